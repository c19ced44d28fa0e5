"""The one interface every optimizer implements (MIPROv2, GEPA, genetic).

An optimizer has a name, budget presets (light, medium, heavy), and `compile(request)`
that reports progress through `request.on_iteration` and honours two stop signals:
`request.should_stop()` (polled between iterations) and `CycleStopped`, raised from any
LM call once a hard budget is reached (see tasks/cycle/budget.py). On either it returns the best
program seen so far with `stopped_early=True`; it never lets `CycleStopped` escape.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import dspy
from dspy.utils.callback import BaseCallback

from tasks.cycle.budget import CycleStopped, StopReason
from tasks.cycle.spec import BudgetPreset

Metric = Callable[..., float]


@dataclass(frozen=True)
class IterationEvent:
    """One optimizer iteration (a MIPROv2 trial, a GEPA iteration, a GA generation)."""

    iteration: int
    total: int | None
    score: float | None = None  # score of this iteration's candidate, in [0, 1]
    best_score: float | None = None
    progress: float | None = None  # fraction of the optimizer's budget used, when known


@dataclass
class CompileRequest:
    program: dspy.Module
    trainset: list[dspy.Example]
    valset: list[dspy.Example]
    metric: Metric
    budget: str = "light"
    seed: int = 0
    num_threads: int = 1
    on_iteration: Callable[[IterationEvent], None] | None = None
    should_stop: Callable[[], bool] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    # Proposes instructions (GEPA's reflection LM, GA rewrites); None: the context's LM.
    reflection_lm: dspy.LM | None = None
    # Where an optimizer that can resume (GEPA) keeps its state: same dir, same run.
    log_dir: Path | None = None
    # Bootstrapped demos must score at least this; 1.0 refuses half-right extractions.
    metric_threshold: float | None = 1.0

    def stop_requested(self) -> bool:
        return self.should_stop is not None and self.should_stop()


@dataclass
class OptimizeResult:
    program: dspy.Module
    val_score: float | None
    iterations: int
    stopped_early: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    stop_reason: StopReason | None = None


class Optimizer(Protocol):
    name: str

    def total_iterations(self, request: CompileRequest) -> int | None:
        """How many iterations the budget allows, for progress and ETA (None: unknown)."""
        ...

    def compile(self, request: CompileRequest) -> OptimizeResult:
        """Run inside the cycle's `dspy.context`, so the LM and usage tracker apply."""
        ...


class EvaluationCounter(BaseCallback):
    """Counts DSPy `Evaluate` runs (one per MIPROv2 trial) and reports them as iterations;
    keeps a copy of the best program evaluated on the full valset, so a stopped compile
    (which returns nothing) still has its best candidate."""

    def __init__(self, total: int | None, on_iteration: Callable[[IterationEvent], None] | None):
        self.total = total
        self.on_iteration = on_iteration
        self.count = 0
        self.best: float | None = None
        self.best_program: dspy.Module | None = None
        self._pending: dict[str, tuple[Any, bool]] = {}
        self._lock = threading.Lock()

    def on_evaluate_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        metadata = inputs.get("callback_metadata") or {}
        minibatch = metadata.get("metric_key") == "eval_minibatch"
        with self._lock:
            self._pending[call_id] = (inputs.get("program"), minibatch)

    def on_evaluate_end(
        self, call_id: str, outputs: Any | None, exception: BaseException | None = None
    ) -> None:
        with self._lock:
            program, minibatch = self._pending.pop(call_id, (None, False))
        if exception is not None:
            return  # a stopped or failed evaluation scores nothing
        score = getattr(outputs, "score", None)
        value = float(score) / 100.0 if isinstance(score, int | float) else None
        with self._lock:
            self.count += 1
            if value is not None and not minibatch and (self.best is None or value > self.best):
                self.best = value
                if program is not None:
                    self.best_program = program.deepcopy()
            event = IterationEvent(
                self.count,
                self.total,
                value,
                self.best,
                progress=min(1.0, self.count / self.total) if self.total else None,
            )
        if self.on_iteration is not None:
            self.on_iteration(event)


def five_arg_metric(metric: Metric) -> Metric:
    """GEPA calls `metric(gold, pred, trace, pred_name, pred_trace)`; wrap metrics that take
    fewer arguments (the usual DSPy `(gold, pred, trace=None)`)."""
    try:
        inspect.signature(metric).bind(None, None, None, None, None)
        return metric
    except TypeError:
        pass
    try:
        takes_trace = True
        inspect.signature(metric).bind(None, None, None)
    except TypeError:
        takes_trace = False

    def wrapped(
        gold: Any, pred: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None
    ) -> Any:
        return metric(gold, pred, trace) if takes_trace else metric(gold, pred)

    wrapped.__name__ = getattr(metric, "__name__", "metric")
    return wrapped


def check_preset(name: str, budget: str) -> None:
    known = [p.value for p in BudgetPreset]
    if budget not in known:
        raise ValueError(
            f"optimizer {name!r}: unknown budget preset {budget!r}; known: {', '.join(known)}"
        )


__all__ = [
    "CompileRequest",
    "CycleStopped",
    "EvaluationCounter",
    "IterationEvent",
    "Metric",
    "OptimizeResult",
    "Optimizer",
    "StopReason",
    "check_preset",
    "five_arg_metric",
]
