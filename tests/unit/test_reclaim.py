"""A job the task runner runs a second time (Dask, after losing the worker process of the
first execution) takes over its row only when the holder is really gone: its pid on this
host, or three heartbeat intervals without a heartbeat from another host. A live holder
keeps its run. On SQLite and on the real PostgreSQL server (`repo` fixture)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

import tasks.cycle.timer
from storage.models import OptimizationRun
from storage.repository import Repository
from tasks.batch.cluster import reclaim_orphaned_run

ME = f"{socket.gethostname()}:{os.getpid()}"


def _running(repo: Repository, worker: str, heartbeat_age_s: float = 0.0) -> tuple[str, str]:
    run_id = repo.create_run(
        task="intent", optimizer="capacity", budget="light", lm="sim", spec={}, batch_id="b"
    )
    lease = repo.start_run(run_id, worker=worker)
    assert lease
    if heartbeat_age_s:
        old = datetime.now(UTC) - timedelta(seconds=heartbeat_age_s)
        with repo.engine.begin() as conn:
            conn.execute(
                update(OptimizationRun)
                .where(OptimizationRun.id == run_id)
                .values(heartbeat_at=old, started_at=old)
            )
    return run_id, lease


@pytest.fixture
def fast_heartbeat(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(tasks.cycle.timer, "HEARTBEAT_INTERVAL_S", 0.2)
    return 0.2


def test_a_dead_local_worker_is_taken_over(repo: Repository) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    holder = f"{socket.gethostname()}:{dead.pid}"
    run_id, _ = _running(repo, holder)
    assert reclaim_orphaned_run(repo, run_id, ME)
    run = repo.get_run(run_id, with_details=True)
    assert run.state == "queued" and run.attempt == 2 and run.worker is None
    (alert,) = run.alerts
    assert alert.kind == "worker_lost"
    assert f"worker process {dead.pid} on {socket.gethostname()} is gone" in alert.message
    assert repo.start_run(run_id, worker=ME)  # this execution can claim it now


def test_a_live_local_worker_keeps_its_run(repo: Repository) -> None:
    holder = f"{socket.gethostname()}:{os.getppid()}"
    run_id, _ = _running(repo, holder)
    assert not reclaim_orphaned_run(repo, run_id, ME)
    assert repo.get_run(run_id).state == "running"


def test_a_silent_remote_worker_is_taken_over(repo: Repository, fast_heartbeat: float) -> None:
    run_id, _ = _running(repo, "elsewhere:4242", heartbeat_age_s=60)
    assert reclaim_orphaned_run(repo, run_id, ME)
    run = repo.get_run(run_id, with_details=True)
    assert run.state == "queued" and run.attempt == 2
    assert "worker elsewhere:4242 stopped: no heartbeat for" in run.alerts[0].message


def test_a_remote_worker_that_heartbeats_keeps_its_run(
    repo: Repository, fast_heartbeat: float
) -> None:
    run_id, lease = _running(repo, "elsewhere:4242")
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(fast_heartbeat / 2):
            repo.heartbeat(run_id, lease)

    beater = threading.Thread(target=beat)
    beater.start()
    try:
        assert not reclaim_orphaned_run(repo, run_id, ME)  # waits 4 intervals, sees beats
    finally:
        stop.set()
        beater.join()
    run = repo.get_run(run_id)
    assert run.state == "running" and run.worker == "elsewhere:4242" and run.attempt == 1


def test_rows_that_are_not_orphans_are_left_alone(repo: Repository) -> None:
    queued = repo.create_run(task="intent", optimizer="capacity", budget="light", lm="sim", spec={})
    assert not reclaim_orphaned_run(repo, queued, ME)
    mine, _ = _running(repo, ME)
    assert not reclaim_orphaned_run(repo, mine, ME)
    assert not reclaim_orphaned_run(repo, "no-such-run", ME)
