"""The LM goes down in the middle of the search, for good (retries cannot help): the run
ends `failed` with the reason and keeps the best program the optimizer had found.

Measured: all three optimizers absorb failed evaluations (DSPy scores an errored example
0), so the search ends with its best program and the final test evaluation is what
fails; the run keeps the program on that path (tasks.cycle.steps.run_cycle)."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.lm.sim import SimulatedEngine
from tests.faults._helpers import quiet, sim_spec

# Calls before the outage: past the baseline and the first iteration of each optimizer.
OUTAGE_AFTER = {"mipro": 160, "gepa": 60, "genetic": 120}


class LMServerDown(ConnectionError):
    """Not a 429/5xx: the cycle's retries and Prefect's retry condition let it through."""


def _outage_after(monkeypatch: pytest.MonkeyPatch, calls: int) -> None:
    real = SimulatedEngine.complete
    lock = threading.Lock()
    seen = {"n": 0}

    def complete(self: SimulatedEngine, request: Any) -> Any:
        with lock:
            seen["n"] += 1
            down = seen["n"] > calls
        if down:
            raise LMServerDown("connection refused: the LM server is gone")
        return real(self, request)

    monkeypatch.setattr(SimulatedEngine, "complete", complete)


@pytest.mark.parametrize("optimizer", ["mipro", "gepa", "genetic"])
def test_an_lm_outage_mid_search_keeps_the_best_program(
    repo: Repository, monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    _outage_after(monkeypatch, OUTAGE_AFTER[optimizer])
    spec = sim_spec(optimizer=optimizer, max_train=20, max_val=20)
    with quiet():
        summary = cycle.run_cycle(spec, repo)
    run = repo.get_run(summary.run_id)
    assert run.state == "failed", (run.state, run.error)
    assert "LMServerDown" in run.error or "LM server is gone" in run.error, run.error
    assert run.baseline_score is not None and run.iterations >= 1
    assert run.program_state, "the best program found before the outage is kept"
    assert run.best_score is None  # never scored on the test split: the LM was down
