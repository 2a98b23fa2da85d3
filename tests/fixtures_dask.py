"""A real Dask cluster on loopback: `dask scheduler` and `dask worker` processes started by the test, as a user
starts them (register as "tests.fixtures_dask" in conftest).

- `dask_cluster`: a function `start(n_workers=2, wrap=())` returning a DaskCluster with the scheduler address
  and each worker's process; everything is stopped after the test. `wrap` prefixes a worker's command (for
  example `unshare -m ...` to give that worker a filesystem view of its own).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.fixtures_ops import stop_process

REPO_ROOT = Path(__file__).resolve().parent.parent
DASK = str(Path(sys.executable).with_name("dask"))
START_S = 60


@dataclass
class DaskCluster:
    address: str
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    def wait_for_workers(self, n: int) -> None:
        from distributed import Client
        with Client(self.address, timeout=START_S, set_as_default=False) as c:
            c.wait_for_workers(n, timeout=START_S)

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid, from the scheduler."""
        from distributed import Client
        with Client(self.address, timeout=START_S, set_as_default=False) as c:
            return {w: info["pid"] for w, info in c.scheduler_info()["workers"].items()}


@pytest.fixture
def dask_cluster(tmp_path_factory):
    procs: list[subprocess.Popen] = []
    base = tmp_path_factory.mktemp("dask")
    # The workers import this checkout's code, as a user's would import the installed project.
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DASK_DISTRIBUTED__WORKER__DAEMON="False")

    def start(n_workers: int = 2, wrap: tuple[str, ...] = (), extra_workers: list[tuple[str, ...]] = ()) -> DaskCluster:
        sched_file = base / "scheduler.json"
        sched = subprocess.Popen([DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                  "--scheduler-file", str(sched_file)], env=env, cwd=base,
                                 stdout=subprocess.DEVNULL, stderr=open(base / "scheduler.log", "wb"))
        procs.append(sched)
        deadline = time.monotonic() + START_S
        while not sched_file.exists():
            if sched.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start: {(base / 'scheduler.log').read_text()[-2000:]}")
            time.sleep(0.2)
        address = json.loads(sched_file.read_text())["address"]
        cluster = DaskCluster(address, sched)
        wraps = [wrap] * n_workers + list(extra_workers)
        for i, w in enumerate(wraps):
            # --no-nanny: the worker is this process itself, so a test can SIGKILL exactly one worker.
            cmd = list(w) + [DASK, "worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                             "--name", f"w{i}", "--local-directory", str(base / f"w{i}")]
            p = subprocess.Popen(cmd, env=env, cwd=base, stdout=subprocess.DEVNULL,
                                 stderr=open(base / f"worker{i}.log", "wb"))
            procs.append(p)
            cluster.workers.append(p)
        cluster.wait_for_workers(len(wraps))
        return cluster

    yield start
    for p in reversed(procs):
        stop_process(p)
