"""The training and mesh sections of a run's config, owned by the layer that uses them.

:class:`TrainingConfig` (optimizer, length, evaluation, early stopping, checkpoints) and
:class:`MeshConfig` (device mesh axes and the multi-host launch) validate themselves on
construction and raise :class:`~jax_ensemble.errors.ConfigError` naming the key;
:mod:`jax_ensemble.config` composes them into the run's :class:`~jax_ensemble.config.Config`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax_ensemble.errors import ConfigError, check_choice


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ``(data, fsdp, tensor)`` and the multi-host launch.

    Axis sizes multiply to the number of devices (over all processes); one size may be
    -1, meaning "every device the other axes leave". ``data`` and ``fsdp`` both split the
    batch; ``fsdp`` also shards the frozen base and the LoRA/optimizer state over the
    input dimension, ``tensor`` over the output dimension.

    coordinator_address: ``""`` (one process), ``"auto"`` (let ``jax.distributed``
      detect the cluster: TPU pods, SLURM, Open MPI) or ``"host:port"`` of process 0,
      with ``num_processes`` and this process's ``process_id``.
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    coordinator_address: str = ""
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self) -> None:
        sizes = {"mesh.data": self.data, "mesh.fsdp": self.fsdp, "mesh.tensor": self.tensor}
        for key, size in sizes.items():
            if size == 0 or size < -1:
                raise ConfigError(f"{key} must be >= 1 or -1 (all remaining devices), got {size}")
        if list(sizes.values()).count(-1) > 1:
            raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        if self.num_processes < 1:
            raise ConfigError(f"mesh.num_processes must be >= 1, got {self.num_processes}")
        if not 0 <= self.process_id < self.num_processes:
            raise ConfigError(
                f"mesh.process_id must be in [0, {self.num_processes}), got {self.process_id}"
            )

    def batch_shards(self) -> int | None:
        """How many ways a batch is split (data × fsdp), or None while a -1 is unresolved."""
        return None if -1 in (self.data, self.fsdp) else self.data * self.fsdp


TRAINING_BUDGETS = ("epochs", "equal")
"""How long each adapter of a multi-adapter job trains (see :class:`TrainingConfig`)."""
LATER_DEFAULTS: dict[str, Any] = {"l2_to_init": 0.0, "train_lora_a": True, "warm_start_steps": 0}
"""Training options added after adapters were first checkpointed, with their defaults: they
enter a fingerprint only when set (:meth:`TrainingConfig.identity`)."""


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """LoRA training: AdamW on the LoRA parameters only.

    ``batch_size`` examples per optimizer step, in ``grad_accum_steps`` micro-batches of
    ``batch_size / grad_accum_steps`` (each divisible by mesh data × fsdp). Length is
    ``max_steps`` if > 0, else ``ceil(epochs · train examples / batch_size)``. The
    learning rate warms up linearly from 0 over ``warmup_steps``, then decays to 0 on a
    cosine. ``max_grad_norm`` clips the global gradient norm (0: off). Validation every
    ``eval_every`` steps and at the end; training stops after ``patience`` evaluations
    without a lower validation loss (0: never) and keeps the best adapter. Checkpoints
    every ``checkpoint_every`` steps and at the end, the last ``keep_last`` kept.

    ``budget`` sets the length of each adapter in a job that trains several on subsets of
    the same rows (groups, random groups, subsets, boosting): ``epochs``, each adapter takes
    ``epochs`` passes over its own rows (a group of a third of the tasks gets a third of the
    single adapter's steps); ``equal``, every adapter gets the steps of one adapter on all
    the job's rows, so adapters are compared at equal optimizer steps (and, with
    ``patience`` > 0, each stops when its own validation loss stops improving, under that cap).

    Recipes that keep the fine-tune near its start θ0 (where the first-order estimates of
    the affinity stage hold): ``l2_to_init`` > 0 adds the decoupled decay
    −lr·l2_to_init·(θ − θ0) to every update (weight decay toward the initial adapter, not
    toward 0); ``train_lora_a`` false freezes every LoRA A at its initialisation (LoRA-FA:
    B alone trains, A gets no update and no optimizer state, halving it).
    ``warm_start_steps`` > 0 moves θ0 itself: LoRA's initialisation is first trained that
    many steps on every task's training rows (these settings, one adapter), and that θ0
    (B ≠ 0) is where the gradients are taken (every LoRA leaf a feature), where the
    estimates linearize and where every adapter of the job starts.
    """

    learning_rate: float = 5e-4
    warmup_steps: int = 10
    max_steps: int = 0
    epochs: float = 1.0
    batch_size: int = 8
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    eval_every: int = 50
    eval_batch_size: int = 16
    patience: int = 0
    checkpoint_every: int = 50
    keep_last: int = 2
    budget: str = "epochs"
    l2_to_init: float = 0.0
    train_lora_a: bool = True
    warm_start_steps: int = 0

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ConfigError(f"training.learning_rate must be > 0, got {self.learning_rate}")
        if self.batch_size < 1 or self.grad_accum_steps < 1 or self.eval_batch_size < 1:
            raise ConfigError("training.batch_size, grad_accum_steps and eval_batch_size must be >= 1")
        if self.batch_size % self.grad_accum_steps:
            raise ConfigError(
                f"training.batch_size={self.batch_size} is not divisible by "
                f"training.grad_accum_steps={self.grad_accum_steps}"
            )
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ConfigError("training.max_steps must be > 0, or training.epochs > 0 with max_steps 0")
        for key in ("warmup_steps", "patience", "warm_start_steps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"training.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every", "keep_last"):
            if getattr(self, key) < 1:
                raise ConfigError(f"training.{key} must be >= 1, got {getattr(self, key)}")
        check_choice("training.budget", self.budget, TRAINING_BUDGETS)
        if self.max_grad_norm < 0 or self.weight_decay < 0 or self.l2_to_init < 0:
            raise ConfigError("training.max_grad_norm, training.weight_decay and training.l2_to_init must be >= 0")

    def identity(self) -> dict[str, Any]:
        """The settings as data for checkpoint fingerprints and cache keys: every field,
        except that the recipe options added later (:data:`LATER_DEFAULTS`) enter only when
        they differ from their default, so adapters trained before they existed stay valid."""
        return {k: v for k, v in dataclasses.asdict(self).items() if LATER_DEFAULTS.get(k, object()) != v}

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps


def check_batch_divisible(training: TrainingConfig, batch_shards: int | None) -> None:
    """ConfigError unless each micro-batch splits evenly over the ``batch_shards`` data axes."""
    if batch_shards and training.micro_batch_size % batch_shards:
        raise ConfigError(
            f"training.batch_size={training.batch_size} (micro-batch {training.micro_batch_size} after "
            f"grad_accum_steps={training.grad_accum_steps}) is not divisible by the mesh's data axes "
            f"(mesh.data x mesh.fsdp = {batch_shards})"
        )
