"""The model stage: load the model once per command, attach LoRA, sanity-check it.

:func:`load_run_model` loads the configured checkpoint with its int8/bf16/f32 base,
measures the logits before and after attaching LoRA (B = 0 must leave them unchanged),
greedy-completes the sanity prompt, and splits the adapted model into the functional
pieces every later stage takes: ``graphdef``, the initial adapter ``lora0`` (A random,
B = 0: θ0; with ``training.warm_start_steps`` > 0 that adapter trained on all tasks first,
:func:`jax_ensemble.stages.adapters.warm_start`) and the frozen ``base``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_ensemble.config import Config
from jax_ensemble.models.generate import greedy_generate
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.models.lora import apply_lora, count_parameters, split_lora
from jax_ensemble.models.tokenizer import Tokenizer
from jax_ensemble.stages.adapters import warm_start
from jax_ensemble.training.mesh import leaf_sharding, make_mesh


class RunModel(NamedTuple):
    """graphdef, lora0 (θ0) and base of the adapted model, its tokenizer and architecture
    config, and the model stage's JSON-able summary."""

    graphdef: nnx.GraphDef
    lora0: nnx.State
    base: nnx.State
    tokenizer: Tokenizer
    architecture: Any
    summary: dict[str, Any]


def load_run_model(config: Config, *, sanity_check: bool = True) -> RunModel:
    """Load and adapt (LoRA key = ``config.seed``) the config's model, on a mesh of more than
    one device straight into the partition rules' shardings; with ``sanity_check``
    also measure the B = 0 logit change and complete the sanity prompt (else the summary is
    empty)."""
    start = time.perf_counter()
    mesh = make_mesh(config.mesh)
    model, tokenizer = load_pretrained(
        config.model.source, base_dtype=config.model.base_dtype, compute_dtype=config.model.compute_dtype,
        kernels=config.model.kernels, sharding=leaf_sharding(mesh) if mesh.size > 1 else None,
    )
    load_seconds = time.perf_counter() - start
    if not sanity_check:
        apply_lora(model, config.lora, jax.random.key(config.seed))
        graphdef, lora0, base = split_lora(model)
        return RunModel(graphdef, warm_start(config, graphdef, lora0, base, tokenizer), base, tokenizer,
                        model.config, {})
    probe = jnp.array([tokenizer.encode(config.sanity_prompt)])
    base_logits = np.asarray(model(probe, logit_positions=jnp.array([probe.shape[1] - 1])))
    targets = apply_lora(model, config.lora, jax.random.key(config.seed))
    adapted_logits = np.asarray(model(probe, logit_positions=jnp.array([probe.shape[1] - 1])))
    generation = greedy_generate(model, tokenizer, config.sanity_prompt, max_new_tokens=4)
    summary = {
        "source": config.model.source,
        "base_dtype": config.model.base_dtype,
        "compute_dtype": config.model.compute_dtype,
        "architecture": dataclasses.asdict(model.config),
        "lora_targets": targets,
        "parameters": count_parameters(model).as_dict(),
        "lora_b0_max_abs_logit_change": float(np.max(np.abs(adapted_logits - base_logits))),
        "sanity_prompt": config.sanity_prompt,
        "sanity_completion": generation.completion,
        "load_seconds": round(load_seconds, 2),
    }
    graphdef, lora0, base = split_lora(model)
    summary["warm_start_steps"] = config.training.warm_start_steps
    return RunModel(graphdef, warm_start(config, graphdef, lora0, base, tokenizer), base, tokenizer, model.config,
                    summary)
