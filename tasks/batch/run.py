"""Many cycles in one flow run: the `batch_job` task and the batch dispatcher.

One Prefect task per job (a task run costs ~5 ms; a subflow 100 ms to 1 s). Jobs enter
dspyflow's `JobQueue` (priority, backpressure) and the dispatcher, in the flow's thread,
hands a job to the task runner only when a slot is free: the runner never holds a backlog
of its own, so the queue, not the runner's FIFO, decides what starts next. A task never
waits on another task's future (that deadlocks a bounded pool): completion comes back
through done-callbacks that free the queue slot.

Every job gets its row up front (all `queued`, one transaction, one `batch_id`) and ends
in a terminal state: cycles record their own (`run_cycle`), refused jobs are
`cancelled` with the reason, and a task run that died without recording one is `failed`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import dspy
from prefect import task
from prefect.cache_policies import NONE

from storage.db import get_engine
from storage.models import RunState
from storage.repository import Repository, RunClaimError, new_id
from tasks.batch.jobs import RejectedLine
from tasks.batch.models import BatchOptions, BatchSummary, top_errors
from tasks.batch.queue import JobQueue, SubmitStatus
from tasks.cycle.spec import CycleSpec
from tasks.cycle.steps import run_cycle, worker_name
from tasks.cycle.thread_safety import guard_tqdm_registry
from tasks.cycle.timer import HEARTBEAT_INTERVAL_S
from tasks.lm.rate_limit import (
    PrefectRateLimiter,
    RateLimiter,
    TokenBucketLimiter,
    ensure_prefect_rate_limit,
)

logger = logging.getLogger("dspyflow.batch")

OPTIMIZATION_TAG = "optimization"  # `prefect concurrency-limit create optimization N` caps it


# --- the per-job task -------------------------------------------------------------------

_repos: dict[str, Repository] = {}
_repos_lock = threading.Lock()


def repository_for(url: str) -> Repository:
    """One Repository per URL and process: the schema check runs once, not per job."""
    with _repos_lock:
        repo = _repos.get(url)
        if repo is None:
            repo = _repos[url] = Repository(get_engine(url))
        return repo


def run_batch_job(
    spec: CycleSpec,
    run_id: str,
    database_url: str,
    limiter: RateLimiter | None = None,
    flow_run_id: str | None = None,
    reclaim: bool = False,
) -> str:
    """One queued job, start to terminal state; returns the state. Plain function (the
    bare-executor baseline of benchmarks/concurrency.py runs exactly this).

    `reclaim` (the Dask runner): this may be a second execution of the job, the runner's
    answer to losing the worker process of the first; a row left `running` by that dead
    process is marked stale and re-queued so this execution claims it (attempt 2)."""
    from tasks.cycle.timer import PER_CYCLE_ARTIFACTS

    guard_tqdm_registry()  # concurrent cycles: DSPy clears tqdm's registry without its lock
    repo = repository_for(database_url)
    if reclaim:
        from tasks.batch.cluster import reclaim_orphaned_run

        reclaim_orphaned_run(repo, run_id, worker_name())
    # The batch publishes one summary artifact, not one progress artifact per cycle.
    token = PER_CYCLE_ARTIFACTS.set(False)
    try:
        # Long-running workers: DSPy's global LM history would grow to 10k entries.
        with dspy.context(disable_history=True):
            summary = run_cycle(spec, repo, run_id=run_id, flow_run_id=flow_run_id, limiter=limiter)
    except RunClaimError:
        ended = repo.get_run(run_id).state
        if RunState(ended).terminal:  # cancelled by a stopped batch before it started
            logger.info("run %s ended (%s) before this job started: nothing to run", run_id, ended)
            return ended
        raise
    finally:
        PER_CYCLE_ARTIFACTS.reset(token)
    return summary.state


@task(
    name="batch-job",
    task_run_name="cycle-{run_id}",
    tags=[OPTIMIZATION_TAG],
    cache_policy=NONE,
    persist_result=False,
    cache_result_in_memory=False,  # client memory would grow with every task run
    log_prints=False,
)
def batch_job(
    spec: CycleSpec,
    run_id: str,
    database_url: str,
    limiter: RateLimiter | None = None,
    flow_run_id: str | None = None,
    reclaim: bool = False,
) -> str:
    """One optimization cycle as one Prefect task run (the budget is enforced inside)."""
    return run_batch_job(spec, run_id, database_url, limiter, flow_run_id, reclaim)


class BatchStop:
    """A request to stop a batch early (its process got SIGTERM). No further job starts:
    the queued rows end `cancelled`, and cycles in flight in this process are cancelled
    (each ends `cancelled` with its best program so far, as Ctrl-C does). Cycles in other
    processes (a Dask cluster) run to their end. `request` is safe from a signal handler:
    the work runs in a thread of its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reason: str | None = None
        self._apply: Callable[[str], None] | None = None

    def request(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            apply = self._apply
        if apply is not None:
            threading.Thread(target=apply, args=(reason,), name="batch-stop", daemon=True).start()

    def attach(self, apply: Callable[[str], None]) -> None:
        """What stopping means for the batch now running (a request already made applies)."""
        with self._lock:
            self._apply = apply
            reason = self.reason
        if reason is not None:
            apply(reason)

    def detach(self) -> None:
        with self._lock:
            self._apply = None


# --- the dispatcher ---------------------------------------------------------------------


def build_limiter(options: BatchOptions) -> tuple[RateLimiter | None, TokenBucketLimiter | None]:
    """(what cycles call, the local bucket for metrics)."""
    local = (
        TokenBucketLimiter(options.lm_rps, options.lm_tokens_per_min)
        if (options.lm_rps or options.lm_tokens_per_min) and options.task_runner == "threads"
        else None
    )
    if options.prefect_rate_limit:
        if options.lm_rps:
            ensure_prefect_rate_limit(options.prefect_rate_limit, options.lm_rps)
        return PrefectRateLimiter(options.prefect_rate_limit, local=local), local
    return local, local


def resolve_task_tags(tags: list[str] | None) -> list[str]:
    """The cycle tasks' tags: as given, or `optimization` if a limit on it exists."""
    if tags is not None:
        return tags
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            client.read_global_concurrency_limit_by_name(f"tag:{OPTIMIZATION_TAG}")
    except ObjectNotFound:
        return []
    return [OPTIMIZATION_TAG]


def _task_runner(options: BatchOptions) -> Any:
    if options.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:  # pragma: no cover - depends on the extra
            raise ValueError(
                "task_runner=dask needs the `dask` extra: pip install 'dspyflow[dask]'"
            ) from None
        if options.dask_address:
            return DaskTaskRunner(address=options.dask_address)
        # No address: a local in-process cluster (threads), mostly for trying it out.
        local = {"n_workers": 1, "processes": False, "threads_per_worker": options.workers}
        return DaskTaskRunner(cluster_kwargs=local)
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=options.workers)


def _row(spec: CycleSpec, run_id: str, batch_id: str) -> dict[str, Any]:
    return {
        # The batch process owns its queued rows until a cycle claims one: recovery
        # marks them stale at once when this process is gone (tasks.cycle.recovery).
        "worker": worker_name(),
        "run_id": run_id,
        "batch_id": batch_id,
        **spec.run_fields(),
    }


def run_batch(
    specs: Sequence[CycleSpec],
    options: BatchOptions,
    database_url: str,
    *,
    flow_run_id: str | None = None,
    rejected_lines: Sequence[RejectedLine] = (),
    on_start: Callable[[Repository], object] | None = None,
    stop: BatchStop | None = None,
) -> BatchSummary:
    """Run every job to a terminal state; call from inside a flow run (it submits tasks).

    `on_start(repo)` runs before anything is written: the place for crash recovery of an
    earlier batch's stale runs. `stop` ends the batch early (SIGTERM), every row still
    terminal."""
    if not specs:
        raise ValueError("a batch needs at least one job")
    from tasks.batch.cluster import check_cluster_setup

    # Workers in other processes that cannot report or record: refused before any write.
    cluster = check_cluster_setup(options, database_url)
    in_flight = options.in_flight_cap
    if cluster is not None:
        # More in flight than the cluster's threads would queue jobs inside Dask.
        in_flight = min(in_flight, cluster.threads)
    repo = repository_for(database_url)
    if on_start is not None:
        on_start(repo)
    batch_id = options.batch_id or new_id()
    run_ids = [new_id() for _ in specs]
    repo.create_runs(_row(s, rid, batch_id) for s, rid in zip(specs, run_ids, strict=True))
    limiter, local_bucket = build_limiter(options)
    queue: JobQueue[CycleSpec] = JobQueue(
        options.capacity,
        max_concurrent=in_flight,
        backpressure=options.backpressure,
    )
    keeper = _QueuedKeeper(repo, batch_id)
    keeper.start()
    try:
        return _dispatch(
            repo,
            specs,
            run_ids,
            batch_id,
            options,
            database_url,
            queue,
            limiter,
            local_bucket,
            flow_run_id,
            rejected_lines,
            stop,
        )
    finally:
        if stop is not None:
            stop.detach()
        keeper.stop()


def _stop_batch(
    repo: Repository, queue: JobQueue[CycleSpec], options: BatchOptions, reason: str
) -> None:
    """Start nothing more; cancel what this process runs; the dispatcher then drains."""
    from tasks.cycle.budget import cancel_run

    not_started = queue.drain()
    logger.warning(
        "batch: %s: %d queued job(s) cancelled, %d in flight stopping",
        reason,
        len(not_started),
        queue.in_flight,
    )
    for run_id in not_started:
        repo.finish_run(run_id, RunState.cancelled, error=f"{reason}; the run never started")
    for run_id in queue.running_ids():
        if options.task_runner == "threads":
            cancel_run(run_id, reason)  # in this process: at its next LM call
        else:
            # In a Dask worker process, as `runs cancel` does: a running row gets the
            # request for its next heartbeat; a row the worker has not claimed yet (a busy
            # cluster starts tasks late) is cancelled before it starts.
            repo.cancel(run_id, reason, unclaimed_note="; the run never started")


class _QueuedKeeper:
    """Refreshes the heartbeat of the batch's queued rows while the dispatcher lives, so
    recovery tells a long queue from the leftovers of a dead batch process."""

    def __init__(self, repo: Repository, batch_id: str) -> None:
        self.repo, self.batch_id = repo, batch_id
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._loop, name=f"batch-queue-{batch_id[:8]}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.repo.touch_queued(self.batch_id)
            except Exception as exc:  # noqa: BLE001 - a DB hiccup must not end the batch
                logger.warning("batch %s: queued-run heartbeat failed: %s", self.batch_id, exc)


def _dispatch(
    repo: Repository,
    specs: Sequence[CycleSpec],
    run_ids: list[str],
    batch_id: str,
    options: BatchOptions,
    database_url: str,
    queue: JobQueue[CycleSpec],
    limiter: RateLimiter | None,
    local_bucket: TokenBucketLimiter | None,
    flow_run_id: str | None,
    rejected_lines: Sequence[RejectedLine],
    stop: BatchStop | None = None,
) -> BatchSummary:
    started = time.monotonic()
    for spec, run_id in zip(specs, run_ids, strict=True):
        result = queue.submit(run_id, spec, spec.priority)
        if result.status is SubmitStatus.refused:
            repo.finish_run(run_id, RunState.cancelled, error=f"{result.reason}; resubmit later")
    queue.close()
    if stop is not None:  # every job is in the queue now, for a stop to drain
        stop.attach(lambda reason: _stop_batch(repo, queue, options, reason))

    crashed: dict[str, str] = {}

    def on_done(run_id: str) -> Callable[[Any], None]:
        def callback(future: Any) -> None:
            try:
                _note_crash(future, run_id, crashed)
            finally:
                queue.done(run_id)

        return callback

    tags = resolve_task_tags(options.task_tags)
    cycle_task = batch_job if tags == [OPTIMIZATION_TAG] else batch_job.with_options(tags=tags)
    with _task_runner(options) as runner:
        while (job := queue.take()) is not None:
            params = {
                "spec": job.item,
                "run_id": job.job_id,
                "database_url": database_url,
                "limiter": limiter,
                "flow_run_id": flow_run_id,
                "reclaim": options.task_runner == "dask",
            }
            try:
                future = runner.submit(cycle_task, parameters=params)
            except Exception as exc:  # noqa: BLE001 - the job fails, the batch goes on
                crashed[job.job_id] = f"{type(exc).__name__}: {exc}"
                queue.done(job.job_id)
                continue
            future.add_done_callback(on_done(job.job_id))
        queue.join()
    wall = time.monotonic() - started
    _fail_unfinished(repo, batch_id, crashed)
    return _summarize(
        repo, batch_id, len(specs), wall, queue, options, local_bucket, rejected_lines
    )


def _note_crash(future: Any, run_id: str, crashed: dict[str, str]) -> None:
    """Remember why a task run ended without a Completed state (crash, cancellation)."""
    wrapped = getattr(future, "wrapped_future", None)
    try:
        state = wrapped.result() if wrapped is not None else None
    except BaseException as exc:  # noqa: BLE001 - any failure of the runner itself
        crashed[run_id] = f"{type(exc).__name__}: {exc}"
        return
    if state is not None and hasattr(state, "is_completed") and not state.is_completed():
        crashed[run_id] = f"task run {state.name}: {state.message or ''}".strip()


def _fail_unfinished(repo: Repository, batch_id: str, crashed: dict[str, str]) -> None:
    """A job whose task run died before it recorded a terminal state is not lost: fail it.
    Queued rows were never claimed (an operator may fail them); a running row is failed
    with the lease it holds if this process claimed it. A row another process (a Dask
    worker) still holds when every task run has ended was left by a process the runner
    gave up on: it becomes `stale` with the reason (a worker that is in fact alive finds
    its lease gone and keeps its best program on the stale row)."""
    me = worker_name()
    for state in (RunState.queued, RunState.running):
        for run in repo.list_runs(batch_id=batch_id, state=state.value, limit=None):
            reason = crashed.get(run.id, "the task run ended without a terminal state")
            if state is RunState.running and run.worker != me:
                repo.mark_worker_gone(
                    run.id,
                    worker=run.worker or "",
                    reason=f"lost by the runner: {reason}; held by {run.worker}"[:2000],
                )
                continue
            repo.finish_run(
                run.id,
                RunState.failed,
                lease=run.lease if state is RunState.running else None,
                error=f"lost by the runner: {reason}"[:2000],
            )


def _summarize(
    repo: Repository,
    batch_id: str,
    jobs: int,
    wall: float,
    queue: JobQueue[Any],
    options: BatchOptions,
    bucket: TokenBucketLimiter | None,
    rejected_lines: Sequence[RejectedLine],
) -> BatchSummary:
    runs = repo.list_runs(batch_id=batch_id, limit=None)
    states = collections.Counter(r.state for r in runs)
    metrics = queue.metrics()
    succeeded = states.get(RunState.succeeded.value, 0)
    executed = jobs - metrics.refused
    return BatchSummary(
        batch_id=batch_id,
        jobs=jobs,
        states=dict(states),
        succeeded=succeeded,
        failed=executed - succeeded,
        refused=metrics.refused,
        deferred=metrics.deferred_total,
        success_rate=succeeded / jobs if jobs else 0.0,
        wall_s=wall,
        jobs_per_s=executed / wall if wall > 0 else 0.0,
        queue_wait_p50_s=metrics.wait_p50_s,
        queue_wait_p95_s=metrics.wait_p95_s,
        run_p50_s=metrics.run_p50_s,
        run_p95_s=metrics.run_p95_s,
        max_in_flight=metrics.max_in_flight,
        workers=options.workers,
        max_concurrent=options.max_concurrent,
        capacity=options.capacity,
        lm_calls=sum(r.lm_calls or 0 for r in runs),
        lm_rps_limit=options.lm_rps,
        simulated=any(r.simulated for r in runs),
        top_errors=top_errors(runs),
        rejected_lines=list(rejected_lines),
        queue=metrics,
        limiter=bucket.metrics() if bucket is not None else None,
    )
