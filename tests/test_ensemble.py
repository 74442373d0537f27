"""Grouped ensemble: stacked inference = adapter by adapter, convex weights = scipy SLSQP,
ridge = sklearn, boosting lowers the training loss of a weak ensemble (tiny random model)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.optimize import minimize
from sklearn.linear_model import Ridge
from tiny_training import TINY, synthetic_table

from jax_ensemble.core.ensemble import (
    active_calls,
    add_booster,
    boosting_offsets,
    closed_form_step,
    ensemble_loss,
    fit_convex_weights,
    fit_ensemble_weights,
    group_losses,
    linear_boost,
    logit_features,
    make_ensemble,
    prune_weights,
    residuals,
    ridge_fit,
    routed_passes,
)
from jax_ensemble.core.losses import NO_CHOICE_LOGIT
from jax_ensemble.core.projection import make_projector
from jax_ensemble.core.trees import stack_trees, unstack_tree, zeros_like_member
from jax_ensemble.data.tables import eval_batches
from jax_ensemble.errors import ConfigError, DataError, NumericalError, SolverError
from jax_ensemble.models import LlamaForCausalLM
from jax_ensemble.models.lora import LoRAConfig, init_member_adapters, with_zero_b
from jax_ensemble.models.lora_gradients import batch_gradients, lora_feature_split
from jax_ensemble.stages.ensemble import (
    boost,
    boost_closed_form,
    boost_trained,
    ensemble_logits,
    ensemble_table_logits,
    lifted_adapter,
    stacked_label_logits,
    stacked_table_logits,
    table_features,
    table_outputs,
)
from jax_ensemble.stages.gradients import SplitGradients
from jax_ensemble.stages.uq import member_logits_fn
from jax_ensemble.training.losses import boosting_objective, objective_loss
from jax_ensemble.training.mesh import make_mesh
from jax_ensemble.training.settings import MeshConfig, TrainingConfig


@functools.cache
def adapters(count: int = 3):
    """(graphdef, stacked adapters (count, …) with random B, a fresh adapter (B = 0), base)."""
    model = LlamaForCausalLM(TINY, base_dtype="int8", rngs=nnx.Rngs(0))
    graphdef, fresh, base = init_member_adapters(model, LoRAConfig(rank=2, alpha=4.0), list(range(count + 1)))
    leaves, treedef = jax.tree.flatten(fresh)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noisy = jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    members = jax.tree.map(lambda x: x[1:], noisy)
    return graphdef, members, unstack_tree(fresh)[0], base


def two_task_table(rows: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic rows of two tasks: task 0 binary (third choice padded), task 1 three-way."""
    table = synthetic_table(rows, seed=seed, num_classes=3)
    task = (np.arange(rows) % 2).astype(np.int32)
    table["label"] = np.where(task == 0, table["label"] % 2, table["label"]).astype(np.int32)
    table["label_token_ids"] = np.where((task[:, None] == 0) & (np.arange(3) == 2), -1, table["label_token_ids"])
    table["task_index"] = task
    return table


def test_stacked_logits_equal_adapter_by_adapter():
    graphdef, members, _, base = adapters()
    table = two_task_table(7)
    batch = {k: jnp.asarray(v) for k, v in table.items()}
    stacked = np.asarray(stacked_label_logits(graphdef, members, base, batch))
    one = member_logits_fn(graphdef)
    alone = np.stack([np.asarray(one(lora, base, batch, None)) for lora in unstack_tree(members)])
    assert stacked.shape == (3, 7, 3)
    np.testing.assert_allclose(stacked, alone, rtol=1e-5, atol=1e-5)
    assert np.all(stacked[:, table["task_index"] == 0, 2] == NO_CHOICE_LOGIT)
    assert not np.allclose(stacked[0], stacked[1])
    np.testing.assert_allclose(stacked_table_logits(graphdef, members, base, table, batch_size=3), stacked,
                               rtol=1e-5, atol=1e-5)


def test_length_ordered_trimmed_batches_give_the_full_width_logits():
    """eval_batches sorts rows by prompt end and cuts each batch to a bucket (32 / 64 / 80
    here); the outputs, put back in table order, equal one full-width pass."""
    graphdef, members, _, base = adapters()
    table = two_task_table(9)
    lengths = np.array([3, 12, 40, 7, 70, 33, 12, 5, 64])
    width = 80
    ids = np.zeros((9, width), np.int32)
    for r, n in enumerate(lengths):  # right-padded prompts of the given lengths
        ids[r, :n] = np.resize(table["input_ids"][r][table["attention_mask"][r] == 1], n)
    table.update(input_ids=ids, attention_mask=(np.arange(width) < lengths[:, None]).astype(np.int32),
                 answer_position=(lengths - 1).astype(np.int32))
    batches = list(eval_batches(table, 4))
    assert [b["input_ids"].shape[1] for b, _ in batches] == [32, 64, 80]
    rows = np.concatenate([r for _, r in batches])
    assert sorted(rows[rows >= 0]) == list(range(9)) and (batches[-1][0]["weight"][rows[8:] < 0] == 0).all()
    full = np.asarray(stacked_label_logits(graphdef, members, base, {k: jnp.asarray(v) for k, v in table.items()}))
    np.testing.assert_allclose(stacked_table_logits(graphdef, members, base, table, batch_size=4), full,
                               rtol=1e-5, atol=1e-5)


def _slsqp_loss(logits, labels, weights):
    """Reference objective in float64 numpy, padded choices masked out."""
    valid = logits[0] > NO_CHOICE_LOGIT / 2
    w = weights / weights.sum()

    def loss(alpha):
        z = np.where(valid, np.einsum("m,mnk->nk", alpha, np.where(valid, logits, 0.0)), -np.inf)
        top = z.max(axis=1)
        lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
        return float(np.sum(w * (lse - z[np.arange(len(labels)), labels])))

    return loss


def test_convex_weights_match_scipy_slsqp():
    rng = np.random.default_rng(0)
    m, n, k = 4, 60, 3
    logits = rng.normal(size=(m, n, k)) * np.array([1.0, 2.0, 0.5, 3.0])[:, None, None]
    labels = rng.integers(0, k, size=n)
    padded = (np.arange(n) % 3 == 0)
    labels = np.where(padded, labels % 2, labels)
    logits[:, padded, 2] = NO_CHOICE_LOGIT
    logits[1] += 1.5 * np.eye(k)[labels]  # member 1 carries signal, the others mostly noise
    weights = rng.uniform(0.5, 2.0, size=n)
    weights[:5] = 0.0
    alpha = fit_convex_weights(logits, labels, weights)
    assert alpha.shape == (m,) and np.all(alpha >= 0) and alpha.sum() == pytest.approx(1.0, abs=1e-9)
    reference = _slsqp_loss(logits, labels, weights)
    result = minimize(reference, np.full(m, 1 / m), method="SLSQP", bounds=[(0, 1)] * m,
                      constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}], options={"ftol": 1e-12})
    assert result.success
    assert reference(alpha) == pytest.approx(result.fun, abs=1e-5)
    assert ensemble_loss(alpha, logits, labels, weights) == pytest.approx(reference(alpha), abs=1e-5)
    for member in np.eye(m):  # a vertex is feasible: the fit is at least as good as every member
        assert reference(alpha) <= reference(member) + 1e-6


def test_per_task_weights_pick_the_planted_member():
    rng = np.random.default_rng(1)
    n, k = 80, 2
    labels = rng.integers(0, k, size=n)
    task = (np.arange(n) % 2).astype(np.int32)
    logits = rng.normal(size=(3, n, k))
    onehot = np.eye(k)[labels]
    logits[0, task == 0] += 4 * onehot[task == 0]  # member 0 knows task 0, member 2 knows task 1
    logits[2, task == 1] += 4 * onehot[task == 1]
    weights = np.ones(n)
    alpha = fit_ensemble_weights(logits, labels, weights, task, 2)
    assert alpha.shape == (2, 3)
    assert alpha[0, 0] > 0.9 and alpha[1, 2] > 0.9
    glob = fit_ensemble_weights(logits, labels, weights, task, 2, per_task=False)
    np.testing.assert_allclose(glob[0], glob[1])
    assert glob[0, 1] < 0.05
    with pytest.raises(DataError, match="task 1 has no validation rows"):
        fit_ensemble_weights(logits, labels, np.where(task == 1, 0.0, 1.0), task, 2)
    logits[1, 3, 0] = np.nan
    with pytest.raises(NumericalError, match="NaN"):
        fit_ensemble_weights(logits, labels, weights, task, 2)


def test_ridge_matches_sklearn():
    rng = np.random.default_rng(2)
    n, k, d, l2 = 50, 3, 6, 0.7
    features = rng.normal(size=(n, k, d)).astype(np.float32)
    targets = rng.normal(size=(n, k)).astype(np.float32)
    weights = rng.uniform(0, 2, size=n).astype(np.float32)
    w = np.asarray(ridge_fit(jnp.asarray(features), jnp.asarray(targets), jnp.asarray(weights), l2))
    reference = Ridge(alpha=l2, fit_intercept=False, solver="cholesky").fit(
        features.reshape(n * k, d), targets.reshape(-1), sample_weight=np.repeat(weights, k))
    np.testing.assert_allclose(w, reference.coef_, rtol=1e-4, atol=1e-5)


def test_log_odds_features_give_the_same_probabilities_as_logit_gradients():
    rng = np.random.default_rng(3)
    n, d = 20, 5
    per_class = rng.normal(size=(n, 2, d))  # ∇z_0, ∇z_1
    labels = rng.integers(0, 2, size=n)
    log_odds = per_class[np.arange(n), labels] - per_class[np.arange(n), 1 - labels]
    z0, w = rng.normal(size=(n, 2)), rng.normal(size=d)
    exact = jax.nn.softmax(z0 + per_class @ w)
    derived = jax.nn.softmax(z0 + logit_features(log_odds, labels) @ w)
    np.testing.assert_allclose(derived, exact, rtol=1e-5, atol=1e-6)
    three = rng.normal(size=(4, 3, d)).astype(np.float32)
    splits = [SplitGradients(log_odds, z0[:, 0], labels), SplitGradients(three, z0[:4], labels[:4])]
    table = table_features(splits, width=3)
    assert table.shape == (n + 4, 3, d)
    np.testing.assert_allclose(table[:n, :2], logit_features(log_odds, labels))
    assert np.all(table[:n, 2] == 0)
    np.testing.assert_allclose(table[n:], three - three.mean(axis=1, keepdims=True), rtol=1e-6)


def test_k_class_boosting_fit_does_not_depend_on_the_reference_logit():
    """The gradient stage stores ∇(z − z_0) for K > 2; the centred features and so the
    booster's ridge fit equal those of the K logits' own gradients."""
    rng = np.random.default_rng(4)
    n, k, d = 30, 4, 6
    per_class = rng.normal(size=(n, k, d)).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    residual = np.asarray(residuals(jnp.asarray(rng.normal(size=(n, k))), jnp.asarray(labels)))
    fits = [np.asarray(ridge_fit(jnp.asarray(logit_features(g, labels)), jnp.asarray(residual),
                                 jnp.ones(n), 0.5)) for g in (per_class, per_class - per_class[:, :1])]
    np.testing.assert_allclose(fits[1], fits[0], rtol=1e-4, atol=1e-6)
    # centring changes nothing for softmax predictions
    w = rng.normal(size=d)
    np.testing.assert_allclose(jax.nn.softmax(logit_features(per_class, labels) @ w),
                               jax.nn.softmax(per_class @ w), rtol=1e-5)


def test_ensemble_logits_closed_form():
    graphdef, members, fresh, base = adapters()
    table = two_task_table(6, seed=4)
    batch = {k: jnp.asarray(v) for k, v in table.items()}
    alpha = np.array([[0.2, 0.5, 0.3], [0.0, 0.1, 0.9]])
    booster = unstack_tree(members)[0]
    ens = add_booster(make_ensemble(members, alpha), booster, np.array([0.25, 0.0]))
    one = member_logits_fn(graphdef)
    z = [np.asarray(one(lora, base, batch, None), np.float64) for lora in unstack_tree(members)]
    z_base = np.asarray(one(jax.tree.map(jnp.zeros_like, fresh), base, batch, None), np.float64)
    t = table["task_index"]
    expected = sum(alpha[t, m][:, None] * z[m] for m in range(3))
    expected = expected + np.array([0.25, 0.0])[t][:, None] * (z[0] - z_base)
    got = np.asarray(ensemble_logits(graphdef, ens, base, batch))
    valid = table["label_token_ids"] >= 0
    np.testing.assert_allclose(got[valid], expected[valid], rtol=1e-5, atol=1e-5)
    assert np.all(got[~valid] < NO_CHOICE_LOGIT / 2)
    # routed: task 1 (α[1, 0] = 0, no booster) runs members 1 and 2 only, task 0 everything and the base
    np.testing.assert_array_equal(active_calls(ens), [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    np.testing.assert_allclose(ensemble_table_logits(graphdef, ens, base, table, batch_size=4), got, rtol=1e-5,
                               atol=1e-4)
    # the base term from precomputed logits (the zero-shot pass): same result without a base pass
    shared = ensemble_table_logits(graphdef, ens, base, table, batch_size=4, base_logits=z_base.astype(np.float32))
    np.testing.assert_allclose(shared[valid], expected[valid], rtol=1e-5, atol=1e-5)
    rows = np.bincount(t, minlength=2)
    assert routed_passes(ens, t) == {"routed": 5 * rows[0] + 2 * rows[1], "dense": 5 * len(t)}
    plain = make_ensemble(members, alpha)  # no booster: no base pass either
    assert routed_passes(plain, t) == {"routed": 3 * rows[0] + 2 * rows[1], "dense": 3 * len(t)}
    routed = ensemble_table_logits(graphdef, plain, base, table, batch_size=4)
    np.testing.assert_allclose(routed[valid], sum(alpha[t, m][:, None] * z[m] for m in range(3))[valid],
                               rtol=1e-5, atol=1e-4)


def test_prune_weights_zeroes_small_weights_and_renormalises():
    alpha = np.array([[0.6, 0.3995, 0.0005], [0.0004, 0.0004, 0.9992], [0.5, 0.5, 0.0]])
    pruned = prune_weights(alpha, 1e-3)
    np.testing.assert_allclose(pruned, [[0.6 / 0.9995, 0.3995 / 0.9995, 0.0], [0.0, 0.0, 1.0], [0.5, 0.5, 0.0]])
    np.testing.assert_array_equal(prune_weights(alpha, 0.0), alpha)
    rng = np.random.default_rng(5)
    random = rng.dirichlet(np.full(6, 0.3), size=50)
    for threshold in (1e-3, 0.05, 0.3):
        out = prune_weights(random, threshold)
        np.testing.assert_allclose(out.sum(axis=1), 1.0)
        assert np.all((out == 0) | (random >= threshold) | (random == random.max(axis=1, keepdims=True)))
        np.testing.assert_array_equal(out.argmax(axis=1), random.argmax(axis=1))


def _train_loss(logits, table):
    return ensemble_loss(np.ones(1), logits[None], table["label"], table["weight"])


def test_trained_boosting_lowers_the_training_loss_of_a_weak_ensemble():
    graphdef, members, fresh, base = adapters()
    train = two_task_table(32, seed=5)
    weak = make_ensemble(jax.tree.map(lambda x: x[:1], members), np.ones((2, 1)))
    before = ensemble_table_logits(graphdef, weak, base, train, batch_size=16)
    groups = [[0], [1]]
    losses = group_losses(before, train["label"], train["weight"], train["task_index"], groups)
    # at B = 0 the boosting adapter reproduces the ensemble: its loss is CE(F)
    z_base = stacked_table_logits(graphdef, stack_trees([fresh]), base, train, batch_size=16)[0]
    batch = {**{k: jnp.asarray(v) for k, v in train.items()}, "offset_logits": boosting_offsets(before, z_base)}
    total, weight = objective_loss(boosting_objective(graphdef))(fresh, base, batch, None)
    assert float(total / weight) == pytest.approx(_train_loss(before, train), rel=1e-4)
    mesh = make_mesh(MeshConfig())
    with pytest.raises(ConfigError, match="fresh adapter"):
        boost_trained(graphdef, weak, unstack_tree(members)[0], base, train, groups, TrainingConfig(), mesh,
                      progress=False)
    config = TrainingConfig(learning_rate=2e-2, warmup_steps=0, max_steps=12, batch_size=8, max_grad_norm=1.0,
                            weight_decay=0.0)
    boosted, chosen, steps = boost_trained(graphdef, weak, fresh, base, train, groups, config, mesh, steps=1,
                                           step_size=0.5, batch_size=16, progress=False)
    assert chosen == [int(np.argmax(losses))] and steps == [12]  # no validation: the whole budget
    after = ensemble_table_logits(graphdef, boosted, base, train, batch_size=16)
    rows = train["task_index"] == chosen[0]
    other = {k: v[~rows] for k, v in train.items()}
    assert _train_loss(after[rows], {k: v[rows] for k, v in train.items()}) < losses[chosen[0]] - 1e-3
    np.testing.assert_allclose(after[~rows], before[~rows], rtol=1e-5, atol=1e-5)  # η = 0 off the group
    assert _train_loss(after, train) < _train_loss(before, train)
    assert _train_loss(after[~rows], other) == pytest.approx(_train_loss(before[~rows], other), rel=1e-5)


def test_trained_boosting_reports_the_steps_early_stopping_left():
    """A round validated on its group's rows stops when the validation loss stops improving;
    the steps returned (what the FLOPs accounting charges) are the steps trained, not the
    budget."""
    graphdef, members, fresh, base = adapters()
    train, val = two_task_table(32, seed=5), two_task_table(16, seed=9)
    weak = make_ensemble(jax.tree.map(lambda x: x[:1], members), np.ones((2, 1)))
    member_logits = stacked_table_logits(graphdef, jax.tree.map(lambda x: x[:1], members), base, val, batch_size=16)
    config = TrainingConfig(learning_rate=5e-2, warmup_steps=0, max_steps=60, batch_size=8, max_grad_norm=1.0,
                            weight_decay=0.0, eval_every=2, patience=1)
    _, _, steps = boost_trained(graphdef, weak, fresh, base, train, [[0], [1]], config, make_mesh(MeshConfig()),
                                batch_size=16, progress=False, validation=val, validation_member_logits=member_logits)
    assert len(steps) == 1 and 0 < steps[0] < config.max_steps and steps[0] % config.eval_every == 0


def test_a_trained_adapter_with_zero_b_is_the_base_model_and_starts_a_boosting_round():
    """with_zero_b (the boosters' start under a warm-started θ0): B = 0, A kept, the base
    model's logits (an adapter of zeros), and boosting accepts it where it refuses the
    trained adapter."""
    graphdef, members, _, base = adapters()
    trained = unstack_tree(members)[0]
    reset = with_zero_b(trained)
    originals = {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(trained)}
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(reset)]
    assert sorted(paths) == sorted(originals) and any("lora_b" in p for p in paths)
    for path, leaf in zip(paths, jax.tree.leaves(reset)):
        expected = np.zeros_like(originals[path]) if "lora_b" in path else originals[path]
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(expected))
    train = two_task_table(16, seed=3)
    logits = stacked_table_logits(graphdef, stack_trees([reset, trained]), base, train, batch_size=16)
    zero = stacked_table_logits(graphdef, stack_trees([zeros_like_member(members)]), base, train, batch_size=16)[0]
    np.testing.assert_allclose(logits[0], zero, rtol=1e-6, atol=1e-6)
    assert np.abs(logits[1] - zero).max() > 1e-2  # the trained adapter is not the base model
    weak = make_ensemble(jax.tree.map(lambda x: x[:1], members), np.ones((2, 1)))
    config = TrainingConfig(learning_rate=1e-2, warmup_steps=0, max_steps=2, batch_size=8)
    _, chosen, _ = boost_trained(graphdef, weak, reset, base, train, [[0], [1]], config, make_mesh(MeshConfig()),
                                 batch_size=16, progress=False)
    assert len(chosen) == 1


def test_every_boosting_round_sees_the_current_ensemble_and_the_base_on_its_group():
    """Round r's learner gets F of the ensemble with r boosters on every training row, z_base
    on the chosen group's rows, and validation offsets F − z_base there; computed from
    scratch here with the network (the rounds update F on the group's rows only)."""
    graphdef, members, fresh, base = adapters()
    train, val = two_task_table(12, seed=7), two_task_table(8, seed=8)
    weak = make_ensemble(jax.tree.map(lambda x: x[:1], members), np.ones((2, 1)))
    seen = []

    def learner(round_):
        seen.append(round_)
        return unstack_tree(members)[1 + round_.index]

    groups = [[0], [1]]
    boosted, chosen = boost(graphdef, weak, base, train, groups, learner, steps=2, step_size=0.5, batch_size=4,
                            validation=val)
    assert len(seen) == 2 and len(chosen) == 2
    fresh_one = stack_trees([fresh])
    z_base = stacked_table_logits(graphdef, fresh_one, base, train, batch_size=4)[0]
    val_base = stacked_table_logits(graphdef, fresh_one, base, val, batch_size=4)[0]
    for r, round_ in enumerate(seen):
        so_far = boosted._replace(boosters=jax.tree.map(lambda x: x[:r], boosted.boosters),
                                  step_sizes=boosted.step_sizes[:r])
        current = ensemble_table_logits(graphdef, so_far, base, train, batch_size=4)
        valid = train["label_token_ids"] >= 0
        np.testing.assert_allclose(round_.logits[valid], current[valid], rtol=1e-5, atol=1e-4)
        assert round_.group == chosen[r] == int(np.argmax(group_losses(
            current, train["label"], train["weight"], train["task_index"], groups)))
        rows = train["task_index"] == chosen[r]
        np.testing.assert_allclose(round_.base_logits[rows & valid[:, 0]], z_base[rows & valid[:, 0]], rtol=1e-5)
        val_rows = val["task_index"] == chosen[r]
        expected = ensemble_table_logits(graphdef, so_far, base, val, batch_size=4)[val_rows] - val_base[val_rows]
        got = round_.validation["offset_logits"]
        keep = val["label_token_ids"][val_rows] >= 0
        np.testing.assert_allclose(got[keep], expected[keep], rtol=1e-5, atol=1e-4)


def test_closed_form_boosting_lowers_the_training_loss_of_a_weak_ensemble():
    graphdef, members, fresh, base = adapters()
    train = synthetic_table(24, seed=6)
    train["task_index"] = np.zeros(24, np.int32)
    weak = make_ensemble(jax.tree.map(lambda x: x[:1], members), np.ones((1, 1)))
    before = ensemble_table_logits(graphdef, weak, base, train, batch_size=24)
    features, fixed, space = lora_feature_split(fresh)
    assert space == "lora_b"
    projector = make_projector(features, 16, seed=3)
    batch = {k: jnp.asarray(v) for k, v in train.items()}
    _, grads = batch_gradients(features, fixed, base, batch, graphdef=graphdef, projector=projector,
                               strategy="reverse")
    g = logit_features(np.asarray(grads), train["label"])
    group, w = closed_form_step(g, before, train["label"], train["weight"], train["task_index"], [[0]], l2=1.0)
    assert group == 0 and w.shape == (16,)
    linear = linear_boost(before, g, w, step_size=0.2)
    assert _train_loss(linear, train) < _train_loss(before, train) - 1e-4
    with pytest.raises(DataError, match="do not match the training table"):
        boost_closed_form(graphdef, weak, fresh, base, train, g[:5], projector, [[0]])
    boosted, chosen = boost_closed_form(graphdef, weak, fresh, base, train, g, projector, [[0]], steps=1,
                                        step_size=0.2, l2=1.0, batch_size=24)
    assert chosen == [0]
    lifted = lifted_adapter(projector, w, fresh)
    for a, b in zip(jax.tree.leaves(lifted), jax.tree.leaves(unstack_tree(boosted.boosters)[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    network = ensemble_table_logits(graphdef, boosted, base, train, batch_size=24)
    assert _train_loss(network, train) < _train_loss(before, train) - 1e-4
    # the network's step follows its linearization: centred increments (what softmax sees) align
    moved, predicted = network - before, linear - before
    moved, predicted = moved - moved.mean(1, keepdims=True), predicted - predicted.mean(1, keepdims=True)
    assert np.sum(moved * predicted) / (np.linalg.norm(moved) * np.linalg.norm(predicted)) > 0.7


def test_table_outputs_in_table_order_and_no_progress_bar_off_a_terminal(capsys):
    """Batches run in length order and come back in table order; the progress bar is drawn on
    a terminal only, so a log file (here a captured, non-terminal stderr) gets no \\r updates."""
    table = two_task_table(11, seed=6)
    table["attention_mask"][::3, 5:] = 0  # uneven lengths: eval_batches reorders the rows
    out = table_outputs(lambda b: jnp.asarray(b["label"]) * 10 + jnp.asarray(b["task_index"]), table, 4,
                        progress="test rows")
    np.testing.assert_array_equal(out, table["label"] * 10 + table["task_index"])
    assert "\r" not in capsys.readouterr().err


def test_inaccurate_weight_fits_fall_back_to_the_best_member(monkeypatch):
    """When the solver only reports ``optimal_inaccurate`` (Clarabel did on a planted-conflict
    run), the weights are the best, by the objective, of its solution and each member alone;
    any other non-optimal status is a SolverError."""
    import cvxpy as cp

    rng = np.random.default_rng(7)
    n = 40
    labels = rng.integers(0, 2, size=n)
    logits = rng.normal(size=(3, n, 2))
    logits[1, np.arange(n), labels] += 8.0  # member 1 separates the rows
    solve = cp.Problem.solve

    def reported(status, value):
        def fake_solve(self, *args, **kwargs):
            solve(self, *args, **kwargs)
            self.variables()[0].value = value
            self._status = status
        return fake_solve

    monkeypatch.setattr(cp.Problem, "solve", reported(cp.OPTIMAL_INACCURATE, np.full(3, 1 / 3)))
    alpha = fit_convex_weights(logits, labels, np.ones(n))
    np.testing.assert_array_equal(alpha, [0.0, 1.0, 0.0])
    assert ensemble_loss(alpha, logits, labels, np.ones(n)) < ensemble_loss(np.full(3, 1 / 3), logits, labels, np.ones(n))
    monkeypatch.setattr(cp.Problem, "solve", reported(cp.INFEASIBLE, None))
    with pytest.raises(SolverError, match="status 'infeasible'"):
        fit_convex_weights(logits, labels, np.ones(n))
