"""prefect.yaml for real: a Prefect server on loopback, the `cpu` work pool, deployments
created with `prefect deploy`, a process worker, and runs triggered by deployment name
with `prefect deployment run`, recorded in a real PostgreSQL results database.

Not the test harness: everything here is what an operator types (docs/operations.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from storage.db import get_engine
from storage.repository import Repository
from tasks.load.loopback import LoopbackServer

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
PREFECT = str(Path(sys.executable).with_name("prefect"))
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """The processes this test starts, each in its own process group (server and worker
    start children: uvicorn, flow-run processes); all stopped in `close`."""

    def __init__(self, tmp: Path, database_url: str) -> None:
        self.tmp = tmp
        self.port = _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_API_URL": self.api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "DSPYFLOW_PROJECT_DIR": str(ROOT),
            "DSPYFLOW_DATABASE_URL": database_url,
            "DSPYFLOW_HOME": str(tmp / "dspyflow-home"),
            "TQDM_DISABLE": "1",
        }

    def start(self, name: str, *args: str, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            [PREFECT, *args],
            cwd=cwd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((name, proc))
        return proc

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PREFECT, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def log(self, name: str) -> str:
        path = self.tmp / f"{name}.log"
        return path.read_text(errors="replace")[-6000:] if path.exists() else ""

    def api_call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = httpx.request(method, self.api + path, timeout=30, **kwargs)
        response.raise_for_status()
        return response.json()

    def wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        server = self.procs[0][1]
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"prefect server exited {server.returncode}:\n{self.log('server')}")
            try:
                if httpx.get(self.api + "/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"prefect server not healthy after {timeout_s} s:\n{self.log('server')}")

    def close(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for _, proc in reversed(self.procs):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            # Flow-run processes a worker started share its group: none may outlive it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def stack(tmp_path: Path, postgres_database_factory: Callable[[], str]) -> Iterator[Stack]:
    s = Stack(tmp_path, postgres_database_factory())
    try:
        yield s
    finally:
        s.close()


def _run_deployment(stack: Stack, name: str, params: dict[str, Any]) -> str:
    """`prefect deployment run NAME --params ...`; the new flow run's id."""
    out = stack.cli("deployment", "run", name, "--params", json.dumps(params))
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
    assert match, out.stdout
    return match.group(1)


def _wait_terminal(stack: Stack, flow_run_ids: list[str], timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    states: dict[str, Any] = {}
    while time.monotonic() < deadline:
        states = {fid: stack.api_call("GET", f"/flow_runs/{fid}")["state"] for fid in flow_run_ids}
        if all(s and s["type"] in TERMINAL for s in states.values()):
            return states
        time.sleep(2)
    pytest.fail(f"flow runs not finished after {timeout_s} s: {states}\n{stack.log('worker')}")


def _logs(stack: Stack, flow_run_id: str) -> str:
    rows = stack.api_call(
        "POST", "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    return "\n".join(r["message"] for r in rows)


def test_deploy_and_run_from_prefect_yaml(stack: Stack) -> None:
    stack.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(stack.port))
    stack.wait_healthy(timeout_s=180)

    pool = stack.cli("work-pool", "create", "cpu", "--type", "process")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = stack.cli("--no-prompt", "deploy", "--name", "cycle", "--name", "http")
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    for name in ("optimization-cycle/cycle", "load-test/http"):
        d = stack.api_call("GET", f"/deployments/name/{name}")
        assert d["work_pool_name"] == "cpu" and "dspyflow" in d["tags"]
        assert d["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}
        ]
        assert d["parameter_openapi_schema"]["properties"]  # the UI's form
    # The worker starts elsewhere: the pull step, not its cwd, finds the code.
    stack.start("worker", "worker", "start", "--pool", "cpu", cwd=stack.tmp)

    with LoopbackServer(delay_ms=(1.0, 3.0)) as target:
        cycle_id = _run_deployment(
            stack,
            "optimization-cycle/cycle",
            {
                "spec": {
                    "task": "intent",
                    "optimizer": "mipro",
                    "budget": "light",
                    "lm": {"model": "sim"},
                    "max_train": 10,
                    "max_val": 10,
                    "max_test": 10,
                }
            },
        )
        load_id = _run_deployment(
            stack,
            "load-test/http",
            {
                "config": {
                    "name": "deployment-test",
                    "url": target.url,
                    "rps": 20,
                    "duration_s": 2,
                    "max_concurrency": 10,
                    "thresholds": ["error_rate<0.5"],
                    "report_path": str(stack.tmp / "load-report.html"),
                }
            },
        )
        # A value pydantic rejects but the JSON schema admits reaches the flow run, which
        # fails before any work with the field and the reason in its state message.
        bogus_id = _run_deployment(
            stack,
            "optimization-cycle/cycle",
            {"spec": {"task": "intent", "optimizer": "bogus", "lm": {"model": "sim"}}},
        )
        states = _wait_terminal(stack, [cycle_id, load_id, bogus_id], timeout_s=300)

    for fid in (cycle_id, load_id):
        assert states[fid]["type"] == "COMPLETED", (
            states[fid],
            _logs(stack, fid)[-4000:],
            stack.log("worker"),
        )
    repo = Repository(get_engine(stack.env["DSPYFLOW_DATABASE_URL"]))
    (run,) = [r for r in repo.list_runs() if r.flow_run_id == cycle_id]
    assert run.state == "succeeded" and run.lm == "sim" and run.simulated
    assert run.lm_calls > 0 and run.best_score is not None and run.program_state
    (load,) = [t for t in repo.list_load_tests() if t.flow_run_id == load_id]
    assert load.state == "completed" and load.passed and load.name == "deployment-test"
    assert repo.get_load_test(load.id).windows

    bogus = states[bogus_id]
    assert bogus["type"] == "FAILED"
    assert "spec.optimizer" in bogus["message"]
    assert "unknown optimizer 'bogus'" in bogus["message"]
    assert not [r for r in repo.list_runs() if r.flow_run_id == bogus_id]  # nothing written

    # A value of the wrong type is refused when the run is created: no flow run at all.
    refused = stack.cli(
        "deployment",
        "run",
        "optimization-cycle/cycle",
        "--params",
        json.dumps({"spec": {"task": "intent", "lm": {"model": "sim"}, "time_budget_s": "soon"}}),
    )
    assert refused.returncode != 0
    message = " ".join((refused.stdout + refused.stderr).split())
    assert "Validation failed for field 'spec.time_budget_s'" in message
    assert "'soon' is not of type 'number'" in message
