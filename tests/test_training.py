"""Training core on one device: loss, gradients, the optimizer step, accumulation, data
order, early stopping, metrics/checkpoints and clear errors. References are independent:
numpy log-softmax, central finite differences, a hand-written AdamW in numpy."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_training import assert_tensorboard_matches_jsonl, synthetic_table, tiny_split

from jax_ensemble.config import load_config
from jax_ensemble.core.losses import weighted_cross_entropy
from jax_ensemble.core.trees import stack_trees, unstack_tree
from jax_ensemble.data.tables import batch_indices, take_batch
from jax_ensemble.errors import ConfigError, TrainingError
from jax_ensemble.models.classification import label_logits
from jax_ensemble.models.lora import merge_lora
from jax_ensemble.training.engine import (
    Evaluator,
    adapter_training,
    early_stopping_update,
    init_state,
    make_optimizer,
    make_train_step,
    train,
)
from jax_ensemble.training.losses import classification_loss, classification_objective
from jax_ensemble.training.mesh import make_mesh
from jax_ensemble.training.settings import MeshConfig, TrainingConfig


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)).astype(np.float32)
    label = np.array([0, 2, 1, 1, 0], np.int32)
    weight = np.array([1, 1, 0, 0.5, 1], np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -(weight * log_p[np.arange(5), label]).sum()
    loss_sum, weight_sum = weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(label), jnp.asarray(weight))
    np.testing.assert_allclose(float(loss_sum), expected, rtol=1e-6)
    assert float(weight_sum) == pytest.approx(3.5)


def test_lora_gradient_matches_finite_differences():
    """<∇L, v> against (L(θ+εv) − L(θ−εv)) / 2ε along a random direction v (float32:
    relative tolerance 2e-2)."""
    graphdef, lora, base = tiny_split()
    batch = take_batch(synthetic_table(8), np.arange(8))
    batch = {k: jnp.asarray(v[0]) for k, v in batch.items()}
    loss_fn = classification_loss(graphdef)

    @jax.jit
    def mean_loss(params):
        total, weight = loss_fn(params, base, batch, None)
        return total / weight

    grads = jax.jit(jax.grad(mean_loss))(lora)
    leaves, treedef = jax.tree.flatten(lora)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    direction = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    eps = 1e-3
    shifted = lambda s: jax.tree.map(lambda p, v: p + s * eps * v, lora, direction)  # noqa: E731
    numeric = (float(mean_loss(shifted(1.0))) - float(mean_loss(shifted(-1.0)))) / (2 * eps)
    assert abs(analytic) > 1e-3
    assert numeric == pytest.approx(analytic, rel=2e-2)


def _hand_adamw(params, grads_fn, steps, lr_fn, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, clip=0.0, to_init=0.0):
    """AdamW with bias correction, decoupled weight decay (toward 0: ``wd``; toward the
    start: ``to_init``) and global-norm clipping, in numpy."""
    start = params.copy()
    m = np.zeros_like(params)
    v = np.zeros_like(params)
    for t in range(steps):
        g = grads_fn(params)
        norm = np.sqrt((g * g).sum())
        if clip and norm > clip:
            g = g * clip / norm
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1 ** (t + 1))
        v_hat = v / (1 - b2 ** (t + 1))
        lr = lr_fn(t)
        params = params - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * params + to_init * (params - start))
    return params


@pytest.mark.parametrize("to_init", [0.0, 0.7])
def test_train_step_matches_hand_written_adamw_on_a_quadratic(to_init):
    """loss = Σ_i w_i·½‖θ − x_i‖² / Σ w_i; warm-up 2 then cosine to 0 over 6 steps; clipping 0.5;
    weight decay 0.1 (and 0.7 toward the start θ0 ≠ 0); 2 micro-batches. Reference: numpy
    AdamW (relative tolerance 1e-5)."""
    config = TrainingConfig(learning_rate=0.1, warmup_steps=2, max_steps=6, batch_size=4,
                            grad_accum_steps=2, max_grad_norm=0.5, weight_decay=0.1, l2_to_init=to_init)
    start = np.array([0.3, -0.2, 0.5], np.float32)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(4, 3)).astype(np.float32)
    weights = np.array([1.0, 2.0, 0.5, 1.5], np.float32)

    def loss_fn(params, frozen, batch, key):
        per_row = 0.5 * jnp.sum((params["theta"] - batch["x"]) ** 2, axis=-1)
        return jnp.sum(batch["weight"] * per_row), jnp.sum(batch["weight"])

    optimizer = make_optimizer(config, config.max_steps)
    step = jax.jit(make_train_step(loss_fn, optimizer, seed=0, dropout=False))
    state = init_state({"theta": jnp.asarray(start)}, optimizer)
    batch = {"x": jnp.asarray(xs.reshape(2, 2, 3)), "weight": jnp.asarray(weights.reshape(2, 2))}
    for _ in range(config.max_steps):
        state, _ = step(state, None, batch)

    def lr_fn(t):
        if t < 2:
            return 0.1 * t / 2
        return 0.1 * 0.5 * (1 + math.cos(math.pi * (t - 2) / 4))

    grads_fn = lambda p: (weights[:, None] * (p[None] - xs)).sum(0) / weights.sum()  # noqa: E731
    expected = _hand_adamw(start.astype(np.float64), grads_fn, 6, lr_fn, wd=0.1, clip=0.5, to_init=to_init)
    # float32 against float64: 1e-5 of the parameters' scale (a component passing near 0 keeps its
    # absolute float32 error, ~2e-6 here)
    np.testing.assert_allclose(np.asarray(state.lora["theta"]), expected, rtol=1e-5, atol=1e-5)
    assert int(state.step) == 6


def test_frozen_lora_a_keeps_its_initialisation_and_has_no_optimizer_state():
    """``train_lora_a: false`` (LoRA-FA): every A leaf ends bitwise at its init, B trains, and
    the optimizer holds Adam moments for the B leaves only."""
    graphdef, lora, base = tiny_split()
    table = synthetic_table(16)
    config = TrainingConfig(learning_rate=5e-2, warmup_steps=0, max_steps=4, batch_size=8, train_lora_a=False)
    result = train(classification_objective(graphdef), lora, base, table, config, make_mesh(MeshConfig()), seeds=[0],
                   progress=False)
    paths = lambda tree: {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}  # noqa: E731
    before, after = paths(lora), paths(result.lora)
    assert any("lora_a" in k for k in before) and any("lora_b" in k for k in before)
    for k in before:
        moved = not np.array_equal(np.asarray(before[k]), np.asarray(after[k]))
        assert moved == ("lora_b" in k), k
    optimizer = make_optimizer(config, 4)
    state_floats = sum(x.size for x in jax.tree.leaves(optimizer.init(lora)) if x.ndim > 0)
    b_floats = sum(x.size for k, x in before.items() if "lora_b" in k)
    assert state_floats == 2 * b_floats  # Adam's m and v for B only
    full = make_optimizer(TrainingConfig(), 4)
    assert sum(x.size for x in jax.tree.leaves(full.init(lora)) if x.ndim > 0) == 2 * sum(x.size for x in before.values())


def test_recipe_options_enter_fingerprints_only_when_set():
    """Adapters checkpointed before l2_to_init / train_lora_a existed keep their fingerprint."""
    plain = TrainingConfig().identity()
    assert "l2_to_init" not in plain and "train_lora_a" not in plain and plain["learning_rate"] == 5e-4
    assert TrainingConfig(l2_to_init=0.1).identity()["l2_to_init"] == 0.1
    assert TrainingConfig(train_lora_a=False).identity()["train_lora_a"] is False


def test_gradient_accumulation_equals_full_batch():
    """4 micro-batches of 2 rows give the 8-row batch's update (atol 1e-6)."""
    graphdef, lora, base = tiny_split()
    table = synthetic_table(8)
    results = []
    for accum in (1, 4):
        config = TrainingConfig(learning_rate=1e-2, warmup_steps=0, max_steps=1, batch_size=8, grad_accum_steps=accum)
        optimizer = make_optimizer(config, 1)
        step = jax.jit(make_train_step(classification_loss(graphdef), optimizer, seed=0, dropout=False))
        batch = {k: jnp.asarray(v) for k, v in take_batch(table, np.arange(8), accum).items()}
        state, metrics = step(init_state(lora, optimizer), base, batch)
        results.append((jax.tree.leaves(state.lora), float(metrics["loss"])))
    for a, b in zip(results[0][0], results[1][0]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-6)


def test_data_order_is_a_seeded_permutation_per_epoch():
    rows, batch = 10, 4
    order = np.concatenate([batch_indices(rows, batch, seed=3, step=s) for s in range(5)])
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
    assert np.array_equal(order, np.concatenate([batch_indices(rows, batch, 3, s) for s in range(5)]))
    assert not np.array_equal(order[:10], np.concatenate([batch_indices(rows, batch, 4, s) for s in range(3)])[:10])


def test_early_stopping_rule():
    assert early_stopping_update(math.inf, 0, 1.0) == (True, 1.0, 0)
    assert early_stopping_update(1.0, 0, 1.0) == (False, 1.0, 1)
    assert early_stopping_update(1.0, 1, 0.5) == (True, 0.5, 0)


def test_train_logs_checkpoints_stops_early_and_resumes(tmp_path):
    """Validation rows are the training rows with flipped labels, so validation loss rises
    as training fits: training stops after `patience` evaluations without improvement and
    returns the best adapter. Every per-step scalar of metrics.jsonl is also in TensorBoard's
    event files. Re-running in the same directory resumes at the end."""
    graphdef, lora, base = tiny_split()
    table = synthetic_table(32)
    flipped = dict(table, label=1 - table["label"])
    config = TrainingConfig(learning_rate=5e-2, warmup_steps=0, max_steps=40, batch_size=8,
                            eval_every=2, patience=2, checkpoint_every=2, keep_last=2)
    mesh = make_mesh(MeshConfig())
    objective = classification_objective(graphdef)
    result = train(objective, lora, base, table, config, mesh, seeds=[0], validation=flipped, run_dir=tmp_path,
                   progress=False)
    assert result.stopped_early and result.step < 40
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, result.step + 1))
    assert {"loss", "grad_norm", "learning_rate", "seconds"} <= set(records[0])
    val = [r["val_loss"] for r in records if "val_loss" in r]
    best = min(range(len(val)), key=val.__getitem__)
    assert len(val) - 1 - best == 2
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [result.step - 2, result.step]
    assert_tensorboard_matches_jsonl(tmp_path)
    # the returned (best) adapter's validation logits come back from its evaluation, bitwise
    # what the same evaluation program gives on the same rows, in table order
    evaluator = Evaluator(objective, base, mesh, config.eval_batch_size)
    np.testing.assert_array_equal(result.validation_logits, evaluator(result.lora, flipped)["logits"])
    direct = np.asarray(label_logits(merge_lora(graphdef, result.lora, base), {k: jnp.asarray(v) for k, v in flipped.items()}))
    np.testing.assert_allclose(result.validation_logits, direct, rtol=1e-4, atol=1e-4)
    again = train(objective, lora, base, table, config, mesh, seeds=[0], validation=flipped, run_dir=tmp_path,
                  progress=False)
    assert again.validation_logits is None  # restored at the end: nothing evaluated in this call
    assert again.step == result.step and again.checkpoint == result.checkpoint
    for a, b in zip(jax.tree.leaves(result.lora), jax.tree.leaves(again.lora)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert_tensorboard_matches_jsonl(tmp_path)  # resuming at the end adds nothing
    with pytest.raises(Exception, match="different run"):
        train(objective, lora, base, table, TrainingConfig(**{**config.__dict__, "learning_rate": 1e-3}), mesh,
              seeds=[0], validation=flipped, run_dir=tmp_path, progress=False)


def test_equal_budget_gives_every_adapter_of_a_job_the_single_adapters_steps():
    """A group with a third of the job's 48 rows trains ceil(48 / 8) = 6 steps under
    ``budget: equal`` (the all-rows adapter's count), 2 under ``epochs``; an explicit
    ``max_steps`` wins under both."""
    graphdef, lora, base = tiny_split()
    group = synthetic_table(16)
    for budget, steps in (("epochs", 2), ("equal", 6)):
        config = adapter_training(TrainingConfig(budget=budget, warmup_steps=0, batch_size=8), job_rows=48)
        result = train(classification_objective(graphdef), lora, base, group, config, make_mesh(MeshConfig()),
                       seeds=[0], progress=False)
        assert result.step == len(result.history) == steps, budget
    assert adapter_training(TrainingConfig(budget="equal", max_steps=3), job_rows=48).max_steps == 3
    with pytest.raises(ConfigError, match="training.budget must be one of epochs, equal"):
        TrainingConfig(budget="converge")


def test_stacked_members_keep_their_own_best_adapter_and_stop_together(tmp_path):
    """Two stacked members (different LoRA initialisation and data order), validation after
    every step, patience 2. Each member's returned adapter is exactly the adapter it had
    at its own lowest validation loss (recorded after every step through ``on_step``),
    and a numpy cross-entropy of the model's label logits with that adapter reproduces
    the logged minimum. The members peak at different steps, and training stops at the
    first step at which every member (not just one) has gone ``patience`` evaluations
    without improving. TensorBoard shows each member's curves."""
    graphdef, lora, base = tiny_split()
    other = tiny_split(seed=1)[1]  # another random adapter of the same structure
    table, validation = synthetic_table(32), synthetic_table(16, seed=1)
    config = TrainingConfig(learning_rate=3e-2, warmup_steps=0, max_steps=16, batch_size=8, eval_every=1,
                            patience=2, eval_batch_size=16)
    seen = {}

    def record(step, state):
        seen[step] = unstack_tree(jax.device_get(state.lora))

    result = train(classification_objective(graphdef), stack_trees([lora, other]), base, table, config,
                   make_mesh(MeshConfig()), seeds=[0, 5], stacked=True, validation=validation, progress=False,
                   on_step=record, run_dir=tmp_path)
    assert [r["step"] for r in result.history] == list(range(1, result.step + 1)) == sorted(seen)
    assert_tensorboard_matches_jsonl(tmp_path)  # one curve per member (loss/member_0, loss/member_1, ...)
    val = np.array([r["val_loss"] for r in result.history])  # (steps, M): one evaluation per step
    best = np.argmin(val, axis=0)  # first minimum: a tie is no improvement

    def exhausted(evaluations: int, m: int) -> bool:
        """Member m has gone `patience` evaluations without a new minimum after `evaluations`."""
        return evaluations - 1 - int(np.argmin(val[:evaluations, m])) >= config.patience

    stop = next(s for s in range(1, len(val) + 1) if all(exhausted(s, m) for m in range(2)))
    assert result.stopped_early and result.step == stop < config.max_steps
    assert best[0] != best[1], "the members must peak at different steps for this test to discriminate"
    assert any(exhausted(s, m) for s in range(1, stop) for m in range(2)), "one member must wait for the other"
    batch = {k: jnp.asarray(v) for k, v in validation.items()}
    for m, member in enumerate(unstack_tree(jax.device_get(result.lora))):
        for got, expected in zip(jax.tree.leaves(member), jax.tree.leaves(seen[int(best[m]) + 1][m])):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
        logits = np.asarray(label_logits(merge_lora(graphdef, member, base), batch), np.float64)
        log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        nll = -log_p[np.arange(len(logits)), validation["label"]].mean()
        assert nll == pytest.approx(val[best[m], m], rel=1e-5)
        if best[m] + 1 < result.step:  # a member that went on training after its best kept the best
            last = seen[result.step][m]
            assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(member), jax.tree.leaves(last)))
    assert min(best) + 1 < result.step


def test_non_finite_loss_is_a_clear_error():
    graphdef, lora, base = tiny_split()
    table = synthetic_table(8)
    table["weight"] = np.full(8, np.nan, np.float32)
    config = TrainingConfig(max_steps=2, batch_size=8)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 1"):
        train(classification_objective(graphdef), lora, base, table, config, make_mesh(MeshConfig()), seeds=[0],
              progress=False)
    with pytest.raises(TrainingError, match="one adapter trains with one seed, got 2"):
        train(classification_objective(graphdef), lora, base, synthetic_table(8), config, make_mesh(MeshConfig()),
              seeds=[0, 1], progress=False)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["training.learning_rate=0"], "training.learning_rate must be > 0"),
        (["training.learning_rate=-1e-3"], "training.learning_rate must be > 0"),
        (["training.no_such_key=1"], "unknown config key 'training.no_such_key'"),
        (["mesh.data=3", "training.batch_size=8"], "not divisible by the mesh's data axes"),
        (["mesh.data=2", "mesh.fsdp=2", "training.batch_size=8", "training.grad_accum_steps=4"],
         "not divisible by the mesh's data axes"),
        (["training.batch_size=6", "training.grad_accum_steps=4"], "not divisible by training.grad_accum_steps"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one of"),
        (["training.l2_to_init=-0.1"], "training.l2_to_init must be >= 0"),
    ],
)
def test_bad_config_is_one_clear_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_config(None, overrides)
    assert "\n" not in str(info.value)


def test_mesh_that_does_not_fit_the_devices_is_a_clear_error():
    with pytest.raises(ConfigError, match="devices"):
        make_mesh(MeshConfig(data=2 * len(jax.devices())))


def test_int8_training_does_not_keep_float_copies_of_the_base():
    """The compiled train step's temporaries for an int8 base stay at the float32 base's
    level: the layer scan must not stack dequantized kernels as backward residuals
    (which would add ~4 bytes per base weight)."""
    from flax import nnx

    from jax_ensemble.models import LlamaConfig, LlamaForCausalLM
    from jax_ensemble.models.lora import LoRAConfig, apply_lora, split_lora

    wide = LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True)
    batch = {k: jnp.asarray(v) for k, v in take_batch(synthetic_table(2, seq=8), np.arange(2)).items()}
    temps = {}
    for base_dtype in ("int8", "float32"):
        model = LlamaForCausalLM(wide, base_dtype=base_dtype, rngs=nnx.Rngs(0))
        apply_lora(model, LoRAConfig(), jax.random.key(0))
        graphdef, lora, base = split_lora(model)
        optimizer = make_optimizer(TrainingConfig(max_steps=1), 1)
        step = jax.jit(make_train_step(classification_loss(graphdef), optimizer, seed=0, dropout=False))
        compiled = step.lower(init_state(lora, optimizer), base, batch).compile()
        temps[base_dtype] = compiled.memory_analysis().temp_size_in_bytes
    float_weights = 2 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512) * 4
    assert temps["int8"] < temps["float32"] + 0.25 * float_weights, temps
