"""The gradient stage on a tiny transformers-written Llama and two local tasks: shard layout,
f0 against a plain evaluation, G against per-example ``jax.grad`` times the dense P,
byte-identical resume after an interrupted run and a corrupt shard, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from jax_ensemble.cli import main
from jax_ensemble.config import config_from_dict
from jax_ensemble.core.projection import lift, make_projector
from jax_ensemble.data import load_suite, tokenize_split
from jax_ensemble.data.tables import eval_batches, table_of_splits
from jax_ensemble.errors import CheckpointError, ConfigError, DataError, NumericalError
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.lora import apply_lora, split_lora
from jax_ensemble.models.lora_gradients import lora_feature_split, lora_output_fn
from jax_ensemble.stages.gradients import _check_finite, gradient_stage, load_gradients


def write_suite(directory: Path) -> Path:
    """Two local tasks: binary (words) and 3-class (digits)."""
    rng = np.random.default_rng(0)
    words = ["good", "bad", "fine", "poor", "great", "awful", "nice", "dull"]
    specs = []
    for name, labels, n in (("polar", {"no": "n", "yes": "y"}, 24), ("three", {"a": "a", "b": "b", "c": "c"}, 30)):
        rows = [{"text": " ".join(rng.choice(words, rng.integers(2, 9))), "label": list(labels)[i % len(labels)]}
                for i in range(n)]
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        spec = {"name": name, "template": "Text: {text}\nAnswer:", "label_words": labels, "data": f"{name}.jsonl"}
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        specs.append(f"{name}.yaml")
    suite = directory / "suite.yaml"
    suite.write_text(yaml.safe_dump({"tasks": specs}))
    return suite


@pytest.fixture(scope="module")
def stage_config(tiny_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage")
    suite = write_suite(root)
    return config_from_dict({
        "run_dir": str(root / "run"),
        "model": {"source": str(tiny_hf_dir), "base_dtype": "int8"},
        "lora": {"rank": 2, "alpha": 8.0},
        "tasks": {"suite": str(suite), "train_size": 12, "validation_size": 6, "test_size": 4, "max_length": 32},
        "gradients": {"dim": 16, "batch_size": 4, "shard_examples": 8, "block_rows": 64},
    })


@pytest.fixture(scope="module")
def stage_dir(stage_config):
    return gradient_stage(stage_config, progress=False)


def test_stage_outputs_match_per_example_reference(stage_config, stage_dir):
    manifest = json.loads((stage_dir / "manifest.json").read_text())
    assert manifest["feature_space"] == "lora_b" and manifest["projector"]["dim"] == 16
    assert [len(t["splits"]["train"]) for t in manifest["tasks"]] == [2, 2]  # 12 rows in shards of 8
    assert manifest["timing"]["timed_shards"] == manifest["timing"]["shards"] == len(list(stage_dir.rglob("*.safetensors")))
    assert manifest["timing"]["seconds"] > 0
    loaded = load_gradients(stage_dir)
    assert loaded["polar"]["train"].grads.shape == (12, 16)
    assert loaded["three"]["validation"].grads.shape == (6, 3, 16)
    assert loaded["three"]["validation"].f0.shape == (6, 3)

    # reference: the model's outputs and a jax.grad per example times the dense P
    cfg = stage_config
    model, tokenizer = load_pretrained(cfg.model.source, base_dtype="int8")
    apply_lora(model, cfg.lora, jax.random.key(cfg.seed))
    graphdef, lora, base = split_lora(model)
    features, fixed, _ = lora_feature_split(lora)
    output = jax.jit(lora_output_fn(graphdef))
    dense = np.concatenate([np.asarray(x).reshape(16, -1) for x in jax.tree.leaves(
        lift(make_projector(features, 16, seed=0, block_rows=64), jnp.eye(16)))], axis=1).T
    grad_one = jax.jit(jax.grad(lambda f, fx, b, x: output(f, fx, b, x)[0]))
    task = load_suite(cfg.tasks)[0]
    tokenized = tokenize_split(task, "train", tokenizer, cfg.tasks.max_length)
    batch, index = next(eval_batches(table_of_splits([tokenized], pad_id=tokenizer.pad_id,
                                                    max_length=cfg.tasks.max_length), 12))
    f0 = np.asarray(output(features, fixed, base, batch))
    got = loaded["polar"]["train"]
    for row in np.flatnonzero(index >= 0)[:4]:
        i = index[row]
        single = {k: v[row:row + 1] for k, v in batch.items()}
        g = np.concatenate([np.asarray(x).ravel() for x in jax.tree.leaves(grad_one(features, fixed, base, single))])
        np.testing.assert_allclose(got.grads[i], g @ dense, rtol=1e-4, atol=1e-4 * np.abs(g @ dense).max())
        np.testing.assert_allclose(got.f0[i], f0[row], rtol=1e-5, atol=1e-5)
        assert got.labels[i] == batch["label"][row]


def test_resume_is_byte_identical(stage_config, stage_dir):
    shards = sorted(stage_dir.rglob("*.safetensors"))
    before = {p: p.read_bytes() for p in shards}
    untouched = shards[0].stat().st_mtime_ns
    shards[1].unlink()  # an interrupted run: a missing shard and no manifest
    (stage_dir / "manifest.json").unlink()
    shards[2].write_bytes(b"corrupt" + before[shards[2]][7:])  # fails its checksum
    assert gradient_stage(stage_config, progress=False) == stage_dir
    assert {p: p.read_bytes() for p in shards} == before
    assert shards[0].stat().st_mtime_ns == untouched  # finished shards are skipped
    assert json.loads((stage_dir / "manifest.json").read_text())["timing"]["timed_shards"] == 2
    manifest = (stage_dir / "manifest.json").read_text()
    (stage_dir / "manifest.json").write_text(manifest[:100])  # truncated: not trusted, rewritten by the stage
    with pytest.raises(CheckpointError, match="no verified manifest.json"):
        load_gradients(stage_dir)
    assert gradient_stage(stage_config, progress=False) == stage_dir
    assert json.loads((stage_dir / "manifest.json").read_text())["tasks"] == json.loads(manifest)["tasks"]
    assert {p: p.read_bytes() for p in shards} == before


def test_bad_input_is_one_clear_error(stage_config, tmp_path, capsys):
    with pytest.raises(NumericalError, match="NaN/inf"):
        _check_finite(np.array([[0.0, np.nan]]), np.zeros(1), "polar", "train", np.array([3]))
    with pytest.raises(ConfigError, match="gradients.dim must be >= 1"):
        config_from_dict({"gradients": {"dim": 0}})
    empty = tmp_path / "empty.yaml"
    empty.write_text(yaml.safe_dump({"tasks": []}))
    with pytest.raises(DataError):
        gradient_stage(config_from_dict({"tasks": {"suite": str(empty)}, "run_dir": str(tmp_path)}), progress=False)
    assert main(["gradients", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert main(["gradients", f"tasks.suite={empty}", f"run_dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.count("\n") == 2


def test_stage_on_a_2x2x2_mesh_equals_one_device(stage_config, stage_dir, tmp_path):
    """The stage with 8 fake devices (examples over data × fsdp, the int8 base split over fsdp
    and tensor by the partition rules) writes the one-device G and f0 (float32 reductions in
    another order: rtol 1e-5)."""
    from test_cli import cli

    from jax_ensemble.config import config_to_dict

    settings = config_to_dict(stage_config)
    settings.update(run_dir=str(tmp_path / "run"), mesh={**settings["mesh"], "data": 2, "fsdp": 2, "tensor": 2})
    (tmp_path / "mesh.yaml").write_text(yaml.safe_dump(settings))
    result = cli("gradients", "--config", str(tmp_path / "mesh.yaml"), "--json",
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
    meshed = Path(json.loads(result.stdout.splitlines()[-1])["directory"])
    assert meshed.name == stage_dir.name  # the mesh is not part of the stage's key
    one, eight = load_gradients(stage_dir), load_gradients(meshed)
    for task in one:
        for split in one[task]:
            np.testing.assert_array_equal(eight[task][split].labels, one[task][split].labels)
            for field in ("grads", "f0"):
                expected = getattr(one[task][split], field)
                np.testing.assert_allclose(getattr(eight[task][split], field), expected, rtol=1e-5,
                                           atol=1e-6 * np.abs(expected).max())
    bad = {**settings, "mesh": {**settings["mesh"], "data": 8, "fsdp": 1, "tensor": 1}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**bad, "gradients": {**settings["gradients"], "batch_size": 4}}))
    result = cli("gradients", "--config", str(tmp_path / "bad.yaml"),
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2 and "gradients.batch_size = 4 does not split over mesh" in result.stderr
    assert "Traceback" not in result.stderr


def test_warm_start_moves_theta0_for_the_gradients_and_is_restored(stage_config, tmp_path):
    """training.warm_start_steps = 3: θ0 is LoRA's initialisation trained 3 steps on every
    task's training rows (the engine on the suite's train table, same seed), B ≠ 0, so the
    gradient stage takes every LoRA leaf as a feature, in its own directory; a second load
    restores θ0 from the checkpoint bit for bit (no training)."""
    import dataclasses

    from jax_ensemble.stages.adapters import suite_tables
    from jax_ensemble.stages.model import load_run_model
    from jax_ensemble.training.engine import train
    from jax_ensemble.training.losses import classification_objective
    from jax_ensemble.training.mesh import make_mesh

    config = dataclasses.replace(
        stage_config, run_dir=str(tmp_path / "warm"),
        training=dataclasses.replace(stage_config.training, warm_start_steps=3, batch_size=4, warmup_steps=0,
                                     learning_rate=0.05))
    warm = load_run_model(config, sanity_check=False)
    cold = load_run_model(dataclasses.replace(config, training=dataclasses.replace(config.training,
                                                                                    warm_start_steps=0)),
                          sanity_check=False)
    names = [t.name for t in load_suite(config.tasks)]
    expected = train(classification_objective(cold.graphdef), cold.lora0, cold.base,
                     suite_tables(config, cold.tokenizer, names, ("train",))["train"],
                     dataclasses.replace(config.training, max_steps=3), make_mesh(config.mesh), seeds=[config.seed],
                     progress=False).lora
    for got, want in zip(jax.tree.leaves(warm.lora0), jax.tree.leaves(expected)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)
    assert lora_feature_split(warm.lora0)[2] == "lora"  # B ≠ 0: A and B are features
    assert (tmp_path / "warm" / "adapters" / "warm-start" / "checkpoints").is_dir()
    again = load_run_model(config, sanity_check=False)
    for got, want in zip(jax.tree.leaves(again.lora0), jax.tree.leaves(warm.lora0)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    directory = gradient_stage(config, progress=False, model=warm)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert directory.name != gradient_stage(dataclasses.replace(
        config, training=dataclasses.replace(config.training, warm_start_steps=0)), progress=False, model=cold).name
    assert manifest["settings"]["warm_start"]["warm_start_steps"] == 3
    assert any("lora_a" in leaf["path"] for leaf in manifest["projector"]["leaves"])
