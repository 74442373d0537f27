"""The dependency rule of docs/design.md, checked with import-linter (contracts in .importlinter)."""

from __future__ import annotations

import configparser
import pkgutil
import subprocess
import sys
from pathlib import Path

import jax_ensemble

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> list[str]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / ".importlinter")
    text = parser["importlinter:contract:layers"]["layers"]
    return [name.strip() for line in text.splitlines() for name in line.split("|") if name.strip()]


def test_import_contracts_are_kept():
    """lint-imports exits 0 only when every contract holds (layers; a core without model libraries)."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / ".importlinter")], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_every_top_level_module_sits_in_a_layer():
    """A new top-level module or package must be placed in the layers contract, or the rule would not cover it."""
    modules = {f"jax_ensemble.{m.name}" for m in pkgutil.iter_modules(jax_ensemble.__path__)}
    assert modules == set(_layers())


def test_importing_the_package_starts_no_jax_backend():
    """Multi-host runs call jax.distributed.initialize() after reading the config, which
    must come before any JAX computation: importing a module may not create arrays."""
    modules = sorted(m.name for m in pkgutil.walk_packages(jax_ensemble.__path__, "jax_ensemble."))
    code = ("import importlib, sys\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "from jax._src import xla_bridge\n"
            "sys.exit(1 if xla_bridge.backends_are_initialized() else 0)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "a module starts the JAX backend at import\n" + result.stderr[-2000:]
