"""The capacity planner: its memory model against XLA's ``memory_analysis()`` of the project's
compiled steps (training, per-example gradients, stacked inference) on a small Llama with 8
fake CPU devices, its closed forms, the architectures it reads without weights, and the
``plan`` command (JSON, per-stage fit, one-line errors).

Tolerance of the memory model: arguments (base weights, training state and batch under the
partition rules) exactly; arguments + outputs + temporaries within 25%. The activation
formulas count the saved residuals of the remat policy and one layer's working set; XLA's
buffer assignment reuses and fuses buffers they cannot see, and with ``fsdp``/``tensor``
sharding the SPMD partitioner's gathered activations and partial sums come and go. Measured
(benchmarks/RESULTS.md), plan / XLA: training 0.996–0.997 on one device, 0.89–1.14 on
(8,1,1), (1,8,1), (2,2,2), (2,4,1) meshes; gradients 0.96–0.97 (reverse, forward);
stacked inference 0.87–1.05. CPU XLA computes bf16 in float32 (same temporaries), so
the check is float32; bf16's halved activations are the formula's assumption.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_one_line_error, cli

from jax_ensemble.config import load_config
from jax_ensemble.errors import ConfigError
from jax_ensemble.models import LlamaConfig
from jax_ensemble.models.sources import REGISTRY
from jax_ensemble.stages import accounting
from jax_ensemble.stages.architectures import KNOWN_ARCHITECTURES, architecture_of
from jax_ensemble.stages.plan import DEVICES, plan_run
from jax_ensemble.storage.packages import cache_dir

HERE = Path(__file__).resolve().parent
TOLERANCE = 0.25


@pytest.mark.slow
def test_memory_model_within_tolerance_of_xla_memory_analysis():
    out = subprocess.run([sys.executable, str(HERE / "plan_worker.py")], capture_output=True, text=True, timeout=900,
                         cwd=HERE.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    cases = json.loads(out.stdout.strip().splitlines()[-1])
    assert {c["step"] for c in cases} == {"training", "gradients", "inference"}
    for case in cases:
        if case["plan_arguments"] is not None:
            assert case["plan_arguments"] == case["xla"]["arguments"], case
        ratio = case["plan"] / case["xla"]["total"]
        assert 1 - TOLERANCE <= ratio <= 1 + TOLERANCE, (case, ratio)


def test_device_bytes_divide_by_the_axes_that_split_each_leaf():
    import jax
    import jax.numpy as jnp
    from jax.sharding import AbstractMesh

    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    tree = {"layers": {"q_proj": {"kernel": jax.ShapeDtypeStruct((3, 8, 6), jnp.int8),   # (None, fsdp, tensor)
                                  "scale": jax.ShapeDtypeStruct((3, 5), jnp.float32)}},   # 5: tensor does not divide
            "norm": jax.ShapeDtypeStruct((8,), jnp.float32)}                              # replicated
    assert accounting.device_bytes(tree, mesh) == 3 * 8 * 6 // 4 + 3 * 5 * 4 + 8 * 4
    assert accounting.batch_rows_per_device(8, mesh) == 2 and accounting.batch_rows_per_device(6, mesh) == 6


def test_paper_plan_closed_forms():
    config = load_config("paper_llama31_8b_gpu")
    plan = plan_run(config, devices=8, device=DEVICES["h100"], efficiency=0.5)
    arch = LlamaConfig.from_hf_config(KNOWN_ARCHITECTURES["meta-llama/Llama-3.1-8B"])
    stages = {s["name"]: s for s in plan["stages"]}
    # int8 base: one byte per weight plus float32 scales per output channel / embedding row
    assert plan["model"]["base_bytes"] == pytest.approx(8.03e9, rel=0.01)
    assert stages["model"]["memory_bytes"] == pytest.approx(plan["model"]["base_bytes"] / 8, rel=0.01)
    single = stages["training single"]
    steps = -(-10 * plan["rows"]["train"] // 32)
    assert single["steps"] == steps
    evaluations = -(-steps // config.training.eval_every)
    expected = 2 * steps * accounting.forward_flops(arch, 32, 512, 4) + evaluations * accounting.forward_flops(
        arch, plan["rows"]["validation"], 512, 4)
    assert single["flops"] == pytest.approx(expected)
    assert single["seconds"] == pytest.approx(expected / (8 * 989e12 * 0.5))
    assert all(s["runs"] == "mesh" for name, s in stages.items() if name not in ("affinity", "grouping"))
    assert plan["all_fit"] and single["fits"]


def test_architectures_without_weights(tiny_hf_dir):
    family, arch = architecture_of(str(tiny_hf_dir))
    assert family.name == "llama" and arch == LlamaConfig.from_hf_config(
        json.loads((tiny_hf_dir / "config.json").read_text()))
    gguf = cache_dir() / "models" / "smollm2-135m" / Path(REGISTRY["smollm2-135m"].member).name
    if gguf.is_file():  # the registry's numbers are the real file's metadata
        _, from_file = architecture_of(str(gguf))
        _, known = architecture_of("smollm2-135m")
        fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rope_theta", "tie_word_embeddings")
        assert {f: getattr(from_file, f) for f in fields} == {f: getattr(known, f) for f in fields}
    with pytest.raises(ConfigError, match="its architecture is not known without downloading"):
        architecture_of("someone/unknown-model")


def test_plan_command_json_and_does_not_fit():
    result = cli("plan", "--config", "paper_llama31_8b_gpu", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and plan["devices"] == 8
    for stage in plan["stages"]:
        assert {"memory", "memory_bytes", "fits", "flops", "seconds"} <= set(stage)
    small = cli("plan", "--config", "paper_llama31_8b_gpu", "--device-memory", "4")
    assert small.returncode == 0, small.stderr
    assert "does not fit" in small.stdout and "some stage does not fit" in small.stdout


@pytest.mark.parametrize("args, fragment", [
    (("--config", "no_such_config"), "does not exist"),
    (("--config", "paper_llama31_8b_gpu", "--devices", "6"), "but 6 are available"),
    (("--config", "paper_llama31_8b_gpu", "--device", "tpu9"), "--device must be one of"),
    (("--config", "paper_llama31_8b_gpu", "--efficiency", "2"), "--efficiency must be in (0, 1]"),
    (("--config", "default", "model.source=someone/unknown"), "not known without downloading"),
])
def test_plan_bad_input_one_line_exit_2(args, fragment):
    assert_one_line_error(cli("plan", *args), fragment)
