"""The main job, stage by stage, each writing its result atomically under the run directory.

Stages that exist now: ``model`` (load the pretrained model with its int8/bf16/f32 base,
attach LoRA, count parameters and bytes, check that the adapted model at B = 0 gives the
base model's logits, and greedy-complete the config's sanity prompt). Later stages
(gradients → affinity → grouping → training → ensemble → report) are listed as pending.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jax_ensemble.config import Config, config_hash, config_to_dict
from jax_ensemble.generate import greedy_generate
from jax_ensemble.lora import apply_lora, count_parameters
from jax_ensemble.models.loading import load_pretrained
from jax_ensemble.storage import atomic_write_json

PENDING_STAGES = ("gradients", "affinity", "grouping", "training", "ensemble", "report")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def model_stage(config: Config) -> dict[str, Any]:
    """Load, adapt and sanity-check the model; return the stage's JSON-able summary."""
    start = time.perf_counter()
    model, tokenizer = load_pretrained(
        config.model.source, base_dtype=config.model.base_dtype, compute_dtype=config.model.compute_dtype
    )
    load_seconds = time.perf_counter() - start
    probe = jnp.array([tokenizer.encode(config.sanity_prompt)])
    base_logits = np.asarray(model(probe, logit_positions=jnp.array([probe.shape[1] - 1])))
    targets = apply_lora(model, config.lora, jax.random.key(config.seed))
    adapted_logits = np.asarray(model(probe, logit_positions=jnp.array([probe.shape[1] - 1])))
    generation = greedy_generate(model, tokenizer, config.sanity_prompt, max_new_tokens=4)
    return {
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


def run(config: Config) -> Path:
    """Run every existing stage for ``config``; return the run directory."""
    run_dir = config.resolved_run_dir()
    digest = config_hash(config)
    atomic_write_json(run_dir / "config.json", {"hash": digest, "config": config_to_dict(config)})
    _log(f"[1/1] model: loading {config.model.source} with a {config.model.base_dtype} base")
    summary = model_stage(config)
    atomic_write_json(run_dir / "model.json", summary)
    p = summary["parameters"]
    print(f"model: {config.model.source} ({summary['architecture']['num_hidden_layers']} layers, "
          f"hidden {summary['architecture']['hidden_size']}), base {config.model.base_dtype}: "
          f"{p['base_params']:,} weights in {p['base_bytes'] / 2**20:.1f} MiB")
    print(f"lora: rank {config.lora.rank}, alpha {config.lora.alpha:g} on {len(summary['lora_targets'])} "
          f"module groups ({', '.join(summary['lora_targets'])}): {p['lora_params']:,} trainable parameters")
    print(f"lora at B=0 changes logits by at most {summary['lora_b0_max_abs_logit_change']:.2e}")
    print(f"sanity: {config.sanity_prompt!r} -> {summary['sanity_completion']!r}")
    print(f"pending stages (not implemented yet): {', '.join(PENDING_STAGES)}")
    print(f"run directory: {run_dir}")
    return run_dir
