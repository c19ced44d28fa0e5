"""MIPROv2 behind the optimizer interface."""

from __future__ import annotations

import math
from typing import Any

import dspy

from tasks.optimizers.base import CompileRequest, EvaluationCounter, OptimizeResult

# MIPROv2's `auto` presets: candidates per preset (dspy 3.4).
_CANDIDATES = {"light": 6, "medium": 12, "heavy": 18}


class MiproOptimizer:
    name = "mipro"

    def total_iterations(self, request: CompileRequest) -> int | None:
        # MIPROv2: trials = max(2 * V * log2(n), 1.5 n), V = predictors (x2 with demos);
        # one Evaluate per trial plus the default program's evaluation.
        n = _CANDIDATES[request.budget]
        variables = 2 * max(1, len(request.program.predictors()))
        trials = max(int(2 * variables * math.log2(n)), int(1.5 * n))
        full_evals = 1 + (trials // 5 if len(request.valset) > 50 else 0)
        return trials + full_evals

    def compile(self, request: CompileRequest) -> OptimizeResult:
        counter = EvaluationCounter(self.total_iterations(request), request.on_iteration)
        callbacks: list[Any] = [*dspy.settings.callbacks, counter]
        with dspy.context(callbacks=callbacks):
            # MIPROv2 reads dspy.settings.lm in __init__: build it inside the cycle context.
            optimizer = dspy.MIPROv2(
                metric=request.metric,
                auto=request.budget,  # type: ignore[arg-type]
                num_threads=request.num_threads,
                seed=request.seed,
                verbose=False,
                track_stats=True,
                **request.options,
            )
            program = optimizer.compile(
                request.program.deepcopy(),
                trainset=request.trainset,
                valset=request.valset,
                minibatch=len(request.valset) > 50,
            )
        score = getattr(program, "score", None)
        return OptimizeResult(
            program=program,
            val_score=float(score) / 100.0 if isinstance(score, int | float) else counter.best,
            iterations=counter.count,
            details={"trials": len(getattr(program, "trial_logs", {}) or {})},
        )
