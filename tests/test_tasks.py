"""Tasks layer on data the tests write: splits, local files, the superglue10 code path on a
local mirror, batching, zero-shot against a plain per-example loop, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from jax_ensemble.cli import main
from jax_ensemble.config import TasksConfig, load_config
from jax_ensemble.data import SUITES, load_suite, load_task, render_prompt
from jax_ensemble.data.batching import bucket_lengths, label_scoring, label_token_ids, tokenize_split
from jax_ensemble.data.splits import scaled_sizes, split_indices, stratified_order
from jax_ensemble.data.tables import eval_batches, table_of_splits
from jax_ensemble.errors import ConfigError, DataError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_spec(directory: Path, rows: list[dict] | None = None, **overrides) -> Path:
    """A sentiment task spec over a JSONL file (30 negative, 20 positive rows unless ``rows``)."""
    rows = rows if rows is not None else [
        {"text": f"review number {i} " + ("awful" if i < 30 else "great"), "stars": 1 if i < 30 else 5}
        for i in range(50)
    ]
    write_jsonl(directory / "reviews.jsonl", rows)
    spec = {
        "name": "stars",
        "template": "Review: {text}\nSentiment:",
        "label_field": "stars",
        "label_words": {"negative": " negative", "positive": " positive"},
        "label_values": [1, 5],
        "data": "reviews.jsonl",
        "license": "CC0",
    }
    spec.update(overrides)
    spec = {k: v for k, v in spec.items() if v is not None}
    path = directory / "stars.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


SMALL = TasksConfig(train_size=20, validation_size=10, test_size=10)


# --- splits ------------------------------------------------------------------------------

def test_stratified_order_interleaves_classes_by_hand():
    # class 0 keys (r+.5)/6 = 1/12, 3/12, ..., 11/12; class 1 keys (r+.5)/3 = 2/12, 6/12, 10/12
    labels = [0] * 6 + [1] * 3
    for seed in (0, 1, 7):
        order = stratified_order(labels, seed)
        assert sorted(order) == list(range(9))
        assert [labels[i] for i in order] == [0, 1, 0, 0, 1, 0, 0, 1, 0]


def test_split_indices_sizes_stratification_and_disjointness():
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    plan = split_indices({"all": labels}, {"train": 50, "validation": 20, "test": 20}, seed=3, salt="t")
    train, val, test = (plan[s][1] for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (50, 20, 20)
    assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
    # each slice of the interleaved order holds the 6:3:1 proportions within one example
    for idx, n in ((train, 50), (val, 20), (test, 20)):
        counts = np.bincount(labels[idx], minlength=3)
        assert np.all(np.abs(counts - n * np.array([0.6, 0.3, 0.1])) <= 1), counts
    again = split_indices({"all": labels}, {"train": 50, "validation": 20, "test": 20}, seed=3, salt="t")
    other = split_indices({"all": labels}, {"train": 50, "validation": 20, "test": 20}, seed=4, salt="t")
    assert np.array_equal(again["train"][1], train)
    assert not np.array_equal(other["train"][1], train)


def test_sizes_scale_down_when_a_pool_is_small():
    assert scaled_sizes([200, 50, 100], 1000) == [200, 50, 100]
    assert scaled_sizes([200, 50, 100], 70) == [40, 10, 20]
    assert scaled_sizes([50, 100], 56) == [18, 37]
    plan = split_indices({"train": [0, 1] * 20, "heldout": [0, 1] * 5},
                         {"train": 30, "validation": 10, "test": 10}, seed=0)
    assert plan["train"][0] == "train" and len(plan["train"][1]) == 30
    assert plan["validation"][0] == plan["test"][0] == "heldout"
    assert len(plan["validation"][1]) == 5 and len(plan["test"][1]) == 5
    assert not set(plan["validation"][1]) & set(plan["test"][1])


# --- local files ---------------------------------------------------------------------------

def test_local_jsonl_task_round_trips(tmp_path):
    task = load_task(str(write_spec(tmp_path)), SMALL)
    assert task.num_classes == 2 and task.spec.class_names == ("negative", "positive")
    assert [len(task.split(s)) for s in ("train", "validation", "test")] == [20, 10, 10]
    texts = {s: set(task.split(s)["text"]) for s in ("train", "validation", "test")}
    assert not (texts["train"] & texts["validation"] or texts["train"] & texts["test"])
    # 30:20 class ratio kept in train: 12 negative, 8 positive
    assert np.bincount(task.split("train")["label"]).tolist() == [12, 8]
    for row in task.split("train"):
        assert row["label"] == (0 if "awful" in row["text"] else 1)
        assert render_prompt(task.spec, row) == f"Review: {row['text']}\nSentiment:"
    assert task.summary()["license"] == "CC0" and "all_sha256" in task.summary()["provenance"]
    assert task.summary()["available"] == 50


def test_local_csv_train_and_heldout_files(tmp_path):
    (tmp_path / "train.csv").write_text("sentence,label\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(40)))
    (tmp_path / "dev.csv").write_text("sentence,label\n" + "".join(f"d{i},{'ab'[i % 2]}\n" for i in range(12)))
    spec = tmp_path / "t.json"
    spec.write_text(json.dumps({"name": "ab", "template": "{sentence} ->", "label_words": {"a": " a", "b": " b"},
                                "data": {"train": "train.csv", "heldout": "dev.csv"}}))
    task = load_task(str(spec), SMALL)
    assert all(t.startswith("s") for t in task.split("train")["sentence"])
    assert all(t.startswith("d") for t in [*task.split("validation")["sentence"], *task.split("test")["sentence"]])
    assert (len(task.split("validation")), len(task.split("test"))) == (6, 6)  # 12 held out for 10 + 10


def test_user_suite_yaml_mixes_spec_paths(tmp_path):
    spec = write_spec(tmp_path / "a")
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": [str(spec.relative_to(tmp_path))]}))
    (task,) = load_suite(TasksConfig(suite=str(suite), train_size=20, validation_size=10, test_size=10))
    assert task.name == "stars"


# --- superglue10: same code path as the hub, on local files in the hub's schema -----------

def superglue_rows(task: str, i: int) -> dict:
    """One row of ``task`` in its Hugging Face hub schema."""
    y = i % 2
    rows = {
        "cb": {"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3, "idx": i},
        "rte": {"premise": f"p{i}", "hypothesis": f"h{i}", "label": y, "idx": i},
        "copa": {"premise": f"p{i}", "choice1": f"c{i}", "choice2": f"d{i}", "question": "cause", "label": y,
                 "idx": i},
        "wic": {"word": "bank", "sentence1": f"s{i}", "sentence2": f"t{i}", "start1": 0, "start2": 0, "end1": 4,
                "end2": 4, "label": y, "idx": i},
        "wsc.fixed": {"text": f"text {i}", "span1_index": 0, "span2_index": 2, "span1_text": "Tom",
                      "span2_text": "he", "label": y, "idx": i},
        "boolq": {"question": f"q{i}", "passage": f"p{i}", "label": y, "idx": i},
        "multirc": {"paragraph": f"p{i}", "question": f"q{i}", "answer": f"a{i}", "label": y,
                    "idx": {"paragraph": 0, "question": i, "answer": 0}},
        "winogrande": {"sentence": f"s{i} _ .", "option1": "A", "option2": "B", "answer": str(y + 1)},
        "story_cloze": {"story_id": str(i), **{f"input_sentence_{k}": f"s{k}" for k in range(1, 5)},
                        "sentence_quiz1": f"e{i}", "sentence_quiz2": f"f{i}", "answer_right_ending": y + 1},
        "hellaswag": {"ind": i, "activity_label": "x", "ctx_a": "a", "ctx_b": "b", "ctx": f"ctx {i}",
                      "endings": [f"e{i}{k}" for k in range(4)], "source_id": "s", "split": "train",
                      "split_type": "indomain", "label": str(i % 4)},
    }
    return rows[task]


def test_superglue10_loads_from_a_local_mirror_in_hub_schema(tmp_path):
    splits = {"story_cloze": ("validation", "test")}
    for task in SUITES["superglue10"]:
        for split, n in zip(splits.get(task, ("train", "validation")), (40, 16)):
            write_jsonl(tmp_path / task / f"{split}.jsonl", [superglue_rows(task, i) for i in range(n)])
    config = TasksConfig(suite="superglue10", hub_mirror=str(tmp_path), train_size=20, validation_size=8,
                         test_size=8)
    tasks = {t.name: t for t in load_suite(config)}
    assert list(tasks) == list(SUITES["superglue10"]) and len(tasks) == 10
    assert all(len(t.split("train")) == 20 and len(t.split("validation")) == 8 for t in tasks.values())
    row = tasks["hellaswag"].split("train")[0]
    assert row["label"] == int(superglue_rows("hellaswag", int(row["ind"]))["label"])
    assert f"D) e{row['ind']}3" in render_prompt(tasks["hellaswag"].spec, row)
    row = tasks["winogrande"].split("train")[0]
    assert row["label"] == int(row["answer"]) - 1
    row = tasks["cb"].split("validation")[0]
    assert render_prompt(tasks["cb"].spec, row).startswith(f"{row['premise']}\nQuestion: {row['hypothesis']}")
    assert tasks["cb"].spec.label_words[row["label"]] == [" True", " False", " Neither"][row["idx"] % 3]


def test_unreachable_hub_is_one_clear_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "jax_ensemble.cli", "data", "show", "rte"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not load 'aps/super_glue'") and "tasks.hub_mirror" in lines[-1]
    assert "Traceback" not in proc.stderr


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("rows", "overrides", "message"),
    [
        (None, {"template": None}, "missing required key 'template'"),
        (None, {"colour": "blue"}, "unknown key 'colour'"),
        (None, {"label_values": [1, 4]}, "has label 5, not one of [1, 4]"),
        (None, {"template": "{body} ->"}, "field 'body' is missing"),
        ([{"text": "a", "stars": 1}] * 40, {}, "single class"),
        (None, {"label_words": {"neg": " n", "pos": " p", "mid": " m"}, "label_values": [1, 5, 3]},
         "class 'mid' has no training examples"),
        (None, {"label_words": {"neg": " n"}, "label_values": [1]}, "needs at least 2 classes"),
        (None, {"data": "missing.jsonl"}, "does not exist"),
        (None, {"label_values": "15"}, "label_values must be a list"),
        (None, {"label_words": [" n", " p"]}, "label_words must map each class name"),
    ],
)
def test_bad_task_specs_are_one_line_data_errors(tmp_path, rows, overrides, message):
    with pytest.raises(DataError) as err:
        load_task(str(write_spec(tmp_path, rows, **overrides)), SMALL)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_empty_data_and_empty_split(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match=f"data file {tmp_path / 'empty.jsonl'} is empty$"):
        load_task(str(write_spec(tmp_path, data="empty.jsonl")), SMALL)
    rows = [{"text": f"t{i}", "stars": [1, 5][i % 2]} for i in range(4)]
    with pytest.raises(DataError, match="split is empty"):
        load_task(str(write_spec(tmp_path, rows)), TasksConfig(train_size=100, validation_size=1, test_size=1))


@pytest.mark.parametrize(("text", "message"), [
    ('{"text": "a", "stars": 1}\n\n{"text": "b", "stars": 5\n', "line 3: not valid JSON (Expecting ',' delimiter, column 25)"),
    ('{"text": "a", "stars": 1}\n[1, 5]\n', "line 2: each line must be a JSON object, got list"),
])
def test_malformed_jsonl_names_the_file_and_line(tmp_path, text, message):
    (tmp_path / "rows.jsonl").write_text(text)
    with pytest.raises(DataError) as err:
        load_task(str(write_spec(tmp_path, data="rows.jsonl")), SMALL)
    assert str(err.value) == f"data file {tmp_path / 'rows.jsonl'}, {message}"


def test_yaml_errors_keep_line_and_column(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("name: t\ntemplate: '{text}\n")
    with pytest.raises(DataError, match=r"is not valid YAML: line 3, column 1: found unexpected end of stream"):
        load_task(str(bad), SMALL)
    (tmp_path / "config.yaml").write_text("name: x\nseed: [1\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: line 3, column 1: expected ',' or '\]'"):
        load_config(tmp_path / "config.yaml")


def test_unknown_task_and_suite():
    with pytest.raises(DataError, match="unknown task 'nope'"):
        load_task("nope", SMALL)
    with pytest.raises(DataError, match="unknown suite 'nope10'"):
        load_suite(TasksConfig(suite="nope10"))


@pytest.mark.parametrize("argv", [["data", "show", "no_such_task"], ["data", "list", "--suite", "nope"],
                                  ["data", "list", "tasks.train_size=0"], ["evaluate"],
                                  ["data", "show", "rt_polarity", "-n", "-5"],
                                  ["generate", "--model", "smollm2-135m", "--max-new-tokens", "0", "hi"]])
def test_cli_bad_input_exits_2_with_one_line(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


# --- batching and zero-shot on a tiny model --------------------------------------------------

def test_bucket_lengths():
    assert bucket_lengths(128) == (32, 64, 128)
    assert bucket_lengths(100) == (32, 64, 100)
    assert bucket_lengths(16) == (16,)


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_dir):
    from jax_ensemble.models import load_pretrained

    return load_pretrained(str(tiny_hf_dir))


def tiny_task(tmp_path: Path, label_words: dict | None = None):
    # three prompt lengths (one short, two truncated at 40 tokens): few compiled shapes for the per-example loop
    rows = [{"text": "t" * [1, 50, 150][i % 3], "stars": [1, 5][i % 2]} for i in range(24)]
    spec = write_spec(tmp_path, rows, label_words=label_words or {"no": "x", "yes": " t"})
    return load_task(str(spec), TasksConfig(train_size=12, validation_size=6, test_size=6))


def test_batches_follow_the_classification_convention(tmp_path, tiny_model):
    _, tok = tiny_model
    task = tiny_task(tmp_path)
    tokenized = tokenize_split(task, "train", tok, max_length=40)
    assert tokenized.truncated > 0
    table = table_of_splits([tokenized], pad_id=tok.pad_id, max_length=40)
    seen = []
    for batch, index in eval_batches(table, batch_size=5):
        b, t = batch["input_ids"].shape
        assert b == 5 and t in (32, 40)
        assert {k: v.dtype.name for k, v in batch.items()} == {
            "input_ids": "int32", "attention_mask": "int32", "answer_position": "int32",
            "label_token_ids": "int32", "label": "int32", "weight": "float32", "task_index": "int32"}
        assert batch["label_token_ids"].shape == (5, 2)
        for row, i in enumerate(index):
            if i < 0:  # a padding row: a weight-0 copy of a real row, so its logits stay finite
                assert batch["weight"][row] == 0 and batch["attention_mask"][row].sum() >= 1
                continue
            full = tok.encode(render_prompt(task.spec, task.split("train")[int(i)]))
            n = int(batch["attention_mask"][row].sum())
            assert batch["answer_position"][row] == n - 1 and batch["weight"][row] == 1
            assert batch["input_ids"][row, :n].tolist() == full[-n:]  # truncated from the left
            assert (batch["input_ids"][row, n:] == tok.pad_id).all()  # right-padded
            assert tok.decode(full[-1:]) == ":"  # the answer position is the prompt's last token
            seen.append(int(i))
    assert sorted(seen) == list(range(12))
    wide = table_of_splits([tokenized], pad_id=tok.pad_id, max_length=40, num_choices=3)
    batch, _ = next(eval_batches(wide, batch_size=5))
    assert batch["label_token_ids"][:, 2].tolist() == [-1] * 5  # a third choice column for mixed-K batches
    assert batch["label_token_ids"][:, :2].tolist() == [label_token_ids(task.spec, tok).tolist()] * 5


def test_label_words_sharing_a_first_token_are_scored_after_it(tmp_path, tiny_model):
    """' no' and ' yes' both start with the byte 'Ġ' in the tiny tokenizer: the shared token is
    appended to every prompt and the classes are scored by the next token, which equals a
    per-example loop over full-vocabulary logits after prompt + 'Ġ'."""
    import jax.numpy as jnp
    from flax import nnx

    from jax_ensemble.stages.zero_shot import jitted_label_logits, split_label_logits

    model, tok = tiny_model
    task = tiny_task(tmp_path, label_words={"no": " no", "yes": " yes"})
    prefix, scored = label_scoring(task.spec, tok)
    words = [tok.encode(w, add_bos=False) for w in task.spec.label_words]
    assert prefix == words[0][:1] == words[1][:1] and scored.tolist() == [words[0][1], words[1][1]]
    tokenized = tokenize_split(task, "train", tok, 40)
    assert all(p[-1:].tolist() == prefix for p in tokenized.prompts)
    batched = split_label_logits(jitted_label_logits(model), tokenized, batch_size=4, max_length=40, pad_id=tok.pad_id,
                                 num_choices=2)
    last_logits = nnx.jit(lambda m, ids: m(ids, logit_positions=jnp.array([ids.shape[1] - 1])))
    reference = np.stack([
        np.asarray(last_logits(model, jnp.array([(tok.encode(render_prompt(task.spec, row)) + prefix)[-40:]])))[0][scored]
        for row in task.split("train")])
    np.testing.assert_allclose(batched, reference, rtol=1e-4, atol=1e-4)


def test_zero_shot_matches_a_plain_per_example_loop(tmp_path, tiny_model):
    import jax.numpy as jnp
    from flax import nnx

    from jax_ensemble.stages.zero_shot import evaluate_zero_shot, jitted_label_logits, split_label_logits

    model, tok = tiny_model
    task = tiny_task(tmp_path)
    (result,) = evaluate_zero_shot(model, tok, [task], split="train", batch_size=4, max_length=40, progress=False)
    batched = split_label_logits(jitted_label_logits(model), tokenize_split(task, "train", tok, 40),
                                 batch_size=4, max_length=40, pad_id=tok.pad_id, num_choices=5)
    words = [tok.encode(w)[0] for w in task.spec.label_words]
    last_logits = nnx.jit(lambda m, ids: m(ids, logit_positions=jnp.array([ids.shape[1] - 1])))
    reference = []
    for row in task.split("train"):  # one unpadded example at a time, full-vocabulary logits
        ids = tok.encode(render_prompt(task.spec, row))[-40:]
        reference.append(np.asarray(last_logits(model, jnp.array([ids])))[0][words])
    reference = np.stack(reference)
    np.testing.assert_allclose(batched, reference, rtol=1e-4, atol=1e-4)
    labels = np.asarray(task.split("train")["label"])
    assert result["examples"] == 12
    assert result["accuracy"] == pytest.approx(np.mean(reference.argmax(1) == labels))
    assert result["prediction_counts"] == np.bincount(reference.argmax(1), minlength=2).tolist()


def test_cli_evaluate_zero_shot_json_on_a_user_suite(tmp_path, tiny_hf_dir, capsys):
    tiny_task(tmp_path)  # writes stars.yaml
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": ["stars.yaml"]}))
    argv = ["evaluate", "--zero-shot", "--suite", str(suite), "--json", f"model.source={tiny_hf_dir}",
            "model.base_dtype=float32", "tasks.train_size=12", "tasks.validation_size=6", "tasks.test_size=6",
            "tasks.max_length=40", "tasks.batch_size=4"]
    assert main(argv) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["task"] == "stars" and result["examples"] == 6 and 0.0 <= result["accuracy"] <= 1.0


def test_cli_evaluate_zero_shot_on_a_2x2x2_mesh_equals_one_device(tmp_path, tiny_hf_dir):
    """8 fake CPU devices: the model loaded into the partition rules' shardings, rows over
    data x fsdp; the per-task results equal one device's (accuracy, prediction counts)."""
    from test_cli import cli

    tiny_task(tmp_path)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": ["stars.yaml"]}))
    argv = ["evaluate", "--zero-shot", "--split", "train", "--suite", str(suite), "--json",
            f"model.source={tiny_hf_dir}", "tasks.train_size=12", "tasks.validation_size=6", "tasks.test_size=6",
            "tasks.max_length=40", "tasks.batch_size=8"]
    results = []
    for devices, mesh in ((1, []), (8, ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])):
        out = cli(*argv, *mesh, env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                                     "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads(out.stdout)[0])
    for key in ("accuracy", "prediction_counts", "examples"):
        assert results[1][key] == results[0][key], key


def test_cli_data_show_local_spec_with_overrides_after_options(tmp_path, capsys):
    spec = write_spec(tmp_path)
    assert main(["data", "show", str(spec), "-n", "2", "--split", "test", "--json", "tasks.test_size=4",
                 "tasks.train_size=20", "tasks.validation_size=10"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["test"] == 4 and len(shown["examples"]) == 2
    assert all(e["prompt"].startswith("Review: review number") and e["answer"] in (" negative", " positive")
               for e in shown["examples"])
    with pytest.raises(SystemExit) as usage_error:  # argparse's usage error, status 2
        main(["data", "show", str(spec), "-n", "2", "--bogus"])
    assert usage_error.value.code == 2
