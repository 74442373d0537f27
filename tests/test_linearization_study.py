"""The linearization-error study on a tiny transformers-written Llama and two local tasks:
the weight distance against a dense dequantized computation, and every reported number of
the CLI's run recomputed independently: the adapters the study measured (captured from
the training engine's ``on_step``) are run through the merged model for f, an explicit
``jax.jvp`` of our own gives f_lin, and the errors, accuracies and weight distances follow
from their definitions in numpy."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_gradient_stage import write_suite

import jax_ensemble.stages.linearization_study as study
from jax_ensemble.cli import main
from jax_ensemble.config import load_config
from jax_ensemble.data import load_suite, tokenize_split
from jax_ensemble.data.tables import table_of_splits
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.llama.modeling import LlamaConfig, LlamaForCausalLM
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.lora import LoRAConfig, apply_lora, merge_lora, split_lora
from jax_ensemble.models.quantization import dequantize_int8
from jax_ensemble.stages.linearization_study import lora_weight_distance


def dense_weight_distance(model, modules, scaling: float) -> float:
    """‖s·AB‖_F / ‖W0‖_F over ``modules`` of ``model``'s stacked layers, from the dense
    dequantized kernels (q·scale per output channel), layer by layer in numpy."""
    delta_sq = base_sq = 0.0
    for name in modules:
        layer = getattr(model.layers.self_attn, name)
        a, b = np.asarray(layer.lora_a[...], np.float64), np.asarray(layer.lora_b[...], np.float64)
        w0 = np.asarray(dequantize_int8(layer.kernel[...], layer.scale[...], reduce_axis=1), np.float64)
        for i in range(a.shape[0]):
            delta_sq += np.sum((scaling * a[i] @ b[i]) ** 2)
            base_sq += np.sum(w0[i] ** 2)
    return float(np.sqrt(delta_sq / base_sq))


def test_weight_distance_matches_dense_delta():
    cfg = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = LlamaForCausalLM(cfg, base_dtype="int8", rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=2, alpha=6.0, target_modules=r".*\.(q_proj|v_proj)"), jax.random.key(0))
    for name in ("q_proj", "v_proj"):
        layer = getattr(model.layers.self_attn, name)
        layer.lora_b = nnx.LoRAParam(jax.random.normal(jax.random.key(len(name)), layer.lora_b[...].shape))
    _, lora, base = split_lora(model)
    np.testing.assert_allclose(lora_weight_distance(lora, base, 3.0),
                               dense_weight_distance(model, ("q_proj", "v_proj"), 3.0), rtol=1e-5)
    # from a start (A0, B0) = (A, B) / 2: AB − A0B0 = 0.75 AB; from itself: 0
    half = jax.tree.map(lambda x: x / 2, lora)
    np.testing.assert_allclose(lora_weight_distance(lora, base, 3.0, start=half),
                               0.75 * lora_weight_distance(lora, base, 3.0), rtol=1e-5)
    # float32 rounding of AB − AB: zero to 1e-5 of the distance from the initialisation
    assert lora_weight_distance(lora, base, 3.0, start=lora) <= 1e-5 * lora_weight_distance(lora, base, 3.0)


def _outputs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The studied output: binary log-odds z_gold − z_other, else z_k − z_0 for k = 1…K−1."""
    if logits.shape[1] != 2:
        return jnp.stack([logits[:, k] - logits[:, 0] for k in range(1, logits.shape[1])], axis=1)
    rows = jnp.arange(len(labels))
    return logits[rows, labels] - logits[rows, 1 - labels]


def test_study_reports_match_an_independent_recomputation(tiny_hf_dir, tmp_path, capsys, monkeypatch):
    suite = write_suite(tmp_path)
    overrides = [
        f"run_dir={tmp_path / 'run'}", f"model.source={tiny_hf_dir}", "lora.rank=2", "lora.alpha=8.0",
        f"tasks.suite={suite}", "tasks.train_size=12", "tasks.validation_size=6", "tasks.test_size=4",
        "tasks.max_length=32", "training.batch_size=4", "training.learning_rate=0.01", "training.warmup_steps=0",
        "linearization.tasks=[]", "linearization.steps=[1,0]", "linearization.ranks=[2]",
    ]
    runs = []
    engine_train = study.train

    def spy(objective, lora, base, table, config, mesh, **kwargs):
        """The engine, recording the adapter after every step (what the study measures)."""
        run = {"initial": jax.device_get(lora), "states": {}}
        runs.append(run)
        measure = kwargs.pop("on_step")

        def on_step(step, state):
            run["states"][step] = jax.device_get(state.lora)
            measure(step, state)

        return engine_train(objective, lora, base, table, config, mesh, on_step=on_step, **kwargs)

    monkeypatch.setattr(study, "train", spy)
    assert main(["linearization-error", "--json", *overrides]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["default_training_steps"] == 6  # ceil(1 epoch · 24 rows / 4)
    settings = result["settings"]
    assert [(s["rank"], s["steps"], s["is_default_training_length"]) for s in settings] == [(2, 1, False), (2, 6, True)]
    assert len(runs) == 1 and sorted(runs[0]["states"]) == list(range(1, 7))

    # the same model, adapter initialisation and validation rows, built here
    config = load_config(None, overrides)
    model, tokenizer = load_pretrained(str(tiny_hf_dir), base_dtype="int8")
    apply_lora(model, LoRAConfig(rank=2, alpha=8.0), jax.random.key(config.seed))
    graphdef, lora0, base = split_lora(model)
    for a, b in zip(jax.tree.leaves(lora0), jax.tree.leaves(runs[0]["initial"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    tables = [table_of_splits([tokenize_split(task, "validation", tokenizer, 32)], pad_id=tokenizer.pad_id,
                             max_length=32) for task in load_suite(config.tasks)]
    batches = [{k: jnp.asarray(v) for k, v in t.items()} for t in tables]
    labels = [t["label"] for t in tables]

    @jax.jit
    def f(lora, batch, label):
        return _outputs(label_logits(merge_lora(graphdef, lora, base), batch), label)

    @jax.jit
    def f_lin(lora, batch, label):  # f(θ0) + J(θ0)(θ − θ0), one forward-mode product
        delta = jax.tree.map(jnp.subtract, lora, lora0)
        out0, tangent = jax.jvp(lambda p: f(p, batch, label), (lora0,), (delta,))
        return out0 + tangent

    f0 = [np.asarray(f(lora0, b, y), np.float64) for b, y in zip(batches, labels)]

    def accuracy(outputs):
        hits = [(o > 0) if o.ndim == 1 else (np.where(o.max(1) > 0, o.argmax(1) + 1, 0) == y)
                for o, y in zip(outputs, labels)]
        return float(np.mean(np.concatenate(hits)))

    assert result["accuracy_f0"] == pytest.approx(accuracy(f0), abs=1e-9)
    for s in settings:
        lora = jax.tree.map(jnp.asarray, runs[0]["states"][s["steps"]])
        fs = [np.asarray(f(lora, b, y), np.float64) for b, y in zip(batches, labels)]
        lins = [np.asarray(f_lin(lora, b, y), np.float64) for b, y in zip(batches, labels)]
        every = lambda parts: np.concatenate([p.ravel() for p in parts])  # noqa: E731
        fa, la, za = every(fs), every(lins), every(f0)
        assert s["validation_examples"] == 12
        assert s["relative_output_error"] == pytest.approx(np.sum(np.abs(fa - la)) / np.sum(np.abs(fa - za)),
                                                           rel=1e-3)
        denominator = np.maximum(np.abs(fa), np.abs(za))
        assert s["relative_squared_error"] == pytest.approx(np.mean(((la - fa) / denominator) ** 2), rel=1e-3)
        assert s["accuracy_f"] == pytest.approx(accuracy(fs), abs=1e-9)
        assert s["accuracy_f_lin"] == pytest.approx(accuracy(lins), abs=1e-9)
        merged = merge_lora(graphdef, lora, base)
        assert s["weight_distance"] == pytest.approx(dense_weight_distance(merged, ("q_proj", "k_proj", "v_proj"),
                                                                           8.0 / 2), rel=1e-5)
        assert s["relative_output_error"] > 0 and s["weight_distance"] > 0
    short, full = settings
    assert full["weight_distance"] > short["weight_distance"]
    assert (tmp_path / "run" / "linearization_error.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "linearization_error.json").read_text()) == result
    assert main(["linearization-error", "linearization.steps=[]"]) == 2
