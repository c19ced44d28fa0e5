"""A live worker whose run is marked stale (`runs recover --stale-after S` with S too
short, a heartbeat stuck behind a database lock) learns it from its next heartbeat, stops
spending LM calls and keeps its best program on the stale row. Before: the heartbeat
silently matched no row, the cycle ran to its end and its result was thrown away."""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import text

import tasks.cycle.timer as cycle_timer
from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.cycle.recovery import recover_stale_runs
from tests.faults._helpers import quiet, sim_spec, wait_for


def test_lease_lost_while_alive_stops_the_cycle_and_keeps_its_program(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cycle_timer, "HEARTBEAT_INTERVAL_S", 0.2)
    monkeypatch.setattr(cycle_timer, "SAMPLE_INTERVAL_S", 0.05)
    # ~20 ms a call: the genetic optimizer's full budget takes many seconds.
    spec = sim_spec(optimizer="genetic", sim_latency_ms=20, sim_latency_sigma=0, max_val=12)
    with quiet():
        ctx = cycle.prepare_cycle(spec, repo)
    holder: dict[str, object] = {}

    def work() -> None:
        with quiet():
            baseline = cycle.run_baseline(ctx)
            result = cycle.run_optimizer(ctx)
            holder["result"] = result
            test_score = cycle.evaluate_final(ctx, result)
            cycle.record_success(ctx, baseline, result, test_score)

    worker = threading.Thread(target=work)
    worker.start()
    wait_for(
        lambda: (s := repo.latest_progress_sample(ctx.run_id)) is not None and s.iteration >= 1,
        what="the first generation",
    )
    # What `runs recover --stale-after 60` does to a run whose heartbeat looks old.
    marked: list[str] = []
    while not marked:
        with repo.engine.begin() as conn:
            conn.execute(
                text("UPDATE optimization_runs SET heartbeat_at = :t WHERE id = :id"),
                {"t": "2000-01-01 00:00:00", "id": ctx.run_id},
            )
        marked = recover_stale_runs(repo, stale_after_s=60).marked_stale
    calls_when_marked = ctx.lm.usage.calls
    marked_at = time.monotonic()
    worker.join(timeout=60)
    assert not worker.is_alive()
    stopped_after_s = time.monotonic() - marked_at
    result = holder["result"]
    assert result.stopped_early and result.stop_reason == "lease_lost"  # type: ignore[attr-defined]
    # It stopped within a heartbeat and an LM call or so: a handful of calls, no final
    # test evaluation (nobody can record its score as this run's outcome).
    extra_calls = ctx.lm.usage.calls - calls_when_marked
    assert extra_calls <= 2 * len(ctx.splits.val), (extra_calls, stopped_after_s)
    assert stopped_after_s < 5
    calls_after = ctx.lm.usage.calls
    time.sleep(0.5)
    assert ctx.lm.usage.calls == calls_after, "no LM calls after the cycle ended"
    run = repo.get_run(ctx.run_id, with_details=True)
    assert run.state == "stale"
    assert "heartbeat older than 60 s" in run.error and "worker was alive" in run.error
    assert run.program_state, "the best program so far is kept on the stale row"
    assert run.val_score is not None and run.best_score is None
    assert "lease_lost" in [a.kind for a in run.alerts]
    # Re-queue still works: the stale verdict stands, the old lease is void.
    assert recover_stale_runs(repo, stale_after_s=60, requeue=True).requeued == [ctx.run_id]
