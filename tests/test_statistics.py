"""Mean ± std and paired differences over seeds, against scipy's paired t-test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from jax_ensemble.core.statistics import mean_std, paired_difference


def test_paired_difference_matches_scipys_paired_t_interval():
    rng = np.random.default_rng(0)
    for seeds in (2, 3, 7):
        a, b = rng.normal(0.6, 0.05, seeds), rng.normal(0.55, 0.05, seeds)
        got = paired_difference(a.tolist(), b.tolist())
        ci = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert got["ci95"] == pytest.approx([ci.low, ci.high], rel=1e-10)
        assert got["mean"] == pytest.approx(np.mean(a - b), rel=1e-12)
        assert got["std"] == pytest.approx(np.std(a - b, ddof=1), rel=1e-12)
        assert got["per_seed"] == pytest.approx((a - b).tolist())


def test_one_seed_has_no_interval_and_zero_std():
    assert paired_difference([0.7], [0.5]) == {"mean": pytest.approx(0.2), "std": 0.0, "ci95": None,
                                               "per_seed": [pytest.approx(0.2)]}
    assert mean_std([0.3]) == (0.3, 0.0)
    assert mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(np.std([1.0, 2.0, 4.0], ddof=1)))


def test_unpaired_inputs_are_refused():
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([0.1, 0.2], [0.1])
