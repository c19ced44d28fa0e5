"""The cycle's steps as Prefect task runs, for the single-run flow: the UI's task graph,
retries of `optimize` on transient LM errors, and a Prefect timeout past the time budget.
The step functions are tasks.cycle.steps' own; `run_cycle` calls them through this."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import task
from prefect.cache_policies import NONE
from prefect.tasks import exponential_backoff

from tasks.cycle.spec import CycleSpec
from tasks.cycle.steps import (
    CycleStep,
    StepRunner,
    evaluate_final,
    prepare_cycle,
    record_success,
    run_baseline,
    run_optimizer,
)


def _transient_lm_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry `optimize` only when a transient LM error (429/5xx/timeout) escaped."""
    from tasks.lm.managed import is_transient_lm_error

    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classification of whatever the task raised
        # Also the raw lm15 429/5xx an engine raises, which DSPy's own check misses.
        return is_transient_lm_error(exc)
    return False


_TASK_OPTIONS: dict[str, Any] = {"cache_policy": NONE, "persist_result": False}

_PREFECT_STEPS: dict[str, Any] = {
    "prepare": task(name="prepare", **_TASK_OPTIONS)(prepare_cycle),
    "baseline": task(name="baseline", **_TASK_OPTIONS)(run_baseline),
    # The budget is enforced inside the optimizer (and re-armed on each retry).
    "optimize": task(
        name="optimize",
        retries=2,
        retry_delay_seconds=exponential_backoff(backoff_factor=2),
        retry_jitter_factor=0.5,
        retry_condition_fn=_transient_lm_error,
        **_TASK_OPTIONS,
    )(run_optimizer),
    "evaluate": task(name="evaluate", **_TASK_OPTIONS)(evaluate_final),
    "record": task(name="record", **_TASK_OPTIONS)(record_success),
}


def prefect_steps(spec: CycleSpec) -> StepRunner:
    """Each step as a Prefect task run (retries and the UI's task graph); `optimize` gets
    a Prefect timeout past the time budget, an outer guard should the inner one fail."""
    tasks = {
        **_PREFECT_STEPS,
        "optimize": _PREFECT_STEPS["optimize"].with_options(
            timeout_seconds=spec.time_budget_s * 1.25 + 60
        ),
    }

    def run_step(name: CycleStep, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return tasks[name](*args, **kwargs)

    return run_step
