"""Budgets hold across Prefect retries of the `optimize` task. Before: the first attempt
disarmed the guard on its way out and nothing re-armed it, so a retry ran with no budget
(a 4 s time budget took 28 s and ended `succeeded`)."""

from __future__ import annotations

import time
from typing import Any

import pytest

from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.optimizers import CompileRequest, OptimizeResult
from tests.faults._helpers import quiet, sim_spec


class _FailsFirstAttempt:
    """The real optimizer, except that its first compile dies of a transient LM error
    after `fail_after_s` (what Prefect's retry condition retries)."""

    def __init__(self, real: Any, fail_after_s: float) -> None:
        self.real, self.fail_after_s, self.attempts = real, fail_after_s, 0
        self.name = real.name

    def total_iterations(self, request: CompileRequest) -> int | None:
        return self.real.total_iterations(request)

    def compile(self, request: CompileRequest) -> OptimizeResult:
        self.attempts += 1
        if self.attempts == 1:
            from dspy.utils.exceptions import LMRateLimitError

            time.sleep(self.fail_after_s)
            raise LMRateLimitError("simulated rate limit (HTTP 429)")
        return self.real.compile(request)


def _patch_optimizer(monkeypatch: pytest.MonkeyPatch, fail_after_s: float) -> _FailsFirstAttempt:
    """Every attempt calls `get_optimizer`: all of them get the one wrapper."""
    real_get = cycle.get_optimizer
    wrapper: dict[str, _FailsFirstAttempt] = {}

    def get(name: str) -> _FailsFirstAttempt:
        if name not in wrapper:
            wrapper[name] = _FailsFirstAttempt(real_get(name), fail_after_s)
        return wrapper[name]

    monkeypatch.setattr(cycle, "get_optimizer", get)
    return get("genetic")


def test_a_second_optimizer_attempt_is_guarded(repo: Repository) -> None:
    spec = sim_spec(optimizer="genetic", time_budget_s=30)
    with quiet():
        ctx = cycle.prepare_cycle(spec, repo)
        cycle.run_baseline(ctx)
        first = cycle.run_optimizer(ctx)
    assert not first.stopped_early and not ctx.guard.armed
    ctx.guard.time_budget_s = 0.001  # the budget is spent by the time the retry starts
    with quiet():
        retry = cycle.run_optimizer(ctx)
    assert retry.stopped_early and retry.stop_reason == "time"
    cycle.record_success(ctx, 0.0, retry, None)


def test_prefect_retry_of_optimize_keeps_the_time_budget(
    prefect_harness: None, use_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.optimization import optimization_cycle

    budget_s = 4.0
    # The first attempt fails early, inside the budget; the retry (after Prefect's ~2 s
    # delay) would need ~5 s more for the whole optimizer: only the guard can stop it.
    optimizer = _patch_optimizer(monkeypatch, fail_after_s=0.2)
    spec = sim_spec(
        optimizer="genetic", time_budget_s=budget_s, max_val=12, sim_latency_ms=25,
        sim_latency_sigma=0,
    )  # fmt: skip
    started = time.monotonic()
    with quiet():
        optimization_cycle(spec, run_id="retrykeepsbudget01")
    took = time.monotonic() - started
    assert optimizer.attempts == 2, "Prefect retried the optimize task"
    run = Repository().get_run("retrykeepsbudget01")
    assert run.state == "timed_out", (run.state, run.error)
    assert "time budget of 4 s" in run.error
    assert run.program_state
    assert took < budget_s + 10, took  # + Prefect's start and the final evaluation
