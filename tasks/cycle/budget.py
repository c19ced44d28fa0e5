"""Hard budgets of one cycle (time, LM calls, tokens, USD) and cancellation.

How a stop really happens. MIPROv2 has no stop hook, GEPA checks its stop callbacks only
between iterations, and DSPy, GEPA and Optuna catch `Exception` in many places (a failed
example scores 0, a failing callback is logged, a failed trial is skipped), so a plain
exception would turn a stop into a bad score. `CycleGuard` is a DSPy callback whose
`on_lm_start` and `on_evaluate_start` raise `CycleStopped`, a `BaseException`, once a
limit is reached or the cycle is cancelled. Every LM call of the cycle passes through it
(task model, bootstrapping, instruction proposals, GEPA reflection, on any DSPy worker
thread: callbacks travel in `dspy.context`), so a cycle stops within one LM call of its
limit, whatever phase it is in. Optimizers catch `CycleStopped` around compile and return
the best program seen so far.

Budgets are checked before anything runs (`check_budgets`): a budget too small for one
evaluation of the validation set is refused with the arithmetic in the message.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from dspy.utils.callback import BaseCallback

from tasks.cycle.spec import CycleSpec, LMSpec

# Seconds per LM call when nothing better is known: SmolLM2-135M through llama.cpp on 2
# cores measured ~0.14 s for a short classification prompt; a hosted API ~0.5 s.
LOCAL_CALL_S = 0.15
REMOTE_CALL_S = 0.5


class StopReason(StrEnum):
    time = "time"
    cancelled = "cancelled"
    lm_calls = "lm_calls"
    tokens = "tokens"
    cost = "cost"
    # The run's claim is gone (recovery marked it stale, another worker holds it): the
    # result can no longer be recorded as this run's outcome, so stop spending on it.
    lease_lost = "lease_lost"


class CycleStopped(BaseException):  # noqa: N818 - a control-flow signal, like KeyboardInterrupt
    """Raised from inside DSPy once a cycle must stop. A BaseException on purpose: see the
    module docstring. Optimizers catch it and return their best program so far."""

    def __init__(self, reason: StopReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class BudgetTooSmallError(ValueError):
    """A budget cannot cover one evaluation of the validation set."""


class CycleControl:
    """A handle to cancel one running cycle from another thread (CLI Ctrl-C, a batch)."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.reason = ""

    def cancel(self, reason: str = "cancelled") -> None:
        self.reason = self.reason or reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


_controls: dict[str, CycleControl] = {}
_controls_lock = threading.Lock()


def control_for(run_id: str) -> CycleControl:
    """The process-wide cancel handle of a run (created on first use)."""
    with _controls_lock:
        return _controls.setdefault(run_id, CycleControl())


def cancel_run(run_id: str, reason: str = "cancelled") -> None:
    """Ask a cycle running in this process to stop; it ends `cancelled` with its best
    program so far. Across processes, cancel its Prefect flow run instead."""
    control_for(run_id).cancel(reason)


def release_control(run_id: str) -> None:
    with _controls_lock:
        _controls.pop(run_id, None)


UsageSource = Callable[[], dict[str, Any]]
StopListener = Callable[[StopReason, str], None]


class CycleGuard(BaseCallback):
    """Checks a cycle's limits; raises `CycleStopped` from DSPy callbacks once one is hit.

    Put it in the cycle's `dspy.context(callbacks=...)` only around the optimizer: the
    baseline and the final test evaluation must run to completion. `poll()` may be called
    from any thread; the first limit reached wins and stays.
    """

    def __init__(
        self,
        *,
        time_budget_s: float | None,
        usage: UsageSource | None = None,
        lm_call_budget: int | None = None,
        token_budget: int | None = None,
        cost_budget_usd: float | None = None,
        control: CycleControl | None = None,
        clock: Callable[[], float] = time.monotonic,
        started_at: float | None = None,
    ) -> None:
        super().__init__()
        self.time_budget_s = time_budget_s
        self.lm_call_budget = lm_call_budget
        self.token_budget = token_budget
        self.cost_budget_usd = cost_budget_usd
        self.control = control or CycleControl()
        self._usage = usage
        self._clock = clock
        self.started_at = clock() if started_at is None else started_at
        self.reserve_s = 0.0
        self.armed = True  # limits are enforced until the optimizer is done
        self.reason: StopReason | None = None
        self.message = ""
        self.stopped_at_s: float | None = None
        self._lock = threading.Lock()
        self._listeners: list[StopListener] = []

    @classmethod
    def for_spec(
        cls,
        spec: CycleSpec,
        usage: UsageSource,
        *,
        control: CycleControl | None = None,
        started_at: float | None = None,
    ) -> CycleGuard:
        return cls(
            time_budget_s=spec.time_budget_s,
            usage=usage,
            lm_call_budget=spec.lm_call_budget,
            token_budget=spec.token_budget,
            cost_budget_usd=spec.cost_budget_usd,
            control=control,
            started_at=started_at,
        )

    # --- state ------------------------------------------------------------------------

    def elapsed_s(self) -> float:
        return self._clock() - self.started_at

    def set_reserve(self, seconds: float) -> None:
        """Stop the optimizer this much before the time budget, to leave room for the final
        test evaluation (estimated from the baseline's duration), so the whole cycle keeps
        to its budget. At most half the budget."""
        limit = 0.5 * self.time_budget_s if self.time_budget_s else 0.0
        self.reserve_s = max(0.0, min(seconds, limit))

    def arm(self) -> None:
        """Enforce the limits (again): the start of every optimizer attempt, so a Prefect
        retry of `optimize` runs under the same budgets as the first attempt."""
        self.armed = True

    def disarm(self) -> None:
        """No new stops after the optimizer: the final test evaluation must complete. A stop
        that already happened stays (stray DSPy workers still see it and end)."""
        self.armed = False

    def add_listener(self, listener: StopListener) -> None:
        """Called once, in the thread that trips the guard: keep it cheap."""
        self._listeners.append(listener)

    @property
    def stopped(self) -> bool:
        return self.reason is not None

    def trip(self, reason: StopReason, message: str) -> bool:
        with self._lock:
            if self.reason is not None:
                return False
            self.reason, self.message = reason, message
            self.stopped_at_s = self.elapsed_s()
        for listener in self._listeners:
            listener(reason, message)
        return True

    def usage_fractions(self) -> dict[str, float]:
        """How much of each configured budget is used (1.0 = the stop), for warnings. Time
        counts against the optimizer's deadline (the budget less the final-eval reserve)."""
        fractions: dict[str, float] = {}
        if self.time_budget_s:
            fractions["time"] = self.elapsed_s() / (self.time_budget_s - self.reserve_s)
        usage = self._usage() if self._usage is not None else {}
        if self.lm_call_budget:
            fractions["lm_calls"] = usage.get("lm_calls", 0) / self.lm_call_budget
        if self.token_budget:
            tokens = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
            fractions["tokens"] = tokens / self.token_budget
        if self.cost_budget_usd:
            fractions["cost"] = (usage.get("cost_usd") or 0.0) / self.cost_budget_usd
        return fractions

    def poll(self) -> StopReason | None:
        """Check every limit now; trip on the first one reached. Cheap: a clock read and,
        with token/call/cost budgets, one locked usage snapshot."""
        if self.reason is not None or not self.armed:
            return self.reason
        if self.control.cancelled:
            self.trip(StopReason.cancelled, self.control.reason or "cancelled")
            return self.reason
        elapsed = self.elapsed_s()
        if self.time_budget_s is not None and elapsed >= self.time_budget_s - self.reserve_s:
            reserve = (
                f" ({self.reserve_s:.1f} s kept for the final test evaluation)"
                if self.reserve_s
                else ""
            )
            self.trip(
                StopReason.time,
                f"time budget of {self.time_budget_s:g} s reached at {elapsed:.1f} s{reserve}",
            )
            return self.reason
        if self._usage is None or not (
            self.lm_call_budget or self.token_budget or self.cost_budget_usd
        ):
            return None
        usage = self._usage()
        tokens = usage.get("input_tokens", 0) + usage.get("output_tokens", 0)
        cost = usage.get("cost_usd") or 0.0
        if self.lm_call_budget and usage.get("lm_calls", 0) >= self.lm_call_budget:
            self.trip(StopReason.lm_calls, f"LM-call budget of {self.lm_call_budget} reached")
        elif self.token_budget and tokens >= self.token_budget:
            self.trip(
                StopReason.tokens, f"token budget of {self.token_budget} reached ({tokens} used)"
            )
        elif self.cost_budget_usd and cost >= self.cost_budget_usd:
            self.trip(
                StopReason.cost,
                f"cost budget of ${self.cost_budget_usd:g} reached (${cost:.4f} spent)",
            )
        return self.reason

    def should_stop(self) -> bool:
        return self.poll() is not None

    def check(self) -> None:
        if self.poll() is not None:
            assert self.reason is not None
            raise CycleStopped(self.reason, self.message)

    # --- DSPy callback hooks: the places a stop really takes effect ---------------------

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.check()

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.check()

    def __deepcopy__(self, memo: dict[int, Any]) -> CycleGuard:
        # DSPy copies settings for worker threads; one guard per cycle must stay one.
        return self


# --- checks before anything runs -------------------------------------------------------------


def estimate_call_s(lm: LMSpec) -> float:
    """A sensible per-call latency for the feasibility check (not a measurement)."""
    if lm.provider == "sim":
        # Mean of the simulated log-normal latency.
        return lm.sim_latency_ms / 1000.0 * math.exp(lm.sim_latency_sigma**2 / 2)
    return LOCAL_CALL_S if lm.provider == "local" else REMOTE_CALL_S


def check_budgets(spec: CycleSpec, n_val: int) -> None:
    """Refuse budgets that cannot cover one evaluation of the validation set."""
    # The local model serializes calls behind one lock: threads do not help it.
    parallel = 1 if spec.lm.provider == "local" else spec.num_threads
    per_call = estimate_call_s(spec.lm)
    rounds = math.ceil(n_val / parallel)
    needed = per_call * rounds
    if spec.time_budget_s < needed:
        threads = f"{parallel} thread{'s' if parallel > 1 else ''}"
        raise BudgetTooSmallError(
            f"time_budget_s: {spec.time_budget_s:g} s is shorter than one evaluation of the "
            f"validation set: {n_val} examples x ~{per_call:.2f} s per {spec.lm.provider} LM "
            f"call on {threads} = ~{needed:.1f} s. Give a time budget of at least "
            f"{math.ceil(needed)} s, or fewer validation examples (max_val)."
        )
    if spec.lm_call_budget is not None and spec.lm_call_budget < n_val:
        raise BudgetTooSmallError(
            f"lm_call_budget: {spec.lm_call_budget} calls cannot evaluate even one candidate "
            f"on the {n_val}-example validation set; give at least {n_val} (one evaluation) "
            "or fewer validation examples (max_val)."
        )
