"""Loading straight into a mesh's shardings (``load_pretrained(..., sharding=leaf_sharding(mesh))``).

The sharded loads run in subprocesses with 8 fake CPU devices (one process, or two
processes x 4 devices joined by ``jax.distributed``; tests/training_worker.py) and dump
every addressable shard with its index. Reference: the plain single-device load of the
same checkpoint in this process (itself checked against transformers in test_models and
test_gpt2). Every shard must equal the plain array at its index exactly (int8 values,
scales and float leaves; bfloat16 compared after an exact cast to float32), the shards
must cover each array, and a partitioned variable's shards must be blocks, not copies."""

from __future__ import annotations

import json
import socket

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from training_worker import DISTRIBUTED_LOADS, finish, spawn

from jax_ensemble.models import load_pretrained


def _plain(checkpoint, base_dtype: str) -> dict[str, np.ndarray]:
    model, _ = load_pretrained(str(checkpoint), base_dtype=base_dtype)
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model)):
        array = var[...]
        out[".".join(map(str, path))] = np.asarray(array.astype(jnp.float32) if array.dtype == jnp.bfloat16 else array)
    return out


def _shards(out, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    with np.load(out / f"{name}.npz") as data:
        return json.loads((out / f"{name}.json").read_text()), dict(data)


def _assert_shards_equal_plain(plain: dict[str, np.ndarray], dumps: list[tuple[dict, dict]]) -> None:
    """Every shard of every dump equals ``plain`` at its index, and together they cover it."""
    for layout, _ in dumps:
        assert layout.keys() == plain.keys()
    for key, reference in plain.items():
        covered = np.zeros(reference.shape, bool)
        for layout, data in dumps:
            for device, bounds in layout[key]["shards"].items():
                index = tuple(slice(a, b) for a, b in bounds)
                shard = data[f"{key}@{device}"]
                assert shard.dtype == reference.dtype, key
                np.testing.assert_array_equal(shard, reference[index], err_msg=f"{key} on device {device}")
                covered[index] = True
        assert covered.all(), key


# name, checkpoint fixture, base dtype, mesh (data, fsdp, tensor), bytes read at once (None: the default)
CASES = [
    ("llama-int8-2x2x2", "tiny_hf_dir", "int8", (2, 2, 2), None),
    ("llama-int8-2x2x2-chunked", "tiny_hf_dir", "int8", (2, 2, 2), 1000),  # 3 lines a block: across device blocks
    ("llama-bfloat16-1x2x4", "tiny_hf_dir", "bfloat16", (1, 2, 4), None),
    ("gguf-int8-1x2x4", "tiny_gguf", "int8", (1, 2, 4), 1000),  # K's 2 heads' rows over tensor=4: half a head each
    ("gpt2-int8-2x2x2", "tiny_gpt2_dir", "int8", (2, 2, 2), None),
]


@pytest.fixture(scope="module")
def sharded(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded_loading")
    checkpoints = {case[1]: str(request.getfixturevalue(case[1])) for case in CASES}
    cases = [[name, checkpoints[fixture], dtype, list(axes), chunk] for name, fixture, dtype, axes, chunk in CASES]
    finish(spawn("loading", str(out), json.dumps(cases), devices=8))
    return out


@pytest.mark.parametrize("name,fixture,base_dtype,axes,chunk_bytes", CASES, ids=[c[0] for c in CASES])
def test_sharded_load_equals_the_plain_load_leaf_by_leaf(sharded, request, name, fixture, base_dtype, axes,
                                                         chunk_bytes):
    layout, data = _shards(sharded, name)
    _assert_shards_equal_plain(_plain(request.getfixturevalue(fixture), base_dtype), [(layout, data)])
    # every device of the mesh holds a shard of every variable, and nothing is left on one device
    assert all(len(v["shards"]) == 8 for v in layout.values())


def test_each_device_holds_only_its_blocks(sharded):
    """Shard shapes from the partition table (training/mesh.py) for the tiny configs
    (hidden 64, intermediate 96, vocab 258, 2 layers, 4 heads / 2 KV heads of 16): a
    dimension the mesh axes do not divide (258 over tensor=4) stays whole."""
    expected = {
        "llama-int8-2x2x2": {
            "layers.self_attn.q_proj.kernel": [2, 32, 32],
            "layers.self_attn.q_proj.scale": [2, 32],
            "layers.mlp.down_proj.kernel": [2, 48, 32],
            "embed_tokens.embedding": [129, 32],
            "embed_tokens.scale": [129],
            "lm_head.kernel": [32, 129],
            "layers.input_layernorm.weight": [2, 64],  # replicated
        },
        "llama-bfloat16-1x2x4": {
            "layers.self_attn.k_proj.kernel": [2, 32, 8],
            "embed_tokens.embedding": [258, 32],
            "lm_head.kernel": [32, 258],
        },
        "gguf-int8-1x2x4": {"layers.self_attn.k_proj.kernel": [2, 32, 8], "layers.self_attn.k_proj.scale": [2, 8]},
        "gpt2-int8-2x2x2": {"layers.attn.c_attn.kernel": [2, 32, 96], "wte.embedding": [129, 32],
                            "wpe.embedding": [64, 32]},
    }
    for name, shapes in expected.items():
        layout, data = _shards(sharded, name)
        for key, shape in shapes.items():
            assert {tuple(data[f"{key}@{d}"].shape) for d in layout[key]["shards"]} == {tuple(shape)}, (name, key)
        for key, leaf in layout.items():
            if any(leaf["spec"]):  # a partitioned variable
                full = np.prod(leaf["shape"])
                assert all(data[f"{key}@{d}"].size < full for d in leaf["shards"]), (name, key)


def test_two_processes_each_read_and_hold_only_their_blocks(tiny_hf_dir, tmp_path):
    """Two processes x 4 devices: each holds only its 4 devices' shards, together they
    equal the plain load, and each reads only its part of every layer matrix
    (``DISTRIBUTED_LOADS``: half where its out channels, or a float base's in channels,
    are half; all of it where an int8 base's in channels are split, as the scales need
    whole rows)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    processes = [spawn("distributed-loading", str(tmp_path), port, str(i), str(tiny_hf_dir), devices=4)
                 for i in (0, 1)]
    for process in processes:
        finish(process)
    sizes = {name: int(np.prod(shape)) for name, shape in _tensor_shapes(tiny_hf_dir).items()}
    for name, (base_dtype, _, fraction) in DISTRIBUTED_LOADS.items():
        dumps = [_shards(tmp_path, f"{name}-{i}") for i in (0, 1)]
        _assert_shards_equal_plain(_plain(tiny_hf_dir, base_dtype), dumps)
        devices = [{d for leaf in layout.values() for d in leaf["shards"]} for layout, _ in dumps]
        assert len(devices[0]) == len(devices[1]) == 4 and not devices[0] & devices[1]
        for i in (0, 1):
            read = json.loads((tmp_path / f"{name}-{i}-read.json").read_text())
            assert read.keys() == sizes.keys()
            for tensor, size in sizes.items():
                if ".layers." in tensor and tensor.endswith("proj.weight"):
                    assert read[tensor] == size * fraction, (name, i, tensor)
                else:  # norms, the embedding and head: replicated, or split, read once at most
                    assert read[tensor] <= size, (name, i, tensor)


def _tensor_shapes(checkpoint) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(checkpoint / "model.safetensors"), framework="numpy") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
