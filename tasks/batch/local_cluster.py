"""A whole cluster on one machine, as real processes: a Prefect server, a Dask scheduler,
Dask worker processes and Prefect process workers, each in its own process group.

What the cluster tests (`tests/cluster/`) and `benchmarks/scale_out.py` start: the same
commands an operator types (docs/operations.md, "A cluster"), not in-process stand-ins.
Every process gets the parent-death signal (it dies with the test or benchmark, even
after a `kill -9`) and `close()` stops every process group it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import psutil
from pydantic import BaseModel

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CpuSeconds(BaseModel):
    """CPU seconds (user + system) of a process and its descendants."""

    total: float

    @classmethod
    def of(cls, pids: list[int]) -> CpuSeconds:
        total = 0.0
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        t = p.cpu_times()
                        total += t.user + t.system
        return cls(total=total)


class LocalCluster:
    """Processes started in `workdir` with `env`; `close()` ends them all."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = dict(env)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self.api_url: str | None = None
        self.scheduler: str | None = None

    # --- processes ------------------------------------------------------------------

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> subprocess.Popen[bytes]:
        from flows.cli.runtime import _die_with_parent

        parent = os.getpid()
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(
            argv,
            cwd=cwd or self.workdir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=lambda: _die_with_parent(parent),
        )
        self.procs[name] = proc
        self._logs[name] = log
        return proc

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is not None:
            _stop_group(proc)
        log = self._logs.pop(name, None)
        if log is not None:
            log.close()

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the pieces -----------------------------------------------------------------

    def start_prefect_server(self, database_url: str | None = None, timeout_s: float = 240) -> str:
        """`prefect server start` on a free loopback port; sets PREFECT_API_URL for every
        process started afterwards and returns it once /health answers."""
        import httpx

        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}/api"
        if database_url:
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
        proc = self.start(
            "prefect-server",
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited:\n{self.log('prefect-server')}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.api_url + "/health", timeout=5).status_code == 200:
                    self.env["PREFECT_API_URL"] = self.api_url
                    return self.api_url
            time.sleep(0.5)
        raise RuntimeError(f"prefect server not up in {timeout_s} s:\n{self.log('prefect-server')}")

    def start_scheduler(self, timeout_s: float = 60) -> str:
        port = free_port()
        self.scheduler = f"tcp://127.0.0.1:{port}"
        self.start(
            "dask-scheduler",
            [
                str(BIN / "dask"),
                "scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
        )
        _wait_port(port, timeout_s, lambda: self.log("dask-scheduler"))
        return self.scheduler

    def start_dask_workers(
        self, count: int, nthreads: int, *, preload: str | None = None, timeout_s: float = 120
    ) -> None:
        """`count` worker processes (`dask worker`, one nanny each), and waits until the
        scheduler sees them all."""
        assert self.scheduler is not None, "start_scheduler first"
        start = len(self.dask_workers())
        for _ in range(count):
            name = f"dask-worker-{len([n for n in self.procs if n.startswith('dask-worker')])}"
            argv = [
                str(BIN / "dask"),
                "worker",
                self.scheduler,
                "--nworkers",
                "1",
                "--nthreads",
                str(nthreads),
                "--memory-limit",
                "0",
                "--name",
                name,
            ]
            if preload:
                argv += ["--preload", preload]
            self.start(name, argv)
        deadline = time.monotonic() + timeout_s
        while len(self.dask_workers()) < start + count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"dask workers did not join in {timeout_s} s")
            time.sleep(0.5)

    def stop_dask_workers(self) -> None:
        for name in [n for n in self.procs if n.startswith("dask-worker")]:
            self.stop(name)
        deadline = time.monotonic() + 30
        while self.dask_workers() and time.monotonic() < deadline:
            time.sleep(0.3)

    def dask_workers(self) -> dict[str, dict[str, Any]]:
        """The scheduler's view: worker address -> {pid, nthreads, ...}."""
        from distributed import Client

        with Client(self.scheduler, timeout=10, set_as_default=False) as client:
            workers = dict(client.scheduler_info(n_workers=-1)["workers"])
            pids = client.run(os.getpid, on_error="return") if workers else {}
        for address, pid in pids.items():
            if address in workers and isinstance(pid, int):
                workers[address] = {**workers[address], "pid": pid}
        return workers

    def start_prefect_worker(self, name: str, pool: str, *args: str) -> None:
        self.start(name, [str(BIN / "prefect"), "worker", "start", "--pool", pool, *args])

    def prefect(
        self, *args: str, timeout: float = 180, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "prefect"), *args],
            cwd=cwd or self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def pids(self, prefix: str) -> list[int]:
        return [p.pid for n, p in self.procs.items() if n.startswith(prefix)]


def _wait_port(port: int, timeout_s: float, log: Any) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on port {port} after {timeout_s} s:\n{log()}")


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the process group, SIGKILL after 15 s; children included."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    # Anything left in the group (a flow-run process, a dask worker under its nanny).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
