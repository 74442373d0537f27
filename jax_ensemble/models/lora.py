"""LoRA on chosen modules, and the split between trainable LoRA state and the frozen base.

``apply_lora(model, LoRAConfig(...), key)`` attaches ``lora_a`` (in, r) and ``lora_b``
(r, out) as ``nnx.LoRAParam`` to every :class:`~jax_ensemble.models.layers.Linear` whose
dotted path fully matches ``target_modules``; the layer then computes
``x W + (alpha / r) · dropout(x) A B``. A is drawn from U(−1/√in, 1/√in) (PEFT's default)
and B is zero, so the adapted model starts equal to the base model. Stacked layers get
stacked adapters (L, in, r) / (L, r, out).

``split_lora(model) -> (graphdef, lora_state, base_state)`` and
``merge_lora(graphdef, lora_state, base_state)`` are the functional edge: differentiate
or optimise ``lora_state`` only (int8 base leaves are not differentiable).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jax_ensemble.core.trees import stack_trees
from jax_ensemble.errors import ConfigError
from jax_ensemble.models.layers import Linear, QuantizedWeight


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters: ``W x + (alpha / rank) * B A x`` on every module whose dotted
    path (e.g. ``layers.self_attn.q_proj``) fully matches ``target_modules``.
    Defaults follow the paper: rank 4, alpha 32, on the q/k/v projections."""

    rank: int = 4
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: str = r".*\.(q_proj|k_proj|v_proj)"

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        try:
            re.compile(self.target_modules)
        except re.error as e:
            raise ConfigError(f"lora.target_modules is not a valid regex: {e}") from None


def linear_modules(model: nnx.Module) -> dict[str, Linear]:
    """Dotted path (``layers.self_attn.q_proj``) → every Linear module of ``model``."""
    return {
        ".".join(str(p) for p in path): node
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Linear)
    }


def apply_lora(model: nnx.Module, config: LoRAConfig, key: jax.Array) -> list[str]:
    """Attach LoRA to the matching Linear modules of ``model`` (in place).

    Returns the matched dotted paths. Raises ConfigError when nothing matches.
    """
    modules = linear_modules(model)
    targets = sorted(p for p in modules if re.fullmatch(config.target_modules, p))
    if not targets:
        raise ConfigError(
            f"lora.target_modules {config.target_modules!r} matches no module; "
            f"modules are: {', '.join(sorted(modules))}"
        )
    for index, path in enumerate(targets):
        layer = modules[path]
        kernel = layer.kernel[...]
        lead = kernel.shape[:-2]
        fan_in = layer.in_features
        bound = 1.0 / fan_in**0.5
        a = jax.random.uniform(
            jax.random.fold_in(key, index), lead + (fan_in, config.rank), jnp.float32, -bound, bound
        )
        layer.lora_a = nnx.LoRAParam(a)
        layer.lora_b = nnx.LoRAParam(jnp.zeros(lead + (config.rank, layer.out_features), jnp.float32))
        layer.lora_scaling = config.alpha / config.rank
        layer.lora_dropout = config.dropout
    return targets


def split_lora(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """``(graphdef, lora_state, base_state)``; base holds every non-LoRA variable."""
    return nnx.split(model, nnx.LoRAParam, ...)


def with_zero_b(lora_state: nnx.State) -> nnx.State:
    """``lora_state`` with every ``lora_b`` leaf 0 and A kept: an adapter whose function is
    the base model's (x·A·B = 0) that still trains (∂/∂B ≠ 0), as LoRA's initialisation is.
    The start of a boosting round when θ0 itself was trained (``training.warm_start_steps``)."""
    b_state, rest = nnx.split_state(lora_state, nnx.PathContains("lora_b"), ...)
    return nnx.merge_state(jax.tree.map(jnp.zeros_like, b_state), rest)


def merge_lora(graphdef: nnx.GraphDef, lora_state: nnx.State, base_state: nnx.State) -> nnx.Module:
    """Inverse of :func:`split_lora`."""
    return nnx.merge(graphdef, lora_state, base_state)


def init_member_adapters(model: nnx.Module, config: LoRAConfig, seeds: Sequence[int]) -> tuple[nnx.GraphDef, Any, nnx.State]:
    """``(graphdef, stacked LoRA (M, …), base)``: member m's adapter initialised from key(seeds[m])."""
    adapters = []
    for seed in seeds:
        apply_lora(model, config, jax.random.key(seed))
        graphdef, lora, base = split_lora(model)
        adapters.append(lora)
    return graphdef, stack_trees(adapters), base


@dataclasses.dataclass(frozen=True)
class ParameterCount:
    """Numbers of scalars and bytes in the LoRA (trainable) and base (frozen) state.

    ``base_params`` counts logical weights (an int8 value and its scale are one weight
    plus a per-channel scale: scales are counted in ``base_scale_params``)."""

    lora_params: int
    lora_bytes: int
    base_params: int
    base_scale_params: int
    base_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def count_parameters(model: nnx.Module) -> ParameterCount:
    """Count LoRA and base parameters and their bytes."""
    _, lora_state, base_state = split_lora(model)
    lora_leaves = jax.tree.leaves(lora_state)
    base_flat = nnx.to_flat_state(base_state)
    weights = scales = base_bytes = 0
    for path, var in base_flat:
        value = var[...]
        base_bytes += value.size * value.dtype.itemsize
        if isinstance(var, QuantizedWeight) and path[-1] == "scale":
            scales += value.size
        else:
            weights += value.size
    return ParameterCount(
        lora_params=sum(x.size for x in lora_leaves),
        lora_bytes=sum(x.size * x.dtype.itemsize for x in lora_leaves),
        base_params=weights,
        base_scale_params=scales,
        base_bytes=base_bytes,
    )
