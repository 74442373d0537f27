"""Peak host memory of loading an int8 base onto a mesh: straight into its shardings vs
the plain load followed by ``put_global`` (what training did before).

The checkpoint is a random Llama-3.1-8B-shaped model scaled down by ``--scale``: hidden
size, intermediate size, heads, KV heads and vocabulary divided by it, head dim (128) and
the 32 layers kept, so every matrix, and the model, shrinks by ``scale²`` and keeps the
real proportions (``--scale 1`` is the real 8.0B shape). It is written once with
safetensors in bfloat16, as the real checkpoint is. Each way of loading runs in its own
fresh process with 8 fake CPU devices and a ``mesh.fsdp=8`` mesh (the paper config's):

- ``plain``: ``load_pretrained`` on one device, then ``put_global(state, tree_shardings)``;
- ``sharded``: ``load_pretrained(..., sharding=leaf_sharding(mesh))``, with the blocks it
  reads at once (``checkpoint_map.CHUNK_BYTES``) scaled down by ``scale²`` too, so they
  keep their proportion to the tensors;
- ``runtime``: the JAX runtime with 8 devices and no model, the floor under both.

Memory is read from Linux's ``/proc/self/status``: the peak RSS (``VmHWM``) and the peak
of the anonymous part (``RssAnon``, sampled every millisecond while loading). Both ways
map the safetensors file, and the file pages they touch count in RSS but not in
``RssAnon``, so the anonymous figures are what loading allocates. On CPU the devices'
buffers are host memory too, so each row also reports the bytes the 8 devices hold at
the end (``resident_bytes``) and the anonymous peak's excess over the runtime floor and
those buffers (``transient_bytes``): what loading needed beyond the placed model.

    python benchmarks/loading.py [--scale 8] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

DEVICES = 8
LLAMA_31_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                   vocab_size=128256, num_hidden_layers=32, head_dim=128)


def scaled_config(scale: int) -> dict:
    """Llama-3.1-8B's ``config.json`` with the widths divided by ``scale``."""
    shape = {k: v // scale for k, v in LLAMA_31_8B.items() if k not in ("num_hidden_layers", "head_dim")}
    return dict(LLAMA_31_8B, **shape, model_type="llama", max_position_embeddings=8192, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def write_checkpoint(directory: Path, config: dict) -> int:
    """A random bfloat16 checkpoint of ``config`` in ``directory``; returns its file's bytes."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    h, f, v, d = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes.update({layer + "input_layernorm.weight": (h,), layer + "post_attention_layernorm.weight": (h,),
                       layer + "self_attn.q_proj.weight": (q, h), layer + "self_attn.k_proj.weight": (kv, h),
                       layer + "self_attn.v_proj.weight": (kv, h), layer + "self_attn.o_proj.weight": (h, q),
                       layer + "mlp.gate_proj.weight": (f, h), layer + "mlp.up_proj.weight": (f, h),
                       layer + "mlp.down_proj.weight": (h, f)})
    rng = np.random.default_rng(0)
    tensors = {name: (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)
               for name, shape in shapes.items()}
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return (directory / "model.safetensors").stat().st_size


def _status_bytes(field: str) -> int:
    """A memory field of Linux's ``/proc/self/status`` in bytes."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field + ":"))


def _peak_rss_bytes() -> int:
    """Peak resident memory (``VmHWM``; unlike ``ru_maxrss`` not inherited from the parent)."""
    return _status_bytes("VmHWM")


def _anon_rss_bytes() -> int:
    """This process's anonymous resident memory (``RssAnon``: not file pages)."""
    return _status_bytes("RssAnon")


class AnonPeak(threading.Thread):
    """The peak of :func:`_anon_rss_bytes`, sampled every millisecond until ``stop()``."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = _anon_rss_bytes(), threading.Event()
        self.start()

    def run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _anon_rss_bytes())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _anon_rss_bytes())


def measure(kind: str, directory: Path, scale: int) -> dict:
    """One row, in this (fresh) process: load ``directory``'s checkpoint the ``kind`` way."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jax_ensemble.models import checkpoint_map
    from jax_ensemble.models.checkpoint_files import SafetensorsFiles
    from jax_ensemble.models.llama.modeling import LlamaConfig
    from jax_ensemble.models.llama.params import load_llama
    from jax_ensemble.training.mesh import leaf_sharding, make_mesh, put_global, tree_shardings
    from jax_ensemble.training.settings import MeshConfig

    mesh = make_mesh(MeshConfig(data=1, fsdp=DEVICES))
    jax.jit(lambda x: x + 1)(jnp.ones(4)).block_until_ready()
    if kind == "runtime":
        return {"peak_rss_bytes": _peak_rss_bytes(), "peak_anon_bytes": _anon_rss_bytes(), "resident_bytes": 0,
                "seconds": 0.0}
    config = LlamaConfig.from_hf_config(json.loads((directory / "config.json").read_text()))
    sampler = AnonPeak()
    start = time.perf_counter()
    if kind == "plain":
        state = nnx.state(load_llama(config, SafetensorsFiles(directory), base_dtype="int8"))
        state = put_global(state, tree_shardings(state, mesh))  # the single-device copy is dropped here
    else:
        checkpoint_map.CHUNK_BYTES //= scale**2
        model = load_llama(config, SafetensorsFiles(directory), base_dtype="int8", sharding=leaf_sharding(mesh))
        state = nnx.state(model)
        del model
    leaves = jax.block_until_ready(jax.tree.leaves(state))
    seconds = time.perf_counter() - start
    peak_anon = sampler.stop()
    resident = sum(s.data.nbytes for x in leaves for s in x.addressable_shards)
    return {"peak_rss_bytes": _peak_rss_bytes(), "peak_anon_bytes": peak_anon, "resident_bytes": resident,
            "seconds": round(seconds, 2), "model_bytes": sum(x.nbytes for x in leaves)}


def _child(kind: str, directory: Path, scale: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, __file__, "--child", kind, "--dir", str(directory), "--scale", str(scale)],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"benchmark child {kind} failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=8, choices=(1, 2, 4, 8),
                        help="divide Llama-3.1-8B's widths by this (it must divide the 8 KV heads)")
    parser.add_argument("--dir", help="where to write (or find) the checkpoint; default: a temporary directory")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, Path(args.dir), args.scale)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(args.dir or tmp)
        config = scaled_config(args.scale)
        if (directory / "config.json").is_file() and json.loads((directory / "config.json").read_text()) == config:
            file_bytes = (directory / "model.safetensors").stat().st_size
        else:
            file_bytes = write_checkpoint(directory, config)
        rows = {kind: _child(kind, directory, args.scale) for kind in ("runtime", "plain", "sharded")}
    floor = rows["runtime"]["peak_anon_bytes"]
    for kind in ("plain", "sharded"):
        rows[kind]["transient_bytes"] = rows[kind]["peak_anon_bytes"] - floor - rows[kind]["resident_bytes"]
    summary = {
        "scale": args.scale,
        "config": {k: config[k] for k in LLAMA_31_8B},
        "checkpoint_bytes": file_bytes,
        "devices": DEVICES,
        "mesh": {"data": 1, "fsdp": DEVICES, "tensor": 1},
        "results": rows,
        "sharded_over_plain_peak_rss": rows["sharded"]["peak_rss_bytes"] / rows["plain"]["peak_rss_bytes"],
        "sharded_over_plain_peak_anon": rows["sharded"]["peak_anon_bytes"] / rows["plain"]["peak_anon_bytes"],
        "sharded_over_plain_transient": rows["sharded"]["transient_bytes"] / rows["plain"]["transient_bytes"],
    }
    if args.json:
        print(json.dumps(summary))
        return
    mib = 2**20
    print(f"Llama-3.1-8B / {args.scale} (real proportions): checkpoint {file_bytes / mib:.0f} MiB (bfloat16), "
          f"int8 model {rows['sharded']['model_bytes'] / mib:.0f} MiB, {DEVICES} CPU devices, mesh fsdp={DEVICES}")
    print(f"{'load':<9} {'peak RSS MiB':>13} {'peak anon MiB':>14} {'on devices MiB':>15} {'transient MiB':>14} "
          f"{'seconds':>8}")
    for kind, row in rows.items():
        transient = row.get("transient_bytes")
        print(f"{kind:<9} {row['peak_rss_bytes'] / mib:>13.0f} {row['peak_anon_bytes'] / mib:>14.0f} "
              f"{row['resident_bytes'] / mib:>15.0f} {'' if transient is None else f'{transient / mib:.0f}':>14} "
              f"{row['seconds']:>8.2f}")
    for key in ("sharded_over_plain_peak_rss", "sharded_over_plain_peak_anon", "sharded_over_plain_transient"):
        print(f"{key}: {summary[key]:.3f}")


if __name__ == "__main__":
    main()
