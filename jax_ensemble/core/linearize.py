"""Functional linearization: the studied output, f_lin, per-example projected gradients.

Everything here takes a plain parameter pytree and an ``apply_fn(params, batch)`` whose
row i depends on example i only (any JAX model works; for the LLM see
:mod:`jax_ensemble.models.lora_gradients`).

- :func:`classification_output`: the output studied (docs/method.md §1): for K = 2 label
  words the log-odds f = z_gold − z_other of the label-word logits (B,); for K > 2 the
  K − 1 log-odds f_k = z_k − z_0 against class 0 (B, K − 1), which
  :func:`logits_of_output` turns back into softmax-equivalent logits (B, K).
- :func:`linearize`: ``f_lin(θ, batch) = f(θ0, batch) + ⟨∇θ f(θ0, batch), θ − θ0⟩``
  (one ``jax.jvp``).
- :func:`projected_gradients` (and :func:`value_and_projected_gradients`, which also
  returns the outputs from the same pass): G[i] = Pᵀ ∇θ f(x_i; θ) ∈ R^d (or (K, d)),
  with P a seeded :class:`~jax_ensemble.core.projection.Projector`, by one of
  :data:`STRATEGIES`:

  * ``reverse``: ``vmap`` over examples of a VJP per output (per-example gradients,
    B·K·p floats), then block-by-block projection;
  * ``forward``: ``jax.linearize`` once on the batch, then a ``vmap`` of JVPs over the
    columns of P (``direction_chunk`` columns at a time, each lifted to a parameter
    pytree); never holds a per-example gradient;
  * ``auto``: the cheaper of the two by :func:`strategy_costs` among those whose extra
    memory fits ``memory_budget_bytes``.
- :func:`linearization_errors`: how far f_lin is from f at fine-tuned parameters.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jax_ensemble.core.projection import Projector, lift, project
from jax_ensemble.errors import ConfigError

ApplyFn = Callable[[Any, Any], jax.Array]
STRATEGIES = ("reverse", "forward", "auto")


def classification_output(logits: jax.Array, label: jax.Array) -> jax.Array:
    """Label-word logits (B, K), gold labels (B,) → (B,) log-odds z_gold − z_other when
    K = 2, else (B, K − 1) log-odds z_k − z_0 of classes 1…K−1 against class 0.

    softmax(z) = softmax(z − z_0), so K − 1 outputs carry everything the K logits do and
    their per-example gradients take K − 1 backward passes instead of K."""
    if logits.shape[-1] != 2:
        return logits[:, 1:] - logits[:, :1]
    gold = jnp.take_along_axis(logits, label[:, None].astype(jnp.int32), axis=1)[:, 0]
    return 2.0 * gold - logits.sum(axis=1)


def logits_of_output(output: jax.Array) -> jax.Array:
    """(B, K − 1, ...) log-odds against class 0 (:func:`classification_output`, K > 2) or
    their gradients → (B, K, ...) with class 0's entry 0: logits z − z_0, which give the
    softmax, the cross-entropy and the argmax of z itself."""
    pad = [(0, 0), (1, 0)] + [(0, 0)] * (output.ndim - 2)
    return jnp.pad(output, pad)


def linearize(apply_fn: ApplyFn, params0: Any) -> ApplyFn:
    """``f_lin(params, batch) = f(params0, batch) + J(params0, batch)·(params − params0)``.

    The returned function has ``apply_fn``'s signature and output shape."""

    def f_lin(params: Any, batch: Any) -> jax.Array:
        delta = jax.tree.map(jnp.subtract, params, params0)
        out0, dout = jax.jvp(lambda p: apply_fn(p, batch), (params0,), (delta,))
        return out0 + dout

    return f_lin


def strategy_costs(
    *, num_params: int, dim: int, batch_size: int, outputs: int, forward_flops: float, direction_chunk: int
) -> dict[str, dict[str, float]]:
    """Cost model: FLOPs and extra memory (bytes) of each strategy for one batch.

    With F the batch's forward FLOPs, p parameters, d = dim, B examples, K outputs per
    example and c = direction_chunk:

    - reverse: 3F (forward + backward) + 2·B·K·p·d (projection); memory 4·B·K·p
      (per-example gradients);
    - forward: F (linearize) + d·F (one JVP per column) + 2·p·d² (lifting columns of P);
      memory 4·c·p (one chunk of tangent directions; tangent activations not counted).

    Generating P costs p·d random numbers per pass and is left out (both pay it)."""
    p, d, b, k, c = num_params, dim, batch_size, outputs, direction_chunk
    return {
        "reverse": {"flops": 3 * forward_flops + 2.0 * b * k * p * d, "memory_bytes": 4.0 * b * k * p},
        "forward": {"flops": (1 + d) * forward_flops + 2.0 * p * d * d, "memory_bytes": 4.0 * c * p},
    }


def choose_strategy(costs: Mapping[str, Mapping[str, float]], memory_budget_bytes: float) -> str:
    """The cheapest strategy in FLOPs whose extra memory fits the budget (else the one
    with the least memory)."""
    fitting = [s for s, c in costs.items() if c["memory_bytes"] <= memory_budget_bytes]
    if fitting:
        return min(fitting, key=lambda s: costs[s]["flops"])
    return min(costs, key=lambda s: costs[s]["memory_bytes"])


def forward_flops(fn: Callable[..., jax.Array], *args: Any) -> float:
    """XLA's FLOP estimate of ``fn(*args)`` (from the lowered HLO, no compilation)."""
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), args)
    analysis = jax.jit(fn).lower(*spec).cost_analysis()
    if isinstance(analysis, list):
        analysis = analysis[0]
    return float((analysis or {}).get("flops", 0.0))


def resolve_strategy(
    strategy: str,
    *,
    projector: Projector,
    out_shape: tuple[int, ...],
    flops_fn: Callable[[], float],
    direction_chunk: int = 32,
    memory_budget_bytes: float = 2**30,
) -> str:
    """``strategy`` unless it is ``auto``; then the cost model's choice for a batch whose
    outputs have shape ``out_shape`` (B, *out); ``flops_fn()`` (the batch's forward FLOPs) is only called for ``auto``."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"gradient strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    if strategy != "auto":
        return strategy
    costs = strategy_costs(
        num_params=projector.num_params,
        dim=projector.dim,
        batch_size=out_shape[0],
        outputs=math.prod(out_shape[1:]),
        forward_flops=flops_fn(),
        direction_chunk=min(direction_chunk, projector.dim),
    )
    return choose_strategy(costs, memory_budget_bytes)


def _reverse(apply_fn: ApplyFn, params: Any, batch: Any, projector: Projector,
             separate_outputs: bool = False) -> tuple[jax.Array, jax.Array]:
    def per_example(example: Any) -> tuple[jax.Array, Any]:
        single = jax.tree.map(lambda x: x[None], example)
        out, vjp = jax.vjp(lambda p: apply_fn(p, single)[0], params)
        basis = jnp.eye(out.size, dtype=out.dtype).reshape((out.size,) + out.shape)
        (jac,) = jax.vmap(vjp)(basis)  # leaves (out.size, *shape)
        return out, jax.tree.map(lambda j: j.reshape(out.shape + j.shape[1:]), jac)

    outs, grads = jax.vmap(per_example)(batch)
    if separate_outputs:  # see value_and_projected_gradients
        outs = apply_fn(params, batch)
    return outs, project(projector, grads)


def _forward(
    apply_fn: ApplyFn, params: Any, batch: Any, projector: Projector, direction_chunk: int
) -> tuple[jax.Array, jax.Array]:
    outs, jvp = jax.linearize(lambda p: apply_fn(p, batch), params)
    d = projector.dim
    c = min(direction_chunk, d)
    columns = jnp.arange(-(-d // c) * c).reshape(-1, c)  # out-of-range ids: zero directions

    def chunk(ids: jax.Array) -> jax.Array:
        tangents = lift(projector, jax.nn.one_hot(ids, d, dtype=jnp.float32))  # leaves (c, *shape)
        return jax.vmap(jvp)(tangents)  # (c, B, *out)

    g = jax.lax.map(chunk, columns)  # (d/c, c, B, *out)
    g = g.reshape((-1,) + g.shape[2:])[:d]
    return outs, jnp.moveaxis(g, 0, -1)


def value_and_projected_gradients(
    apply_fn: ApplyFn,
    params: Any,
    batch: Any,
    projector: Projector,
    *,
    strategy: str = "reverse",
    direction_chunk: int = 32,
    memory_budget_bytes: float = 2**30,
    separate_outputs: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Outputs f(x_i; θ) and per-example projected gradients Pᵀ∇θ f(x_i; θ) at ``params``,
    from one pass (the outputs come with the VJPs / the linearization).

    apply_fn(params, batch) → (B,) or (B, *out) per-example outputs; ``batch`` a pytree
    of arrays with leading axis B; ``projector`` built for ``params``'s structure.
    Returns (f (B, *out), G (B, *out, d) float32). Call it inside ``jax.jit``
    (``strategy``, ``direction_chunk`` and ``separate_outputs`` static).

    ``separate_outputs``: with ``reverse``, take f from its own forward pass over the batch
    instead of from the per-example VJPs (one more forward). Use it when the batch is split
    over several mesh axes: with JAX 0.10–0.12 on CPU, returning the VJPs' outputs beside G
    gave wrong G on a 2×2×2 (data, fsdp, tensor) mesh with one example per device
    (``tests/test_gradient_stage.py``), while G alone or f from its own pass was right."""
    strategy = resolve_strategy(
        strategy,
        projector=projector,
        out_shape=jax.eval_shape(apply_fn, params, batch).shape,
        flops_fn=lambda: forward_flops(apply_fn, params, batch),
        direction_chunk=direction_chunk,
        memory_budget_bytes=memory_budget_bytes,
    )
    if strategy == "reverse":
        return _reverse(apply_fn, params, batch, projector, separate_outputs)
    return _forward(apply_fn, params, batch, projector, direction_chunk)


def projected_gradients(apply_fn: ApplyFn, params: Any, batch: Any, projector: Projector, **options: Any) -> jax.Array:
    """G (B, d) or (B, *out, d): :func:`value_and_projected_gradients` (same ``options``)
    without the outputs."""
    return value_and_projected_gradients(apply_fn, params, batch, projector, **options)[1]


def linearization_errors(
    f: jax.Array, f_lin: jax.Array, f0: jax.Array, weight: jax.Array | None = None
) -> dict[str, jax.Array]:
    """How well f_lin(θ) approximates f(θ) over a set of examples (leading axis n).

    - ``relative_output_error`` = Σ|f − f_lin| / Σ|f − f0| (weighted sums over examples
      and outputs): the error as a fraction of how far fine-tuning moved the output;
    - ``relative_squared_error`` = mean(((f_lin − f) / max(|f|, |f0|))²): the official
      code's measure.

    ``weight`` (n,) masks padding rows (0)."""
    w = jnp.ones(f.shape[:1], jnp.float32) if weight is None else weight.astype(jnp.float32)
    w = w.reshape(w.shape + (1,) * (f.ndim - 1)) * jnp.ones_like(f)
    denom = jnp.maximum(jnp.maximum(jnp.abs(f), jnp.abs(f0)), 1e-12)
    return {
        "relative_output_error": jnp.sum(w * jnp.abs(f - f_lin)) / jnp.maximum(jnp.sum(w * jnp.abs(f - f0)), 1e-12),
        "relative_squared_error": jnp.sum(w * ((f_lin - f) / denom) ** 2) / jnp.sum(w),
    }
