"""The cycle timer: progress, throughput, ETA and budget alerts of one optimization cycle.

`CycleTimer` is pure arithmetic over a clock (testable with a fake one): target duration
(default 7200 s), iterations done and planned, throughput, elapsed, time remaining, ETA,
approaching-limit (default 80 %) and exceeded detection.

`CycleMonitor` rides along a running cycle: the optimizer's `on_iteration` callback feeds
it (cheap, any thread), and one background thread does all the I/O:
- progress samples to the database at most once per `sample_interval_s`, each with a
  heartbeat of the run row (iterations, LM usage);
- a heartbeat every `heartbeat_interval_s` even when no iteration ends (a long bootstrap,
  a slow LM), so a dead worker is told from a slow one;
- alerts once per kind: a log line, a `RunAlert` row, and a Prefect event
  (`dspyflow.cycle.budget-warning` / `dspyflow.cycle.budget-exceeded` /
  `dspyflow.cycle.cancelled`, resource `dspyflow.run.<id>`);
- a Prefect progress artifact, when the cycle runs inside a flow run;
- Prefect cancellation: a flow run set to Cancelling cancels the cycle;
- the run's claim: a heartbeat that finds its lease gone (the run was marked stale under
  a live worker, or claimed elsewhere) stops the cycle (`StopReason.lease_lost`).
The thread runs in a copy of the caller's context, so Prefect's run and settings contexts
(the ephemeral server's URL included) are the flow's.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from tasks.cycle.budget import CycleGuard, StopReason
from tasks.optimizers.base import IterationEvent

if TYPE_CHECKING:
    from storage.repository import Repository

logger = logging.getLogger("dspyflow.cycle_timer")

DEFAULT_TARGET_S = 7200.0
DEFAULT_WARNING_AT = 0.8
SAMPLE_INTERVAL_S = 1.0
HEARTBEAT_INTERVAL_S = float(os.environ.get("DSPYFLOW_HEARTBEAT_S", "10"))
MONITOR_TICK_S = 0.1  # how often the monitor thread looks for a due sample or heartbeat
# The Prefect progress artifact trails the samples: each update is an API request that the
# (often local, same-cores) Prefect server also has to serve.
ARTIFACT_INTERVAL_S = 5.0
# A batch flow of many cycles sets this False: one summary artifact for the batch instead
# of a progress artifact per cycle (2-3 API calls each: 2.5x slower batches on SQLite).
PER_CYCLE_ARTIFACTS: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "dspyflow_per_cycle_artifacts", default=True
)


@dataclass(frozen=True)
class TimerStats:
    elapsed_s: float
    target_s: float
    iterations: int
    total_iterations: int | None  # planned, or extrapolated from the budget used
    progress: float | None  # fraction of the optimizer's own budget done, 0..1
    throughput: float | None  # iterations per second, since the first iteration began
    eta_s: float | None  # seconds until the optimizer finishes at this pace
    time_remaining_s: float  # seconds left of the target duration
    budget_fraction: float  # elapsed / target
    approaching_limit: bool
    exceeded: bool
    best_score: float | None
    score: float | None = None  # the latest iteration's candidate

    @property
    def expected_finish_s(self) -> float:
        """Seconds until the cycle ends: when the optimizer is done or the budget is."""
        if self.eta_s is None:
            return self.time_remaining_s
        return min(self.eta_s, self.time_remaining_s)


class CycleTimer:
    """Elapsed time, progress and ETA of one cycle against its target duration."""

    def __init__(
        self,
        target_s: float = DEFAULT_TARGET_S,
        warning_at: float = DEFAULT_WARNING_AT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if target_s <= 0:
            raise ValueError(f"target duration must be > 0 s, got {target_s}")
        if not 0 < warning_at < 1:
            raise ValueError(f"warning threshold must be in (0, 1), got {warning_at}")
        self.target_s = target_s
        self.warning_at = warning_at
        self._clock = clock
        self._lock = threading.Lock()
        self.started_at: float | None = None
        self.iterations_started_at: float | None = None
        self.iterations = 0
        self.total_iterations: int | None = None
        self.progress: float | None = None
        self.best_score: float | None = None
        self.score: float | None = None
        # The first iteration's (time, iterations, progress): the pace is measured from
        # here, so setup (bootstrapping, proposals) does not skew the ETA.
        self._first: tuple[float, int, float | None] | None = None

    def start(self, at: float | None = None) -> None:
        self.started_at = self._clock() if at is None else at

    def begin_iterations(self, total: int | None = None) -> None:
        """Mark the start of the optimizer's iterations (throughput is measured from here)."""
        with self._lock:
            self.iterations_started_at = self._clock()
            if total is not None:
                self.total_iterations = total

    def update(
        self,
        iteration: int,
        total: int | None = None,
        *,
        progress: float | None = None,
        best_score: float | None = None,
        score: float | None = None,
    ) -> None:
        with self._lock:
            if self.started_at is None:
                self.started_at = self._clock()
            if self.iterations_started_at is None:
                self.iterations_started_at = self.started_at
            self.iterations = max(self.iterations, iteration)
            if total is not None:
                self.total_iterations = total
            if progress is not None:
                self.progress = max(0.0, min(1.0, progress))
            if best_score is not None:
                self.best_score = best_score
            self.score = score
            if self._first is None:
                self._first = (self._clock(), self.iterations, self.progress)

    def record(self, event: IterationEvent) -> None:
        self.update(
            event.iteration,
            event.total,
            progress=event.progress,
            best_score=event.best_score,
            score=event.score,
        )

    def elapsed(self) -> float:
        return 0.0 if self.started_at is None else self._clock() - self.started_at

    def time_remaining(self) -> float:
        return max(0.0, self.target_s - self.elapsed())

    def is_approaching_limit(self) -> bool:
        return self.elapsed() >= self.warning_at * self.target_s

    def is_exceeded(self) -> bool:
        return self.elapsed() >= self.target_s

    def stats(self) -> TimerStats:
        with self._lock:
            now = self._clock()
            elapsed = 0.0 if self.started_at is None else now - self.started_at
            running = (
                0.0 if self.iterations_started_at is None else now - self.iterations_started_at
            )
            iterations, total = self.iterations, self.total_iterations
            progress = self.progress
            if progress is None and total:
                progress = min(1.0, iterations / total)
            # Pace since the first iteration ended (excludes setup); until a second one,
            # the average since iterations began.
            first_at, first_iterations, first_progress = self._first or (now, 0, None)
            since_first = now - first_at
            throughput = iterations / running if iterations and running > 0 else None
            if iterations > first_iterations and since_first > 0:
                throughput = (iterations - first_iterations) / since_first
            eta: float | None = None
            if total and throughput:
                eta = max(0, total - iterations) / throughput
            elif progress is not None and progress > 0:
                if first_progress is not None and progress > first_progress and since_first > 0:
                    eta = (1.0 - progress) * since_first / (progress - first_progress)
                elif running > 0:
                    eta = running * (1.0 - progress) / progress
            if total is None and progress and iterations:
                total = max(iterations, round(iterations / progress))
            fraction = elapsed / self.target_s
            return TimerStats(
                elapsed_s=elapsed,
                target_s=self.target_s,
                iterations=iterations,
                total_iterations=total,
                progress=progress,
                throughput=throughput,
                eta_s=eta,
                time_remaining_s=max(0.0, self.target_s - elapsed),
                budget_fraction=fraction,
                approaching_limit=fraction >= self.warning_at,
                exceeded=fraction >= 1.0,
                best_score=self.best_score,
                score=self.score,
            )


# --- the monitor: database, Prefect, heartbeat ------------------------------------------------


_EXCEEDED_KIND = {
    StopReason.time: "budget_exceeded",
    StopReason.lm_calls: "lm_call_budget_exceeded",
    StopReason.tokens: "token_budget_exceeded",
    StopReason.cost: "cost_budget_exceeded",
    StopReason.cancelled: "cancelled",
    StopReason.lease_lost: "lease_lost",
}
_WARNING_KIND = {
    "time": "budget_warning",
    "lm_calls": "lm_call_budget_warning",
    "tokens": "token_budget_warning",
    "cost": "cost_budget_warning",
}


# One flow-run state read per flow run and heartbeat interval, however many cycles it runs
# (a batch of 1000 cycles must not poll the API 1000 times every 10 s).
_cancel_cache: dict[str, tuple[float, bool]] = {}
_cancel_lock = threading.Lock()


class PrefectHooks:
    """Prefect side effects of one cycle, decided once in the caller's thread: inside a
    flow run (or with an API URL) emit events and keep a progress artifact; otherwise
    stay quiet (emitting outside a flow would start an ephemeral server)."""

    def __init__(self, run_id: str, flow_run_id: str | None = None) -> None:
        self.run_id = run_id
        self.flow_run_id = flow_run_id
        self.enabled = False
        self.artifact_id: Any = None
        try:
            from prefect.context import FlowRunContext
            from prefect.settings import PREFECT_API_URL

            ctx = FlowRunContext.get()
            if ctx is not None and ctx.flow_run is not None:
                self.flow_run_id = self.flow_run_id or str(ctx.flow_run.id)
            self.enabled = ctx is not None or bool(PREFECT_API_URL.value())
        except Exception:  # noqa: BLE001 - Prefect is optional for a plain cycle
            self.enabled = False

    def create_artifact(self, description: str) -> None:
        if not self.enabled or self.flow_run_id is None or not PER_CYCLE_ARTIFACTS.get():
            return
        try:
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                progress=0.0, key=f"dspyflow-run-{self.run_id}", description=description
            )
        except Exception as exc:  # noqa: BLE001 - progress display must never fail a cycle
            logger.debug("no progress artifact: %s", exc)

    def update_artifact(self, percent: float, description: str) -> None:
        if self.artifact_id is None:
            return
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(
                self.artifact_id, progress=max(0.0, min(100.0, percent)), description=description
            )
        except Exception as exc:  # noqa: BLE001
            logger.debug("progress artifact update failed: %s", exc)

    def emit(self, event: str, payload: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            from prefect.events import emit_event

            related = (
                [
                    {
                        "prefect.resource.id": f"prefect.flow-run.{self.flow_run_id}",
                        "prefect.resource.role": "flow-run",
                    }
                ]
                if self.flow_run_id
                else None
            )
            emit_event(
                event=event,
                resource={
                    "prefect.resource.id": f"dspyflow.run.{self.run_id}",
                    "prefect.resource.name": f"dspyflow run {self.run_id[:12]}",
                },
                related=related,
                payload=payload,
            )
        except Exception as exc:  # noqa: BLE001
            logger.debug("event %s not emitted: %s", event, exc)

    def cancel_requested(self) -> bool:
        """Whether this cycle's Prefect flow run was set to Cancelling (or Cancelled)."""
        if not self.enabled or self.flow_run_id is None:
            return False
        now = time.monotonic()
        with _cancel_lock:
            cached = _cancel_cache.get(self.flow_run_id)
            if cached is not None and now - cached[0] < HEARTBEAT_INTERVAL_S:
                return cached[1]
            # Claim this interval's read before releasing the lock: others use the cache.
            _cancel_cache[self.flow_run_id] = (now, cached[1] if cached else False)
        try:
            from prefect.client.orchestration import get_client

            with get_client(sync_client=True) as client:
                state = client.read_flow_run(UUID(self.flow_run_id)).state
            cancelled = state is not None and (state.is_cancelling() or state.is_cancelled())
        except Exception as exc:  # noqa: BLE001 - an unreachable API must not stop a cycle
            logger.debug("flow run state unavailable: %s", exc)
            return False
        with _cancel_lock:
            _cancel_cache[self.flow_run_id] = (now, cancelled)
        return cancelled


class CycleMonitor:
    """Timer + guard + database + Prefect for one running cycle (see module docstring)."""

    def __init__(
        self,
        run_id: str,
        repo: Repository,
        timer: CycleTimer,
        guard: CycleGuard,
        *,
        usage: Callable[[], dict[str, Any]],
        lease: str,
        label: str = "",
        prefect: PrefectHooks | None = None,
        sample_interval_s: float | None = None,
        heartbeat_interval_s: float | None = None,
        tick_s: float | None = None,
    ) -> None:
        self.run_id = run_id
        self.repo = repo
        self.lease = lease
        self.lease_lost = False
        self.timer = timer
        self.guard = guard
        self.label = label
        self._usage = usage
        self.prefect = prefect or PrefectHooks(run_id)
        # Read at construction (not import) so tests and deployments can tune them.
        self.sample_interval_s = sample_interval_s or SAMPLE_INTERVAL_S
        self.heartbeat_interval_s = heartbeat_interval_s or HEARTBEAT_INTERVAL_S
        self.tick_s = tick_s or MONITOR_TICK_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # One writer at a time: the monitor thread and the cycle's flush() both write, and
        # a sample read earlier must not land after a later one (the artifact would end at
        # 75 % of a finished run).
        self._write_lock = threading.RLock()
        self._dirty = False
        self._last_sample = -float("inf")
        self._last_artifact = -float("inf")
        self._artifact_behind = False  # a sample was written that the artifact skipped
        self._last_heartbeat = time.monotonic()
        self._alerted: set[str] = set()
        self.samples_written = 0
        self.alerts: list[tuple[str, str]] = []
        guard.add_listener(self._on_guard_stop)

    # --- called by the cycle ----------------------------------------------------------

    def start(self) -> None:
        if self.timer.started_at is None:
            self.timer.start(self.guard.started_at)
        self.prefect.create_artifact(self._describe(self.timer.stats()))
        ctx = contextvars.copy_context()
        self._thread = threading.Thread(
            target=ctx.run, args=(self._loop,), name=f"cycle-monitor-{self.run_id[:8]}", daemon=True
        )
        self._thread.start()

    def begin_iterations(self, total: int | None) -> None:
        self.timer.begin_iterations(total)
        with self._lock:
            self._dirty = True

    def on_iteration(self, event: IterationEvent) -> None:
        """The optimizer's progress callback: record only; the monitor thread writes."""
        self.timer.record(event)
        with self._lock:
            self._dirty = True

    def flush(self) -> None:
        """Write the pending sample now (the optimizer's last, before the final test
        evaluation adds LM calls of its own)."""
        self._tick(final=True)

    def close(self) -> None:
        """Stop the thread and flush: last sample, alerts, heartbeat."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            self._tick(final=True)
        except Exception as exc:  # noqa: BLE001 - recording the run's end matters more
            logger.warning("final progress flush failed for run %s: %s", self.run_id, exc)

    # --- the thread -------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.tick_s):
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - a DB hiccup must not end the monitor
                logger.warning("cycle monitor tick failed for run %s: %s", self.run_id, exc)

    def _tick(self, final: bool = False) -> None:
        now = time.monotonic()
        self._check_alerts()
        with self._write_lock:
            with self._lock:
                due = self._dirty and (final or now - self._last_sample >= self.sample_interval_s)
                if due:
                    self._dirty = False
                    self._last_sample = now
            if due and not self.lease_lost:
                self._write_sample()
            artifact_due = final or now - self._last_artifact >= ARTIFACT_INTERVAL_S
            if self._artifact_behind and artifact_due and not self.lease_lost:
                self._publish_artifact(now)
        if self.lease_lost:
            return  # the run is not ours any more: write nothing to it
        if not final and now - self._last_heartbeat >= self.heartbeat_interval_s:
            self._last_heartbeat = now
            self._heartbeat(**self._usage())
            if self.prefect.cancel_requested():
                self.guard.control.cancel("flow run cancelled in Prefect")
                self.guard.poll()

    def _heartbeat(self, **fields: Any) -> None:
        beat = self.repo.heartbeat(self.run_id, self.lease, **fields)
        if beat.cancel_request and not self.guard.control.cancelled:
            logger.warning("run %s: %s; stopping", self.run_id[:12], beat.cancel_request)
            self.guard.control.cancel(beat.cancel_request)
            self.guard.poll()
        if beat or self.lease_lost:
            return
        # Marked stale (or re-claimed) under a live worker: every further LM call would be
        # spent on a result nobody can record. The guard stops the optimizer at its next
        # LM call; the cycle keeps its best program on the stale row (salvage_run).
        self.lease_lost = True
        try:
            run = self.repo.get_run(self.run_id)
            why = f"is {run.state} ({run.error or 'claimed by another worker'})"
        except Exception as exc:  # noqa: BLE001 - the stop matters more than its wording
            why = f"is no longer held by this worker ({exc})"
        message = f"lease lost: run {self.run_id[:12]} {why} while this worker was alive"
        if self.guard.trip(StopReason.lease_lost, message):
            logger.error("%s; stopping", message)
            self._check_alerts()

    def _write_sample(self) -> None:
        stats = self.timer.stats()
        usage = self._usage()
        self.repo.add_progress_sample(
            self.run_id,
            iteration=stats.iterations,
            total_iterations=stats.total_iterations,
            elapsed_s=stats.elapsed_s,
            throughput=stats.throughput,
            eta_s=stats.eta_s,
            best_score=stats.best_score,
            score=stats.score,
            lm_calls=usage.get("lm_calls"),
        )
        self.samples_written += 1
        self._last_heartbeat = time.monotonic()
        progress: dict[str, Any] = {"iterations": stats.iterations}
        if stats.total_iterations is not None:
            progress["total_iterations"] = stats.total_iterations
        self._heartbeat(**progress, **usage)
        self._artifact_behind = True

    def _publish_artifact(self, now: float) -> None:
        """Bring the Prefect progress artifact up to the latest sample."""
        stats = self.timer.stats()
        self._last_artifact = now
        self._artifact_behind = False
        self.prefect.update_artifact(100.0 * (stats.progress or 0.0), self._describe(stats))

    def _check_alerts(self) -> None:
        self.guard.poll()  # trips on time/usage limits even between LM calls
        for budget, fraction in self.guard.usage_fractions().items():
            kind = _WARNING_KIND[budget]
            if fraction >= self.timer.warning_at and kind not in self._alerted:
                stats = self.timer.stats()
                self._alert(
                    kind,
                    f"run {self.run_id[:12]}: {fraction:.0%} of its {budget} budget used "
                    f"(warning at {self.timer.warning_at:.0%}); {stats.elapsed_s:.1f} s elapsed",
                    "dspyflow.cycle.budget-warning",
                    {"budget": budget, "fraction": round(fraction, 4)},
                )
        if self.guard.reason is not None:
            kind = _EXCEEDED_KIND[self.guard.reason]
            if kind not in self._alerted:
                event = (
                    "dspyflow.cycle.cancelled"
                    if self.guard.reason is StopReason.cancelled
                    else "dspyflow.cycle.budget-exceeded"
                )
                self._alert(
                    kind,
                    f"run {self.run_id[:12]}: {self.guard.message}; stopping with the best "
                    "program so far",
                    event,
                    {"budget": self.guard.reason.value},
                )

    def _on_guard_stop(self, reason: StopReason, message: str) -> None:
        # Any thread (a DSPy worker): wake the monitor rather than write from here.
        with self._lock:
            self._dirty = True

    def _alert(self, kind: str, message: str, event: str, payload: dict[str, Any]) -> None:
        self._alerted.add(kind)
        elapsed = self.timer.elapsed()
        self.alerts.append((kind, message))
        logger.warning(message)
        self.repo.add_alert(self.run_id, kind, message, elapsed)
        self.prefect.emit(
            event, {**payload, "kind": kind, "message": message, "elapsed_s": round(elapsed, 3)}
        )

    def _describe(self, stats: TimerStats) -> str:
        total = f"/{stats.total_iterations}" if stats.total_iterations else ""
        best = f", best {stats.best_score:.3f}" if stats.best_score is not None else ""
        eta = f", ETA {stats.expected_finish_s:.0f} s" if stats.iterations else ""
        # The run's page (its history, budget, usage and changes): Prefect hosts no files,
        # so the artifact names the command that writes it.
        page = f"`dspyflow report --run {self.run_id[:12]} --out run.html`"
        return (
            f"{self.label} iteration {stats.iterations}{total}{best}; "
            f"{stats.elapsed_s:.0f}/{stats.target_s:.0f} s{eta}; page: {page}"
        ).strip()
