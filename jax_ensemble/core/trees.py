"""Pytree helpers shared by the stages: stacking M pytrees on a leading member axis."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp


def stack_trees(trees: Sequence[Any]) -> Any:
    """M pytrees of equal structure → one pytree with a leading axis M on every leaf."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack_tree(tree: Any) -> list[Any]:
    """Inverse of :func:`stack_trees`."""
    m = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda x: x[i], tree) for i in range(m)]


def zeros_like_member(stacked: Any) -> Any:
    """One member (leaves without the M axis) of zeros: for a LoRA adapter, A = B = 0,
    whose logits are the base model's."""
    return jax.tree.map(lambda x: jnp.zeros(x.shape[1:], x.dtype), stacked)
