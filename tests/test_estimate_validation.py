"""validate-estimates: per-task scores against scikit-learn, error summaries and timing
against closed forms, bad input at the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import accuracy_score, log_loss
from test_cli import assert_one_line_error, cli

from jax_ensemble.models.classification import NO_CHOICE_LOGIT
from jax_ensemble.stages.adapters import wall_seconds_of
from jax_ensemble.stages.estimate_validation import per_task, subset_adapter_name, summarize, task_scores, timing


def test_task_scores_match_sklearn_with_padded_choices():
    rng = np.random.default_rng(0)
    # task 0: binary rows padded to 3 choices; task 1: 3-way rows
    logits = rng.normal(size=(14, 3)).astype(np.float32) * 2
    task_index = np.array([0] * 6 + [1] * 8)
    logits[task_index == 0, 2] = NO_CHOICE_LOGIT
    labels = np.where(task_index == 0, rng.integers(0, 2, 14), rng.integers(0, 3, 14))
    scores = task_scores(logits, labels, task_index, [0, 1])
    for t, k in ((0, 2), (1, 3)):
        z = logits[task_index == t, :k].astype(np.float64)
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        y = labels[task_index == t]
        assert scores[t][0] == pytest.approx(log_loss(y, p, labels=list(range(k))), rel=1e-5)
        assert scores[t][1] == pytest.approx(accuracy_score(y, z.argmax(axis=1)))


def _pair(actual, linear, weights, base):
    return {name: {"loss": v[0], "accuracy": v[1]}
            for name, v in zip(("actual", "linear", "weight_space", "base"), (actual, linear, weights, base))}


def test_summarize_is_the_mean_of_pairwise_errors():
    pairs = [_pair((0.5, 0.75), (0.6, 0.70), (0.5, 0.75), (0.7, 0.5)),
             _pair((0.4, 0.80), (0.3, 0.90), (0.8, 0.40), (0.7, 0.5))]
    errors = summarize(pairs)
    assert errors["linear"]["mean_relative_error_loss"] == pytest.approx((0.1 / 0.5 + 0.1 / 0.4) / 2)
    assert errors["linear"]["mean_abs_error_accuracy"] == pytest.approx((0.05 + 0.10) / 2)
    assert errors["weight_space"]["mean_relative_error_loss"] == pytest.approx((0 + 1.0) / 2)
    assert errors["linear"]["loss_correlation"] == pytest.approx(1.0)  # two points: the sign of the slope
    assert np.isnan(errors["base"]["loss_correlation"])  # a constant predictor has no correlation


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(1)
    actual = (np.abs(rng.normal(size=(40, 2))) + 0.1).round(1)  # positive losses, ties on purpose
    linear = actual + rng.normal(size=(40, 2)) * 0.5
    linear[:5] = linear[0]  # a run of tied estimates
    pairs = [_pair(a, e, a, (0.7, 0.5)) for a, e in zip(actual, linear)]
    errors = summarize(pairs)
    for key, column in (("loss_spearman", 0), ("accuracy_spearman", 1)):
        expected = scipy.stats.spearmanr(linear[:, column], actual[:, column]).statistic
        assert errors["linear"][key] == pytest.approx(expected, rel=1e-9)
    assert errors["weight_space"]["loss_spearman"] == pytest.approx(1.0)
    assert np.isnan(errors["base"]["loss_spearman"])


def test_change_and_within_task_spearman_match_scipy():
    """The rank correlation of the change from the base model over all pairs, and the mean
    over tasks (≥ 3 pairs) of the per-task rank correlation, against scipy's spearmanr."""
    rng = np.random.default_rng(2)
    tasks = np.array(["a"] * 5 + ["b"] * 4 + ["c"] * 2)  # c has too few pairs to count
    actual = np.abs(rng.normal(size=(11, 2))) + 0.3
    linear = actual + rng.normal(size=(11, 2)) * 0.2
    base = np.abs(rng.normal(size=(11, 2))) + 0.5
    pairs = [{**_pair(a, e, a, b), "task": t} for a, e, b, t in zip(actual, linear, base, tasks)]
    errors = summarize(pairs)
    change = scipy.stats.spearmanr(linear[:, 0] - base[:, 0], actual[:, 0] - base[:, 0]).statistic
    within = np.mean([scipy.stats.spearmanr(linear[tasks == t, 0], actual[tasks == t, 0]).statistic for t in "ab"])
    assert errors["linear"]["loss_change_spearman"] == pytest.approx(change, rel=1e-9)
    assert errors["linear"]["within_task_loss_spearman"] == pytest.approx(within, rel=1e-9)
    assert errors["weight_space"]["within_task_loss_spearman"] == pytest.approx(1.0)  # weight space = actual here
    assert np.isnan(errors["base"]["loss_change_spearman"])  # the base predicts no change at all
    jittered = [{**p, "base": {"loss": 0.7 * (1 + 1e-7 * i), "accuracy": 0.5}} for i, p in enumerate(pairs)]
    assert np.isnan(summarize(jittered)["base"]["within_task_loss_spearman"])  # float rounding is no ranking
    no_tasks = summarize([_pair(a, e, a, b) for a, e, b in zip(actual, linear, base)])  # one unnamed task of 11
    assert no_tasks["linear"]["within_task_loss_spearman"] == pytest.approx(
        scipy.stats.spearmanr(linear[:, 0], actual[:, 0]).statistic, rel=1e-9)


def test_per_task_groups_the_pairs_of_each_task_worst_first():
    pairs = [{**_pair((0.5, 0.50), (0.6, 0.70), (0.5, 0.5), (0.7, 0.5)), "task": "a"},
             {**_pair((0.4, 0.80), (0.4, 0.80), (0.8, 0.4), (0.7, 0.5)), "task": "b"},
             {**_pair((0.5, 0.60), (0.5, 0.70), (0.5, 0.5), (0.7, 0.5)), "task": "a"}]
    tasks = per_task(pairs)
    assert list(tasks) == ["a", "b"]  # a misses by 0.15 on average, b by 0
    assert tasks["a"]["pairs"] == 2 and tasks["b"]["pairs"] == 1
    assert tasks["a"]["errors"]["linear"]["mean_abs_error_accuracy"] == pytest.approx((0.2 + 0.1) / 2)
    assert tasks["a"]["errors"]["linear"]["mean_relative_error_loss"] == pytest.approx((0.1 / 0.5 + 0) / 2)
    assert tasks["a"]["accuracy"]["actual"] == pytest.approx(0.55)
    assert tasks["a"]["accuracy"]["linear"] == pytest.approx(0.70)
    assert tasks["b"]["errors"]["weight_space"]["mean_abs_error_accuracy"] == pytest.approx(0.4)


def test_timing_extrapolates_to_every_subset_and_scales_resumed_gradients():
    t = timing({"seconds": 30.0, "timed_shards": 5, "shards": 10}, 4.0, [100.0, 120.0, None], total_subsets=50)
    assert t["gradient_seconds"] == 60.0 and t["gradient_seconds_extrapolated"]
    assert t["estimate_seconds_all_subsets"] == 64.0 and t["finetune_seconds_per_subset"] == 110.0
    assert t["speedup"] == pytest.approx(110.0 * 50 / 64.0)
    assert t["marginal_speedup"] == pytest.approx(110.0 * 50 / 4.0)
    unknown = timing({"seconds": 30.0, "timed_shards": 10, "shards": 10}, 4.0, [None], total_subsets=50)
    assert unknown["speedup"] is None and not unknown["gradient_seconds_extrapolated"]
    untimed = timing(None, 4.0, [100.0], total_subsets=50)
    assert untimed["speedup"] is None and untimed["marginal_speedup"] == pytest.approx(1250.0)
    assert timing({"seconds": 3.0, "timed_shards": 0, "shards": 10}, 4.0, [100.0], total_subsets=50)["speedup"] is None


def test_subset_adapter_names_are_stable():
    assert subset_adapter_name(np.array([0, 3, 7])) == "subset-0-3-7"
    assert subset_adapter_name([1, 2], balanced=True) == "subset-1-2-balanced"


def test_cli_rejects_a_subset_count_outside_the_stage(tmp_path):
    result = cli("validate-estimates", "--config", "tiny", "--subsets", "13", f"run_dir={tmp_path}")
    assert_one_line_error(result, "--subsets must be between 1 and 12")
    assert not any(tmp_path.iterdir())  # nothing started


def test_training_seconds_sum_the_step_records_of_resumed_runs():
    history = [{"step": 1, "seconds": 1.5}, {"step": 2, "seconds": 0.25}, {"step": 3, "seconds": 0.25}]
    assert wall_seconds_of(history) == pytest.approx(2.0)
    assert wall_seconds_of(history + [{"step": 4}]) is None  # a step recorded before timing existed
