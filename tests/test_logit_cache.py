"""The logit cache returns the computed array on a hit, recomputes on any changed input,
and survives a corrupt file; the main job's second run reads every pass back."""

from __future__ import annotations

import numpy as np

from jax_ensemble.stages.logit_cache import LogitCache, cached


def _table(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 50, (6, 8)), "task_index": np.zeros(6, np.int32)}


def test_hits_misses_and_corruption(tmp_path):
    cache = LogitCache(tmp_path, {"model": "m", "batch_size": 4})
    adapters = {"lora_b": np.arange(6.0).reshape(2, 3)}
    calls = []

    def compute(value: float):
        def run():
            calls.append(value)
            return np.full((2, 6, 3), value, np.float32)
        return run

    first = cache.get("stacked", adapters, _table(), compute(1.0))
    again = cache.get("stacked", adapters, _table(), compute(2.0))
    np.testing.assert_array_equal(again, first)  # read back, not recomputed
    assert calls == [1.0] and again.dtype == np.float32
    # any changed input is a different entry: adapter value, table cell, kind, identity
    changed = {"lora_b": adapters["lora_b"] + np.eye(2, 3) * 1e-7}
    assert cache.get("stacked", changed, _table(), compute(3.0))[0, 0, 0] == 3.0
    table = _table()
    table["input_ids"][5, 7] += 1
    assert cache.get("stacked", adapters, table, compute(4.0))[0, 0, 0] == 4.0
    assert cache.get("ensemble", adapters, _table(), compute(5.0))[0, 0, 0] == 5.0
    other = LogitCache(tmp_path, {"model": "m", "batch_size": 8})
    assert other.get("stacked", adapters, _table(), compute(6.0))[0, 0, 0] == 6.0
    assert calls == [1.0, 3.0, 4.0, 5.0, 6.0]
    # a corrupt file is recomputed (one warning), not trusted
    path = next(p for p in tmp_path.glob("stacked-*.npy") if p.name.endswith(f"{cache.key('stacked', adapters, _table())}.npy"))
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    assert cache.get("stacked", adapters, _table(), compute(7.0))[0, 0, 0] == 7.0
    assert cached(None, "stacked", adapters, _table(), compute(8.0))[0, 0, 0] == 8.0
