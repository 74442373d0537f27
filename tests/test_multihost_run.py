"""``jax-ensemble run`` as a multi-host job: 2 local processes × 2 fake CPU devices each
(joined by ``jax.distributed``, as on two hosts) against one process with the same 4
devices. The two-process job is killed mid-training (process 1 first, then process 0, as a
scheduler ends a job whose host died) and started again: it resumes from the cached
gradient, affinity and grouping stages and the adapters' checkpoints and ends with the
one-process ``metrics.json`` numbers. Tiny random Llama, four local tasks, a
data × fsdp = 2 × 2 mesh."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from test_affinity_stage import write_four_task_suite

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(args: list[str], devices: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(Path(tempfile.gettempdir()) / "jax-ensemble-test-xla-cache"))
    return subprocess.Popen([sys.executable, "-m", "jax_ensemble.cli", "run", *args], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def _job(common: list[str], run_dir: Path, logs: Path) -> list[subprocess.Popen]:
    """The two processes of one job (process 0 and 1, a fresh coordinator port)."""
    port = _free_port()
    return [_spawn([*common, f"run_dir={run_dir}", f"mesh.coordinator_address=localhost:{port}",
                    "mesh.num_processes=2", f"mesh.process_id={i}"], 2, logs / f"{run_dir.name}-{i}.log")
            for i in range(2)]


def _finish(processes: list[subprocess.Popen], logs: list[Path], timeout: float = 1500) -> None:
    for process, log in zip(processes, logs):
        assert process.wait(timeout=timeout) == 0, log.read_text()[-4000:]


def _numbers(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    return {k: m[k] for k in ("tasks", "groups", "random_groups", "per_task_accuracy", "average_accuracy",
                              "ensemble_weights", "affinity", "boosted_groups")}


def _assert_same(got: dict, expected: dict) -> None:
    for key in ("tasks", "groups", "random_groups", "per_task_accuracy", "average_accuracy", "boosted_groups"):
        assert got[key] == expected[key], key
    for key in ("ensemble_weights", "affinity"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.slow
def test_two_processes_give_one_process_numbers_and_resume_after_a_kill(tiny_hf_dir, tmp_path):
    suite = write_four_task_suite(tmp_path)
    common = [
        f"model.source={tiny_hf_dir}", f"tasks.suite={suite}", "lora.rank=2", "tasks.train_size=12",
        "tasks.validation_size=8", "tasks.test_size=8", "tasks.max_length=32", "tasks.batch_size=8",
        "gradients.dim=16", "gradients.batch_size=4", "affinity.num_subsets=6", "clustering.num_groups=2",
        "training.max_steps=4", "training.batch_size=4", "training.warmup_steps=0", "training.learning_rate=0.05",
        "training.eval_every=2", "training.checkpoint_every=1", "training.eval_batch_size=8", "ensemble.boosting_steps=1",
        "sanity_prompt=good", "mesh.data=2", "mesh.fsdp=2",
    ]
    one = tmp_path / "one"
    process = _spawn([*common, f"run_dir={one}"], 4, tmp_path / "one.log")
    _finish([process], [tmp_path / "one.log"])
    expected = _numbers(one)

    # kill process 1 once the first group adapter has a checkpoint (mid training), then the whole job
    killed = tmp_path / "killed"
    processes = _job(common, killed, tmp_path)
    deadline = time.monotonic() + 1200
    while not list((killed / "adapters").glob("group-0/checkpoints/*")) and time.monotonic() < deadline:
        assert processes[0].poll() is None, (tmp_path / "killed-0.log").read_text()[-3000:]
        time.sleep(0.2)
    processes[1].send_signal(signal.SIGKILL)
    processes[1].wait()
    processes[0].send_signal(signal.SIGKILL)  # its peer is gone: the job fails; a scheduler restarts it whole
    processes[0].wait()
    assert not (killed / "metrics.json").exists() and (killed / "grouping").is_dir()
    _finish(_job(common, killed, tmp_path), [tmp_path / f"killed-{i}.log" for i in range(2)])
    _assert_same(_numbers(killed), expected)


WORKER = """
import sys
from jax_ensemble.errors import SolverError
from jax_ensemble.storage.atomic import atomic_write_bytes, read_verified_shared, write_verified
from jax_ensemble.storage.processes import is_writer, on_writer, on_writer_array
from jax_ensemble.training.mesh import initialize_distributed
from jax_ensemble.training.settings import MeshConfig

out, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
initialize_distributed(MeshConfig(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid))
import numpy as np
atomic_write_bytes(f"{out}/plain-{pid}.txt", b"x")
write_verified(f"{out}/shared.bin", b"from process %d" % pid)
print("read", read_verified_shared(f"{out}/shared.bin").decode(), read_verified_shared(f"{out}/missing.bin"))
print("value", on_writer(lambda: {"pid": pid}), on_writer_array(lambda: np.arange(3) * (pid + 1)).tolist())
try:
    on_writer(lambda: (_ for _ in ()).throw(SolverError("the SDP failed")))
except SolverError as e:
    print("raised", type(e).__name__, e)
print("writer", is_writer())
"""


def test_process_zero_writes_reads_and_decides_for_every_process(tmp_path):
    """Two processes: only process 0's files appear; a verified file read by process 0 (and a
    missing one) reaches both; on_writer values and arrays are process 0's; an error raised
    on process 0 is raised on both, as the same JaxEnsembleError class."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(port), str(i)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-0.txt", "shared.bin", "shared.bin.sha256"]
    for pid, output in enumerate(outputs):
        lines = [line for line in output.splitlines() if line.split(" ")[0] in ("read", "value", "raised", "writer")]
        assert lines == ["read from process 0 None", "value {'pid': 0} [0, 1, 2]",
                         "raised SolverError the SDP failed", f"writer {pid == 0}"], output
