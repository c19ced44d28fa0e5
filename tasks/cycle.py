"""One optimization cycle's steps as plain functions, and the Prefect tasks that wrap them.

prepare -> baseline -> optimize -> evaluate -> record. `prepare` validates everything
(task, dataset, LM) before it writes the run's row, so bad input leaves nothing behind.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import dspy
from prefect import task
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel

from storage.models import RunState
from storage.repository import Repository
from tasks.lm import CycleLM, RateLimiter, build_lm
from tasks.optimizers import CompileRequest, IterationEvent, OptimizeResult, get_optimizer
from tasks.programs import TaskDefinition, get_task
from tasks.programs.dataset import Splits, load_user_task
from tasks.spec import CycleSpec

logger = logging.getLogger("dspyflow.cycle")

os.environ.setdefault("TQDM_DISABLE", "1")


@dataclass
class CycleContext:
    """What the steps of one cycle share (in-process only; never serialized)."""

    run_id: str
    spec: CycleSpec
    task: TaskDefinition
    splits: Splits
    lm: CycleLM
    repo: Repository
    started_monotonic: float = field(default_factory=time.monotonic)
    _last_progress_write: float = 0.0
    _progress_lock: threading.Lock = field(default_factory=threading.Lock)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def usage_fields(self) -> dict[str, Any]:
        usage = self.lm.usage.snapshot()
        cost = usage.pop("cost_usd")
        spec = self.spec.lm
        if spec.price_per_1k_input_usd is not None or spec.price_per_1k_output_usd is not None:
            cost = usage["input_tokens"] / 1000 * (spec.price_per_1k_input_usd or 0.0) + usage[
                "output_tokens"
            ] / 1000 * (spec.price_per_1k_output_usd or 0.0)
        return {**usage, "cost_usd": cost if cost else None}


def resolve_task(spec: CycleSpec) -> TaskDefinition:
    if spec.program is not None:
        assert spec.metric is not None and spec.dataset is not None  # checked by CycleSpec
        return load_user_task(spec.program, spec.metric, spec.dataset)
    return get_task(spec.task)


def _cap(examples: list[dspy.Example], limit: int | None) -> list[dspy.Example]:
    return examples if limit is None else examples[:limit]


def prepare_cycle(
    spec: CycleSpec,
    repo: Repository,
    *,
    run_id: str | None = None,
    flow_run_id: str | None = None,
    limiter: RateLimiter | None = None,
) -> CycleContext:
    """Validate and load everything, then create (or claim) the run's row as running."""
    task_def = resolve_task(spec)
    splits = task_def.load_splits()
    splits = Splits(
        train=_cap(splits.train, spec.max_train),
        val=_cap(splits.val, spec.max_val),
        test=_cap(splits.test, spec.max_test),
    )
    cycle_lm = build_lm(spec.lm, task_def, limiter=limiter)
    if run_id is None or not repo.run_exists(run_id):
        run_id = repo.create_run(
            run_id=run_id,
            task=task_def.name,
            optimizer=spec.optimizer,
            budget=spec.budget,
            lm=spec.lm.model,
            spec=spec.model_dump(mode="json"),
            priority=spec.priority,
            simulated=spec.lm.provider == "sim",
        )
    if not repo.start_run(run_id, flow_run_id=flow_run_id, worker=_worker_name()):
        raise RuntimeError(f"run {run_id} is not queued: it was started elsewhere or ended")
    return CycleContext(
        run_id=run_id, spec=spec, task=task_def, splits=splits, lm=cycle_lm, repo=repo
    )


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def evaluate_program(
    ctx: CycleContext, program: dspy.Module, examples: list[dspy.Example]
) -> float:
    """Mean metric over ``examples`` in [0, 1], on the cycle's LM."""
    if not examples:
        raise ValueError(f"task {ctx.task.name!r} has no examples to evaluate on")
    with ctx.lm.context():
        evaluator = dspy.Evaluate(
            devset=examples,
            metric=ctx.task.metric,
            num_threads=ctx.spec.num_threads,
            display_progress=False,
            provide_traceback=False,
            max_errors=len(examples),
        )
        result = evaluator(program)
    return float(result.score) / 100.0


def run_baseline(ctx: CycleContext) -> float:
    score = evaluate_program(ctx, ctx.task.build_program(), ctx.splits.test)
    ctx.repo.update_run(ctx.run_id, baseline_score=score, **ctx.usage_fields())
    return score


def run_optimizer(ctx: CycleContext) -> OptimizeResult:
    optimizer = get_optimizer(ctx.spec.optimizer)

    def on_iteration(event: IterationEvent) -> None:
        # Bounded write rate: at most one progress write per second per cycle.
        now = time.monotonic()
        with ctx._progress_lock:
            if now - ctx._last_progress_write < 1.0 and event.iteration != event.total:
                return
            ctx._last_progress_write = now
        ctx.repo.heartbeat(
            ctx.run_id,
            iterations=event.iteration,
            total_iterations=event.total,
            **ctx.usage_fields(),
        )

    request = CompileRequest(
        program=ctx.task.build_program(),
        trainset=ctx.splits.train,
        valset=ctx.splits.val,
        metric=ctx.task.metric,
        budget=ctx.spec.budget,
        seed=ctx.spec.seed,
        num_threads=ctx.spec.num_threads,
        on_iteration=on_iteration,
    )
    with ctx.lm.context():
        return optimizer.compile(request)


def record_success(
    ctx: CycleContext, baseline: float, result: OptimizeResult, test_score: float
) -> None:
    ctx.repo.finish_run(
        ctx.run_id,
        RunState.succeeded,
        baseline_score=baseline,
        best_score=test_score,
        iterations=result.iterations,
        program_state=result.program.dump_state(),
        **ctx.usage_fields(),
    )


def record_failure(repo: Repository, run_id: str, exc: BaseException, ctx: CycleContext | None):
    fields = ctx.usage_fields() if ctx is not None else {}
    message = (
        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    )
    repo.finish_run(run_id, RunState.failed, error=message[:2000], **fields)


class CycleSummary(BaseModel):
    """What a finished cycle returns to its caller (CLI, flow, batch)."""

    run_id: str
    state: str
    task: str
    optimizer: str
    lm: str
    baseline_score: float | None
    best_score: float | None
    duration_s: float | None
    lm_calls: int
    simulated: bool
    error: str | None = None


def summarize(repo: Repository, run_id: str) -> CycleSummary:
    run = repo.get_run(run_id)
    duration = (
        (run.finished_at - run.started_at).total_seconds()
        if run.finished_at and run.started_at
        else None
    )
    return CycleSummary(
        run_id=run.id,
        state=run.state,
        task=run.task,
        optimizer=run.optimizer,
        lm=run.lm,
        baseline_score=run.baseline_score,
        best_score=run.best_score,
        duration_s=duration,
        lm_calls=run.lm_calls,
        simulated=run.simulated,
        error=run.error,
    )


def execute_cycle(
    spec: CycleSpec,
    repo: Repository,
    *,
    run_id: str | None = None,
    flow_run_id: str | None = None,
    limiter: RateLimiter | None = None,
) -> CycleSummary:
    """All steps of one cycle in the calling thread, without Prefect task runs: for a
    batch, where one Prefect task per job carries the whole cycle. The run always ends
    in a terminal state; errors are recorded on the run, not raised."""
    ctx: CycleContext | None = None
    try:
        ctx = prepare_cycle(spec, repo, run_id=run_id, flow_run_id=flow_run_id, limiter=limiter)
        baseline_score = run_baseline(ctx)
        result = run_optimizer(ctx)
        test_score = evaluate_program(ctx, result.program, ctx.splits.test)
        record_success(ctx, baseline_score, result, test_score)
    except Exception as exc:  # noqa: BLE001 - every failure becomes the run's terminal state
        failed_run = ctx.run_id if ctx is not None else run_id
        if failed_run is None:
            raise
        record_failure(repo, failed_run, exc, ctx)
        return summarize(repo, failed_run)
    return summarize(repo, ctx.run_id)


# --- Prefect tasks: thin wrappers ----------------------------------------------------------


def _transient_lm_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry `optimize` only when a transient LM error (429/5xx/timeout) escaped."""
    from dspy.utils.exceptions import is_retryable_lm_error

    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classification of whatever the task raised
        return is_retryable_lm_error(exc)
    return False


_TASK_OPTIONS: dict[str, Any] = {"cache_policy": NONE, "persist_result": False}


@task(name="prepare", **_TASK_OPTIONS)
def prepare(
    spec: CycleSpec, repo: Repository, run_id: str | None = None, flow_run_id: str | None = None
) -> CycleContext:
    return prepare_cycle(spec, repo, run_id=run_id, flow_run_id=flow_run_id)


@task(name="baseline", **_TASK_OPTIONS)
def baseline(ctx: CycleContext) -> float:
    return run_baseline(ctx)


@task(
    name="optimize",
    retries=2,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=_transient_lm_error,
    **_TASK_OPTIONS,
)
def optimize(ctx: CycleContext) -> OptimizeResult:
    return run_optimizer(ctx)


@task(name="evaluate", **_TASK_OPTIONS)
def evaluate(ctx: CycleContext, program: dspy.Module) -> float:
    return evaluate_program(ctx, program, ctx.splits.test)


@task(name="record", **_TASK_OPTIONS)
def record(ctx: CycleContext, baseline_score: float, result: OptimizeResult, test_score: float):
    record_success(ctx, baseline_score, result, test_score)
