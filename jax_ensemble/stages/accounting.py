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

Per-device memory, for planning (:mod:`jax_ensemble.stages.plan`): arrays laid out by the
partition rules (:func:`device_bytes`: each leaf's size over the mesh axes that split it)
and activations (:func:`training_activation_bytes`, :func:`inference_activation_bytes`)
from the per-token widths of one decoder layer (:func:`layer_widths`). Differentiated, the
scan over layers saves only the outputs of dots without batch dimensions
(``dots_with_no_batch_dims_saveable``, :func:`jax_ensemble.models.decoder.scan_layers`) that
the backward needs: every projection but the MLP's output projection (whose output only
joins the residual stream, which is the next layer's saved input), both LoRA products
(x·A and x·A·B; only x·A on the MLP's output projection), plus each layer's input. The
backward then recomputes one layer at a time: 4 float32 copies of its attention scores
(scores, probabilities and their cotangents, b·H·T² each) and 2·F + 3·D values per token
(the two MLP branches; the layer input, its cotangent and the attention output), over the
rows the layer is computed on (with ``fsdp`` > 1 XLA gathers the batch over ``fsdp`` and
keeps the weights sharded, so over b·fsdp rows). A forward pass alone keeps 2 copies of
the scores and the same per-token values. tests/test_plan.py holds these against XLA's
``memory_analysis()`` of the compiled steps.
"""

from __future__ import annotations

import dataclasses
import math
import resource
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from jax_ensemble.models.decoder import DecoderConfig
from jax_ensemble.models.lora import linear_modules
from jax_ensemble.training.mesh import BATCH_AXES, DEFAULT_RULES, Rules, partition_spec, path_name

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


TRAIN_ATTENTION_COPIES = 4
"""float32 (b, H, T, T) arrays alive in one layer's backward: scores, probabilities, their cotangents."""
FORWARD_ATTENTION_COPIES = 2
"""float32 (b, H, T, T) arrays alive in one layer's forward: scores and probabilities."""


MLP_OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj")
"""Each family's MLP output projection (Llama, GPT-2): its output only joins the residual stream."""


def _axes_size(mesh: Mesh | AbstractMesh, axes: Any) -> int:
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in names)


def device_bytes(tree: Any, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES, leading: int = 0) -> int:
    """Bytes one device holds of ``tree`` (arrays or ShapeDtypeStructs) laid out by the
    partition rules (:func:`jax_ensemble.training.mesh.tree_shardings`, ``leading`` axes
    replicated): Σ_leaf size / Π(sizes of the mesh axes splitting it) · itemsize."""
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        shape = tuple(np.shape(leaf))
        spec = partition_spec(path_name(path), shape[leading:], mesh, rules)
        split = math.prod(_axes_size(mesh, axes) for axes in spec)
        total += math.prod(shape) // split * np.dtype(leaf.dtype).itemsize
    return total


def batch_rows_per_device(rows: int, mesh: Mesh | AbstractMesh) -> int:
    """Rows of a batch of ``rows`` on one device: split over (data, fsdp) when they divide it."""
    shards = _axes_size(mesh, BATCH_AXES)
    return rows // shards if rows % shards == 0 else rows


def batch_bytes(batch: Any, mesh: Mesh | AbstractMesh, leading: int = 0) -> int:
    """Bytes one device holds of a batch (leaves (…, rows, …), the row axis after ``leading``
    axes split over (data, fsdp) as :func:`jax_ensemble.training.mesh.batch_sharding` lays it out)."""
    total = 0
    for leaf in jax.tree.leaves(batch):
        shape = tuple(np.shape(leaf))
        rows = shape[leading]
        total += math.prod(shape) // rows * batch_rows_per_device(rows, mesh) * np.dtype(leaf.dtype).itemsize
    return total


@dataclasses.dataclass(frozen=True)
class LayerWidths:
    """Values per token of one decoder layer on one device.

    layers: L; hidden: D; heads: attention heads on the device; saved: what the backward
    keeps per token and layer (module doc); widest: the widest projection output (F)."""

    layers: int
    hidden: int
    heads: int
    saved: int
    widest: int


def layer_widths(model: nnx.Module, mesh: Mesh | AbstractMesh, rules: Rules = DEFAULT_RULES) -> LayerWidths:
    """The :class:`LayerWidths` of a (possibly abstract, ``nnx.eval_shape``) model with LoRA
    attached, each projection's output divided by the mesh axes that split its kernel's
    output dimension (``tensor``)."""
    config = model.config
    hidden = config.hidden_size
    saved, widest = hidden, 0
    for path, layer in linear_modules(model).items():
        if not path.startswith("layers."):
            continue
        kernel = layer.kernel.get_value()
        spec = partition_spec(f"{path}.kernel", kernel.shape, mesh, rules)
        out = layer.out_features // (_axes_size(mesh, spec[-1]) if len(spec) == kernel.ndim else 1)
        residual_only = path.endswith(MLP_OUTPUT_PROJECTIONS)
        rank = 0 if layer.lora_a is None else layer.lora_a.get_value().shape[-1]
        saved += (0 if residual_only else out) + (rank + (0 if residual_only else out) if rank else 0)
        widest = max(widest, out)
    tensor = mesh.shape["tensor"]
    heads = config.num_attention_heads
    return LayerWidths(layers=config.num_hidden_layers, hidden=hidden,
                       heads=heads // tensor if heads % tensor == 0 else heads, saved=saved, widest=widest)


def saved_residual_bytes(widths: LayerWidths, rows: int, length: int, dtype_bytes: int) -> int:
    """What a differentiated (or linearized) pass keeps of the forward: L·b·T·saved·c."""
    return widths.layers * rows * length * widths.saved * dtype_bytes


def training_activation_bytes(widths: LayerWidths, rows: int, length: int, dtype_bytes: int,
                              working_rows: int | None = None) -> int:
    """Activations of one forward + backward over ``rows`` sequences of ``length`` tokens on
    one device: L·b·T·saved·c (saved residuals) + 4·b·H·T²·4 (one layer's attention) +
    b'·T·(2F + 3D)·c (one layer's backward over ``working_rows`` b', default b)."""
    working_rows = rows if working_rows is None else working_rows
    saved = saved_residual_bytes(widths, rows, length, dtype_bytes)
    attention = TRAIN_ATTENTION_COPIES * rows * widths.heads * length**2 * 4
    working = working_rows * length * (2 * widths.widest + 3 * widths.hidden) * dtype_bytes
    return saved + attention + working


def inference_activation_bytes(widths: LayerWidths, rows: int, length: int, dtype_bytes: int,
                               working_rows: int | None = None) -> int:
    """Activations of one forward pass (one layer alive at a time): 2·b·H·T²·4 +
    b'·T·(2F + 3D)·c."""
    working_rows = rows if working_rows is None else working_rows
    attention = FORWARD_ATTENTION_COPIES * rows * widths.heads * length**2 * 4
    return attention + working_rows * length * (2 * widths.widest + 3 * widths.hidden) * dtype_bytes
