"""Run configuration: nested frozen dataclasses read from YAML, with ``key=value`` overrides.

``load_config("configs/default.yaml", ["lora.rank=8", "model.base_dtype=float32"])``
returns a :class:`Config`. Unknown keys, wrong types and bad values raise
:class:`~jax_ensemble.errors.ConfigError` naming the key. ``config_hash`` is a stable
digest of the resolved config, used to key cached stages in the run directory.

Each later stage adds its own section dataclass here; the YAML files in ``configs/``
document every key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jax_ensemble.errors import ConfigError

BASE_DTYPES = ("int8", "bfloat16", "float32")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model, and how its frozen base is stored.

    source: a registry name (``smollm2-135m``), a local path (HF safetensors directory
      or ``.gguf`` file) or a Hugging Face hub id (``org/name``).
    base_dtype: storage of the frozen base: ``int8`` (weight-only, per-output-channel
      scales, embedding per-row), ``bfloat16`` or ``float32``.
    compute_dtype: dtype of activations and matmuls.
    """

    source: str = "smollm2-135m"
    base_dtype: str = "int8"
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        _check_choice("model.base_dtype", self.base_dtype, BASE_DTYPES)
        _check_choice("model.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        if not self.source:
            raise ConfigError("model.source is empty: give a registry name, a local path or a hub id")


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


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run: name, seed, run directory and one section per stage."""

    name: str = "default"
    seed: int = 0
    run_dir: str = ""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    sanity_prompt: str = "The capital of France is"

    def resolved_run_dir(self) -> Path:
        """``run_dir`` if set, else ``runs/<name>``."""
        return Path(self.run_dir) if self.run_dir else Path("runs") / self.name


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


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


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML config (``None``: all defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        data.setdefault("name", path.stem)
    return config_from_dict(data, overrides)


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain JSON-able data."""
    return dataclasses.asdict(config)


def config_hash(config: Config) -> str:
    """A short stable digest of the resolved config."""
    blob = json.dumps(config_to_dict(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
