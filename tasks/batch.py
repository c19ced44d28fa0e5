"""Many cycles in one flow run: the `run_cycle` task and the batch dispatcher.

One Prefect task per job (a task run costs ~5 ms; a subflow 100 ms to 1 s). Jobs enter
dspyflow's `JobQueue` (priority, backpressure) and the dispatcher, in the flow's thread,
hands a job to the task runner only when a slot is free: the runner never holds a backlog
of its own, so the queue, not the runner's FIFO, decides what starts next. A task never
waits on another task's future (that deadlocks a bounded pool): completion comes back
through done-callbacks that free the queue slot.

Every job gets its row up front (all `queued`, one transaction, one `batch_id`) and ends
in a terminal state: cycles record their own (`execute_cycle`), refused jobs are
`cancelled` with the reason, and a task run that died without recording one is `failed`.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import dspy
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field, model_validator

from storage.db import get_engine
from storage.models import RunState
from storage.repository import Repository, new_id
from tasks.batch_jobs import RejectedLine
from tasks.cycle import execute_cycle, worker_name
from tasks.cycle_timer import HEARTBEAT_INTERVAL_S
from tasks.job_queue import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_CONCURRENT,
    Backpressure,
    JobQueue,
    LimiterMetrics,
    PrefectRateLimiter,
    QueueMetrics,
    SubmitStatus,
    TokenBucketLimiter,
    ensure_prefect_rate_limit,
)
from tasks.lm import RateLimiter
from tasks.spec import CycleSpec
from tasks.thread_safety import guard_tqdm_registry

logger = logging.getLogger("dspyflow.batch")
guard_tqdm_registry()  # concurrent cycles: DSPy clears tqdm's registry without its lock

_DASK_SCHEMES = {"tcp", "tls", "ucx", "ws", "wss"}
OPTIMIZATION_TAG = "optimization"  # `prefect concurrency-limit create optimization N` caps it


class BatchOptions(BaseModel):
    """How a batch runs: validated at the boundary (flow parameters, CLI, Python)."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(
        64, gt=0, le=4096, description="Task-runner threads, or Dask task slots in all."
    )
    max_concurrent: int = Field(
        DEFAULT_MAX_CONCURRENT, gt=0, description="Cap on cycles in flight at once."
    )
    capacity: int = Field(DEFAULT_CAPACITY, gt=0, description="Queue capacity.")
    backpressure: Backpressure = Field(
        Backpressure.refuse,
        description="At >= 90 % of capacity: `refuse` (job cancelled with the reason) or "
        "`defer` (held and admitted as the queue drains).",
    )
    lm_rps: float | None = Field(None, gt=0, description="LM requests/s for the whole batch.")
    lm_tokens_per_min: float | None = Field(None, gt=0, description="LM prompt tokens/min.")
    prefect_rate_limit: str | None = Field(
        None,
        description="Name of a Prefect global rate limit shared across processes; created "
        "or updated with `lm_rps` when that is given.",
    )
    task_tags: list[str] | None = Field(
        None,
        description="Tags of the cycle tasks. None: `optimization` when a Prefect "
        "concurrency limit on that tag exists at batch start (it then caps cycles across "
        "flows), else none: Prefect checks the limits of every tag of every task run, two "
        "API calls each, about a third of a capacity batch's throughput on 2 cores.",
    )
    task_runner: Literal["threads", "dask"] = "threads"
    dask_address: str | None = Field(None, description="Dask scheduler, e.g. tcp://host:8786.")
    batch_id: str | None = Field(None, max_length=32)

    @model_validator(mode="after")
    def _dask_needs_shared_limits(self) -> BatchOptions:
        if self.dask_address is not None:
            if self.task_runner != "dask":
                raise ValueError(
                    "dask_address is for task_runner=dask: add --task-runner dask, or drop "
                    "--dask-address to run in this process"
                )
            parts = urlsplit(self.dask_address)
            try:
                port = parts.port
            except ValueError:
                port = None
            if parts.scheme not in _DASK_SCHEMES or not parts.hostname or port is None:
                raise ValueError(
                    f"dask_address {self.dask_address!r} is not a scheduler address: "
                    "use tcp://HOST:PORT (e.g. tcp://scheduler:8786)"
                )
        if self.task_runner != "dask":
            return self
        if self.lm_rps and not self.prefect_rate_limit:
            raise ValueError(
                "task_runner=dask runs cycles in other processes, each of which would get "
                "its own copy of the in-process LM rate limit (N processes, N x lm_rps); "
                "add prefect_rate_limit (--prefect-rate-limit NAME) to share lm_rps "
                "through the Prefect server, or use task_runner=threads"
            )
        if self.lm_tokens_per_min:
            raise ValueError(
                "lm_tokens_per_min (--lm-tpm) is enforced in one process only and cannot "
                "be shared across Dask workers; drop it and limit requests/s with "
                "--lm-rps and --prefect-rate-limit, or use task_runner=threads"
            )
        return self

    @property
    def in_flight_cap(self) -> int:
        # More in flight than slots would queue jobs inside the runner, where dspyflow's
        # priorities no longer apply.
        return min(self.workers, self.max_concurrent)


class BatchSummary(BaseModel):
    """What a batch reports (CLI output, flow return value, Prefect artifact)."""

    batch_id: str
    jobs: int
    states: dict[str, int]
    succeeded: int
    failed: int
    refused: int
    deferred: int
    success_rate: float
    wall_s: float
    jobs_per_s: float = Field(description="Jobs run (refused ones excluded) per second.")
    queue_wait_p50_s: float | None
    queue_wait_p95_s: float | None
    run_p50_s: float | None
    run_p95_s: float | None
    max_in_flight: int
    workers: int
    max_concurrent: int
    capacity: int
    lm_calls: int
    lm_rps_limit: float | None
    simulated: bool
    top_errors: dict[str, int] = Field(default_factory=dict)
    rejected_lines: list[RejectedLine] = Field(default_factory=list)
    queue: QueueMetrics
    limiter: LimiterMetrics | None = None

    def to_markdown(self) -> str:
        sim = " (simulated LM: capacity figures, not model quality)" if self.simulated else ""
        rows = [
            ("jobs", self.jobs),
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("refused (backpressure)", self.refused),
            ("success rate", f"{self.success_rate:.2%}"),
            ("wall time", f"{self.wall_s:.2f} s"),
            ("throughput", f"{self.jobs_per_s:.1f} jobs/s"),
            (
                "queue wait p50 / p95",
                f"{_ms(self.queue_wait_p50_s)} / {_ms(self.queue_wait_p95_s)}",
            ),
            ("run time p50 / p95", f"{_ms(self.run_p50_s)} / {_ms(self.run_p95_s)}"),
            ("max in flight", f"{self.max_in_flight} (workers {self.workers})"),
            ("LM calls", self.lm_calls),
        ]
        lines = [f"# Optimization batch `{self.batch_id}`{sim}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        lines += ["", "| state | runs |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(self.states.items())]
        if self.top_errors:
            lines += ["", "| error | runs |", "|---|---|"]
            lines += [f"| {k.replace('|', '/')} | {v} |" for k, v in self.top_errors.items()]
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


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


def run_cycle_job(
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
    from tasks.cycle_timer import PER_CYCLE_ARTIFACTS

    repo = repository_for(database_url)
    if reclaim:
        from tasks.cluster import reclaim_orphaned_run

        reclaim_orphaned_run(repo, run_id, worker_name())
    # The batch publishes one summary artifact, not one progress artifact per cycle.
    token = PER_CYCLE_ARTIFACTS.set(False)
    try:
        # Long-running workers: DSPy's global LM history would grow to 10k entries.
        with dspy.context(disable_history=True):
            summary = execute_cycle(
                spec, repo, run_id=run_id, flow_run_id=flow_run_id, limiter=limiter
            )
    finally:
        PER_CYCLE_ARTIFACTS.reset(token)
    return summary.state


@task(
    name="run-cycle",
    task_run_name="cycle-{run_id}",
    tags=[OPTIMIZATION_TAG],
    cache_policy=NONE,
    persist_result=False,
    cache_result_in_memory=False,  # client memory would grow with every task run
    log_prints=False,
)
def run_cycle(
    spec: CycleSpec,
    run_id: str,
    database_url: str,
    limiter: RateLimiter | None = None,
    flow_run_id: str | None = None,
    reclaim: bool = False,
) -> str:
    """One optimization cycle as one Prefect task run (the budget is enforced inside)."""
    return run_cycle_job(spec, run_id, database_url, limiter, flow_run_id, reclaim)


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
        # marks them stale at once when this process is gone (tasks.recovery).
        "worker": worker_name(),
        "run_id": run_id,
        "task": spec.program or spec.task,
        "optimizer": spec.optimizer,
        "budget": spec.budget,
        "lm": spec.lm.model,
        "spec": spec.model_dump(mode="json"),
        "priority": spec.priority,
        "batch_id": batch_id,
        "simulated": spec.lm.provider == "sim",
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
    from tasks.cluster import check_cluster_setup

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
    from tasks.budget import cancel_run

    not_started = queue.drain()
    logger.warning(
        "batch: %s: %d queued job(s) cancelled, %d in flight stopping",
        reason,
        len(not_started),
        queue.in_flight,
    )
    for run_id in not_started:
        repo.finish_run(run_id, RunState.cancelled, error=f"{reason}; the run never started")
    if options.task_runner == "threads":
        for run_id in queue.running_ids():
            cancel_run(run_id, reason)


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
    cycle_task = run_cycle if tags == [OPTIMIZATION_TAG] else run_cycle.with_options(tags=tags)
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
    errors = collections.Counter(
        (r.error or "").split(";")[0][:120]
        for r in runs
        if r.state != RunState.succeeded.value and r.error
    )
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
        top_errors=dict(errors.most_common(5)),
        rejected_lines=list(rejected_lines),
        queue=metrics,
        limiter=bucket.metrics() if bucket is not None else None,
    )
