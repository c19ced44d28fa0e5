"""MIPROv2 behind the optimizer interface.

MIPROv2 has no stop hook and returns nothing when interrupted, so: the cycle's guard raises
`CycleStopped` from the next LM call or evaluation once a budget is reached (bootstrapping
and instruction proposal included), and `EvaluationCounter` keeps a copy of the best
program evaluated on the full valset, which is what a stopped compile returns.
"""

from __future__ import annotations

import math
from typing import Any

import dspy

from tasks.optimizers.base import (
    CompileRequest,
    CycleStopped,
    EvaluationCounter,
    OptimizeResult,
    check_preset,
)

# Options that go to MIPROv2.compile rather than its constructor.
_COMPILE_OPTIONS = frozenset(
    {
        "data_aware_proposer",
        "program_aware_proposer",
        "tip_aware_proposer",
        "fewshot_aware_proposer",
        "view_data_batch_size",
        "minibatch_size",
        "minibatch_full_eval_steps",
    }
)

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
        check_preset(self.name, request.budget)
        # MIPROv2 imports optuna only at step 3: fail (or pay the ~0.3 s import) before
        # bootstrapping spends LM calls and time budget, not in the middle.
        import optuna  # noqa: F401

        counter = EvaluationCounter(self.total_iterations(request), request.on_iteration)
        callbacks: list[Any] = [*dspy.settings.callbacks, counter]
        with dspy.context(callbacks=callbacks):
            options: dict[str, Any] = {"metric_threshold": request.metric_threshold}
            options.update(request.options)
            compile_options = {k: options.pop(k) for k in list(options) if k in _COMPILE_OPTIONS}
            # MIPROv2 reads dspy.settings.lm in __init__: build it inside the cycle context.
            optimizer = dspy.MIPROv2(
                metric=request.metric,
                auto=request.budget,
                prompt_model=request.reflection_lm,
                num_threads=request.num_threads,
                seed=request.seed,
                verbose=False,
                track_stats=True,
                **options,
            )
            try:
                program = optimizer.compile(
                    request.program.deepcopy(),
                    trainset=request.trainset,
                    valset=request.valset,
                    minibatch=len(request.valset) > 50,
                    **compile_options,
                )
            except CycleStopped as stop:
                return OptimizeResult(
                    program=counter.best_program or request.program.deepcopy(),
                    val_score=counter.best,
                    iterations=counter.count,
                    stopped_early=True,
                    stop_reason=stop.reason,
                    details={"stopped": stop.message},
                )
        score = getattr(program, "score", None)
        return OptimizeResult(
            program=program,
            val_score=float(score) / 100.0 if isinstance(score, int | float) else counter.best,
            iterations=counter.count,
            details={"trials": len(getattr(program, "trial_logs", {}) or {})},
        )
