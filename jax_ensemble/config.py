"""Run configuration: nested frozen dataclasses read from YAML, with ``key=value`` overrides.

``load_config("default", ["lora.rank=8", "model.base_dtype=float32"])`` returns a
:class:`Config`; the first argument is the name of a config shipped in the package
(``default``, ``tiny``, ``paper_llama31_8b_gpu``: ``jax_ensemble/configs/<name>.yaml``) or a
path to any YAML file. Unknown keys, wrong types and bad values raise
:class:`~jax_ensemble.errors.ConfigError` naming the key. ``config_hash`` is a stable
digest of the resolved config, used to key cached stages in the run directory.

Each later stage adds its own section dataclass here; the YAML files in ``jax_ensemble/configs/``
document every key.
"""

from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jax_ensemble.core.affinity import AFFINITY_METRICS
from jax_ensemble.core.clustering import METHODS as CLUSTERING_METHODS
from jax_ensemble.core.clustering import SDP_SOLVERS
from jax_ensemble.core.ensemble import WEIGHTS_SOLVERS
from jax_ensemble.core.linearize import STRATEGIES
from jax_ensemble.core.projection import PROJECTION_KINDS
from jax_ensemble.core.solvers import METHODS as SOLVER_METHODS
from jax_ensemble.data.suites import TasksConfig
from jax_ensemble.errors import ConfigError, check_choice, parse_error_location
from jax_ensemble.kernels.backend import KERNEL_CHOICES
from jax_ensemble.models.layers import BASE_DTYPES, COMPUTE_DTYPES
from jax_ensemble.models.lora import LoRAConfig
from jax_ensemble.storage.digests import digest
from jax_ensemble.training.settings import MeshConfig, TrainingConfig, check_batch_divisible


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model, and how its frozen base is stored.

    source: a registry name (``smollm2-135m``), a local path (HF safetensors directory
      or ``.gguf`` file) or a Hugging Face hub id (``org/name``).
    base_dtype: storage of the frozen base: ``int8`` (weight-only, per-output-channel
      scales, embedding per-row), ``bfloat16`` or ``float32``.
    compute_dtype: dtype of activations and matmuls.
    kernels: ``auto`` (each Pallas kernel where it was measured faster than XLA: the seeded
      projection on GPU), ``xla`` or ``pallas`` (every kernel: the fused int8 + LoRA matmul and
      the seeded projection; on CPU interpreted, slow).
      Changes how, not what, is computed: not part of any stage's cache key.
    """

    source: str = "smollm2-135m"
    base_dtype: str = "int8"
    compute_dtype: str = "float32"
    kernels: str = "auto"

    def __post_init__(self) -> None:
        check_choice("model.base_dtype", self.base_dtype, BASE_DTYPES)
        check_choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("model.kernels", self.kernels, KERNEL_CHOICES)
        if not self.source:
            raise ConfigError("model.source is empty: give a registry name, a local path or a hub id")

    def cache_identity(self) -> dict[str, Any]:
        """The fields that change results (cache keys and adapter fingerprints): all but ``kernels``."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "kernels"}






@dataclasses.dataclass(frozen=True)
class GradientsConfig:
    """Per-example projected gradients at the base model (docs/method.md §2).

    dim: projection dimension d (paper 400); kind: ``rademacher`` (±1/√d) or
    ``gaussian``; seed: the projector's seed (P is regenerated from it, never stored);
    block_rows: rows of P generated at once (part of P's identity); strategy:
    ``reverse`` | ``forward`` | ``auto`` (cost model); direction_chunk: columns of P per
    vmapped JVP (forward); batch_size: examples per jitted batch; shard_examples:
    examples per shard file (rounded up to whole batches); memory_budget_mb: extra
    memory ``auto`` may spend on per-example gradients or tangents.
    """

    dim: int = 400
    kind: str = "rademacher"
    seed: int = 0
    block_rows: int = 4096
    strategy: str = "auto"
    direction_chunk: int = 32
    batch_size: int = 8
    shard_examples: int = 256
    memory_budget_mb: int = 1024

    def __post_init__(self) -> None:
        check_choice("gradients.kind", self.kind, PROJECTION_KINDS)
        check_choice("gradients.strategy", self.strategy, STRATEGIES)
        for key in ("dim", "block_rows", "direction_chunk", "batch_size", "shard_examples", "memory_budget_mb"):
            if getattr(self, key) < 1:
                raise ConfigError(f"gradients.{key} must be >= 1, got {getattr(self, key)}")


@dataclasses.dataclass(frozen=True)
class LinearizationConfig:
    """The linearization-error study (``jax-ensemble linearization-error``).

    For each LoRA rank in ``ranks`` and learning rate in ``learning_rates`` (empty: the
    ``lora.rank`` / ``training.learning_rate``), one fine-tune with the training section's
    optimizer on the train rows of ``tasks`` (task names or spec paths; empty: the whole
    suite), measured after each step count in ``steps`` on up to ``validation_examples``
    validation examples per task. A step count of 0 stands for the training stage's own
    length on these rows (``training.max_steps``, else ceil(epochs · rows / batch_size)).
    The run (and its learning-rate schedule) lasts as long as the largest count; smaller
    counts are points on its way.
    """

    tasks: tuple[str, ...] = ("rt_polarity",)
    steps: tuple[int, ...] = (2, 4, 0)
    ranks: tuple[int, ...] = ()
    learning_rates: tuple[float, ...] = ()
    validation_examples: int = 50

    def __post_init__(self) -> None:
        if not self.steps or any(s < 0 for s in self.steps):
            raise ConfigError(f"linearization.steps must be a non-empty list of counts >= 0 (0: the training "
                              f"stage's own length), got {list(self.steps)}")
        if any(r < 1 for r in self.ranks):
            raise ConfigError(f"linearization.ranks must be >= 1, got {list(self.ranks)}")
        if any(lr <= 0 for lr in self.learning_rates):
            raise ConfigError(f"linearization.learning_rates must be > 0, got {list(self.learning_rates)}")
        if self.validation_examples < 1:
            raise ConfigError(f"linearization.validation_examples must be >= 1, got {self.validation_examples}")


@dataclasses.dataclass(frozen=True)
class AffinityConfig:
    """Task affinity from linearized estimates (docs/method.md §3–4).

    num_subsets: distinct random task subsets (paper 50), each of ⌈subset_fraction·n⌉
    tasks (at least 2); seed: the subsets' seed. Per subset S one regression
    argmin_w Σ_{train(S)} ℓ(y, f0 + ⟨g, w⟩) + l2·‖w‖². l2 stands in for the fine-tune's
    implicit regularisation (steps × learning rate): 300 tracked the default one-epoch
    recipe best (``jax-ensemble validate-estimates`` prints the sweep; 1e-3 overfits the
    regression to losses 2–8× the fine-tuned ones). The official code's mean-loss λ = 1
    equals l2 = rows per subset here (144 at the default sizes);
    balance_tasks: upsample small tasks so every task's training rows weigh alike;
    solver: ``auto`` (Newton up to 2048 features, else L-BFGS) | ``newton`` | ``lbfgs``;
    metric: the per-task score averaged into the affinity: ``loss`` (minus the
    validation loss) or ``accuracy``.
    """

    num_subsets: int = 50
    subset_fraction: float = 0.3
    l2: float = 300.0
    balance_tasks: bool = False
    solver: str = "auto"
    metric: str = "loss"
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("affinity.solver", self.solver, SOLVER_METHODS)
        check_choice("affinity.metric", self.metric, AFFINITY_METRICS)
        if self.num_subsets < 1:
            raise ConfigError(f"affinity.num_subsets must be >= 1, got {self.num_subsets}")
        if not 0.0 < self.subset_fraction <= 1.0:
            raise ConfigError(f"affinity.subset_fraction must be in (0, 1], got {self.subset_fraction}")
        if self.l2 <= 0:
            raise ConfigError(f"affinity.l2 must be > 0 (it keeps separable subsets finite), got {self.l2}")


@dataclasses.dataclass(frozen=True)
class ClusteringConfig:
    """Task grouping from the affinity matrix (docs/method.md §5).

    method: ``sdp`` (the relaxation, rounded by average linkage) | ``spectral`` |
    ``random`` | ``one`` (all tasks together) | ``each`` (one group per task);
    num_groups: m, or 0 to take the largest eigengap of the normalised affinity;
    solver: the SDP's solver: cvxpy's interior-point ``CLARABEL`` or ``SCS``, the low-rank
    ``BURER_MONTEIRO`` (JAX; thousands of tasks), or ``auto`` (the default: CLARABEL up to 60
    tasks, the low-rank solver beyond and when CLARABEL ends inaccurate).
    """

    method: str = "sdp"
    num_groups: int = 0
    solver: str = "auto"

    def __post_init__(self) -> None:
        check_choice("clustering.method", self.method, CLUSTERING_METHODS)
        check_choice("clustering.solver", self.solver, SDP_SOLVERS)
        if self.num_groups < 0:
            raise ConfigError(f"clustering.num_groups must be >= 0 (0: eigengap), got {self.num_groups}")


@dataclasses.dataclass(frozen=True)
class UQConfig:
    """LoRA ensembles for uncertainty (docs/method.md §8), the ``uq`` command.

    in_distribution: tasks the adapters are fine-tuned on (their test splits are scored);
    out_of_distribution: tasks whose test examples the fine-tuned models meet unseen (OOD
      AUROC, OOD = positive, scored by −max probability and by entropy);
    members: ensemble size M (also the number of MC-dropout samples);
    weight_decay / kl_penalty: > 0 adds the regularised ensembles ``ensemble_wd`` (AdamW
      weight decay on A, B) / ``ensemble_kl`` (β·KL(p_base ‖ p_θ) on the label words);
    mc_dropout: LoRA dropout rate of the MC-dropout baseline (trained and sampled with it);
    num_bins: equal-width ECE bins.
    """

    in_distribution: tuple[str, ...] = ("rt_polarity",)
    out_of_distribution: tuple[str, ...] = ("rt_subjectivity",)
    members: int = 5
    weight_decay: float = 0.0
    kl_penalty: float = 0.0
    mc_dropout: float = 0.1
    num_bins: int = 15

    def __post_init__(self) -> None:
        if not self.in_distribution or not self.out_of_distribution:
            raise ConfigError("uq.in_distribution and uq.out_of_distribution must each name at least one task")
        if overlap := set(self.in_distribution) & set(self.out_of_distribution):
            raise ConfigError(f"uq: task {sorted(overlap)[0]!r} is both in- and out-of-distribution")
        if self.members < 2:
            raise ConfigError(f"uq.members must be >= 2 (an ensemble), got {self.members}")
        if self.weight_decay < 0 or self.kl_penalty < 0:
            raise ConfigError("uq.weight_decay and uq.kl_penalty must be >= 0 (0 turns the variant off)")
        if not 0.0 < self.mc_dropout < 1.0:
            raise ConfigError(f"uq.mc_dropout must be in (0, 1), got {self.mc_dropout}")
        if self.num_bins < 1:
            raise ConfigError(f"uq.num_bins must be >= 1, got {self.num_bins}")


@dataclasses.dataclass(frozen=True)
class EnsembleConfig:
    """The grouped ensemble of the main job (docs/method.md §7).

    per_task_weights: fit one convex α per task on its validation rows (the paper's way:
      each task leans on the groups that help it); false: one α for all tasks.
    boosting_steps: trained boosting rounds b after the m group adapters (0: none).
    step_size: η of each boosting adapter (official default 0.2).
    random_groups: also train the same number of groups chosen at random (a baseline).
    weights_solver: cvxpy solver for the ensemble weights.
    prune_below: fitted weights α[t, m] below this are set to 0 (each task's α renormalised),
      and a member with α[t, m] = 0 is not run on task t's rows (routed inference).
    """

    per_task_weights: bool = True
    boosting_steps: int = 1
    step_size: float = 0.2
    random_groups: bool = True
    weights_solver: str = "CLARABEL"
    prune_below: float = 1e-3

    def __post_init__(self) -> None:
        if self.boosting_steps < 0:
            raise ConfigError(f"ensemble.boosting_steps must be >= 0, got {self.boosting_steps}")
        if not 0.0 < self.step_size <= 1.0:
            raise ConfigError(f"ensemble.step_size must be in (0, 1], got {self.step_size}")
        check_choice("ensemble.weights_solver", self.weights_solver, WEIGHTS_SOLVERS)
        if not 0.0 <= self.prune_below < 0.5:
            raise ConfigError(f"ensemble.prune_below must be in [0, 0.5), got {self.prune_below}")


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: name, seed, run directory and one section per stage."""

    name: str = "default"
    seed: int = 0
    run_dir: str = ""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    tasks: TasksConfig = dataclasses.field(default_factory=TasksConfig)
    sanity_prompt: str = "The capital of France is"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    gradients: GradientsConfig = dataclasses.field(default_factory=GradientsConfig)
    linearization: LinearizationConfig = dataclasses.field(default_factory=LinearizationConfig)
    affinity: AffinityConfig = dataclasses.field(default_factory=AffinityConfig)
    clustering: ClusteringConfig = dataclasses.field(default_factory=ClusteringConfig)
    uq: UQConfig = dataclasses.field(default_factory=UQConfig)
    ensemble: EnsembleConfig = dataclasses.field(default_factory=EnsembleConfig)

    def __post_init__(self) -> None:
        check_batch_divisible(self.training, self.mesh.batch_shards())

    def resolved_run_dir(self) -> Path:
        """``run_dir`` if set, else ``runs/<name>``."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name




def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Check/convert a YAML value to the dataclass field type ``typ``."""
    if dataclasses.is_dataclass(typ):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return _build(typ, value, prefix=f"{key}.")
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(typ):
            return None
        (typ,) = [a for a in typing.get_args(typ) if a is not type(None)]
        origin = typing.get_origin(typ)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1]
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str) and re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+", value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ in (int, float, str, bool) and not (
        isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    ):
        raise ConfigError(f"config key {key!r} must be {typ.__name__}, got {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}; known keys here: "
            + ", ".join(prefix + k for k in types_)
        )
    kwargs = {k: _coerce(prefix + k, v, types_[k]) for k, v in data.items()}
    return cls(**kwargs)


def _apply_override(data: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key=value (e.g. lora.rank=8)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: dict[str, Any], overrides: typing.Sequence[str] = ()) -> Config:
    """Build a :class:`Config` from a plain mapping plus ``key=value`` overrides."""
    data = json.loads(json.dumps(data))
    for override in overrides:
        _apply_override(data, override)
    return _build(Config, data)


PACKAGED_CONFIGS = Path(__file__).parent / "configs"
"""The configs shipped in the package, addressed by name (``--config tiny``)."""


def packaged_config_names() -> list[str]:
    """Names of the shipped configs, sorted."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file that ``--config`` names: an existing path, else a shipped config's name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and packaged.is_file():
        return packaged
    raise ConfigError(f"config file {str(name_or_path)!r} does not exist "
                      f"(shipped configs, by name: {', '.join(packaged_config_names())})")


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (a path or a shipped config's name; ``None``: all defaults) and apply
    ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = config_path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {parse_error_location(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        data.setdefault("name", path.stem)
    return config_from_dict(data, overrides)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain JSON-able data."""
    return dataclasses.asdict(config)


def config_identity(config: Config) -> dict[str, Any]:
    """:func:`config_to_dict` for digests: the training options added later enter only when
    set (:meth:`TrainingConfig.identity`), so a digest taken before they existed still holds."""
    return {**config_to_dict(config), "training": config.training.identity()}


def config_hash(config: Config) -> str:
    """A short stable digest of the resolved config (:func:`config_identity`)."""
    return digest(config_identity(config))
