"""Sharding: partition rules as data; 8 fake devices and two processes give the
single-device training run; checkpoints restore under other meshes.

The multi-device runs happen in subprocesses (XLA_FLAGS must be set before jax loads);
see tests/training_worker.py. Reference: the same training on one device. Tolerance:
losses rtol 1e-5 and adapters atol 1e-5 (only the order of float32 reductions differs
across layouts); restores are exact."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from tiny_training import assert_tensorboard_matches_jsonl
from training_worker import SHORT, finish, run, spawn

from jax_ensemble.errors import ConfigError
from jax_ensemble.training.checkpoints import flatten
from jax_ensemble.training.mesh import AXES, check_batch_fits, make_mesh, partition_spec
from jax_ensemble.training.settings import MeshConfig, TrainingConfig, check_batch_divisible


def test_partition_rules_cover_int8_base_lora_optimizer_state_and_batches():
    mesh = AbstractMesh((2, 2, 2), AXES)
    assert partition_spec("layers.self_attn.q_proj.kernel", (30, 576, 576), mesh) == P(None, "fsdp", "tensor")
    assert partition_spec("layers.self_attn.q_proj.scale", (30, 576), mesh) == P(None, "tensor")
    assert partition_spec("layers.self_attn.k_proj.lora_a", (30, 576, 4), mesh) == P(None, "fsdp", None)
    assert partition_spec("lora.layers.self_attn.k_proj.lora_b", (30, 4, 192), mesh) == P(None, None, "tensor")
    assert partition_spec("opt_state.1.0.nu.layers.self_attn.k_proj.lora_b", (30, 4, 192), mesh) == P(
        None, None, "tensor")
    assert partition_spec("embed_tokens.embedding", (49152, 576), mesh) == P("tensor", "fsdp")
    assert partition_spec("embed_tokens.scale", (49152,), mesh) == P("tensor")
    assert partition_spec("layers.input_layernorm.weight", (30, 576), mesh) == P()
    assert partition_spec("opt_state.1.0.count", (), mesh) == P()
    # a dimension the mesh axes do not divide is replicated
    assert partition_spec("layers.self_attn.k_proj.kernel", (30, 576, 3), mesh) == P(None, "fsdp", None)
    # a rule with more axes than the array is a config error naming the rule and the array
    with pytest.raises(ConfigError, match=r"has 3 axes but layers.self_attn.q_proj.kernel has shape \(576, 576\)"):
        partition_spec("layers.self_attn.q_proj.kernel", (576, 576), mesh)


def test_batch_size_not_divisible_by_data_axes_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"batch_size=6 .* not divisible by the mesh's data axes \(mesh.data x mesh.fsdp = 4\)"):
        check_batch_divisible(TrainingConfig(batch_size=6), MeshConfig(data=2, fsdp=2).batch_shards())
    mesh = AbstractMesh((2, 2, 1), AXES)
    check_batch_fits(TrainingConfig(batch_size=8, eval_batch_size=12), mesh)
    with pytest.raises(ConfigError, match=r"training.eval_batch_size = 6 does not split over mesh data x fsdp = 4"):
        check_batch_fits(TrainingConfig(batch_size=8, eval_batch_size=6), mesh)


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes")
    finish(spawn("meshes", str(out), devices=8))
    return out, json.loads((out / "report.json").read_text())


def _adapter(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return dict(data)


def _assert_adapters_close(a: Path, b: Path, atol: float = 1e-5) -> None:
    left, right = _adapter(a), _adapter(b)
    assert left.keys() == right.keys() and left
    for key in left:
        np.testing.assert_allclose(left[key], right[key], atol=atol, err_msg=key)


def test_eight_devices_give_the_single_device_loss_curve(eight_devices):
    out, report = eight_devices
    np.testing.assert_allclose(report["2x2x2"], report["1"], rtol=1e-5)
    _assert_adapters_close(out / "2x2x2.npz", out / "1.npz")
    assert len(report["1"]) == 8


def test_base_lora_and_optimizer_state_are_sharded_on_the_mesh(eight_devices):
    _, report = eight_devices
    assert report["spec"] == "P(None, 'fsdp', 'tensor')"
    assert report["shards"] == {
        "layers.self_attn.q_proj.kernel": [2, 16, 16],  # (L, 32, 32) int8 over fsdp x tensor
        "layers.self_attn.q_proj.scale": [2, 16],
        "embed_tokens.embedding": [48, 16],  # (96, 32) over tensor x fsdp
        "lora.layers.self_attn.q_proj.lora_a": [2, 16, 4],
        "lora.layers.self_attn.q_proj.lora_b": [2, 4, 16],
        "opt_state.1.0.mu.layers.self_attn.q_proj.lora_a": [2, 16, 4],
    }


def test_checkpoint_from_one_mesh_restores_and_resumes_under_others(eight_devices):
    """The 2x2x2 run's step-4 checkpoint restores exactly on 1 device and on 8x1x1, and
    resuming it on a 4x2x1 mesh or on 1 device finishes with the 2x2x2 run's adapter."""
    out, report = eight_devices
    assert report["restore_exact"]
    for name in ("resumed_4x2x1", "resumed_1"):
        np.testing.assert_allclose(report[name], report["2x2x2"], rtol=1e-5)
        _assert_adapters_close(out / f"{name}.npz", out / "2x2x2.npz")


def test_two_processes_joined_by_jax_distributed_match_one_process(tmp_path):
    """Two processes x 2 CPU devices (gloo collectives), a 2x2x1 mesh spanning both,
    checkpointing with orbax from both; compared with this process's single-device run.
    Only process 0 logs and writes metrics (metrics.jsonl and TensorBoard events, each step once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    processes = [spawn("distributed", str(tmp_path), port, str(i), devices=2) for i in (0, 1)]
    outputs = [finish(process) for process in processes]
    assert "log record of process 0" in outputs[0] and "log record of process" not in outputs[1]
    assert_tensorboard_matches_jsonl(tmp_path / "run")  # a second writer would repeat every step
    result = run(SHORT, make_mesh(MeshConfig(data=1)))
    np.testing.assert_allclose(json.loads((tmp_path / "distributed.json").read_text()),
                               [r["loss"] for r in result.history], rtol=1e-5)
    single = {k: np.asarray(v) for k, v in flatten(result.lora).items()}
    distributed = _adapter(tmp_path / "distributed.npz")
    assert single.keys() == distributed.keys()
    for key in single:
        np.testing.assert_allclose(distributed[key], single[key], atol=1e-5, err_msg=key)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["4", "8"]


def test_stacked_and_routed_ensemble_inference_on_a_mesh_equal_one_device(tmp_path):
    """Inference as the main job runs it (stacked members; the routed ensemble with a booster
    and the base term), 8 rows per batch split over data x fsdp = 4 devices."""
    finish(spawn("inference", str(tmp_path), devices=8))
    report = json.loads((tmp_path / "inference.json").read_text())
    for what in ("stacked", "ensemble"):
        one, mesh = np.array(report["1"][what]), np.array(report["2x2x2"][what])
        assert one.shape == mesh.shape and np.abs(one).max() > 0
        np.testing.assert_allclose(mesh, one, rtol=1e-5, atol=1e-5 * np.abs(one).max())

