"""Compute and memory accounting of the main job, the way the paper reports it.

Analytical FLOPs (multiply-add = 2 FLOPs) of a decoder forward pass on a padded batch:
per token and layer 2·W for the projections, W being the family's
``layer_matmul_weights`` (Llama: D·H·Dh + 2·D·KV·Dh + H·Dh·D + 3·D·F; GPT-2: 4·D² + 2·D·F),
and 4·H·Dh·T for attention scores and values over T positions (dense, as XLA computes it),
plus 2·D·K for the K label-word logits at the answer position. A LoRA training step or
a per-example gradient costs about 2× the forward pass (the backward pass needs only
activation gradients and the small LoRA weight gradients, never the base weights');
the affinity stage's solves cost, per subset, iterations · (m·K·d² + d³/3) with Newton
(m: the largest subset's training rows, to which the vmapped solves pad) and
iterations · 4·N·K·d with L-BFGS (one loss-and-gradient pass over all N rows, masked).
Peak memory is the process's peak resident set size (host) and, where the backend
reports it, the devices' peak bytes in use.
"""

from __future__ import annotations

import resource
from typing import Any, Sequence

import jax

from jax_ensemble.models.decoder import DecoderConfig

BACKWARD_FACTOR = 2.0
"""FLOPs of forward + backward (activation gradients + LoRA gradients) over forward."""


def forward_flops(config: DecoderConfig, rows: int, length: int, choices: int = 2) -> float:
    """FLOPs of one forward pass over ``rows`` sequences padded to ``length`` tokens,
    scoring ``choices`` label words at one position per row."""
    projections = 2 * config.layer_matmul_weights
    attention = 4 * config.num_attention_heads * config.head_dim * length
    per_row = config.num_hidden_layers * length * (projections + attention) + 2 * config.hidden_size * choices
    return float(rows * per_row)


def table_forward_flops(config: DecoderConfig, table: dict[str, Any]) -> float:
    """Forward FLOPs of one pass over a training table (N rows padded to T)."""
    rows, length = table["input_ids"].shape
    return forward_flops(config, rows, length, table["label_token_ids"].shape[1])


def newton_solve_flops(subsets: int, rows: int, choices: int, dim: int, iterations: int) -> float:
    """FLOPs of ``subsets`` Newton solves: iterations · (rows·K·d² + d³/3) each."""
    return float(subsets * iterations * (rows * choices * dim**2 + dim**3 / 3))


def affinity_solve_flops(solver: str, subset_rows: Sequence[int], total_rows: int, choices: int, dim: int,
                         iterations: int) -> float:
    """FLOPs of the affinity stage's vmapped solves, as they run: every subset for the
    largest ``iterations`` count; Newton on the largest subset's rows (``subset_rows``: each
    subset's training rows), L-BFGS on all ``total_rows`` rows (4·N·K·d per iteration: a
    product with G and one with Gᵀ). K (``choices``) is 1 for scalar log-odds."""
    if solver == "newton":
        return newton_solve_flops(len(subset_rows), max(subset_rows), choices, dim, iterations)
    return float(len(subset_rows) * iterations * 4 * total_rows * choices * dim)


def peak_memory_bytes() -> dict[str, int]:
    """Peak host RSS and, where the backend reports it, the sum of devices' peak bytes in use."""
    out = {"host_peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    peaks = [(dev.memory_stats() or {}).get("peak_bytes_in_use") for dev in jax.local_devices()]
    if all(p is not None for p in peaks) and peaks:
        out["device_peak_bytes"] = int(sum(peaks))
    return out
