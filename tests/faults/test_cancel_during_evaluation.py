"""A cancel that arrives during the baseline or the final test evaluation stops it.

Before: the guard covered only the optimizer, so a cancel during the baseline let the
whole cycle run on (the optimizer stopped at its first call, then the test split was
scored), and one during the final evaluation was ignored: the run ended `succeeded`
after every example was scored. Now the evaluation runs no further example; the run
ends `cancelled` with the reason, keeping the optimized program if there is one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.cycle.budget import CycleControl
from tests.faults._helpers import quiet, sim_spec

TEST_EXAMPLES = 40


def _cancel_during(step_name: str, control: CycleControl, after_calls: int) -> cycle.StepRunner:
    """Run the steps as they are; once `step_name` has made `after_calls` LM calls, cancel
    from another thread, as Ctrl-C, SIGTERM or a Prefect cancel do."""

    def run_step(name: str, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name == step_name:
            ctx = args[0]
            start = ctx.usage_fields()["lm_calls"]

            def watch() -> None:
                while ctx.usage_fields()["lm_calls"] < start + after_calls:
                    time.sleep(0.005)
                control.cancel("interrupted (Ctrl-C)")

            threading.Thread(target=watch, daemon=True).start()
        return step(*args, **kwargs)

    return run_step  # type: ignore[return-value]


def _spec() -> Any:
    return sim_spec(
        optimizer="genetic",
        max_test=TEST_EXAMPLES,
        sim_latency_ms=40,
        num_threads=2,
    )


def test_a_cancel_during_the_baseline_stops_it(repo: Repository) -> None:
    control = CycleControl()
    with quiet():
        summary = cycle.run_cycle(
            _spec(), repo, control=control, run_step=_cancel_during("baseline", control, 3)
        )
    run = repo.get_run(summary.run_id)
    assert run.state == "cancelled", (run.state, run.error)
    assert run.error.startswith("interrupted (Ctrl-C) during the baseline evaluation"), run.error
    assert run.lm_calls < TEST_EXAMPLES // 2, "the rest of the baseline was not run"
    assert run.program_state is None and run.best_score is None and run.baseline_score is None


def test_a_cancel_during_the_final_evaluation_keeps_the_program_unscored(
    repo: Repository,
) -> None:
    control = CycleControl()
    seen: dict[str, int] = {}

    def run_step(name: str, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name == "evaluate":
            seen["before_final"] = args[0].usage_fields()["lm_calls"]
        return _cancel_during("evaluate", control, 3)(name, step, *args, **kwargs)

    with quiet():
        summary = cycle.run_cycle(_spec(), repo, control=control, run_step=run_step)
    assert summary.state == "cancelled"
    run = repo.get_run(summary.run_id)
    assert run.error.startswith("interrupted (Ctrl-C) during the final evaluation"), run.error
    assert run.program_state, "the optimized program is kept"
    assert run.val_score is not None and run.baseline_score is not None
    assert run.best_score is None, "a partial test score is not recorded"
    assert run.lm_calls - seen["before_final"] < TEST_EXAMPLES // 2


def test_a_cancel_during_the_optimizer_still_scores_the_best_program(
    repo: Repository,
) -> None:
    """The cancel that stopped the optimizer is answered: the final evaluation runs."""
    control = CycleControl()
    with quiet():
        summary = cycle.run_cycle(
            _spec(), repo, control=control, run_step=_cancel_during("optimize", control, 5)
        )
    run = repo.get_run(summary.run_id)
    assert run.state == "cancelled" and run.program_state
    assert run.best_score is not None, "the best program was scored on the test split"


@pytest.mark.usefixtures("prefect_harness")
def test_the_flow_ends_cancelled_not_failed(use_database: str) -> None:
    """Through the Prefect flow (steps as task runs): the flow run ends Cancelled."""
    from prefect.states import State

    from flows.optimization import optimization_cycle
    from tasks.cycle.budget import cancel_run

    run_id = "cancelfinaleval01"

    def cancel_soon() -> None:
        r = Repository()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                run = r.get_run(run_id)
            except Exception:  # noqa: BLE001 - the row does not exist yet
                time.sleep(0.01)
                continue
            if run.state == "running":  # claimed: the baseline comes next
                cancel_run(run_id, "terminated (SIGTERM)")
                return
            time.sleep(0.01)

    threading.Thread(target=cancel_soon, daemon=True).start()
    with quiet():
        state = optimization_cycle(_spec(), run_id=run_id, return_state=True)
    assert isinstance(state, State) and state.is_cancelled(), state
    run = Repository().get_run(run_id)
    assert run.state == "cancelled" and "during the baseline evaluation" in run.error
