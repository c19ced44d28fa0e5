"""Scoring a program on examples with the cycle's LM (the baseline and the final test
evaluation): the metric's mean in [0, 1], stoppable by a cancel between examples, and
failures named (DSPy's own message says only that execution was cancelled)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dspy

if TYPE_CHECKING:  # the steps' shared context; steps imports this module
    from tasks.cycle.steps import CycleContext


class EvaluationCancelled(Exception):  # noqa: N818 - an outcome, like CycleStopped
    """A cancel (Ctrl-C, SIGTERM, Prefect, `runs cancel`) that arrived during the baseline
    or the final test evaluation: the evaluation stops at its next example and the run
    ends `cancelled` (with the optimized program, if there is one)."""


def evaluate_program(
    ctx: CycleContext,
    program: dspy.Module,
    examples: list[dspy.Example],
    *,
    cancellable: str | None = None,
) -> float:
    """Mean metric over ``examples`` in [0, 1], on the cycle's LM. With `cancellable` (the
    evaluation's name), a cancel request stops it: no further example is run, and
    `EvaluationCancelled` says so."""
    if not examples:
        raise ValueError(f"task {ctx.task.name!r} has no examples to evaluate on")
    errors: list[Exception] = []
    control = ctx.guard.control
    skipped: dict[int, dspy.Prediction] = {}  # examples not run after the cancel, by id

    def run(**inputs: Any) -> Any:
        if cancellable and control.cancelled:
            placeholder = dspy.Prediction()  # scored 0 by `metric`; the score is dropped
            skipped[id(placeholder)] = placeholder
            return placeholder
        try:
            return program(**inputs)
        except Exception as exc:
            errors.append(exc)
            raise

    def metric(*args: Any, **kwargs: Any) -> Any:
        if len(args) > 1 and id(args[1]) in skipped:
            return 0.0
        try:
            return ctx.task.metric(*args, **kwargs)
        except Exception as exc:  # a failing metric, too, is named instead of "cancelled"
            errors.append(exc)
            raise

    with ctx.lm.context():
        evaluator = dspy.Evaluate(
            devset=examples,
            metric=metric,
            num_threads=ctx.spec.num_threads,
            display_progress=False,
            provide_traceback=False,
            max_errors=len(examples),
        )
        try:
            result = evaluator(run)
        except Exception as exc:
            # DSPy says only "Execution cancelled due to errors"; the run should say why.
            if errors:
                raise errors[0] from exc
            raise
    if skipped:
        raise EvaluationCancelled(
            f"{control.reason or 'cancelled'} during the {cancellable} "
            f"({len(skipped)} of {len(examples)} examples not run)"
        )
    return float(result.score) / 100.0
