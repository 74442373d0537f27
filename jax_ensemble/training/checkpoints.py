"""Training checkpoints with orbax: every N steps and at the end, the last k kept, atomic.

A checkpoint holds any pytree of arrays (the training state) as a flat mapping from
dotted paths (``lora.layers.self_attn.q_proj.lora_a``) to arrays, plus a JSON
``fingerprint`` of what produced it. Orbax writes each step into a temporary directory
and renames it when complete, so a run killed mid-save leaves the previous checkpoint as
the latest. Once a step is finished (before the next save, and at the end of training)
its digest — the sha256 over its files' paths and bytes — goes to
``checkpoint_digests/<step>.sha256`` beside the checkpoint directory (:func:`seal_finished`);
:func:`restore_checkpoint` skips and deletes a step whose files no longer match it, with
one warning, and resumes from the newest step that does. Restoring takes a template of
the state and the target shardings: a checkpoint saved under one mesh restores under any
other.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jax_ensemble.errors import CheckpointError
from jax_ensemble.storage.atomic import atomic_write_bytes
from jax_ensemble.storage.digests import sha256_file
from jax_ensemble.storage.processes import is_writer, on_writer
from jax_ensemble.training.mesh import path_name

log = logging.getLogger(__name__)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted path: leaf}`` for every leaf of ``tree``."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {prefix + path_name(path): leaf for path, leaf in leaves}


def unflatten(template: Any, flat: dict[str, Any], prefix: str = "") -> Any:
    """Inverse of :func:`flatten`: ``template``'s structure with leaves taken from ``flat``."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [flat[prefix + path_name(p)] for p, _ in paths])


def checkpoint_manager(directory: str | Path, keep_last: int) -> ocp.CheckpointManager:
    """An orbax manager over ``directory`` keeping the last ``keep_last`` steps."""
    options = ocp.CheckpointManagerOptions(max_to_keep=keep_last, create=True)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def step_digest(directory: str | Path) -> str:
    """sha256 over a checkpoint step directory: every file's relative path and sha256, sorted."""
    root = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(root)}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _digest_file(manager: ocp.CheckpointManager, step: int) -> Path:
    return Path(manager.directory).parent / "checkpoint_digests" / f"{step}.sha256"


def seal_finished(manager: ocp.CheckpointManager) -> None:
    """Wait for pending saves, then record the digest of every kept step that has none and
    drop the digests of steps no longer kept."""
    manager.wait_until_finished()
    kept = set(manager.all_steps())
    for step in kept:
        if not _digest_file(manager, step).is_file():
            atomic_write_bytes(_digest_file(manager, step), step_digest(Path(manager.directory) / str(step)).encode())
    for stale in _digest_file(manager, 0).parent.glob("*.sha256") if is_writer() else ():
        if int(stale.name.removesuffix(".sha256")) not in kept:
            stale.unlink()


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any, fingerprint: dict[str, Any]) -> None:
    """Seal the finished steps (:func:`seal_finished`), then save ``state`` (global arrays)
    as step ``step`` (asynchronously: seal again before relying on it)."""
    seal_finished(manager)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(flatten(state)),
            meta=ocp.args.JsonSave({"fingerprint": fingerprint, "step": step}),
        ),
        force=True,
    )


def _newest_intact_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest step whose files match its digest (or that has none yet); steps that do not
    match are deleted with one warning. None when no step is left (training starts over)."""
    for step in sorted(manager.all_steps(), reverse=True):
        recorded = _digest_file(manager, step)
        if not recorded.is_file() or recorded.read_text().strip() == step_digest(Path(manager.directory) / str(step)):
            return step
        log.warning("checkpoint %s/%d is corrupt (it does not match %s): deleted, resuming from an earlier step",
                    manager.directory, step, recorded.name)
        manager.delete(step)
        recorded.unlink()
    return None


def restore_checkpoint(
    manager: ocp.CheckpointManager,
    template: Any,
    shardings: Any,
    fingerprint: dict[str, Any] | None = None,
    step: int | None = None,
) -> tuple[Any, int] | None:
    """``(state, step)`` from step ``step`` (default: the newest intact one), laid out by ``shardings``,
    or None when there is no checkpoint. CheckpointError if the checkpoint was written
    with a different ``fingerprint`` or does not fit ``template``."""
    if step is None:  # process 0 checks the digests; every process restores the step it chose
        step = on_writer(lambda: _newest_intact_step(manager))
    if step is None:
        return None
    directory = manager.directory
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    if fingerprint is not None and meta.get("fingerprint") != fingerprint:
        raise CheckpointError(
            f"checkpoints in {directory} come from a different run (config, data or model differ); "
            "use a new output directory or delete them to start over"
        )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), flatten(template), flatten(shardings)
    )
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))).state
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {directory}/{step} does not fit this model: {str(e).splitlines()[0]}") from None
    return unflatten(template, restored), step


def load_state(directory: str | Path, template: Any, shardings: Any, step: int | None = None) -> tuple[Any, int]:
    """Read a training state from a checkpoint directory (latest step unless ``step``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory {directory} does not exist")
    with checkpoint_manager(directory, keep_last=1_000_000) as manager:
        found = restore_checkpoint(manager, template, shardings, step=step)
    if found is None:
        raise CheckpointError(f"{directory} holds no complete checkpoint")
    return found
