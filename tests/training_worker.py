"""Subprocess entry points for the sharding, multi-process and kill-and-resume tests.

``python training_worker.py meshes OUT``: 8 fake devices (XLA_FLAGS set by the caller).
``python training_worker.py distributed OUT PORT PROCESS_ID``: one of two processes.
``python training_worker.py train RUN_DIR``: a long single-device run with checkpoints.
``python training_worker.py loading OUT CASES``: checkpoints loaded into a mesh's shardings.
``python training_worker.py distributed-loading OUT PORT PROCESS_ID CHECKPOINT``: the same,
as one of two processes, counting what it reads.
Each writes its results under OUT / RUN_DIR (npz adapters or shards, JSON losses or layouts)."""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tiny_training import synthetic_table, tiny_split

from jax_ensemble.cli import configure_logging
from jax_ensemble.models import checkpoint_map
from jax_ensemble.models.checkpoint_files import SafetensorsFiles
from jax_ensemble.models.llama.modeling import LlamaConfig
from jax_ensemble.models.llama.params import load_llama
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.training.checkpoints import flatten, load_state
from jax_ensemble.training.engine import init_state, make_optimizer, train
from jax_ensemble.training.losses import classification_objective
from jax_ensemble.training.mesh import (
    initialize_distributed,
    leaf_sharding,
    make_mesh,
    put_global,
    to_host,
    tree_shardings,
)
from jax_ensemble.training.settings import MeshConfig, TrainingConfig

SHORT = TrainingConfig(learning_rate=1e-2, warmup_steps=2, max_steps=8, batch_size=16, grad_accum_steps=2,
                       eval_every=4, checkpoint_every=4, keep_last=3, eval_batch_size=8)
LONG = TrainingConfig(learning_rate=1e-2, warmup_steps=5, max_steps=60, batch_size=8, grad_accum_steps=2,
                      eval_every=20, checkpoint_every=10, keep_last=2, eval_batch_size=8)


def spawn(*args: str, devices: int) -> subprocess.Popen:
    """Start ``training_worker.py ARGS`` with ``devices`` fake CPU devices. The workers
    share a persistent XLA compilation cache (they compile the same small programs)."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(Path(tempfile.gettempdir()) / "jax-ensemble-test-xla-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen([sys.executable, __file__, *args], cwd=Path(__file__).parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> str:
    """The output of a spawned worker, which must exit with status 0."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]
    return output


def run(config: TrainingConfig, mesh, run_dir=None, dropout: float = 0.0):
    graphdef, lora, base = tiny_split(dropout=dropout)
    return train(classification_objective(graphdef), lora, base, synthetic_table(48), config, mesh, seeds=[0],
                 validation=synthetic_table(16, seed=1), dropout=dropout > 0, run_dir=run_dir, progress=False)


def save_adapter(path: Path, lora) -> None:
    """Gather ``lora`` (a collective: every process calls it); process 0 writes the npz."""
    host = to_host(lora)
    if jax.process_index() == 0:
        np.savez(path, **flatten(host))


def meshes(out: Path) -> None:
    """Loss curves on 1 device and on a 2x2x2 mesh; a checkpoint saved under one mesh
    restored under others (exactly) and resumed under another (to the same adapter)."""
    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    report = {}
    for name, mesh_config in [("1", None), ("2x2x2", MeshConfig(data=2, fsdp=2, tensor=2))]:
        mesh = one if mesh_config is None else make_mesh(mesh_config)
        result = run(SHORT, mesh, run_dir=out / name)
        report[name] = [r["loss"] for r in result.history]
        save_adapter(out / f"{name}.npz", result.lora)
    # shard shapes of the int8 base and the LoRA state under the 2x2x2 mesh
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, lora, base = tiny_split()
    placed = put_global(base, tree_shardings(base, mesh))
    state = init_state(lora, make_optimizer(SHORT, 8))
    placed_state = put_global(state, tree_shardings(state, mesh))
    report["shards"] = {
        name: list(x.addressable_shards[0].data.shape)
        for name, x in {**flatten(placed), **flatten(placed_state)}.items()
        if name in ("layers.self_attn.q_proj.kernel", "layers.self_attn.q_proj.scale", "embed_tokens.embedding",
                    "lora.layers.self_attn.q_proj.lora_a", "lora.layers.self_attn.q_proj.lora_b",
                    "opt_state.1.0.mu.layers.self_attn.q_proj.lora_a")
    }
    report["spec"] = str(flatten(placed)["layers.self_attn.q_proj.kernel"].sharding.spec)
    # restore the 2x2x2 run's step-4 checkpoint under 1 device and under 8x1x1, exactly
    template = init_state(lora, make_optimizer(SHORT, 8))
    restored = {}
    for name, target in [("1", one), ("8x1x1", make_mesh(MeshConfig(data=8)))]:
        state, step = load_state(out / "2x2x2" / "checkpoints", template, tree_shardings(template, target), step=4)
        restored[name] = flatten(to_host(state))
        assert step == 4
    report["restore_exact"] = all(
        np.array_equal(restored["1"][k], restored["8x1x1"][k]) for k in restored["1"]
    )
    # resume the 2x2x2 run from step 4 under the 4x2x1 mesh ... and under 1 device
    for name, target in [("resumed_4x2x1", make_mesh(MeshConfig(data=4, fsdp=2))), ("resumed_1", one)]:
        shutil.copytree(out / "2x2x2", out / name)
        shutil.rmtree(out / name / "checkpoints" / "8")
        result = run(SHORT, target, run_dir=out / name)
        report[name] = [r["loss"] for r in result.history]
        save_adapter(out / f"{name}.npz", result.lora)
    (out / "report.json").write_text(json.dumps(report))


def distributed(out: Path, port: int, process_id: int) -> None:
    """One of two processes (2 devices each) training on a 2x2x1 mesh spanning both."""
    mesh_config = MeshConfig(data=2, fsdp=2, coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
    initialize_distributed(mesh_config)
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    configure_logging("info")  # as the CLI does: records of process 0 only
    logging.getLogger("jax_ensemble.test").info("log record of process %d", process_id)
    result = run(SHORT, make_mesh(mesh_config), run_dir=out / "run")
    save_adapter(out / "distributed.npz", result.lora)
    if process_id == 0:
        (out / "distributed.json").write_text(json.dumps([r["loss"] for r in result.history]))


def dump_shards(model, out: Path, name: str) -> None:
    """This process's addressable shards of every variable of ``model``: ``out/<name>.npz``
    (``<variable>@<device id>`` → the shard, bfloat16 as float32) and ``out/<name>.json``
    (variable → global shape, spec and, per device id, the shard's index as [start, stop] pairs)."""
    data, layout = {}, {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        array, key = var[...], ".".join(map(str, path))
        layout[key] = {"shape": list(array.shape), "spec": list(array.sharding.spec), "shards": {}}
        for shard in array.addressable_shards:
            block = np.asarray(shard.data)
            data[f"{key}@{shard.device.id}"] = block.astype(np.float32) if array.dtype == jnp.bfloat16 else block
            layout[key]["shards"][shard.device.id] = [s.indices(n)[:2] for s, n in zip(shard.index, array.shape)]
    np.savez(out / f"{name}.npz", **data)
    (out / f"{name}.json").write_text(json.dumps(layout))


def loading(out: Path, cases: str) -> None:
    """Each case ``[name, checkpoint, base_dtype, [data, fsdp, tensor], chunk_bytes]`` of
    the JSON list ``cases`` loaded straight into that mesh's shardings, reading blocks of
    at most ``chunk_bytes`` (null: the default), its shards dumped as ``name``."""
    default = checkpoint_map.CHUNK_BYTES
    for name, checkpoint, base_dtype, axes, chunk_bytes in json.loads(cases):
        checkpoint_map.CHUNK_BYTES = chunk_bytes or default
        mesh = make_mesh(MeshConfig(*axes))
        model, _ = load_pretrained(checkpoint, base_dtype=base_dtype, sharding=leaf_sharding(mesh))
        dump_shards(model, out, name)


class CountingSource:
    """A checkpoint's tensors, counting how many elements of each are read."""

    def __init__(self, source):
        self.source, self.read = source, collections.Counter()

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def get(self, name):
        block = self.source.get(name)
        self.read[name] += block.size
        return block

    def get_slice(self, name, index):
        block = self.source.get_slice(name, index)
        self.read[name] += block.size
        return block


DISTRIBUTED_LOADS = {
    # name: base dtype, mesh (data, fsdp, tensor), the fraction of each layer matrix a process reads
    "int8-1x1x8": ("int8", (1, 1, 8), 0.5),  # out channels split between the processes
    "int8-1x8x1": ("int8", (1, 8, 1), 1.0),  # in channels split, but the int8 scales need whole rows
    "float32-1x8x1": ("float32", (1, 8, 1), 0.5),  # in channels split
}


def distributed_loading(out: Path, port: int, process_id: int, checkpoint: Path) -> None:
    """One of two processes (4 devices each) loading the tiny Llama into an 8-device mesh
    spanning both, as each case of :data:`DISTRIBUTED_LOADS`; dumps its shards and the
    elements it read per tensor."""
    initialize_distributed(MeshConfig(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                                      process_id=process_id))
    assert jax.process_count() == 2 and len(jax.devices()) == 8
    config = LlamaConfig.from_hf_config(json.loads((checkpoint / "config.json").read_text()))
    for name, (base_dtype, axes, _) in DISTRIBUTED_LOADS.items():
        source = CountingSource(SafetensorsFiles(checkpoint))
        model = load_llama(config, source, base_dtype=base_dtype, sharding=leaf_sharding(make_mesh(MeshConfig(*axes))))
        dump_shards(model, out, f"{name}-{process_id}")
        (out / f"{name}-{process_id}-read.json").write_text(json.dumps(source.read))


def long_run(run_dir: Path) -> None:
    """A long run with LoRA dropout; writes final.npz when it completes."""
    result = run(LONG, make_mesh(MeshConfig(data=1)), run_dir=run_dir, dropout=0.1)
    save_adapter(run_dir / "final.npz", result.lora)


def inference(out: Path) -> None:
    """Stacked, routed-ensemble (with a booster) and boosting-round logits on one device and
    on a 2x2x2 mesh (rows over data x fsdp, the base by the partition rules)."""
    from jax_ensemble.core.ensemble import add_booster, make_ensemble
    from jax_ensemble.core.trees import stack_trees
    from jax_ensemble.stages.ensemble import ensemble_table_logits, stacked_table_logits

    graphdef, lora, base = tiny_split()
    other = jax.tree.map(lambda x: -0.5 * x, lora)
    members = stack_trees([lora, other, jax.tree.map(lambda x: 0.3 * x, lora)])
    table = synthetic_table(24)
    table["task_index"] = np.arange(24, dtype=np.int32) % 3
    weights = np.array([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.2, 0.3, 0.5]])
    ensemble = add_booster(make_ensemble(members, weights), other, np.array([0.0, 0.5, 0.1]))
    report = {}
    for name, mesh in [("1", None), ("2x2x2", make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))]:
        report[name] = {
            "stacked": stacked_table_logits(graphdef, members, base, table, 8, mesh=mesh).tolist(),
            "ensemble": ensemble_table_logits(graphdef, ensemble, base, table, 8, mesh=mesh).tolist(),
        }
    (out / "inference.json").write_text(json.dumps(report))


if __name__ == "__main__":
    mode, target = sys.argv[1], Path(sys.argv[2])
    if mode == "inference":
        inference(target)
    elif mode == "meshes":
        meshes(target)
    elif mode == "distributed":
        distributed(target, int(sys.argv[3]), int(sys.argv[4]))
    elif mode == "loading":
        loading(target, sys.argv[3])
    elif mode == "distributed-loading":
        distributed_loading(target, int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5]))
    else:
        long_run(target)
