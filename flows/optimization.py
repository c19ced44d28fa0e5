"""Optimization flows: one cycle (`optimization_cycle`), many (`optimization_batch`)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from prefect import flow
from prefect.runtime import flow_run

from storage.repository import Repository, new_id
from tasks.batch.jobs import batch_jobs_path, load_jobs, write_jobs
from tasks.batch.models import BatchOptions, BatchSummary
from tasks.batch.run import BatchStop, run_batch
from tasks.cycle import steps as cycle
from tasks.cycle.prefect_steps import prefect_steps
from tasks.cycle.spec import CycleSpec
from tasks.cycle.summary import CycleSummary

logger = logging.getLogger("dspyflow.flows")


SIGNAL_REASONS = {signal.SIGTERM: "terminated (SIGTERM)", signal.SIGINT: "interrupted (Ctrl-C)"}


def on_first_signal(
    stop: Callable[[str], None], signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)
) -> Callable[[], None]:
    """Call `stop(reason)` on the first of `signals` (SIGTERM: a Prefect worker,
    Kubernetes, systemd stopping us; SIGINT: Ctrl-C); a second one goes to the handler that
    was there before (Prefect's for SIGTERM: TerminationSignal, the flow run ends at once;
    Python's for SIGINT: KeyboardInterrupt). Returns a function that restores those
    handlers. `stop` runs in the signal handler: it must only set flags or start a thread.

    Prefect's flow engine installs its SIGTERM handler (`capture_sigterm`) around the flow
    run, so ours goes in here, inside the flow. Signals are the main thread's alone;
    elsewhere (a flow in a worker thread) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handler(signum: int, frame: FrameType | None) -> None:
        for each, before in previous.items():
            signal.signal(each, before)
        stop(SIGNAL_REASONS[signal.Signals(signum)])

    for signum in signals:
        signal.signal(signum, handler)

    def restore() -> None:
        for signum, before in previous.items():
            signal.signal(signum, before)

    return restore


def cancel_on_sigterm(run_id: str) -> Callable[[], None]:
    """SIGTERM ends the cycle as Ctrl-C does: cancelled, with its best program scored and
    saved (`on_first_signal`)."""
    from tasks.cycle.budget import cancel_run

    def stop(reason: str) -> None:
        logger.warning("SIGTERM: stopping run %s with its best program so far", run_id)
        cancel_run(run_id, reason)

    return on_first_signal(stop)


@flow(name="optimization-cycle", persist_result=False, log_prints=True)
def optimization_cycle(spec: CycleSpec, run_id: str | None = None) -> CycleSummary:
    """Optimize one DSPy program: baseline, optimize, evaluate on the test split, record.

    Every run ends in the database in a terminal state with its reason; a failure is
    recorded first and then re-raised, so the Prefect flow run fails too.

    Args:
        spec: What to optimize: task (program and data), optimizer, budget preset, LM and
            hard limits (time, LM calls, tokens, USD), data caps and seed.
        run_id: The results-database row to run; a new one when empty (an existing
            queued row is claimed, as a batch or `runs recover --resume` does).
    """
    repo = Repository()
    run_id = run_id or new_id()
    restore_sigterm = cancel_on_sigterm(run_id)
    try:
        summary = cycle.run_cycle(
            spec,
            repo,
            run_id=run_id,
            flow_run_id=flow_run.get_id(),
            run_step=prefect_steps(spec),
            reraise=True,  # recorded on the run first, then the flow run fails too
        )
    finally:
        restore_sigterm()
    if summary.state == "cancelled":
        # Cancelled (Prefect UI/API, Ctrl-C, cancel_run): the best program so far is saved;
        # the flow run ends Cancelled rather than Completed.
        from prefect.states import Cancelled

        # A flow may return a State to set its own end state; the annotation names the data.
        return Cancelled(message=summary.error, data=summary)  # type: ignore[return-value]
    return summary


@flow(name="optimization-batch", persist_result=False, log_prints=False)
def optimization_batch(
    jobs: list[CycleSpec] | str, options: BatchOptions | None = None
) -> BatchSummary:
    """Run many cycles, one `batch-job` task each, in priority order.

    Jobs are admitted from dspyflow's queue (capacity, backpressure at 90 %, at most
    min(workers, max_concurrent) in flight) and share one LM rate limit. Every job ends
    in the database in a terminal state; the summary is returned and published as the
    `optimization-batch` artifact.

    Args:
        jobs: The path of a JSONL file with one cycle spec per line (a file with bad lines
            is rejected whole, every bad line named, unless `options.skip_invalid`), or a
            few hundred specs at most (Prefect caps parameters at 512 KB;
            `run_optimization_batch` takes any number).
        options: How the batch runs (each field has its own help): workers, the cap on
            cycles in flight, queue capacity and backpressure, LM rate limits, the task
            runner (threads or a Dask cluster), the batch id and task tags.
    """
    from prefect.artifacts import create_markdown_artifact

    from storage.db import database_url

    options = options or BatchOptions()
    rejected = []
    if isinstance(jobs, str | Path):
        jobs_file = load_jobs(jobs, skip_invalid=options.skip_invalid)
        specs, rejected = jobs_file.jobs, jobs_file.rejected
    else:
        specs = list(jobs)
    from tasks.cycle.recovery import recover_stale_runs

    # SIGTERM or Ctrl-C: start no more jobs, cancel the queued ones and those in flight
    # here (each keeps its best program); every row still ends terminal. A second aborts.
    stop = BatchStop()
    restore_sigterm = on_first_signal(
        lambda reason: stop.request(f"batch {reason}"), (signal.SIGTERM, signal.SIGINT)
    )
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


def run_optimization_batch(
    jobs: Sequence[CycleSpec], options: BatchOptions | None = None
) -> BatchSummary:
    """`optimization_batch` for specs in memory, of any number: they are written to
    `$DSPYFLOW_HOME/batches/<batch_id>.jsonl` (the batch's input, kept) and the flow gets
    the path, since Prefect refuses flow-run parameters over 512 KB (~700 specs)."""
    options = options or BatchOptions()
    batch_id = options.batch_id or new_id()
    path = write_jobs(jobs, batch_jobs_path(batch_id))
    return optimization_batch(str(path), options.model_copy(update={"batch_id": batch_id}))
