"""Compiles the project's real steps on a small Llama with 8 fake CPU devices and prints, per
case, XLA's ``memory_analysis()`` (argument + output + temporary bytes per device) beside the
capacity planner's figure for the same step, as one JSON list. Run by tests/test_plan.py in a
subprocess (XLA_FLAGS must be set before jax loads)."""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AbstractMesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jax_ensemble.config import load_config  # noqa: E402
from jax_ensemble.core.projection import make_projector  # noqa: E402
from jax_ensemble.models import LlamaConfig  # noqa: E402
from jax_ensemble.models.families import FAMILIES  # noqa: E402
from jax_ensemble.models.lora import split_lora  # noqa: E402
from jax_ensemble.models.lora_gradients import batch_gradients, lora_feature_split  # noqa: E402
from jax_ensemble.stages.accounting import batch_bytes, device_bytes  # noqa: E402
from jax_ensemble.stages.ensemble import stacked_label_logits  # noqa: E402
from jax_ensemble.stages.plan import Planner, abstract_model, batch_shapes  # noqa: E402
from jax_ensemble.training.engine import init_state, make_optimizer, make_train_step  # noqa: E402
from jax_ensemble.training.losses import classification_objective, objective_loss  # noqa: E402
from jax_ensemble.training.mesh import AXES, batch_sharding, make_mesh, tree_shardings  # noqa: E402

ARCH = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=32, tie_word_embeddings=True)
"""Small enough to compile in seconds, activations large enough next to the weights."""


def measured(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "total": m.argument_size_in_bytes + m.output_size_in_bytes
            + m.temp_size_in_bytes}


def setup(mesh_sizes, overrides):
    config = load_config(None, [f"mesh.data={mesh_sizes[0]}", f"mesh.fsdp={mesh_sizes[1]}",
                                f"mesh.tensor={mesh_sizes[2]}", *overrides])
    model = abstract_model(FAMILIES[0], ARCH, config)
    planner = Planner(config, model, AbstractMesh(tuple(mesh_sizes), AXES), [2])
    graphdef, lora, base = split_lora(model)
    return config, planner, graphdef, lora, base


def training_case(mesh_sizes, batch_size, length):
    """engine.train's jitted step, with the shardings it uses."""
    config, planner, graphdef, lora, base = setup(
        mesh_sizes, [f"training.batch_size={batch_size}", f"tasks.max_length={length}"])
    mesh = make_mesh(config.mesh, jax.devices()[: mesh_sizes[0] * mesh_sizes[1] * mesh_sizes[2]])
    optimizer = make_optimizer(config.training, 10)
    state = jax.eval_shape(lambda one: init_state(one, optimizer), lora)
    batch = batch_shapes(batch_size, length, 2, (1,))
    state_sh = tree_shardings(state, mesh)
    batch_sh = {k: batch_sharding(mesh, len(v.shape), leading=1) for k, v in batch.items()}
    step = make_train_step(objective_loss(classification_objective(graphdef)), optimizer, seed=0, dropout=False)
    compiled = jax.jit(step, in_shardings=(state_sh, tree_shardings(base, mesh), batch_sh),
                       out_shardings=(state_sh, NamedSharding(mesh, P()))).lower(state, base, batch).compile()
    arguments = planner.weights + device_bytes(state, planner.mesh) + batch_bytes(batch, planner.mesh, leading=1)
    return measured(compiled), sum(planner.training_step_memory(config.training).values()), arguments


def gradient_case(strategy, batch_size, length):
    """lora_gradients.batch_gradients, the gradient stage's jitted batch (one device today)."""
    config, planner, graphdef, lora, base = setup(
        (1, 1, 1), [f"gradients.batch_size={batch_size}", f"tasks.max_length={length}", "gradients.dim=64",
                    f"gradients.strategy={strategy}", "gradients.direction_chunk=8"])
    b_state, fixed, _ = lora_feature_split(jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), lora))
    projector = make_projector(b_state, 64, block_rows=config.gradients.block_rows)
    batch = batch_shapes(batch_size, length, 2)
    compiled = batch_gradients.lower(b_state, fixed, base, batch, graphdef=graphdef, projector=projector,
                                     strategy=strategy, direction_chunk=8).compile()
    return measured(compiled), sum(planner.gradients(batch_size, 0)["memory"].values()), None


def inference_case(members, batch_size, length):
    """stages.ensemble.stacked_label_logits: M stacked adapters over one batch (one device today)."""
    config, planner, graphdef, lora, base = setup((1, 1, 1), [f"tasks.max_length={length}"])
    stacked = jax.tree.map(lambda x: jax.ShapeDtypeStruct((members, *x.shape), x.dtype), lora)
    batch = batch_shapes(batch_size, length, 2)
    compiled = stacked_label_logits.lower(graphdef, stacked, base, batch).compile()
    return measured(compiled), sum(planner.inference_memory(members, batch_size).values()), None


CASES = [
    ("training", training_case, ((1, 1, 1), 8, 128)),
    ("training", training_case, ((1, 1, 1), 8, 256)),
    ("training", training_case, ((8, 1, 1), 8, 128)),
    ("training", training_case, ((1, 8, 1), 16, 128)),
    ("training", training_case, ((2, 2, 2), 8, 128)),
    ("training", training_case, ((2, 4, 1), 8, 256)),
    ("gradients", gradient_case, ("reverse", 4, 128)),
    ("gradients", gradient_case, ("forward", 4, 128)),
    ("inference", inference_case, (3, 8, 128)),
    ("inference", inference_case, (1, 16, 256)),
]

if __name__ == "__main__":
    print(json.dumps([{"step": name, "case": " ".join(map(str, args)), "xla": xla, "plan": plan, "plan_arguments": arguments}
                      for name, fn, args in CASES for xla, plan, arguments in [fn(*args)]]))
