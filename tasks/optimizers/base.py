"""The one interface every optimizer implements (MIPROv2, GEPA, genetic)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import dspy
from dspy.utils.callback import BaseCallback

Metric = Callable[..., float]


@dataclass(frozen=True)
class IterationEvent:
    """One optimizer iteration (a MIPROv2 trial, a GEPA iteration, a GA generation)."""

    iteration: int
    total: int | None
    score: float | None = None  # score of this iteration's candidate, in [0, 1]
    best_score: float | None = None


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


@dataclass
class OptimizeResult:
    program: dspy.Module
    val_score: float | None
    iterations: int
    stopped_early: bool = False
    details: dict[str, Any] = field(default_factory=dict)


class Optimizer(Protocol):
    name: str

    def total_iterations(self, request: CompileRequest) -> int | None:
        """How many iterations the budget allows, for progress and ETA (None: unknown)."""
        ...

    def compile(self, request: CompileRequest) -> OptimizeResult:
        """Run inside the cycle's `dspy.context`, so the LM and usage tracker apply."""
        ...


class EvaluationCounter(BaseCallback):
    """Counts DSPy `Evaluate` runs (one per MIPROv2 trial) and reports them as iterations."""

    def __init__(self, total: int | None, on_iteration: Callable[[IterationEvent], None] | None):
        self.total = total
        self.on_iteration = on_iteration
        self.count = 0
        self.best: float | None = None
        self._lock = threading.Lock()

    def on_evaluate_end(
        self, call_id: str, outputs: Any | None, exception: Exception | None = None
    ) -> None:
        score = getattr(outputs, "score", None)
        value = float(score) / 100.0 if isinstance(score, int | float) else None
        with self._lock:
            self.count += 1
            if value is not None and (self.best is None or value > self.best):
                self.best = value
            event = IterationEvent(self.count, self.total, value, self.best)
        if self.on_iteration is not None:
            self.on_iteration(event)
