"""The built package, not the checkout: a wheel that carries its configs and runs its CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_ships_configs_and_runs_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp_path / "dist").glob("jax_ensemble-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = next(z.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    shipped = {Path(n).stem for n in names if n.startswith("jax_ensemble/configs/") and n.endswith(".yaml")}
    assert shipped == {p.stem for p in (ROOT / "jax_ensemble" / "configs").glob("*.yaml")} >= {"default", "tiny"}
    assert "jax-ensemble = jax_ensemble.cli:main" in entry_points
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def cli(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "jax_ensemble.cli", *args], cwd=outside, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        return result.stdout

    where = subprocess.run([sys.executable, "-c", "import jax_ensemble; print(jax_ensemble.__file__)"], cwd=outside,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert Path(where.strip()).is_relative_to(site)  # the wheel's copy, not the checkout's
    assert " ".join(cli("--version").split()).startswith(f"jax-ensemble {metadata.version('jax-ensemble')} (jax ")
    tasks = json.loads(cli("data", "list", "--config", "default", "--json"))
    assert len(tasks) == 10 and {"name", "num_classes"} <= set(tasks[0])
