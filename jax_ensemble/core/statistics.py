"""Summaries of a result measured over several seeds (numpy, float64).

- ``mean_std``: the mean and the sample standard deviation (ddof = 1; 0 with one seed);
- ``paired_difference``: the per-seed differences d_s = a_s − b_s of two methods run on the
  same seeds, their mean, std and the 95% Student-t interval mean ± t_{0.975, S−1}·std/√S
  (None with one seed). Pairing removes what the seeds share (splits, initialisation), so
  the interval is the one to read when the question is "is a better than b".
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import stats


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample std with ddof = 1) of per-seed values; std is 0.0 for one value."""
    x = np.asarray(values, np.float64)
    return float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """``{"mean", "std", "ci95": [lo, hi] | None, "per_seed"}`` of a − b over paired seeds."""
    if len(a) != len(b) or not len(a):
        raise ValueError(f"paired_difference needs two equally long, non-empty sequences, got {len(a)} and {len(b)}")
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    mean, std = mean_std(d)
    if len(d) < 2:
        return {"mean": mean, "std": std, "ci95": None, "per_seed": d.tolist()}
    half = float(stats.t.ppf(0.975, len(d) - 1) * std / np.sqrt(len(d)))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "per_seed": d.tolist()}
