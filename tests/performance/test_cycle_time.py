"""Optimization cycle time: the seed report's scenarios, on real components.

Real DSPy optimizers (MIPROv2, GEPA, the genetic optimizer), the `sim` LM (its latency is
what the time-budget scenarios control), real databases (SQLite and Postgres where the
database matters), a real Prefect flow for the flow-level progress test. Seed floor:
small workloads in < 1 s of optimizer time, 7200 s default target, warning at 80 %.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dspy
import pytest

import tasks.cycle.timer as cycle_timer
from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.cycle.budget import cancel_run
from tasks.cycle.spec import CycleSpec, LMSpec
from tasks.lm.providers import build_lm
from tasks.optimizers import CompileRequest, get_optimizer
from tasks.programs import get_task

pytestmark = pytest.mark.performance

# Small workloads: about 50-90 sim LM calls each (MIPROv2 light on 5/5 examples, GEPA with
# a 40-metric-call budget, a 4 x 3 genetic search on minibatches of 5).
SMALL_WORKLOAD = {
    "mipro": {},
    "gepa": {"max_metric_calls": 40},
    "genetic": {"population_size": 4, "generations": 3, "minibatch_size": 5},
}


SMALL_SPLIT = {"max_train": 6, "max_val": 6, "max_test": 6}


@pytest.fixture(autouse=True)
def fast_sampling(monkeypatch: pytest.MonkeyPatch) -> None:
    # Samples at most every 50 ms instead of 1 s: short cycles still leave a trail.
    monkeypatch.setattr(cycle_timer, "SAMPLE_INTERVAL_S", 0.05)


@pytest.fixture(autouse=True)
def quiet_libraries() -> Iterator[None]:
    """DSPy's INFO chatter as the CLI runtime sets it (WARNING): pytest would otherwise
    capture and format every trial's log lines inside the timed code."""
    loggers = [logging.getLogger(name) for name in ("dspy", "optuna", "gepa")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


def _spec(**fields) -> CycleSpec:  # type: ignore[no-untyped-def]
    lm_fields = {k: fields.pop(k) for k in list(fields) if k.startswith("sim_")}
    split = {"max_train": 10, "max_val": 10, "max_test": 10}
    return CycleSpec(lm=LMSpec(model="sim", **lm_fields), **{**split, **fields})


def _quiet():  # type: ignore[no-untyped-def]
    # DSPy/GEPA progress bars write to stdout; keep test output readable.
    return contextlib.redirect_stdout(io.StringIO())


@pytest.mark.parametrize("name", ["mipro", "gepa", "genetic"])
def test_algorithm_cycle_time_small_workload(name: str) -> None:
    """MIPROv2 / GEPA / genetic: the compile of a small workload takes < 1 s (sim LM at
    zero latency; best of two warm runs, as timeit does, on a busy shared machine)."""
    task = get_task("intent")
    splits = task.load_splits()
    timings = []
    for _ in range(3):  # the first run pays one-time imports (optuna, GEPA): not timed
        cycle_lm = build_lm(LMSpec(model="sim"), task)
        request = CompileRequest(
            program=task.build_program(),
            trainset=splits.train[:5],
            valset=splits.val[:5],
            metric=task.metric,
            options=dict(SMALL_WORKLOAD[name]),
        )
        with cycle_lm.context(), _quiet():
            started = time.perf_counter()
            result = get_optimizer(name).compile(request)
            timings.append(time.perf_counter() - started)
    assert result.iterations >= 1 and result.val_score is not None
    assert 20 <= cycle_lm.usage.calls <= 120
    assert min(timings[1:]) < 1.0, f"{name}: {timings}"


def test_progress_tracking(repo: Repository) -> None:
    """Samples, heartbeats and the run row follow the optimizer, on SQLite and Postgres."""
    with _quiet():
        summary = cycle.run_cycle(_spec(sim_latency_ms=2), repo)
    run = repo.get_run(summary.run_id, with_details=True)
    assert run.state == "succeeded" and run.heartbeat_at is not None
    samples = run.samples
    assert len(samples) >= 3
    iterations = [s.iteration for s in samples]
    assert iterations == sorted(iterations) and iterations[-1] == run.iterations == 11
    assert all(s.total_iterations == 11 for s in samples) and run.total_iterations == 11
    assert [s.elapsed_s for s in samples] == sorted(s.elapsed_s for s in samples)
    assert [s.lm_calls for s in samples] == sorted(s.lm_calls for s in samples)
    best = [s.best_score for s in samples if s.best_score is not None]
    assert best == sorted(best) and best[-1] > 0
    assert all(s.throughput and s.throughput > 0 for s in samples if s.iteration > 0)
    assert samples[-1].eta_s == pytest.approx(0, abs=1e-6)
    assert run.lm_calls > 100 and run.input_tokens > run.output_tokens > 0


def test_progress_tracking_in_a_flow(
    prefect_harness, sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a Prefect flow the cycle also keeps a live progress artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.optimization import optimization_cycle
    from storage.db import get_engine

    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", sqlite_url)  # the flow's Repository()
    with _quiet():
        summary = optimization_cycle(_spec(optimizer="genetic"))
    assert summary.state == "succeeded"
    key = f"dspyflow-run-{summary.run_id}"
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert artifacts and artifacts[0].type == "progress"
    assert artifacts[0].data == pytest.approx(100.0)
    # The Prefect UI shows the cycle's one sequence, one task run per step.
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    flow_run_id = Repository(get_engine(sqlite_url)).get_run(summary.run_id).flow_run_id
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    assert sorted(t.name.split("-")[0] for t in task_runs) == sorted(
        ["prepare", "baseline", "optimize", "evaluate", "record"]
    )
    assert all(t.state.is_completed() for t in task_runs)
    assert str(artifacts[0].flow_run_id) == Repository().get_run(summary.run_id).flow_run_id


def test_multiple_concurrent_cycles(repo: Repository) -> None:
    """Cycles in threads run in parallel, each with its own LM, usage and run row."""
    specs = [
        _spec(optimizer=name, sim_latency_ms=8, sim_latency_sigma=0, **SMALL_SPLIT)
        for name in ("mipro", "genetic", "mipro")
    ]
    started = time.perf_counter()
    with _quiet(), ThreadPoolExecutor(max_workers=3) as pool:
        summaries = list(pool.map(lambda s: cycle.run_cycle(s, repo), specs))
    wall = time.perf_counter() - started
    assert [s.state for s in summaries] == ["succeeded"] * 3
    assert len({s.run_id for s in summaries}) == 3
    own = sum(s.duration_s or 0 for s in summaries)
    assert wall < 0.8 * own, f"not parallel: {wall:.2f} s wall for {own:.2f} s of cycles"
    # Two identical MIPROv2 cycles, deterministic sim: the same calls, counted apart.
    assert summaries[0].lm_calls == summaries[2].lm_calls > 0
    assert summaries[0].input_tokens == summaries[2].input_tokens


def test_cycle_statistics_and_throughput(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The throughput written with the optimizer's last sample is its pace of trials,
    measured from the first trial on (setup excluded), not iterations over compile time."""
    from storage.db import get_engine

    ended_at: list[float] = []  # when each trial was reported, by the test's own clock
    record = cycle_timer.CycleTimer.record

    def timed_record(self, event):  # type: ignore[no-untyped-def]
        ended_at.append(time.monotonic())
        record(self, event)

    monkeypatch.setattr(cycle_timer.CycleTimer, "record", timed_record)
    repo = Repository(get_engine(sqlite_url))
    spec = _spec(sim_latency_ms=3, sim_latency_sigma=0, **SMALL_SPLIT)
    steps = cycle.TimedSteps()
    with _quiet():
        summary = cycle.run_cycle(spec, repo, run_step=steps)
    run = repo.get_run(summary.run_id, with_details=True)
    assert run.state == "succeeded" and run.iterations == 11 == len(ended_at)
    trial_pace = (len(ended_at) - 1) / (ended_at[-1] - ended_at[0])
    last = max(run.samples, key=lambda sample: sample.elapsed_s)
    assert last.iteration == 11
    # The last sample is written right after the last trial: the pace within 15 %.
    assert last.throughput == pytest.approx(trial_pace, rel=0.15)
    assert last.throughput > 11 / steps.seconds["optimize"]  # setup is not in the pace
    assert run.lm_calls == summary.lm_calls > 0
    assert run.best_score == summary.best_score and run.baseline_score is not None


def test_time_remaining_estimation(sqlite_url: str) -> None:
    """ETA from the samples predicts when the optimizer really finished."""
    from storage.db import get_engine

    repo = Repository(get_engine(sqlite_url))
    spec = _spec(sim_latency_ms=8, sim_latency_sigma=0, max_train=6)
    with _quiet():
        summary = cycle.run_cycle(spec, repo)
    samples = repo.get_run(summary.run_id, with_details=True).samples
    done = next(s.elapsed_s for s in samples if s.iteration == s.total_iterations)
    middle = [s for s in samples if 3 <= s.iteration <= 8 and s.eta_s is not None]
    assert middle
    for sample in middle:
        actual = done - sample.elapsed_s
        assert abs(sample.eta_s - actual) <= 0.35 * actual + 0.2, (sample.iteration, actual)
        assert sample.eta_s < 7200 - sample.elapsed_s  # below the time remaining


def test_approaching_limit_detection(repo: Repository, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 80 % of a budget: one warning (log, database row, Prefect event); at 100 %:
    one exceeded alert and the guard trips."""
    from tasks.cycle.budget import CycleGuard, StopReason

    events: list[tuple[str, dict]] = []
    monkeypatch.setattr(
        cycle_timer.PrefectHooks,
        "emit",
        lambda self, event, payload: events.append((event, payload)),
    )
    run_id = repo.create_run(task="intent", optimizer="mipro", budget="light", lm="sim", spec={})
    lease = repo.start_run(run_id)
    assert lease
    clock = {"now": 0.0}
    guard = CycleGuard(time_budget_s=10, clock=lambda: clock["now"], started_at=0.0)
    timer = cycle_timer.CycleTimer(10, 0.8, clock=lambda: clock["now"])
    timer.start(0.0)
    monitor = cycle_timer.CycleMonitor(run_id, repo, timer, guard, usage=dict, lease=lease)
    clock["now"] = 7.9
    monitor.flush()
    assert repo.get_run(run_id, with_details=True).alerts == []
    clock["now"] = 8.0
    monitor.flush()
    monitor.flush()  # once per kind
    alerts = repo.get_run(run_id, with_details=True).alerts
    assert [a.kind for a in alerts] == ["budget_warning"] and alerts[0].elapsed_s == 8.0
    assert events == [("dspyflow.cycle.budget-warning", events[0][1])]
    assert events[0][1]["budget"] == "time" and events[0][1]["fraction"] == 0.8
    assert not guard.stopped
    clock["now"] = 10.0
    monitor.flush()
    assert guard.reason is StopReason.time
    kinds = [a.kind for a in repo.get_run(run_id, with_details=True).alerts]
    assert kinds == ["budget_warning", "budget_exceeded"]
    assert events[-1][0] == "dspyflow.cycle.budget-exceeded"


def _monitor_of_a_new_run(
    repo: Repository, hooks: cycle_timer.PrefectHooks
) -> tuple[str, cycle_timer.CycleMonitor]:
    """A claimed run's monitor (60 s budget) that reports to `hooks` instead of Prefect."""
    from tasks.cycle.budget import CycleGuard

    run_id = repo.create_run(task="intent", optimizer="genetic", budget="light", lm="sim", spec={})
    lease = repo.start_run(run_id)
    assert lease
    guard = CycleGuard(time_budget_s=60)
    timer = cycle_timer.CycleTimer(60, 0.8)
    timer.start(guard.started_at)
    monitor = cycle_timer.CycleMonitor(
        run_id, repo, timer, guard, usage=dict, lease=lease, prefect=hooks
    )
    return run_id, monitor


def test_a_late_sample_never_overwrites_a_newer_one(repo: Repository) -> None:
    """The monitor thread and the cycle's final flush() write concurrently: the progress
    artifact of a finished run ends at 100 %, never at a sample read before it (seen in CI:
    a slow 75 % update landed after the final 100 %)."""
    from tasks.optimizers.base import IterationEvent

    class SlowFirstUpdate(cycle_timer.PrefectHooks):
        def __init__(self) -> None:
            super().__init__("r")
            self.enabled, self.artifact_id, self.percents = True, "artifact", []
            self.descriptions: list[str] = []

        def update_artifact(self, percent: float, description: str) -> None:
            if not first_update_started.is_set():
                first_update_started.set()
                time.sleep(0.3)  # the API is slow for the first (older) sample
            self.percents.append(percent)
            self.descriptions.append(description)

    first_update_started = threading.Event()
    hooks = SlowFirstUpdate()
    run_id, monitor = _monitor_of_a_new_run(repo, hooks)
    monitor.on_iteration(IterationEvent(iteration=3, total=4, progress=0.75))
    monitor_thread = threading.Thread(target=monitor._tick, kwargs={"final": True})
    monitor_thread.start()  # as the monitor thread would: writes the 75 % sample
    assert first_update_started.wait(5)
    monitor.on_iteration(IterationEvent(iteration=4, total=4, progress=1.0))
    monitor.flush()  # the cycle's last sample, while the 75 % one is still in flight
    monitor_thread.join(5)
    assert hooks.percents == [75.0, 100.0]
    # The artifact links the run's page: the command that writes it, with a prefix that
    # `dspyflow report --run` resolves (tests/integration/test_run_report.py).
    assert all(f"dspyflow report --run {run_id[:12]}" in d for d in hooks.descriptions)


def test_the_progress_artifact_trails_the_samples(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sample a second goes to the database; the Prefect progress artifact (an API
    request the local Prefect server serves on the same cores) at most every
    ARTIFACT_INTERVAL_S, and the run's end brings it up to the last sample, also when
    that sample was written before the end (nothing new to sample then)."""
    from tasks.optimizers.base import IterationEvent

    class Hooks(cycle_timer.PrefectHooks):
        def __init__(self) -> None:
            super().__init__("r")
            self.enabled, self.artifact_id, self.percents = True, "artifact", []

        def update_artifact(self, percent: float, description: str) -> None:
            self.percents.append(percent)

    monkeypatch.setattr(cycle_timer, "SAMPLE_INTERVAL_S", 0.0)
    monkeypatch.setattr(cycle_timer, "ARTIFACT_INTERVAL_S", 60.0)
    hooks = Hooks()
    _, monitor = _monitor_of_a_new_run(repo, hooks)
    for i in range(1, 5):
        monitor.on_iteration(IterationEvent(iteration=i, total=5, progress=i / 5))
        monitor._tick()
    assert monitor.samples_written == 4
    assert hooks.percents == [20.0]  # the first, then nothing within the interval
    monitor.flush()  # no new iteration: no new sample, but the artifact catches up
    assert monitor.samples_written == 4
    assert hooks.percents == [20.0, 80.0]
    monitor.flush()
    assert hooks.percents == [20.0, 80.0]  # up to date: no request
    monitor.on_iteration(IterationEvent(iteration=5, total=5, progress=1.0))
    monitor.close()
    assert hooks.percents == [20.0, 80.0, 100.0]


# Work that cannot fit in 2 s but whose first trial / generation ends early: on an idle
# 2-core machine (~8 ms of DSPy work per call besides the sim's latency) MIPROv2 light needs
# ~240 calls (~3.8 s) with its first full evaluation after ~36 (~0.6 s); the GA light ~250
# calls (~3 s) with its first generation after ~63 (~0.7 s).
EXCEEDED = {
    "mipro": {"sim_latency_ms": 8, "max_train": 2, "max_val": 20},
    "genetic": {"sim_latency_ms": 6, "max_train": 4, "max_val": 20},
}


@pytest.mark.parametrize("name", ["mipro", "genetic"])
def test_exceeded_target_detection(repo: Repository, name: str) -> None:
    """A 2 s budget the work cannot fit: the cycle stops within a small margin, ends
    `timed_out`, and keeps (and tests) the best program it had found."""
    spec = _spec(
        optimizer=name, time_budget_s=2.0, sim_latency_sigma=0, max_test=6, **EXCEEDED[name]
    )
    steps = cycle.TimedSteps()
    started = time.perf_counter()
    with _quiet():
        summary = cycle.run_cycle(spec, repo, run_step=steps)
    elapsed = time.perf_counter() - started
    phases = {name: round(seconds, 3) for name, seconds in steps.seconds.items()}
    assert summary.state == "timed_out", summary.error
    overran = f"overran its 2 s budget: {elapsed:.2f} s, {phases}, {summary.error}"
    # The guard acts at the next LM call or evaluation; on a loaded 2-core CI machine the
    # genetic search once went 0.9 s between two (stopped at 2.8 s, ended at 3.07 s).
    assert elapsed < 2.0 + 1.5, overran
    assert "time budget of 2 s reached" in summary.error
    run = repo.get_run(summary.run_id, with_details=True)
    kinds = [a.kind for a in run.alerts]
    assert kinds.index("budget_warning") < kinds.index("budget_exceeded")
    assert run.program_state and run.best_score is not None  # tested, and kept
    task = get_task("intent")
    if run.iterations == 0:
        # A machine too busy to end one trial in 2 s: the best so far is the program as
        # given (the LM-call-budget test below proves best-keeping deterministically).
        assert run.program_state == task.build_program().dump_state()
        return
    if name != "mipro":
        return  # the GA's scores are minibatch fitness: tests/unit/test_genetic.py checks it
    # The saved program is the best one found: re-scoring it on the valset (the sim is
    # deterministic per prompt) gives the best score MIPROv2 reported.
    assert _rescore(run.program_state, spec, 20) == pytest.approx(_best_reported(run))


def _rescore(program_state: dict, spec: CycleSpec, n_val: int) -> float:
    task = get_task(spec.task)
    program = task.build_program()
    program.load_state(program_state)
    cycle_lm = build_lm(spec.lm, task)
    with cycle_lm.context(), _quiet():
        result = dspy.Evaluate(
            devset=task.load_splits().val[:n_val], metric=task.metric, display_progress=False
        )(program)
    return result.score / 100


def _best_reported(run) -> float:  # type: ignore[no-untyped-def]
    return max(s.best_score for s in run.samples if s.best_score is not None)


@pytest.mark.parametrize("name", ["mipro", "gepa", "genetic"])
def test_lm_call_budget_stops_and_keeps_the_best_program(sqlite_url: str, name: str) -> None:
    """The same stop, made deterministic: an LM-call budget that ends each optimizer
    mid-search. The run ends `budget_exhausted` within one call of the budget, with the
    best program found so far saved and scored on the test split."""
    from storage.db import get_engine

    repo = Repository(get_engine(sqlite_url))
    spec = _spec(optimizer=name, max_train=6, max_val=10, max_test=6, lm_call_budget=130)
    with _quiet():
        summary = cycle.run_cycle(spec, repo)
    run = repo.get_run(summary.run_id, with_details=True)
    assert summary.state == "budget_exhausted" and "LM-call budget of 130" in summary.error
    # 130 calls for baseline + search; the final test evaluation (6) comes on top.
    assert 130 + 6 <= run.lm_calls <= 130 + 6 + 1
    assert run.iterations >= 1 and run.best_score is not None
    assert "lm_call_budget_exceeded" in [a.kind for a in run.alerts]
    if name == "genetic":
        return  # minibatch fitness; see tests/unit/test_genetic.py
    assert _rescore(run.program_state, spec, 10) == pytest.approx(_best_reported(run))


def test_cancellation_keeps_the_best_program(repo: Repository) -> None:
    """A running cycle cancelled from another thread stops within one LM call, ends
    `cancelled`, with its best program saved and scored on the test split."""
    spec = _spec(sim_latency_ms=10, sim_latency_sigma=0, max_train=6, max_val=12)
    run_id = "cancelme" + os.urandom(8).hex()
    holder: dict = {}

    def run() -> None:
        with _quiet():
            holder["summary"] = cycle.run_cycle(spec, repo, run_id=run_id)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        sample = repo.latest_progress_sample(run_id) if repo.run_exists(run_id) else None
        if sample is not None and sample.iteration >= 2:
            break
        time.sleep(0.02)
    cancelled_at = time.perf_counter()
    cancel_run(run_id, "cancelled by the test")
    worker.join(timeout=30)
    stopped_in = time.perf_counter() - cancelled_at
    summary = holder["summary"]
    assert summary.state == "cancelled" and summary.error == "cancelled by the test"
    assert stopped_in < 1.5, f"took {stopped_in:.2f} s to stop (incl. the test evaluation)"
    run = repo.get_run(run_id, with_details=True)
    assert 2 <= run.iterations < 11 and run.program_state and run.best_score is not None
    assert "cancelled" in [a.kind for a in run.alerts]


@pytest.mark.slow
@pytest.mark.benchmark
def test_comprehensive_benchmark_suite(tmp_path: Path) -> None:
    """benchmarks/cycle_time.py: every optimizer x task at one LM-call budget, a table, a
    plot, and one JSON line last."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "cycle_time.py"
    module_spec = importlib.util.spec_from_file_location("cycle_time_benchmark", path)
    assert module_spec is not None and module_spec.loader is not None
    bench = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(bench)
    out = io.StringIO()
    plot = tmp_path / "cycle-time.png"
    with contextlib.redirect_stdout(out):
        assert (
            bench.main(
                [
                    "--lm=sim",
                    "--lm-calls=40",
                    "--max-train=6",
                    "--max-val=6",
                    "--max-test=6",
                    f"--plot={plot}",
                    f"--db=sqlite:///{tmp_path / 'bench.db'}",
                ]
            )
            == 0
        )
    lines = out.getvalue().strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["simulated"] and figures["lm_call_budget"] == 40
    rows = figures["rows"]
    assert {(r["task"], r["optimizer"]) for r in rows} == {
        (t, o) for t in ("intent", "extraction") for o in ("mipro", "gepa", "genetic")
    }
    for row in rows:
        assert row["state"] == "budget_exhausted"
        # The guard stops within the LM calls already in flight (one thread: one call).
        assert 40 <= row["optimizer_lm_calls"] <= 41
        assert 0 <= row["baseline"] <= 1 and 0 <= row["optimized"] <= 1
    assert plot.exists() and plot.stat().st_size > 10_000
    assert any("optimizer" in line and "iterations_per_s" in line for line in lines)
