"""GEPA behind the optimizer interface.

- Reflection LM: `request.reflection_lm` (CycleSpec.reflection_lm), else the task LM.
- Metric: GEPA calls it with five arguments; user metrics with two or three are wrapped.
- Progress: GEPA callbacks (`on_iteration_end`, `on_budget_updated`, `on_valset_evaluated`)
  become `IterationEvent`s; progress is metric calls used / the preset's metric-call budget.
- Stop: a GEPA stop callback polls `request.should_stop()` between iterations, and the
  cycle's guard raises `CycleStopped` inside an iteration; then the best candidate of the
  live GEPA state (highest average on the validation examples it was scored on) is built
  into a program and returned.
- Resume: `request.log_dir` is GEPA's run dir; GEPA saves its state there every iteration
  and a compile with the same dir continues where the last one stopped.
"""

from __future__ import annotations

import threading
from typing import Any

import dspy

from tasks.optimizers.base import (
    CompileRequest,
    CycleStopped,
    IterationEvent,
    OptimizeResult,
    check_preset,
    five_arg_metric,
)

_CANDIDATES = {"light": 6, "medium": 12, "heavy": 18}  # dspy's AUTO_RUN_SETTINGS


class _Progress:
    """GEPA callback: progress events and the live state, for a stop without a result."""

    def __init__(self, request: CompileRequest, max_metric_calls: int) -> None:
        self.request = request
        self.max_metric_calls = max_metric_calls
        self.metric_calls = 0
        self.iterations = 0
        self.best: float | None = None
        self.state: Any = None
        self._lock = threading.Lock()

    def on_iteration_start(self, event: dict[str, Any]) -> None:
        self.state = event.get("state")

    def on_budget_updated(self, event: dict[str, Any]) -> None:
        self.metric_calls = int(event.get("metric_calls_used") or 0)

    def on_valset_evaluated(self, event: dict[str, Any]) -> None:
        score = event.get("average_score")
        if isinstance(score, int | float) and (self.best is None or score > self.best):
            self.best = float(score)

    def on_iteration_end(self, event: dict[str, Any]) -> None:
        self.state = event.get("state", self.state)
        with self._lock:
            self.iterations = int(event.get("iteration") or self.iterations + 1)
        if self.request.on_iteration is not None:
            progress = min(1.0, self.metric_calls / self.max_metric_calls)
            self.request.on_iteration(
                IterationEvent(self.iterations, None, None, self.best, progress=progress)
            )

    def best_candidate(self) -> tuple[dict[str, str], float] | None:
        state = self.state
        if state is None or not getattr(state, "program_candidates", None):
            return None
        best_idx, best_score = 0, float("-inf")
        for idx in range(len(state.program_candidates)):
            score, coverage = state.get_program_average_val_subset(idx)
            if coverage and score > best_score:
                best_idx, best_score = idx, score
        return dict(state.program_candidates[best_idx]), best_score


def build_candidate(student: dspy.Module, candidate: dict[str, str]) -> dspy.Module:
    """The student with a GEPA candidate's instructions (what DspyAdapter.build_program does)."""
    program = student.deepcopy()
    for name, predictor in program.named_predictors():
        if name in candidate:
            predictor.signature = predictor.signature.with_instructions(candidate[name])
    return program


class GepaOptimizer:
    name = "gepa"

    def max_metric_calls(self, request: CompileRequest) -> int:
        """The preset's metric-call budget, as `dspy.GEPA(auto=...)` computes it."""
        return dspy.GEPA.auto_budget(
            None,  # self: auto_budget does not use it
            num_preds=max(1, len(request.program.predictors())),
            num_candidates=_CANDIDATES[request.budget],
            valset_size=len(request.valset) or len(request.trainset),
        )

    def total_iterations(self, request: CompileRequest) -> int | None:
        # GEPA's iteration count depends on acceptances; progress comes from metric calls.
        return None

    def compile(self, request: CompileRequest) -> OptimizeResult:
        check_preset(self.name, request.budget)
        options: dict[str, Any] = {"reflection_minibatch_size": 3, "track_stats": True}
        options.update(request.options)
        # An explicit metric-call budget replaces the preset's (small workloads, tests).
        budget = int(options.pop("max_metric_calls", None) or self.max_metric_calls(request))
        progress = _Progress(request, budget)
        reflection_lm = request.reflection_lm or dspy.settings.lm
        if reflection_lm is None:
            raise ValueError("GEPA needs an LM: run it inside the cycle's dspy.context")
        if request.log_dir is not None:
            request.log_dir.mkdir(parents=True, exist_ok=True)
        gepa = dspy.GEPA(
            metric=five_arg_metric(request.metric),
            max_metric_calls=budget,
            reflection_lm=reflection_lm,
            num_threads=request.num_threads,
            log_dir=str(request.log_dir) if request.log_dir is not None else None,
            seed=request.seed,
            gepa_kwargs={
                "callbacks": [progress],
                "stop_callbacks": [lambda state: request.stop_requested()],
            },
            **options,
        )
        student = request.program.deepcopy()
        try:
            program = gepa.compile(student, trainset=request.trainset, valset=request.valset)
        except CycleStopped as stop:
            found = progress.best_candidate()
            return OptimizeResult(
                program=build_candidate(student, found[0]) if found else student,
                val_score=found[1] if found else None,
                iterations=progress.iterations,
                stopped_early=True,
                stop_reason=stop.reason,
                details={"stopped": stop.message, "metric_calls": progress.metric_calls},
            )
        results = getattr(program, "detailed_results", None)
        val_score = progress.best
        details: dict[str, Any] = {"metric_calls": progress.metric_calls, "budget": budget}
        if results is not None:
            val_score = float(results.val_aggregate_scores[results.best_idx])
            details["candidates"] = len(results.candidates)
            del program.detailed_results  # not JSON: keep dump_state() clean
        stopped = request.stop_requested()
        return OptimizeResult(
            program=program,
            val_score=val_score,
            iterations=progress.iterations,
            stopped_early=stopped,
            details=details,
        )
