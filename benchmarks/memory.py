"""Base-weight bytes and peak RSS of the default model with f32, bf16 and int8 bases.

Each configuration runs in its own fresh process (so peak RSS is its own): load the
model, run one forward pass on a fixed 4×64-token batch, report the bytes of the frozen
base state and the process's peak resident set size. The peer is transformers' PyTorch
LlamaForCausalLM loaded from the same GGUF in float32 (when torch is installed); ``jax_runtime`` is the JAX process
with no model, the floor under every JAX row.

    python benchmarks/memory.py [--model smollm2-135m] [--json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

BATCH, LENGTH = 4, 64


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_jax(model_name: str, base_dtype: str) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from jax_ensemble.models import load_pretrained
    from jax_ensemble.models.lora import count_parameters

    model, _ = load_pretrained(model_name, base_dtype=base_dtype)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, (BATCH, LENGTH)), jnp.int32)
    model(ids, logit_positions=jnp.full((BATCH,), LENGTH - 1)).block_until_ready()
    counts = count_parameters(model)
    return {"base_bytes": counts.base_bytes, "base_params": counts.base_params, "peak_rss_bytes": _peak_rss_bytes()}


def measure_runtime() -> dict:
    """The JAX runtime alone (import, one tiny jitted op): the floor under every JAX row."""
    import jax
    import jax.numpy as jnp

    import jax_ensemble.models  # noqa: F401  (same imports as the model rows)

    jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
    return {"base_bytes": 0, "base_params": 0, "peak_rss_bytes": _peak_rss_bytes()}


def measure_torch(model_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from jax_ensemble.models import resolve_model_files

    path = resolve_model_files(model_name)
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, LENGTH))
    with torch.no_grad():
        model(ids, logits_to_keep=1)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"base_bytes": base_bytes, "base_params": sum(p.numel() for p in model.parameters()),
            "peak_rss_bytes": _peak_rss_bytes()}


def _child(model_name: str, kind: str) -> dict | None:
    cmd = [sys.executable, __file__, "--model", model_name, "--child", kind]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        if kind == "torch_f32":
            return None
        raise SystemExit(f"benchmark child {kind} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "torch_f32":
            result = measure_torch(args.model)
        elif args.child == "jax_runtime":
            result = measure_runtime()
        else:
            result = measure_jax(args.model, args.child)
        print(json.dumps(result))
        return
    rows = {kind: _child(args.model, kind) for kind in ("jax_runtime", "float32", "bfloat16", "int8", "torch_f32")}
    rows = {k: v for k, v in rows.items() if v is not None}
    summary = {
        "model": args.model,
        "batch": [BATCH, LENGTH],
        "results": rows,
        "int8_over_f32_base_bytes": rows["int8"]["base_bytes"] / rows["float32"]["base_bytes"],
        "bf16_over_f32_base_bytes": rows["bfloat16"]["base_bytes"] / rows["float32"]["base_bytes"],
        "int8_over_f32_peak_rss": rows["int8"]["peak_rss_bytes"] / rows["float32"]["peak_rss_bytes"],
    }
    if "torch_f32" in rows:
        summary["int8_peak_rss_over_torch_f32"] = rows["int8"]["peak_rss_bytes"] / rows["torch_f32"]["peak_rss_bytes"]
        summary["f32_peak_rss_over_torch_f32"] = rows["float32"]["peak_rss_bytes"] / rows["torch_f32"]["peak_rss_bytes"]
    if args.json:
        print(json.dumps(summary))
        return
    print(f"{'base':<10} {'base MiB':>10} {'peak RSS MiB':>13}")
    for kind, row in rows.items():
        print(f"{kind:<10} {row['base_bytes'] / 2**20:>10.1f} {row['peak_rss_bytes'] / 2**20:>13.1f}")
    for key, value in summary.items():
        if key.endswith(("_bytes", "_rss", "_torch_f32")) and isinstance(value, float):
            print(f"{key}: {value:.3f}")


if __name__ == "__main__":
    main()
