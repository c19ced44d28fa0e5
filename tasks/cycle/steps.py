"""One optimization cycle: its steps as plain functions, and `run_cycle`, the one
sequence that runs them (directly, as Prefect tasks, or timed).

prepare -> baseline -> optimize -> evaluate -> record. `prepare` validates everything
(task, dataset, LM) before it writes the run's row, so bad input leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import dspy
from sqlalchemy.exc import IntegrityError

from storage.db import StorageSettings
from storage.models import RunState
from storage.repository import Repository, RunClaimError, new_id
from tasks.cycle.budget import (
    CycleControl,
    CycleGuard,
    CycleStopped,
    StopReason,
    control_for,
    release_control,
)
from tasks.cycle.data import load_cycle_data
from tasks.cycle.evaluation import EvaluationCancelled, evaluate_program
from tasks.cycle.outcome import OutcomeSpooledError, RunOutcome, record_outcome
from tasks.cycle.spec import CycleSpec
from tasks.cycle.summary import CycleSummary, summarize
from tasks.cycle.timer import CycleMonitor, CycleTimer, PrefectHooks
from tasks.lm.journal import LMJournal
from tasks.lm.providers import CycleLM, build_lm
from tasks.lm.rate_limit import RateLimiter
from tasks.optimizers import CompileRequest, OptimizeResult, get_optimizer
from tasks.programs import TaskDefinition
from tasks.programs.dataset import Splits

logger = logging.getLogger("dspyflow.cycle")

CycleStep = Literal["prepare", "baseline", "optimize", "evaluate", "record"]


@dataclass
class CycleContext:
    """What the steps of one cycle share (in-process only; never serialized)."""

    run_id: str
    spec: CycleSpec
    task: TaskDefinition
    splits: Splits
    lm: CycleLM
    repo: Repository
    guard: CycleGuard
    monitor: CycleMonitor
    lease: str  # the claim on the run's row: every write of this cycle presents it
    reflection_lm: CycleLM | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    resumed_baseline: float | None = None  # recorded by an earlier attempt of this run

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def usage_fields(self) -> dict[str, Any]:
        """LM calls, tokens and cost (None without a known price) of the whole cycle."""
        return self.lm.usage.snapshot()


RESUMABLE_OPTIMIZERS = ("gepa", "genetic")  # keep their own state in optimizer_state_dir
# Resume by replaying the run's LM answers (tasks.lm.journal): deterministic given them.
JOURNALED_OPTIMIZERS = ("mipro",)


def gepa_log_dir(run_id: str) -> Path:
    """GEPA's state for a run: a re-queued run resumes from it."""
    return optimizer_state_dir(run_id, "gepa")


def optimizer_state_dir(run_id: str, optimizer: str) -> Path:
    """Where a resumable optimizer keeps its state for a run (GEPA's run dir, the genetic
    optimizer's per-generation checkpoint): a re-run of the same run resumes from it."""
    return StorageSettings().home.expanduser() / optimizer / run_id


def prepare_cycle(
    spec: CycleSpec,
    repo: Repository,
    *,
    run_id: str | None = None,
    flow_run_id: str | None = None,
    limiter: RateLimiter | None = None,
    control: CycleControl | None = None,
) -> CycleContext:
    """Validate and load everything, then create (or claim) the run's row as running and
    start its clock, guard, heartbeat and progress monitor."""
    started = time.monotonic()
    task_def, splits = load_cycle_data(spec)
    cycle_lm = build_lm(spec.lm, task_def, limiter=limiter)
    reflection_lm = (
        build_lm(spec.reflection_lm, task_def, limiter=limiter, usage=cycle_lm.usage)
        if spec.reflection_lm is not None
        else None
    )
    run_id = run_id or new_id()
    earlier = repo.get_run(run_id) if repo.run_exists(run_id) else None
    if earlier is None:
        # Another worker may create it first: the claim below decides who runs it.
        with contextlib.suppress(IntegrityError):
            repo.create_run(run_id=run_id, **spec.run_fields())
    lease = repo.start_run(run_id, flow_run_id=flow_run_id, worker=worker_name())
    if lease is None:
        # Someone else holds it (or it ended): this worker must write nothing to it.
        raise RunClaimError(f"run {run_id} is not queued: it was started elsewhere or ended")
    resumed_baseline = None
    if earlier is not None and earlier.attempt > 1:
        # A re-queued run resumes: its earlier attempts' LM usage counts against the same
        # budgets, and their baseline score stands (its test-set calls are not paid twice).
        _carry_usage(cycle_lm, earlier)
        resumed_baseline = earlier.baseline_score
    try:
        usage = cycle_lm.usage.snapshot
        guard = CycleGuard.for_spec(
            spec, usage, control=control or control_for(run_id), started_at=started
        )
        timer = CycleTimer(spec.time_budget_s, spec.budget_warning_at)
        timer.start(started)
        monitor = CycleMonitor(
            run_id,
            repo,
            timer,
            guard,
            usage=usage,
            lease=lease,
            label=f"{task_def.name}/{spec.optimizer}",
            prefect=PrefectHooks(run_id, flow_run_id),
        )
        monitor.start()
    except BaseException as exc:
        # Claimed but no context to hand back: the caller could not finish it; we can.
        repo.finish_run(run_id, RunState.failed, lease=lease, error=_error_text(exc, None))
        raise
    return CycleContext(
        run_id=run_id,
        spec=spec,
        task=task_def,
        splits=splits,
        lm=cycle_lm,
        repo=repo,
        guard=guard,
        monitor=monitor,
        lease=lease,
        reflection_lm=reflection_lm,
        started_monotonic=started,
        resumed_baseline=resumed_baseline,
    )


def _carry_usage(cycle_lm: CycleLM, earlier: Any) -> None:
    """Start the usage counters at what earlier attempts of the run spent (before any LM
    call of this attempt, so no lock is needed)."""
    usage = cycle_lm.usage
    usage.calls += earlier.lm_calls or 0
    usage.input_tokens += earlier.input_tokens or 0
    usage.output_tokens += earlier.output_tokens or 0
    if earlier.cost_usd is not None:
        usage.cost_usd += earlier.cost_usd
        usage.priced = True


def worker_name() -> str:
    """`host:pid`: recovery reads it to tell a dead local worker (tasks.cycle.recovery)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def run_baseline(ctx: CycleContext) -> float:
    if ctx.resumed_baseline is not None:
        return ctx.resumed_baseline
    started = time.monotonic()
    score = evaluate_program(
        ctx, ctx.task.build_program(), ctx.splits.test, cancellable="baseline evaluation"
    )
    # The final test evaluation costs about what this one did (a bit more with demos):
    # the optimizer stops that much before the time budget so the cycle keeps to it.
    ctx.guard.set_reserve(1.25 * (time.monotonic() - started))
    if not ctx.repo.update_run(ctx.run_id, ctx.lease, baseline_score=score, **ctx.usage_fields()):
        ctx.guard.trip(StopReason.lease_lost, f"lease lost on run {ctx.run_id} before optimizing")
    return score


def select_demo_pool(spec: CycleSpec, task: TaskDefinition, splits: Splits) -> list[dspy.Example]:
    """The examples the optimizer may draw demos from (bootstrap candidates, demo sets).

    With `demo_selection`, a pool chosen by sentence-embedding cosine similarity on the best
    device (GPU when present): a spread-out pool covers more kinds of input than the first
    N examples; a nearest pool matches what the program is validated on.
    """
    k = spec.demo_pool_size
    if spec.demo_selection == "none" or len(splits.train) <= k:
        return splits.train
    from tasks.optimizers.demo_selection import DemoSelector

    selector = DemoSelector(splits.train, task.input_fields)
    if spec.demo_selection == "diverse":
        return selector.diverse_demos(k)
    # nearest: rank training examples by how often they are a validation input's neighbour
    votes: dict[int, int] = {}
    index = {id(ex): i for i, ex in enumerate(splits.train)}
    per_input = max(1, -(-k // max(1, len(splits.val))))
    for neighbours in selector.nearest_demos_batch(splits.val, per_input + 1):
        for rank, example in enumerate(neighbours):
            i = index[id(example)]
            votes[i] = votes.get(i, 0) + (per_input + 1 - rank)
    ranked = sorted(votes, key=lambda i: (-votes[i], i))[:k]
    return [splits.train[i] for i in sorted(ranked)]


def optimizer_options(spec: CycleSpec) -> dict[str, Any]:
    """Per-LM tuning. MIPROv2's data-aware proposer asks the LM to summarize the dataset in
    many long generations: from a 135M model that summary is noise, and it cost minutes of
    the quick start (measured: the proposal step took 7 min of a local intent cycle)."""
    if spec.optimizer == "mipro" and spec.lm.provider == "local":
        return {"data_aware_proposer": False}
    return {}


def run_optimizer(ctx: CycleContext) -> OptimizeResult:
    """Compile under the cycle's guard: every LM call and evaluation checks the budgets,
    and a stopped optimizer returns its best program so far."""
    optimizer = get_optimizer(ctx.spec.optimizer)
    request = CompileRequest(
        program=ctx.task.build_program(),
        trainset=select_demo_pool(ctx.spec, ctx.task, ctx.splits),
        valset=ctx.splits.val,
        metric=ctx.task.metric,
        budget=ctx.spec.budget,
        seed=ctx.spec.seed,
        num_threads=ctx.spec.num_threads,
        on_iteration=ctx.monitor.on_iteration,
        should_stop=ctx.guard.should_stop,
        reflection_lm=ctx.reflection_lm.lm if ctx.reflection_lm is not None else None,
        log_dir=(
            optimizer_state_dir(ctx.run_id, ctx.spec.optimizer)
            if ctx.spec.optimizer in RESUMABLE_OPTIMIZERS
            else None
        ),
        options=optimizer_options(ctx.spec),
    )
    ctx.monitor.begin_iterations(optimizer.total_iterations(request))
    journal = _open_journal(ctx)
    # Armed on every attempt: a Prefect retry of `optimize` keeps the budgets (the last
    # attempt disarmed the guard on its way out).
    ctx.guard.arm()
    try:
        with ctx.lm.context(callbacks=[*dspy.settings.callbacks, ctx.guard]):
            try:
                result = optimizer.compile(request)
            except CycleStopped as stop:  # an optimizer that does not keep a best program
                result = OptimizeResult(
                    program=ctx.task.build_program(),
                    val_score=None,
                    iterations=ctx.monitor.timer.iterations,
                    stopped_early=True,
                    stop_reason=stop.reason,
                )
    finally:
        ctx.guard.disarm()  # until the next attempt: the final test evaluation completes
        ctx.monitor.flush()
        if journal is not None:
            _close_journal(ctx, journal)
    if result.stopped_early and result.stop_reason is None:
        result.stop_reason = ctx.guard.reason
    return result


def _open_journal(ctx: CycleContext) -> LMJournal | None:
    """MIPROv2 on an engine dspyflow runs (local, sim): answers go to the run's journal,
    and an earlier attempt's answers are replayed (a resumed run, a Prefect retry)."""
    engine = ctx.lm.engine
    if ctx.spec.optimizer not in JOURNALED_OPTIMIZERS or engine is None:
        return None
    journal = LMJournal(optimizer_state_dir(ctx.run_id, ctx.spec.optimizer) / "lm-journal.jsonl")
    if journal.loaded:
        logger.info("run %s: replaying %d recorded LM answers", ctx.run_id, journal.loaded)
    engine.journal = journal
    return journal


def _close_journal(ctx: CycleContext, journal: LMJournal) -> None:
    if ctx.lm.engine is not None:
        ctx.lm.engine.journal = None
    journal.close()
    if journal.loaded:
        logger.info(
            "run %s: %d LM answers replayed from the journal, %d new calls",
            ctx.run_id,
            journal.replayed,
            journal.recorded,
        )


# How a stopped cycle ends: it still saves its best program and its test score.
_STOP_STATES = {
    StopReason.time: RunState.timed_out,
    StopReason.cancelled: RunState.cancelled,
    StopReason.lm_calls: RunState.budget_exhausted,
    StopReason.tokens: RunState.budget_exhausted,
    StopReason.cost: RunState.budget_exhausted,
    StopReason.lease_lost: RunState.stale,  # recovery's verdict stands; the program is kept
}


def final_state(result: OptimizeResult) -> RunState:
    if not result.stopped_early or result.stop_reason is None:
        return RunState.succeeded
    return _STOP_STATES[result.stop_reason]


def lease_lost(ctx: CycleContext) -> bool:
    return ctx.monitor.lease_lost or ctx.guard.reason is StopReason.lease_lost


def evaluate_final(ctx: CycleContext, result: OptimizeResult) -> float | None:
    """The optimized program's test score; None without spending a call when the run's
    lease is gone (nobody can record this run's outcome any more)."""
    if lease_lost(ctx):
        return None
    # A cancel that already stopped the optimizer is answered: its best program is still
    # scored. One that arrives now stops the scoring (the program is kept, unscored).
    already_cancelled = ctx.guard.control.cancelled
    return evaluate_program(
        ctx,
        result.program,
        ctx.splits.test,
        cancellable=None if already_cancelled else "final evaluation",
    )


def _result_fields(result: OptimizeResult) -> dict[str, Any]:
    return {
        "program_state": result.program.dump_state(),
        "val_score": result.val_score,
        "iterations": result.iterations,
    }


def _outcome(ctx: CycleContext, state: RunState, fields: dict[str, Any], kept: str) -> RunOutcome:
    return RunOutcome(
        run_id=ctx.run_id,
        lease=ctx.lease,
        state=state,
        fields=fields,
        kept=kept,
        stopped_for_lost_lease=ctx.guard.reason is StopReason.lease_lost,
    )


def record_success(
    ctx: CycleContext, baseline: float, result: OptimizeResult, test_score: float | None
) -> None:
    """Record the optimized (or, if stopped, the best-so-far) program and its scores."""
    state = RunState.stale if lease_lost(ctx) else final_state(result)
    ctx.monitor.close()
    fields = {
        "baseline_score": baseline,
        "best_score": test_score,
        "error": ctx.guard.message if state is not RunState.succeeded else None,
        **_result_fields(result),
        **ctx.usage_fields(),
    }
    try:
        written = record_outcome(ctx.repo, _outcome(ctx, state, fields, "its best program"))
    finally:
        release_control(ctx.run_id)
    if written and ctx.spec.optimizer in ("genetic", *JOURNALED_OPTIMIZERS):
        # Recorded: nothing left to resume (a batch of 1000 leaves no 1000 checkpoints).
        shutil.rmtree(optimizer_state_dir(ctx.run_id, ctx.spec.optimizer), ignore_errors=True)


def _error_text(exc: BaseException, ctx: CycleContext | None) -> str:
    if isinstance(exc, EvaluationCancelled):
        return str(exc)[:2000]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    error = f"{type(exc).__name__}: {text}"
    engine = ctx.lm.engine if ctx is not None else None
    if engine is not None and engine.last_error and engine.last_error not in error:
        error += f" (last LM error: {engine.last_error})"
    return error[:2000]


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, or a second SIGTERM (Prefect's TerminationSignal): the user stopped it."""
    return isinstance(exc, KeyboardInterrupt) or type(exc).__name__ == "TerminationSignal"


def record_failure(
    repo: Repository,
    run_id: str,
    exc: BaseException,
    ctx: CycleContext | None,
    result: OptimizeResult | None = None,
) -> None:
    """Record why a cycle failed, with the optimized program when there is one (`result`:
    the final test evaluation failed after the optimizer finished)."""
    if isinstance(exc, RunClaimError):
        # Another worker holds the run: its outcome is theirs to record, not ours.
        logger.warning("%s; leaving it to the worker that holds it", exc)
        return
    if isinstance(exc, OutcomeSpooledError):
        return  # the outcome is safe in the outbox; the database is down anyway
    cancelled = _interrupted(exc) or isinstance(exc, EvaluationCancelled)
    state = RunState.cancelled if cancelled else RunState.failed
    error = _error_text(exc, ctx)
    if ctx is None:
        # Never claimed: only a queued row may be failed (an operator transition).
        if not repo.finish_run(run_id, state, error=error) and repo.run_exists(run_id):
            logger.warning("run %s failed before its claim (%s); left as is", run_id, error)
        release_control(run_id)
        return
    ctx.guard.disarm()
    ctx.monitor.close()
    fields: dict[str, Any] = {"error": error, **ctx.usage_fields()}
    kept = "no program"
    if result is not None:
        fields.update(_result_fields(result))
        kept = "its optimized program"
    if lease_lost(ctx):
        state = RunState.stale
    try:
        record_outcome(repo, _outcome(ctx, state, fields, kept))
    finally:
        release_control(run_id)


class StepRunner(Protocol):
    """How `run_cycle` calls each step: directly (a batch's job), as a Prefect task
    (the single-run flow), or timed (benchmarks). Receives the step's name, its function
    and the arguments; returns what the function returns."""

    def __call__(
        self, name: CycleStep, step: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any: ...


def call_directly(name: CycleStep, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return step(*args, **kwargs)


@dataclass
class TimedSteps:
    """A step runner that times each step and counts the LM calls spent before it."""

    seconds: dict[str, float] = field(default_factory=dict)
    lm_calls_before: dict[str, int] = field(default_factory=dict)
    ctx: CycleContext | None = None

    def __call__(self, name: CycleStep, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.ctx is not None:
            self.lm_calls_before[name] = self.ctx.lm.usage.calls
        started = time.perf_counter()
        try:
            out = step(*args, **kwargs)
        finally:
            self.seconds[name] = time.perf_counter() - started
        if name == "prepare":
            self.ctx = out
        return out


def run_cycle(
    spec: CycleSpec,
    repo: Repository,
    *,
    run_id: str | None = None,
    flow_run_id: str | None = None,
    limiter: RateLimiter | None = None,
    control: CycleControl | None = None,
    run_step: StepRunner = call_directly,
    reraise: bool = False,
) -> CycleSummary:
    """The cycle's one step sequence: prepare -> baseline -> optimize -> evaluate ->
    record. Used by the single-run flow (steps as Prefect tasks, `reraise` so the flow
    run fails too), the batch (one Prefect task per job carries the whole cycle) and the
    benchmarks (`TimedSteps`).

    The run always ends in a terminal state with its reason, and the optimized program
    when there is one: errors are recorded on the run, then returned as its summary (or
    re-raised with `reraise`). Ctrl-C and other BaseExceptions (SystemExit, Prefect's
    TerminationSignal) are recorded, then always re-raised. `control` (or
    `tasks.cycle.budget.cancel_run(run_id)`) cancels it from another thread."""
    ctx: CycleContext | None = None
    result: OptimizeResult | None = None
    try:
        ctx = run_step(
            "prepare",
            prepare_cycle,
            spec,
            repo,
            run_id=run_id,
            flow_run_id=flow_run_id,
            limiter=limiter,
            control=control,
        )
        baseline_score = run_step("baseline", run_baseline, ctx)
        result = run_step("optimize", run_optimizer, ctx)
        test_score = run_step("evaluate", evaluate_final, ctx, result)
        run_step("record", record_success, ctx, baseline_score, result, test_score)
    except BaseException as exc:  # every failure becomes a terminal state
        failed_run = ctx.run_id if ctx is not None else run_id
        if failed_run is None:
            raise  # nothing was written: the input was refused before the run's row
        # With `result`, a failed final evaluation still keeps the optimized program.
        record_failure(repo, failed_run, exc, ctx, result)
        if isinstance(exc, EvaluationCancelled):
            return summarize(repo, failed_run)  # a cancel is an end, not a failure
        if reraise or not isinstance(exc, Exception) or isinstance(exc, OutcomeSpooledError):
            raise  # (spooled: the database is down, so no summary can be read back)
        return summarize(repo, failed_run)
    return summarize(repo, ctx.run_id)
