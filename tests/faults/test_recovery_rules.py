"""Recovery's rules, fast: a dead local pid is proof at once, a reused pid is not the
worker, a live one is left alone; queued rows nothing claims go stale after stale_after,
while a live batch process keeps its queue fresh."""

from __future__ import annotations

import socket
import subprocess
from datetime import UTC, datetime, timedelta

from sqlalchemy import text

from storage.repository import Repository
from tasks.cycle.recovery import local_worker_gone, reap_dead_local_workers, recover_stale_runs

HOST = socket.gethostname()


def _run(repo: Repository, **fields) -> str:  # type: ignore[no-untyped-def]
    row = dict(task="intent", optimizer="genetic", budget="light", lm="sim", spec={})
    return repo.create_run(**{**row, **fields})


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_dead_local_worker_is_reaped_at_once_and_a_live_one_is_not(repo: Repository) -> None:
    dead_pid = _dead_pid()
    dead = _run(repo)
    assert repo.start_run(dead, worker=f"{HOST}:{dead_pid}")
    with subprocess.Popen(["sleep", "30"]) as alive_proc:
        alive = _run(repo)
        assert repo.start_run(alive, worker=f"{HOST}:{alive_proc.pid}")
        elsewhere = _run(repo)
        assert repo.start_run(elsewhere, worker=f"some-other-host:{dead_pid}")
        (orphan,) = repo.create_runs(  # the queue of a batch process that died
            [dict(task="intent", optimizer="genetic", budget="light", lm="sim", spec={},
                  batch_id="b1", worker=f"{HOST}:{dead_pid}")]
        )  # fmt: skip
        assert sorted(reap_dead_local_workers(repo)) == sorted([dead, orphan])
        alive_proc.kill()
    assert repo.get_run(dead).error == f"worker process {dead_pid} on {HOST} is gone"
    assert repo.get_run(orphan).error == (
        f"batch process {dead_pid} on {HOST} is gone; the run never started"
    )
    assert repo.get_run(alive).state == "running"
    assert repo.get_run(elsewhere).state == "running"  # another host's pids prove nothing


def test_a_reused_pid_is_not_the_worker() -> None:
    with subprocess.Popen(["sleep", "30"]) as proc:
        long_ago = datetime.now(UTC) - timedelta(hours=1)
        assert local_worker_gone(proc.pid, long_ago), "started after the claim: not ours"
        assert not local_worker_gone(proc.pid, datetime.now(UTC))
        proc.kill()


def test_queued_rows_nothing_claims_go_stale_unless_their_batch_is_alive(
    repo: Repository,
) -> None:
    live_ids = repo.create_runs(
        [dict(task="intent", optimizer="genetic", budget="light", lm="sim", spec={},
              batch_id="live")] * 2
    )  # fmt: skip
    dead_ids = repo.create_runs(
        [dict(task="intent", optimizer="genetic", budget="light", lm="sim", spec={},
              batch_id="dead")] * 2
    )  # fmt: skip
    with repo.engine.begin() as conn:  # both queues were written an hour ago...
        conn.execute(
            text("UPDATE optimization_runs SET created_at = :t, heartbeat_at = NULL"),
            {"t": "2000-01-01 00:00:00"},
        )
    assert repo.touch_queued("live") == 2  # ...but the live batch vouches for its own
    report = recover_stale_runs(repo, stale_after_s=60)
    assert sorted(report.marked_stale) == sorted(dead_ids)
    assert all("nothing claimed it" in report.reasons[r] for r in dead_ids)
    assert {repo.get_run(r).state for r in live_ids} == {"queued"}
    # Re-queued runs count from the re-queue: not stale again at once.
    report = recover_stale_runs(repo, stale_after_s=60, requeue=True)
    assert sorted(report.requeued) == sorted(dead_ids)
    assert recover_stale_runs(repo, stale_after_s=60).marked_stale == []
