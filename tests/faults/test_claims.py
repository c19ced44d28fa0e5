"""Two workers, one run: the claim (lease) decides who may write it, on SQLite and on the
real PostgreSQL server. Before the lease, the loser of the race failed the winner's run
(`finish_run` only checked "not terminal") and the winner's result vanished silently."""

from __future__ import annotations

import logging
import threading

import pytest

from storage.models import RunState
from storage.repository import CancelOutcome, Repository, new_id
from tasks.batch.models import BatchOptions
from tasks.batch.queue import JobQueue
from tasks.batch.run import _stop_batch, run_batch_job
from tasks.cycle import steps as cycle
from tasks.cycle.spec import CycleSpec
from tests.faults._helpers import quiet, sim_spec, wait_for


def _queued(repo: Repository) -> str:
    return repo.create_run(task="intent", optimizer="genetic", budget="light", lm="sim", spec={})


def test_two_threads_racing_start_run_get_one_claim(repo: Repository) -> None:
    for _ in range(20):
        run_id = _queued(repo)
        barrier = threading.Barrier(2)
        leases: list[str | None] = []

        def claim(
            name: str, run_id: str, barrier: threading.Barrier, out: list[str | None]
        ) -> None:
            barrier.wait()
            out.append(repo.start_run(run_id, worker=name))

        threads = [
            threading.Thread(target=claim, args=(f"w{i}", run_id, barrier, leases))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        won = [lease for lease in leases if lease]
        assert len(won) == 1, leases
        # The loser holds nothing: it can neither fail nor heartbeat the winner's run.
        assert not repo.finish_run(run_id, RunState.failed, error="loser")
        assert not repo.finish_run(run_id, RunState.failed, lease="not-the-lease")
        assert not repo.heartbeat(run_id, "not-the-lease")
        assert repo.heartbeat(run_id, won[0], lm_calls=3)
        assert repo.finish_run(run_id, RunState.succeeded, lease=won[0])
        assert repo.get_run(run_id).state == "succeeded"


def test_transition_table_guards_every_write(repo: Repository) -> None:
    run_id = _queued(repo)
    # Operators may end a run nobody holds...
    assert repo.finish_run(run_id, RunState.cancelled, error="refused")
    run_id = _queued(repo)
    lease = repo.start_run(run_id, worker="host:1")
    assert lease
    # ...but not a running one: only its claimant, with the lease, may.
    assert not repo.finish_run(run_id, RunState.failed)
    with pytest.raises(ValueError, match="an operator cannot move a run to succeeded"):
        repo.finish_run(run_id, RunState.succeeded)
    assert not repo.update_run(run_id, "other", baseline_score=0.1)
    assert repo.update_run(run_id, lease, baseline_score=0.1)
    with pytest.raises(ValueError):
        repo.update_run(run_id, lease, state="succeeded")
    # Recovery marks it stale: the lease no longer heartbeats, updates or finishes...
    assert repo.mark_worker_gone(run_id, worker="host:1", reason="gone")
    assert not repo.heartbeat(run_id, lease)
    assert not repo.update_run(run_id, lease, baseline_score=0.2)
    assert not repo.finish_run(run_id, RunState.succeeded, lease=lease)
    # ...but may keep its result on the stale row while nobody else claimed it.
    assert repo.salvage_run(run_id, lease, program_state={"p": 1}, error="kept")
    assert repo.get_run(run_id).state == "stale"
    # Re-queued: the old claim is void; a new worker claims it with a new lease.
    assert repo.requeue_run(run_id)
    assert not repo.salvage_run(run_id, lease, program_state={"p": 2})
    new_lease = repo.start_run(run_id, worker="host:2")
    assert new_lease and new_lease != lease
    assert not repo.finish_run(run_id, RunState.failed, lease=lease)
    assert repo.finish_run(run_id, RunState.succeeded, lease=new_lease)
    run = repo.get_run(run_id)
    assert (run.state, run.attempt, run.program_state) == ("succeeded", 2, {"p": 1})


def test_the_loser_of_a_claim_race_leaves_the_winners_run_alone(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    """Ordered race: the winner is mid-cycle when the loser tries the same run id."""
    spec = sim_spec(optimizer="genetic", sim_latency_ms=5, sim_latency_sigma=0)
    run_id = _queued(repo)
    results: dict[str, object] = {}

    def winner() -> None:
        with quiet():
            results["winner"] = cycle.run_cycle(spec, repo, run_id=run_id)

    thread = threading.Thread(target=winner)
    thread.start()
    wait_for(lambda: repo.get_run(run_id).state == "running", what="the winner's claim")
    with caplog.at_level(logging.WARNING, logger="dspyflow.cycle"), quiet():
        loser = cycle.run_cycle(spec, repo, run_id=run_id)
    # The loser reports the run as it is (the winner's) and writes nothing to it.
    assert loser.state in ("running", "succeeded"), loser
    assert "not queued" in caplog.text
    thread.join(timeout=120)
    run = repo.get_run(run_id)
    assert run.state == "succeeded", run.error
    assert run.program_state and run.best_score is not None


def test_two_threads_racing_one_cycle_record_one_result(repo: Repository) -> None:
    spec = sim_spec(optimizer="genetic")
    run_id = _queued(repo)
    barrier = threading.Barrier(2)
    states: list[str] = []

    def work() -> None:
        barrier.wait()
        with quiet():
            states.append(cycle.run_cycle(spec, repo, run_id=run_id).state)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    run = repo.get_run(run_id)
    assert run.state == "succeeded", (run.state, run.error, states)
    assert run.program_state and run.error is None


def test_a_result_that_cannot_be_recorded_is_logged_loudly(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    spec = sim_spec(optimizer="genetic")
    with quiet():
        ctx = cycle.prepare_cycle(spec, repo)
        baseline = cycle.run_baseline(ctx)
        result = cycle.run_optimizer(ctx)
        test_score = cycle.evaluate_final(ctx, result)
    # Someone ended it meanwhile (here: re-queued after a stale mark, then claimed again).
    assert repo.mark_worker_gone(ctx.run_id, worker=cycle.worker_name(), reason="test")
    assert repo.requeue_run(ctx.run_id)
    other = repo.start_run(ctx.run_id, worker="elsewhere:1")
    assert other
    with caplog.at_level(logging.ERROR, logger="dspyflow.cycle"):
        cycle.record_success(ctx, baseline, result, test_score)
    assert "NOT recorded" in caplog.text and "elsewhere:1" in caplog.text
    run = repo.get_run(ctx.run_id)
    assert run.state == "running" and run.program_state is None  # the other worker's, intact


def test_a_cancel_request_reaches_the_holder_with_its_next_heartbeat(repo: Repository) -> None:
    """`runs cancel` from any process: the request is on the row, and the holder's next
    heartbeat returns it (no Prefect server needed). A run nobody holds cannot be asked."""
    run_id = _queued(repo)
    assert not repo.request_cancel(run_id, "too early")  # queued: finish_run it instead
    lease = repo.start_run(run_id, worker="host:1")
    assert lease
    assert repo.heartbeat(run_id, lease).cancel_request is None
    assert repo.request_cancel(run_id, "not needed any more")
    beat = repo.heartbeat(run_id, lease, lm_calls=4)
    assert beat and beat.cancel_request == "not needed any more"
    other = repo.heartbeat(run_id, "not-the-lease")
    assert not other and other.cancel_request is None
    assert repo.finish_run(run_id, RunState.cancelled, lease=lease, error=beat.cancel_request)
    assert not repo.request_cancel(run_id, "again")


def test_a_cancel_request_the_holder_never_read_still_ends_the_run_cancelled(
    repo: Repository,
) -> None:
    """The run finished before its next heartbeat read the request. Before: it ended
    `succeeded` although `runs cancel` had said "cancel requested" (a CI run of
    test_runs_cancel_of_one_batch_job_leaves_the_others_running). Now the request wins
    in the recording statement itself, and the result is kept on the cancelled run."""
    run_id = _queued(repo)
    lease = repo.start_run(run_id, worker="host:1")
    assert lease
    assert repo.cancel(run_id, "not needed any more") is CancelOutcome.requested
    assert repo.finish_run(
        run_id, RunState.succeeded, lease=lease, error=None, best_score=0.75, val_score=0.5
    )
    run = repo.get_run(run_id)
    assert (run.state, run.error, run.best_score) == ("cancelled", "not needed any more", 0.75)
    assert run.finished_at is not None

    plain = _queued(repo)
    lease = repo.start_run(plain, worker="host:1")
    assert lease and repo.finish_run(plain, RunState.succeeded, lease=lease, error=None)
    assert (repo.get_run(plain).state, repo.get_run(plain).error) == ("succeeded", None)
    assert repo.cancel(plain, "too late") is None  # ended: nothing to cancel, unchanged
    assert repo.get_run(plain).state == "succeeded"


def test_cancel_reaches_a_run_whoever_holds_it(repo: Repository) -> None:
    """`Repository.cancel` (`runs cancel`, a stopped batch): a running run is asked, a
    queued one is ended at once and its worker's later claim gets nothing, an ended one
    is left alone."""
    running = _queued(repo)
    lease = repo.start_run(running, worker="host:1")
    assert lease
    assert repo.cancel(running, "stop") is CancelOutcome.requested
    assert repo.heartbeat(running, lease).cancel_request == "stop"

    queued = _queued(repo)
    assert repo.cancel(queued, "stop", unclaimed_note="; never started") is CancelOutcome.cancelled
    ended = repo.get_run(queued)
    assert ended.state == "cancelled" and ended.error == "stop; never started"
    assert repo.start_run(queued, worker="host:2") is None
    assert repo.cancel(queued, "again") is None


def test_a_stopped_dask_batch_cancels_the_jobs_its_workers_have_not_claimed_yet(
    repo: Repository,
) -> None:
    """A busy cluster starts a submitted task late: at SIGTERM its row is still queued.
    Before: the stop asked only running rows (`request_cancel` refused a queued one), the
    worker claimed the row afterwards and ran the whole cycle (a CI run: 141 s after
    SIGTERM instead of one heartbeat). Now the row is cancelled and the job runs nothing."""
    spec = sim_spec(sim_latency_ms=0)
    batch_id = new_id()
    ids = [repo.create_run(batch_id=batch_id, **spec.run_fields()) for _ in range(2)]
    queue: JobQueue[CycleSpec] = JobQueue(10, max_concurrent=1)
    for run_id in ids:
        queue.submit(run_id, spec)
    queue.close()
    submitted = queue.take()  # handed to the runner; its worker has not started it
    assert submitted is not None
    options = BatchOptions(task_runner="dask", dask_address="tcp://127.0.0.1:8786")
    _stop_batch(repo, queue, options, "batch terminated (SIGTERM)")
    for run_id in ids:
        run = repo.get_run(run_id)
        assert run.state == "cancelled", (run_id, run.state)
        assert run.error == "batch terminated (SIGTERM); the run never started"
    # The job, when the worker gets to it, runs nothing and reports the row's end.
    state = run_batch_job(spec, submitted.job_id, str(repo.engine.url.render_as_string(False)))
    assert state == "cancelled"
    assert repo.get_run(submitted.job_id).lm_calls in (None, 0)
