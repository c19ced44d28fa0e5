"""Optimization flows: one cycle (`optimization_cycle`), many (`optimization_batch`)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from prefect import flow
from prefect.runtime import flow_run

from storage.repository import Repository, new_id
from tasks import cycle
from tasks.batch import BatchOptions, BatchStop, BatchSummary, run_batch
from tasks.batch_jobs import batch_jobs_path, load_jobs, write_jobs
from tasks.cycle import CycleSummary
from tasks.job_queue import Backpressure
from tasks.spec import CycleSpec

logger = logging.getLogger("dspyflow.flows")


def on_first_sigterm(stop: Callable[[], None]) -> Callable[[], None]:
    """Call `stop` on the first SIGTERM (a Prefect worker, Kubernetes, systemd stopping
    us); a second SIGTERM goes to the handler that was there before (Prefect's:
    TerminationSignal, the flow run ends at once). Returns a function that restores that
    handler. `stop` runs in the signal handler: it must only set flags or start a thread.

    Prefect's flow engine installs its SIGTERM handler (`capture_sigterm`) around the flow
    run, so ours goes in here, inside the flow. Signals are the main thread's alone;
    elsewhere (a flow in a worker thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, previous)
        stop()

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def cancel_on_sigterm(run_id: str) -> Callable[[], None]:
    """SIGTERM ends the cycle as Ctrl-C does: cancelled, with its best program scored and
    saved (`on_first_sigterm`)."""
    from tasks.budget import cancel_run

    def stop() -> None:
        logger.warning("SIGTERM: stopping run %s with its best program so far", run_id)
        cancel_run(run_id, "terminated (SIGTERM)")

    return on_first_sigterm(stop)


@flow(name="optimization-cycle", persist_result=False, log_prints=True)
def optimization_cycle(spec: CycleSpec, run_id: str | None = None) -> CycleSummary:
    """Optimize one DSPy program: baseline, optimize, evaluate on the test split, record.

    Every run ends in the database in a terminal state with its reason; a failure is
    recorded first and then re-raised, so the Prefect flow run fails too.
    """
    repo = Repository()
    run_id = run_id or new_id()
    restore_sigterm = cancel_on_sigterm(run_id)
    try:
        summary = cycle.execute_cycle(
            spec,
            repo,
            run_id=run_id,
            flow_run_id=flow_run.get_id(),
            run_step=cycle.prefect_steps(spec),
            reraise=True,  # recorded on the run first, then the flow run fails too
        )
    finally:
        restore_sigterm()
    if summary.state == "cancelled":
        # Cancelled (Prefect UI/API, Ctrl-C, cancel_run): the best program so far is saved;
        # the flow run ends Cancelled rather than Completed.
        from prefect.states import Cancelled

        return Cancelled(message=summary.error, data=summary)  # type: ignore[return-value]
    return summary


@flow(name="optimization-batch", persist_result=False, log_prints=False)
def optimization_batch(
    jobs: list[CycleSpec] | str,
    workers: int = 64,
    max_concurrent: int = 500,
    capacity: int = 2000,
    backpressure: Backpressure = Backpressure.refuse,
    lm_rps: float | None = None,
    lm_tokens_per_min: float | None = None,
    prefect_rate_limit: str | None = None,
    task_runner: Literal["threads", "dask"] = "threads",
    dask_address: str | None = None,
    skip_invalid: bool = False,
    batch_id: str | None = None,
    task_tags: list[str] | None = None,
) -> BatchSummary:
    """Run many cycles, one `run-cycle` task each, in priority order.

    `jobs`: the path of a JSONL file with one spec per line (a file with bad lines is
    rejected whole, every bad line named, unless `skip_invalid`), or a few hundred specs
    at most (Prefect caps parameters at 512 KB; `run_optimization_batch` takes any number).
    Jobs are admitted from dspyflow's queue (capacity, backpressure at 90 %, at most
    min(workers, max_concurrent) in flight) and share one LM rate limit. Every job ends
    in the database in a terminal state; the summary is returned and published as the
    `optimization-batch` artifact.
    """
    from prefect.artifacts import create_markdown_artifact

    from storage.db import database_url

    options = BatchOptions(
        workers=workers,
        max_concurrent=max_concurrent,
        capacity=capacity,
        backpressure=backpressure,
        lm_rps=lm_rps,
        lm_tokens_per_min=lm_tokens_per_min,
        prefect_rate_limit=prefect_rate_limit,
        task_runner=task_runner,
        dask_address=dask_address,
        batch_id=batch_id,
        **({} if task_tags is None else {"task_tags": task_tags}),
    )
    rejected = []
    if isinstance(jobs, str | Path):
        jobs_file = load_jobs(jobs, skip_invalid=skip_invalid)
        specs, rejected = jobs_file.jobs, jobs_file.rejected
    else:
        specs = list(jobs)
    from tasks.recovery import recover_stale_runs

    # SIGTERM: start no more jobs, cancel the queued ones and those in flight here (each
    # keeps its best program); every row still ends terminal. A second SIGTERM aborts.
    stop = BatchStop()
    restore_sigterm = on_first_sigterm(lambda: stop.request("batch terminated (SIGTERM)"))
    try:
        summary = run_batch(
            specs,
            options,
            database_url(),
            flow_run_id=flow_run.get_id(),
            rejected_lines=rejected,
            # Runs of a crashed earlier process (stale heartbeat) are marked `stale` first.
            on_start=recover_stale_runs,
            stop=stop,
        )
    finally:
        restore_sigterm()
    create_markdown_artifact(
        key="optimization-batch",
        markdown=summary.to_markdown(),
        description=f"batch {summary.batch_id}: {summary.jobs} jobs",
    )
    return summary


def run_optimization_batch(jobs: Sequence[CycleSpec], **options: Any) -> BatchSummary:
    """`optimization_batch` for specs in memory, of any number: they are written to
    `$DSPYFLOW_HOME/batches/<batch_id>.jsonl` (the batch's input, kept) and the flow gets
    the path, since Prefect refuses flow-run parameters over 512 KB (~700 specs)."""
    batch_id = options.pop("batch_id", None) or new_id()
    path = write_jobs(jobs, batch_jobs_path(batch_id))
    return optimization_batch(str(path), batch_id=batch_id, **options)
