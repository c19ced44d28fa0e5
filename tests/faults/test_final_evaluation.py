"""The final test evaluation fails (the LM went down after the optimizer finished): the
run ends `failed` with its reason and still keeps the optimized program and its
validation score. Before: `record_failure` wrote no program, the optimization was lost."""

from __future__ import annotations

from typing import Any

import pytest

from storage.repository import Repository
from tasks.cycle import steps as cycle
from tests.faults._helpers import quiet, sim_spec


def _fail_second_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline is the first test-split evaluation, the final one the second."""
    real = cycle.evaluate_program
    calls = {"n": 0}

    def flaky(ctx: Any, program: Any, examples: Any, **kwargs: Any) -> float:
        calls["n"] += 1
        if calls["n"] == 2:
            raise ConnectionError("LM server went away during the final evaluation")
        return real(ctx, program, examples, **kwargs)

    monkeypatch.setattr(cycle, "evaluate_program", flaky)


def _assert_program_kept(repo: Repository, run_id: str) -> None:
    run = repo.get_run(run_id)
    assert run.state == "failed"
    assert "ConnectionError" in run.error and "final evaluation" in run.error
    assert run.program_state, "the optimized program is kept"
    assert run.val_score is not None and run.baseline_score is not None
    assert run.best_score is None  # never measured on the test split
    assert run.iterations > 0 and run.lm_calls > 0


def test_execute_cycle_keeps_the_program_when_the_final_evaluation_fails(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fail_second_evaluation(monkeypatch)
    with quiet():
        summary = cycle.run_cycle(sim_spec(optimizer="genetic"), repo)
    assert summary.state == "failed"
    _assert_program_kept(repo, summary.run_id)


def test_the_flow_keeps_the_program_when_the_final_evaluation_fails(
    prefect_harness: None, use_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.optimization import optimization_cycle

    _fail_second_evaluation(monkeypatch)
    with quiet(), pytest.raises(ConnectionError):
        optimization_cycle(sim_spec(optimizer="genetic"), run_id="finalevalfails0001")
    _assert_program_kept(Repository(), "finalevalfails0001")
