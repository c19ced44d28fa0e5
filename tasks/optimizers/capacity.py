"""`capacity`: a capacity-test workload behind the optimizer interface, NOT a real optimizer.

It exists so batch and concurrency tests can run thousands of cycles with a known, small
LM-call count. It scores two candidates on the valset: the program as given and the same
program with `k` labeled train demos attached (no bootstrapping, no proposals), and keeps
the better one. LM calls: exactly ``2 * len(valset)``, so a cycle with
``max_test=T, max_val=V`` makes ``2 T + 2 V`` calls (baseline, two candidates, final test).
"""

from __future__ import annotations

import dspy

from tasks.optimizers.base import CompileRequest, IterationEvent, OptimizeResult

DEMOS = 4


class CapacityOptimizer:
    name = "capacity"

    def total_iterations(self, request: CompileRequest) -> int | None:
        return 2

    def compile(self, request: CompileRequest) -> OptimizeResult:
        plain = request.program.deepcopy()
        with_demos = request.program.deepcopy()
        demos = list(request.trainset[:DEMOS])
        for predictor in with_demos.predictors():
            predictor.demos = list(demos)
        best: tuple[float, dspy.Module] | None = None
        for iteration, candidate in enumerate((plain, with_demos), start=1):
            score = _score(candidate, request)
            if best is None or score > best[0]:
                best = (score, candidate)
            if request.on_iteration is not None:
                request.on_iteration(IterationEvent(iteration, 2, score, best[0]))
            if request.should_stop is not None and request.should_stop():
                break
        assert best is not None
        return OptimizeResult(program=best[1], val_score=best[0], iterations=iteration)


def _score(program: dspy.Module, request: CompileRequest) -> float:
    """Mean metric over the valset, sequentially: one LM call per example."""
    if not request.valset:
        return 0.0
    total = 0.0
    for example in request.valset:
        try:
            prediction = program(**example.inputs())
            total += float(request.metric(example, prediction))
        except Exception as exc:
            # Permanent LM errors fail the cycle with their reason; others score 0 as in
            # dspy.Evaluate. Transient errors were already retried by the engine.
            if _is_lm_error(exc):
                raise
    return total / len(request.valset)


def _is_lm_error(exc: Exception) -> bool:
    from dspy.lm15 import LM15Error

    return isinstance(exc, LM15Error)
