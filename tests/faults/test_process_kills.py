"""Kill a real `dspyflow` process and check that nothing is lost.

- SIGTERM (what a Prefect worker, Kubernetes or systemd sends) of `dspyflow optimize`
  ends the run `cancelled` with its best program, as Ctrl-C does. Before: `failed` with
  "TerminationSignal" and no program.
- `kill -9` of `dspyflow optimize`: the next command (`runs recover`, however long its
  --stale-after) finds the dead worker process and marks the run `stale` with the reason.
  Before: `running` forever (until a heartbeat timeout someone had to ask for).
- `kill -9` of `dspyflow batch` mid-batch: its running and queued rows become `stale`
  with reasons. Before: queued rows stayed queued forever, invisible to recovery.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.db import get_engine
from storage.repository import Repository
from tests.faults._helpers import wait_for

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


class Cli:
    """`dspyflow` subprocesses on one SQLite database and a private home and Prefect."""

    def __init__(self, tmp: Path, url: str | None = None) -> None:
        self.url = url or f"sqlite:///{tmp / 'results.db'}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
            "DSPYFLOW_HOME": str(tmp / "home"),
            "DSPYFLOW_DATABASE_URL": self.url,
            "PREFECT_HOME": str(tmp / "prefect"),
            "DSPYFLOW_HEARTBEAT_S": "1",
        }
        self.procs: list[subprocess.Popen[str]] = []
        self._repo: Repository | None = None

    @property
    def repo(self) -> Repository:
        if self._repo is None:
            self._repo = Repository(get_engine(self.url))
        return self._repo

    def start(self, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [str(BIN / "dspyflow"), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own group: the cleanup reaches its Prefect server
        )
        self.procs.append(proc)
        return proc

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "dspyflow"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the group this test started
            proc.wait(timeout=30)


@pytest.fixture
def cli(tmp_path: Path) -> Iterator[Cli]:
    c = Cli(tmp_path)
    yield c
    c.close()


@pytest.fixture(params=["sqlite", "postgres"])
def cli_on_each_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cli]:
    """The same, once on SQLite and once on a fresh database of the real PostgreSQL."""
    url = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    c = Cli(tmp_path, url)
    yield c
    c.close()


OPTIMIZE = (
    "optimize", "--task", "intent", "--lm", "sim", "--optimizer", "mipro", "--budget",
    "heavy", "--max-train", "40", "--max-val", "40", "--max-test", "20", "--format", "json",
)  # fmt: skip


def _running_run(cli: Cli, proc: subprocess.Popen[str], min_iteration: int = 1):  # type: ignore[no-untyped-def]
    """The optimize process's run, once its optimizer has done `min_iteration` iterations."""

    def ready() -> bool:
        assert proc.poll() is None, f"dspyflow exited early:\n{proc.communicate()}"
        try:
            runs = cli.repo.list_runs()
        except Exception:  # noqa: BLE001 - the CLI creates the schema first
            return False
        if not runs or runs[0].state != "running":
            return False
        sample = cli.repo.latest_progress_sample(runs[0].id)
        return sample is not None and sample.iteration >= min_iteration

    wait_for(ready, timeout=240, what="the optimizer's first iterations")
    return cli.repo.list_runs()[0]


def test_sigterm_of_optimize_ends_cancelled_with_its_best_program(cli: Cli) -> None:
    proc = cli.start(*OPTIMIZE)
    run = _running_run(cli, proc)
    assert run.worker == f"{socket.gethostname()}:{proc.pid}"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=180)
    run = cli.repo.get_run(run.id)
    assert run.state == "cancelled", (run.state, run.error, err[-3000:])
    assert run.error == "terminated (SIGTERM)"
    assert run.program_state, "the best program so far is kept"
    assert run.best_score is not None, "and scored on the test split"
    assert proc.returncode == 1  # the CLI reports a run that did not succeed
    assert json.loads(out)["state"] == "cancelled"


def test_kill_9_of_optimize_is_reported_stale_by_the_next_command(
    cli_on_each_database: Cli,
) -> None:
    cli = cli_on_each_database
    proc = cli.start(*OPTIMIZE)
    run = _running_run(cli, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert cli.repo.get_run(run.id).state == "running"  # nobody recorded anything
    # The next command: even with an hour's --stale-after the dead pid is proof enough.
    result = cli.run("runs", "recover", "--stale-after", "3600", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["marked_stale"] == [run.id]
    reason = f"worker process {proc.pid} on {socket.gethostname()} is gone"
    assert report["reasons"][run.id] == reason
    dead = cli.repo.get_run(run.id)
    assert (dead.state, dead.error) == ("stale", reason)


def test_kill_9_mid_batch_leaves_no_run_queued_or_running(cli_on_each_database: Cli) -> None:
    cli = cli_on_each_database
    proc = cli.start(
        "batch", "--generate", "40", "--lm", "sim", "--sim-latency-ms", "40",
        "--lm-calls", "20", "--workers", "2", "--format", "json",
    )  # fmt: skip

    def some_done() -> bool:
        assert proc.poll() is None, f"dspyflow batch exited early:\n{proc.communicate()}"
        try:
            counts = cli.repo.count_runs_by_state()
        except Exception:  # noqa: BLE001 - the schema is being created
            return False
        return counts.get("succeeded", 0) >= 2 and counts.get("running", 0) >= 1

    wait_for(some_done, timeout=240, what="a batch under way")
    proc.kill()
    proc.wait(timeout=30)
    before = cli.repo.count_runs_by_state()
    assert before.get("queued", 0) > 0 and before.get("running", 0) > 0
    result = cli.run("runs", "recover", "--stale-after", "3600", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    after = cli.repo.count_runs_by_state()
    assert "queued" not in after and "running" not in after, after
    assert after["stale"] == before["queued"] + before["running"] == len(report["marked_stale"])
    reasons = set(report["reasons"].values())
    host = socket.gethostname()
    assert reasons == {
        f"worker process {proc.pid} on {host} is gone",
        f"batch process {proc.pid} on {host} is gone; the run never started",
    }


def test_sigterm_of_a_batch_ends_every_run_with_its_reason_and_programs(
    cli_on_each_database: Cli,
) -> None:
    """SIGTERM of a real `dspyflow batch` (what a Prefect worker, Kubernetes or systemd
    sends): it starts no more jobs, cancels the queued ones ("never started") and the
    cycles in flight (each keeps its best program, as Ctrl-C does), writes its summary and
    exits 1. Before: no handler of its own; Prefect's aborted the flow and left rows
    `queued` and `running` for the next command to mark stale, programs lost."""
    _stop_a_batch(cli_on_each_database, signal.SIGTERM, "batch terminated (SIGTERM)")


def test_ctrl_c_of_a_batch_stops_it_as_sigterm_does(cli: Cli) -> None:
    """The first Ctrl-C of `dspyflow batch` is the same graceful stop. It is sent, as a
    terminal does, to the whole process group, so the command's temporary Prefect server
    must not die of it either. Before: a KeyboardInterrupt in the dispatcher while the
    cycles in flight ran on."""
    _stop_a_batch(cli, signal.SIGINT, "batch interrupted (Ctrl-C)", to_group=True)


def _stop_a_batch(cli: Cli, signum: signal.Signals, reason: str, *, to_group: bool = False) -> None:
    proc = cli.start(
        "batch", "--generate", "30", "--lm", "sim", "--sim-latency-ms", "30",
        "--lm-calls", "150", "--workers", "2", "--format", "json",
    )  # fmt: skip

    def under_way() -> bool:
        assert proc.poll() is None, f"dspyflow batch exited early:\n{proc.communicate()}"
        try:
            counts = cli.repo.count_runs_by_state()
        except Exception:  # noqa: BLE001 - the schema is being created
            return False
        return counts.get("succeeded", 0) >= 1 and counts.get("running", 0) >= 2

    wait_for(under_way, timeout=240, what="a batch with 2 cycles in flight")
    in_flight = {r.id for r in cli.repo.list_runs(state="running", limit=None)}
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    summary = json.loads(out)
    runs = cli.repo.list_runs(limit=None)
    assert len(runs) == summary["jobs"] == 30
    assert {r.state for r in runs} <= {"succeeded", "cancelled"}, [(r.state, r.error) for r in runs]
    never = [r for r in runs if r.error == f"{reason}; the run never started"]
    assert never and all(r.state == "cancelled" and r.started_at is None for r in never)
    stopped = [r for r in runs if r.id in in_flight]
    assert len(stopped) >= 2
    for run in stopped:
        assert run.state in ("cancelled", "succeeded"), (run.state, run.error)
        if run.state == "cancelled":
            assert reason in (run.error or "")
        if "during the baseline evaluation" in (run.error or ""):
            continue  # stopped before anything was optimized: no program to keep
        assert run.program_state, f"run {run.id} ({run.state}) kept no program: {run.error}"
    assert any(r.state == "cancelled" for r in stopped), "no cycle in flight was cancelled"
    assert summary["states"].get("cancelled", 0) == sum(r.state == "cancelled" for r in runs)


def test_segfault_of_optimize_is_reported_by_runs_list(cli: Cli) -> None:
    """The crash users met (llama.cpp's SIGSEGV): any next command that reads runs,
    not only `runs recover`, reports the dead run instead of `running` forever."""
    proc = cli.start(*OPTIMIZE)
    run = _running_run(cli, proc)
    proc.send_signal(signal.SIGSEGV)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGSEGV
    result = cli.run("runs", "list", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {row["id"]: row for row in json.loads(result.stdout)}
    assert listed[run.id]["state"] == "stale"
    dead = cli.repo.get_run(run.id)
    assert dead.error == f"worker process {proc.pid} on {socket.gethostname()} is gone"


def test_runs_cancel_from_another_process_stops_optimize_with_its_program(
    cli_on_each_database: Cli,
) -> None:
    """`dspyflow runs cancel` in a second process reaches a `dspyflow optimize` that runs
    on its own temporary Prefect server: the request goes through the database and the
    worker reads it with its next heartbeat. Before: the command cancelled a flow run on
    a different Prefect server and the run ended `succeeded`."""
    cli = cli_on_each_database
    proc = cli.start(*OPTIMIZE)
    run = _running_run(cli, proc)
    result = cli.run("runs", "cancel", run.id[:8], "--reason", "not needed any more")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cancel requested" in result.stdout
    out, err = proc.communicate(timeout=120)
    ended = cli.repo.get_run(run.id)
    assert ended.state == "cancelled", (ended.state, ended.error, err[-3000:])
    assert ended.error == "not needed any more"
    assert ended.program_state, "the best program so far is kept"
    assert ended.best_score is not None, "and scored on the test split"
    assert proc.returncode == 1
    assert json.loads(out)["state"] == "cancelled"
    again = cli.run("runs", "cancel", run.id)
    assert again.returncode != 0 and "is cancelled: nothing to cancel" in again.stderr


def test_runs_cancel_of_one_batch_job_leaves_the_others_running(cli: Cli) -> None:
    """A run of a batch shares its flow run with every other job: the cancel stops that
    run alone, and a queued one is cancelled before it starts."""
    proc = cli.start(
        "batch", "--generate", "12", "--lm", "sim", "--sim-latency-ms", "30",
        "--lm-calls", "60", "--workers", "2", "--format", "json",
    )  # fmt: skip

    def under_way() -> bool:
        assert proc.poll() is None, f"dspyflow batch exited early:\n{proc.communicate()}"
        try:
            counts = cli.repo.count_runs_by_state()
        except Exception:  # noqa: BLE001 - the schema is being created
            return False
        return counts.get("running", 0) >= 1 and counts.get("queued", 0) >= 1

    wait_for(under_way, timeout=240, what="a batch with a cycle in flight and one queued")
    running = cli.repo.list_runs(state="running", limit=1)[0]
    # The last job in line (job i has seed i; one priority): the first in line may be
    # claimed while the cancel command starts. Both commands start at once: one after the
    # other doubles the time a slow machine gives the batch to claim it.
    queued = max(cli.repo.list_runs(state="queued", limit=None), key=lambda r: r.spec["seed"])
    cancels = [cli.start("runs", "cancel", target.id) for target in (running, queued)]
    for cancel in cancels:
        cancel_out, cancel_err = cancel.communicate(timeout=180)
        assert cancel.returncode == 0, cancel_out + cancel_err
    out, err = proc.communicate(timeout=240)
    runs = {r.id: r for r in cli.repo.list_runs(limit=None)}
    assert (runs[queued.id].state, runs[queued.id].started_at) == ("cancelled", None)
    assert runs[running.id].state == "cancelled", (runs[running.id].error, err[-3000:])
    assert runs[running.id].error == "cancelled by an operator"
    others = [r for r in runs.values() if r.id not in (running.id, queued.id)]
    assert len(others) == 10 and all(r.state == "succeeded" for r in others), [
        (r.state, r.error) for r in others
    ]
    assert json.loads(out)["states"] == {"succeeded": 10, "cancelled": 2}
