"""The Pallas kernels against their plain-XLA references on the real layer shapes.

For SmolLM2-135M's and Llama-3.1-8B's LoRA-adapted projections at a training batch
(``--rows`` token rows, LoRA rank 16, bfloat16 activations, int8 base):

- ``int8_lora`` forward and forward+backward (dx, dA, dB) against the XLA path that
  ``models.layers.Linear`` runs (int8 weight converted to bfloat16, matmul, scale, LoRA);
- ``bf16_matmul``: XLA's plain bfloat16 matmul with a bfloat16 weight (the throughput the
  int8 kernel is measured against);
- ``multi_lora`` with 4 adapters, every adapter on every row and one adapter per row;
- ``seeded_projection``: Pᵀg of one stacked LoRA leaf for 64 examples against
  ``core.projection.project``'s XLA scan.

Every case prints the kernel's agreement with its reference (max |Δ| / max |reference|). On
a GPU or TPU it also prints the median time over ``--repeats`` runs, the kernel's speed-up
over the reference and XLA's temporary bytes of each compiled program; on CPU the kernels
run interpreted, so only agreement is reported (use a few ``--rows``). ``--sweep`` times
candidate tile sizes for the forward kernel at the 8B shapes (GPU).

    python benchmarks/kernels.py [--rows N] [--repeats R] [--sweep] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import zlib

import jax
import jax.numpy as jnp

from jax_ensemble.core import projection
from jax_ensemble.kernels import (
    int8_lora_matmul,
    int8_lora_matmul_reference,
    multi_lora_matmul,
    multi_lora_matmul_reference,
    seeded_projection,
)
from jax_ensemble.kernels.backend import platform
from jax_ensemble.kernels.int8_lora import Blocks, matmul
from jax_ensemble.kernels.projection import leaf_key

LAYERS = {  # (in, out) of each adapted projection
    "smollm2-135m": {"q_proj": (576, 576), "k_proj": (576, 192), "gate_proj": (576, 1536), "down_proj": (1536, 576)},
    "llama-3.1-8b": {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "gate_proj": (4096, 14336),
                     "down_proj": (14336, 4096)},
}
NUM_LAYERS = {"smollm2-135m": 30, "llama-3.1-8b": 32}
RANK, ADAPTERS, EXAMPLES, DIM = 16, 4, 64, 1024
SWEEP = [Blocks(128, 128, 64, num_warps=8, num_stages=3), Blocks(128, 128, 64, num_warps=4, num_stages=4),
         Blocks(128, 128, 128, num_warps=8, num_stages=3), Blocks(128, 256, 64, num_warps=8, num_stages=4),
         Blocks(256, 128, 64, num_warps=8, num_stages=3), Blocks(64, 256, 64, num_warps=4, num_stages=4),
         Blocks(128, 128, 32, num_warps=4, num_stages=4)]


def _timed(fn, args, repeats: int, timing: bool) -> tuple[jax.Array, dict]:
    """Run jit(fn)(*args); on an accelerator also its median wall time and XLA temporaries."""
    compiled = jax.jit(fn).lower(*args).compile()
    out = jax.block_until_ready(compiled(*args))
    if not timing:
        return out, {}
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    memory = compiled.memory_analysis()
    temp = getattr(memory, "temp_size_in_bytes", None) if memory is not None else None
    return out, {"ms": 1e3 * statistics.median(times), "temp_bytes": temp}


def _error(out, ref) -> float:
    leaves, ref_leaves = jax.tree.leaves(out), jax.tree.leaves(ref)
    worst = 0.0
    for a, b in zip(leaves, ref_leaves):
        a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
        worst = max(worst, float(jnp.abs(a32 - b32).max() / max(float(jnp.abs(b32).max()), 1e-30)))
    return worst


def _compare(name: str, kernel_fn, reference_fn, args, repeats: int, timing: bool, flops: float | None = None) -> dict:
    out, k = _timed(kernel_fn, args, repeats, timing)
    ref, r = _timed(reference_fn, args, repeats, timing)
    row = {"case": name, "max_rel_error": _error(out, ref)}
    if timing:
        row.update({"kernel_ms": k["ms"], "xla_ms": r["ms"], "speedup": r["ms"] / k["ms"],
                    "kernel_temp_bytes": k["temp_bytes"], "xla_temp_bytes": r["temp_bytes"]})
        if flops:
            row["kernel_tflops"] = flops / k["ms"] / 1e9
    return row


def _operands(rows: int, fan_in: int, fan_out: int, key: int):
    keys = jax.random.split(jax.random.key(key), 5)
    x = jax.random.normal(keys[0], (rows, fan_in), jnp.bfloat16)
    q = jax.random.randint(keys[1], (fan_in, fan_out), -127, 128, jnp.int32).astype(jnp.int8)
    s = jax.random.uniform(keys[2], (fan_out,), jnp.float32, 1e-4, 1e-3)
    a = (jax.random.normal(keys[3], (fan_in, RANK)) / math.sqrt(fan_in)).astype(jnp.float32)
    b = (jax.random.normal(keys[4], (RANK, fan_out)) * 0.01).astype(jnp.float32)
    return x, q, s, a, b


def layer_cases(model: str, layer: str, rows: int, repeats: int, timing: bool) -> list[dict]:
    fan_in, fan_out = LAYERS[model][layer]
    x, q, s, a, b = _operands(rows, fan_in, fan_out, key=zlib.crc32(f"{model}{layer}".encode()))
    scaling = 2.0
    dy = jax.random.normal(jax.random.key(1), (rows, fan_out), jnp.bfloat16)

    def forward(fn):
        return lambda x, q, s, a, b, dy: fn(x, q, s, x @ a.astype(x.dtype), b, scaling)

    def forward_backward(fn):
        def loss(x, q, s, a, b, dy):
            return jnp.vdot(forward(fn)(x, q, s, a, b, dy).astype(jnp.float32), dy.astype(jnp.float32))
        return jax.grad(loss, argnums=(0, 3, 4))

    args = (x, q, s, a, b, dy)  # arguments, not closed-over constants (XLA would try to fold them)
    mkn = 2.0 * rows * fan_in * fan_out
    prefix = f"{model}/{layer} {fan_in}x{fan_out}"
    cases = [
        _compare(f"{prefix} int8_lora forward", forward(int8_lora_matmul), forward(int8_lora_matmul_reference),
                 args, repeats, timing, mkn),
        _compare(f"{prefix} int8_lora forward+backward", forward_backward(int8_lora_matmul),
                 forward_backward(int8_lora_matmul_reference), args, repeats, timing, 2 * mkn),
    ]
    if timing:  # the plain bfloat16 matmul the int8 kernel's throughput is held against
        w16 = (q.astype(jnp.float32) * s).astype(jnp.bfloat16)
        _, bf16 = _timed(lambda x, w: x @ w, (x, w16), repeats, timing)
        cases[0]["xla_bf16_matmul_ms"] = bf16["ms"]
        cases[0]["fraction_of_xla_bf16_throughput"] = bf16["ms"] / cases[0]["kernel_ms"]
    return cases


def multi_cases(model: str, rows: int, repeats: int, timing: bool) -> list[dict]:
    fan_in, fan_out = LAYERS[model]["q_proj"]
    x, q, s, _, _ = _operands(rows, fan_in, fan_out, key=7)
    keys = jax.random.split(jax.random.key(8), 3)
    a = jax.random.normal(keys[0], (ADAPTERS, fan_in, RANK)) / math.sqrt(fan_in)
    b = jax.random.normal(keys[1], (ADAPTERS, RANK, fan_out)) * 0.01
    members = jax.random.randint(keys[2], (rows,), 0, ADAPTERS)

    def shared(fn):
        return lambda x, q, s, a, b, members: fn(x, q, s, jnp.einsum("mk,ekr->emr", x, a.astype(x.dtype)), b, 2.0)

    def routed(fn):
        def run(x, q, s, a, b, members):
            xa = jnp.einsum("mk,ekr->emr", x, a.astype(x.dtype))[members, jnp.arange(rows)]
            return fn(x, q, s, xa, b, 2.0, members)
        return run

    args = (x, q, s, a, b, members)
    prefix = f"{model}/q_proj {fan_in}x{fan_out}, {ADAPTERS} adapters"
    return [
        _compare(f"{prefix} multi_lora every adapter on every row", shared(multi_lora_matmul),
                 shared(multi_lora_matmul_reference), args, repeats, timing, 2.0 * rows * fan_in * fan_out),
        _compare(f"{prefix} multi_lora one adapter per row", routed(multi_lora_matmul),
                 routed(multi_lora_matmul_reference), args, repeats, timing, 2.0 * rows * fan_in * fan_out),
    ]


def projection_case(model: str, examples: int, repeats: int, timing: bool) -> dict:
    """Pᵀg for the stacked lora_a leaf of every layer's q_proj: (layers, in, r) per example."""
    fan_in = LAYERS[model]["q_proj"][0]
    layers = NUM_LAYERS[model] if timing else 2
    template = {"lora_a": jax.ShapeDtypeStruct((layers, fan_in, RANK), jnp.float32)}
    xla = projection.make_projector(template, DIM, seed=0, block_rows=4096)
    spec = xla.leaves[0]
    g = jax.random.normal(jax.random.key(3), (examples, spec.size), jnp.float32)

    def kernel(g):
        return seeded_projection(g, key=leaf_key(0, zlib.crc32(spec.path.encode())), block_rows=4096, dim=DIM,
                                 scale=1 / math.sqrt(DIM))

    def reference(g):
        return projection.project(xla, {"lora_a": g.reshape((examples,) + spec.shape)})

    return _compare(f"{model} seeded_projection {examples} x {spec.size} -> {DIM}", kernel, reference, (g,), repeats,
                    timing, 2.0 * examples * spec.size * DIM)


def sweep(rows: int, repeats: int) -> list[dict]:
    """At the 8B shapes: the base kernel's time per candidate tile, forward and (q_proj,
    gate_proj) transposed as in the backward."""
    out = []

    def record(layer, what, fn, args, blocks=None):
        try:
            _, t = _timed(fn, args, repeats, True)
            out.append({"layer": layer, "what": what, "blocks": blocks and blocks.__dict__, "ms": t["ms"]})
        except Exception as e:  # a tile that does not compile on this chip (shared memory)
            out.append({"layer": layer, "what": what, "blocks": blocks and blocks.__dict__,
                        "error": str(e).splitlines()[0][:200]})

    for layer, (fan_in, fan_out) in LAYERS["llama-3.1-8b"].items():
        x, q, s, _, _ = _operands(rows, fan_in, fan_out, key=5)
        dy = jax.random.normal(jax.random.key(6), (rows, fan_out), jnp.bfloat16)
        for blocks in SWEEP:
            record(layer, "forward", lambda x, q, s, blocks=blocks: matmul(x, q, s, blocks=blocks), (x, q, s), blocks)
            if layer in ("q_proj", "gate_proj"):
                record(layer, "transposed", lambda dy, q, blocks=blocks: matmul(dy, q, transpose_w=True, blocks=blocks),
                       (dy, q), blocks)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None,
                        help="token rows per batch (default 4096 on an accelerator, 16 on CPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="time candidate tiles for the forward kernel (GPU)")
    parser.add_argument("--models", nargs="+", choices=list(LAYERS), default=None,
                        help="models whose layer shapes to run (default: both on an accelerator)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    backend = platform()
    timing = backend != "cpu"
    rows = args.rows or (4096 if timing else 16)
    report = {"backend": backend, "device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": rows,
              "rank": RANK, "mode": "compiled" if timing else "interpreted (agreement only)", "cases": []}
    models = args.models or (list(LAYERS) if timing else ["smollm2-135m"])
    for model in models:
        for layer in LAYERS[model]:
            report["cases"] += layer_cases(model, layer, rows, args.repeats, timing)
            print(f"done {model}/{layer}", file=sys.stderr, flush=True)
        report["cases"] += multi_cases(model, rows, args.repeats, timing)
        report["cases"].append(projection_case(model, EXAMPLES if timing else 8, args.repeats, timing))
    if not timing:  # one 8B-shaped layer, interpreted, to show the tiling at full width
        report["cases"] += layer_cases("llama-3.1-8b", "k_proj", rows, args.repeats, timing)
    if args.sweep and timing:
        report["sweep"] = sweep(rows, args.repeats)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['device']} ({backend}, jax {report['jax']}), {rows} rows, rank {RANK}: {report['mode']}")
        for row in report["cases"]:
            timing_text = (f"  kernel {row['kernel_ms']:.3f} ms  xla {row['xla_ms']:.3f} ms  "
                           f"speed-up {row['speedup']:.2f}x" if "kernel_ms" in row else "")
            print(f"{row['case']}: max rel error {row['max_rel_error']:.2e}{timing_text}")
    return report


if __name__ == "__main__":
    main()
