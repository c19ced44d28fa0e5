"""Controlling running cycles for real: Prefect cancellation, crash recovery by stale
heartbeat and re-queue, GEPA resuming from its log directory, USD budgets, and the CLI."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time

import pytest
from typer.testing import CliRunner

import tasks.cycle.timer as cycle_timer
from flows.cli import app
from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.cycle.budget import release_control
from tasks.cycle.recovery import recover_stale_runs
from tasks.cycle.spec import CycleSpec, LMSpec

runner = CliRunner()


def _quiet():  # type: ignore[no-untyped-def]
    return contextlib.redirect_stdout(io.StringIO())


def _sim(**fields) -> CycleSpec:  # type: ignore[no-untyped-def]
    lm = {k: fields.pop(k) for k in list(fields) if k.startswith("sim_") or k.startswith("price")}
    return CycleSpec(
        lm=LMSpec(model="sim", **lm), **{"max_train": 6, "max_val": 10, "max_test": 6, **fields}
    )


def _wait_for(predicate, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def test_prefect_cancellation_ends_the_run_cancelled_with_its_best_program(
    prefect_harness, use_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    from flows.optimization import optimization_cycle

    monkeypatch.setattr(cycle_timer, "HEARTBEAT_INTERVAL_S", 0.2)  # the cancel poll
    monkeypatch.setattr(cycle_timer, "SAMPLE_INTERVAL_S", 0.05)
    repo = Repository()
    run_id = "prefectcancel" + str(time.time_ns())[-12:]
    # 40 ms a call, 12 validation examples: ~0.5 s a trial, so the remaining trials
    # outlast the 0.2 s cancel poll even on a fast, idle machine (at 10 ms CI finished first).
    spec = _sim(sim_latency_ms=40, sim_latency_sigma=0, max_val=12)
    holder: dict = {}

    def run() -> None:
        with _quiet():
            holder["state"] = optimization_cycle(spec, run_id=run_id, return_state=True)

    worker = threading.Thread(target=run)
    worker.start()
    _wait_for(
        lambda: (
            repo.run_exists(run_id)
            and (sample := repo.latest_progress_sample(run_id)) is not None
            and sample.iteration >= 2
        )
    )
    flow_run_id = repo.get_run(run_id).flow_run_id
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
    worker.join(timeout=60)
    run = repo.get_run(run_id, with_details=True)
    assert run.state == "cancelled" and run.error == "flow run cancelled in Prefect"
    assert run.program_state and run.best_score is not None and run.iterations < 11
    assert "cancelled" in [a.kind for a in run.alerts]
    assert holder["state"].is_cancelled()
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(flow_run_id).state.type.value == "CANCELLED"


def test_a_crashed_run_goes_stale_is_requeued_and_runs_again(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cycle_timer, "HEARTBEAT_INTERVAL_S", 0.1)
    spec = _sim(optimizer="genetic")
    with _quiet():
        ctx = cycle.prepare_cycle(spec, repo)
        cycle.run_baseline(ctx)
    # Heartbeats flow while the worker lives...
    first = repo.get_run(ctx.run_id).heartbeat_at
    _wait_for(lambda: repo.get_run(ctx.run_id).heartbeat_at != first, timeout=5)
    assert recover_stale_runs(repo, stale_after_s=1.0).marked_stale == []
    # ...and stop when it dies (its monitor thread with it, nothing recorded).
    ctx.monitor._stop.set()
    ctx.monitor._thread.join()
    time.sleep(2.1)  # SQLite's clock has whole seconds: > 1 s old for sure
    report = recover_stale_runs(repo, stale_after_s=1.0, requeue=True)
    assert report.marked_stale == [ctx.run_id] and report.requeued == [ctx.run_id]
    requeued = repo.get_run(ctx.run_id)
    assert requeued.state == "queued" and requeued.attempt == 2
    with _quiet():
        summary = cycle.run_cycle(spec, repo, run_id=ctx.run_id)
    assert summary.state == "succeeded"
    assert repo.get_run(ctx.run_id).attempt == 2


def test_requeued_gepa_run_resumes_from_its_log_dir(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GEPA saves its state every iteration under $DSPYFLOW_HOME/gepa/<run_id>; a re-run
    of the same run continues from it instead of starting over."""
    from storage.db import get_engine

    monkeypatch.setattr(cycle_timer, "SAMPLE_INTERVAL_S", 0.01)  # a sample per iteration

    repo = Repository(get_engine(sqlite_url))
    spec = _sim(optimizer="gepa", max_train=8, max_val=8)
    with _quiet():
        ctx = cycle.prepare_cycle(spec, repo)
        cycle.run_baseline(ctx)
        # Crash after a few iterations: the stop ends compile, nothing gets recorded.
        seen = []
        on_iteration = ctx.monitor.on_iteration

        def crash_after_three(event) -> None:  # type: ignore[no-untyped-def]
            on_iteration(event)
            seen.append(event.iteration)
            if len(seen) == 3:
                ctx.guard.control.cancel("simulated crash")

        ctx.monitor.on_iteration = crash_after_three  # type: ignore[method-assign]
        cycle.run_optimizer(ctx)
        ctx.monitor._stop.set()
    release_control(ctx.run_id)  # the crashed process's in-memory cancel handle is gone
    log_dir = cycle.gepa_log_dir(ctx.run_id)
    assert (log_dir / "gepa_state.bin").exists()
    first_calls = ctx.lm.usage.calls
    time.sleep(1.1)  # SQLite's clock has whole seconds
    assert recover_stale_runs(repo, stale_after_s=0.5, requeue=True).requeued == [ctx.run_id]
    with _quiet():
        summary = cycle.run_cycle(spec.model_copy(), repo, run_id=ctx.run_id)
    assert summary.state == "succeeded"
    run = repo.get_run(ctx.run_id, with_details=True)
    iterations = [s.iteration for s in run.samples if s.iteration > 0]
    # Attempt 1 reported iterations 1-3; GEPA numbers on from its saved state, so the
    # re-run's samples continue the sequence instead of starting again at 1.
    assert iterations == sorted(iterations) and iterations[-1] > 3
    assert first_calls > 0


def test_cost_budget_stops_a_priced_cycle(sqlite_url: str) -> None:
    from storage.db import get_engine

    repo = Repository(get_engine(sqlite_url))
    spec = _sim(price_per_1k_input_usd=1.0, price_per_1k_output_usd=2.0, cost_budget_usd=10.0)
    with _quiet():
        summary = cycle.run_cycle(spec, repo)
    assert summary.state == "budget_exhausted" and "cost budget of $10" in summary.error
    assert summary.cost_usd is not None and summary.cost_usd >= 10.0
    run = repo.get_run(summary.run_id, with_details=True)
    kinds = [a.kind for a in run.alerts]
    assert kinds.index("cost_budget_warning") < kinds.index("cost_budget_exceeded")


# --- the CLI ------------------------------------------------------------------------------


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--time-budget", "0"], "time_budget_s"),
        (["--budget", "huge"], "'huge' is not one of 'light'"),
        (["--optimizer", "annealing"], "unknown optimizer 'annealing'"),
        (["--lm-call-budget", "-3"], "lm_call_budget"),
        (["--lm", "local", "--time-budget", "1", "--max-val", "40"], "at least 6 s"),
        (["--lm", "sim", "--cost-budget", "1"], "needs a price"),
    ],
)
def test_optimize_refuses_bad_budgets_before_anything_runs(
    use_database: str, args: list[str], message: str
) -> None:
    result = invoke("optimize", *args)
    assert result.exit_code == 2
    assert message in " ".join(result.stderr.split())
    assert Repository().list_runs() == []


def test_optimize_genetic_with_a_time_budget_then_show(prefect_harness, use_database) -> None:
    result = invoke(
        "optimize",
        "--optimizer",
        "genetic",
        "--lm",
        "sim",
        "--time-budget",
        "60",
        "--max-train",
        "8",
        "--max-val",
        "8",
        "--max-test",
        "8",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "succeeded" and summary["optimizer"] == "genetic"
    assert summary["iterations"] == 4
    shown = invoke("runs", "show", summary["run_id"], "--format", "json")
    detail = json.loads(shown.stdout)
    assert detail["progress_samples"] and detail["progress_samples"][-1]["iteration"] == 4
    assert detail["spec"]["time_budget_s"] == 60
    table = invoke("runs", "show", summary["run_id"][:8])
    assert "progress" in table.stdout and "instructions" in table.stdout


def test_runs_recover_cli(use_database: str) -> None:
    repo = Repository()
    run_id = repo.create_run(task="intent", optimizer="gepa", budget="light", lm="sim", spec={})
    assert repo.start_run(run_id)
    time.sleep(1.1)
    result = invoke("runs", "recover", "--stale-after", "1", "--requeue", "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["marked_stale"] == [run_id] and report["requeued"] == [run_id]
    assert repo.get_run(run_id).state == "queued"
    again = invoke("runs", "recover", "--stale-after", "1")
    assert "0 run(s) marked stale" in again.stdout
    assert invoke("runs", "recover", "--stale-after", "0").exit_code == 2
