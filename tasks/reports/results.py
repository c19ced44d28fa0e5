"""The results report: one self-contained HTML page (plots inlined as base64 PNGs) over
the results database: optimization scores and durations over time, benchmark trends with
the latest verdicts, and load-test percentiles. `dspyflow report --out PATH` writes it.

Collecting (`collect`) and rendering (`render_html`) are separate, so each is testable.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from storage.models import LoadTestRun, OptimizationRun
from storage.repository import Repository
from tasks.nightly.regression import Measurement, MetricVerdict, compare
from tasks.reports.plots import (
    lm_label,
    plot_batch,
    plot_durations,
    plot_load,
    plot_load_windows,
    plot_run_history,
    plot_scores,
    plot_tradeoff,
    plot_trends,
)
from tasks.reports.render import render
from tasks.reports.runs import (
    BatchView,
    RunDetail,
    TaskTradeoff,
    batch_views,
    median,
    run_detail,
    task_tradeoffs,
)

_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A one-line chart of ``values`` (oldest first)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(" ")
        elif span == 0:
            out.append(_BARS[3])
        else:
            out.append(_BARS[min(len(_BARS) - 1, int((v - lo) / span * len(_BARS)))])
    return "".join(out)


def _utc(t: datetime | None) -> datetime | None:
    """Naive UTC (SQLite gives naive UTC, Postgres aware): one kind for sorting and plots."""
    if t is None:
        return None
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


# --- collected data ------------------------------------------------------------------------


class RunPoint(BaseModel):
    id: str
    created_at: datetime | None
    state: str
    task: str
    optimizer: str
    lm: str
    simulated: bool
    baseline_score: float | None
    best_score: float | None
    duration_s: float | None
    lm_calls: int
    tokens: int


class TrendPoint(BaseModel):
    created_at: datetime | None
    session_id: str
    value: float
    q1: float | None = None
    q3: float | None = None
    regression: bool = False  # against the runs before it, by the nightly flow's test


class Trend(BaseModel):
    metric: str
    suite: str
    unit: str
    env_fingerprint: str
    points: list[TrendPoint]
    verdict: MetricVerdict | None = None


class LoadPoint(BaseModel):
    id: str
    name: str
    started_at: datetime | None
    pattern: str
    passed: bool | None
    achieved_rps: float | None
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    error_rate: float | None
    where: str = ""  # what was under load (an HTTP target, or a program on an LM)


class LoadWindows(BaseModel):
    """The newest load test's windows: latency per window over time."""

    id: str
    name: str
    where: str  # what was under load: an HTTP target, or a program on an LM
    windows: list[dict[str, Any]]


class ReportData(BaseModel):
    generated_at: datetime
    database: str
    scope: str = "everything"  # what the page covers: everything, one run, or one task
    runs: list[RunPoint] = Field(default_factory=list)
    details: list[RunDetail] = Field(default_factory=list)
    tradeoffs: list[TaskTradeoff] = Field(default_factory=list)
    batches: list[BatchView] = Field(default_factory=list)
    trends: list[Trend] = Field(default_factory=list)
    load_tests: list[LoadPoint] = Field(default_factory=list)
    load_windows: LoadWindows | None = None
    metrics_total: int = 0


def _quartiles(samples: list[float] | None) -> tuple[float | None, float | None]:
    if not samples or len(samples) < 2:
        return None, None
    s = sorted(samples)
    import statistics

    q = statistics.quantiles(s, n=4, method="inclusive")
    return q[0], q[2]


def _metric_priority(m: dict[str, Any]) -> tuple[int, str]:
    """Which trends to plot first: cycle figures, load percentiles and rates, then the GPU
    ops' own times; derived GPU figures (GB/s, %, ...) last."""
    name = m["metric"]
    if name.startswith("cycle."):
        return 0, name
    if name.startswith("load.") and name.endswith(("p99_ms", "achieved_rps", "p50_ms")):
        return 1, name
    if name.startswith("gpu.") and name.endswith(".ms"):
        return 2, name
    return 3, name


def _run_point(r: OptimizationRun) -> RunPoint:
    return RunPoint(
        id=r.id,
        created_at=_utc(r.created_at),
        state=r.state,
        task=r.task,
        optimizer=r.optimizer,
        lm=r.lm,
        simulated=r.simulated,
        baseline_score=r.baseline_score,
        best_score=r.best_score,
        duration_s=r.duration_s,
        lm_calls=r.lm_calls or 0,
        tokens=(r.input_tokens or 0) + (r.output_tokens or 0),
    )


def collect(
    repo: Repository,
    *,
    since: datetime | None = None,
    run_id: str | None = None,
    task: str | None = None,
    max_runs: int = 500,
    max_detailed: int = 5,
    max_batches: int = 5,
    max_metrics: int = 12,
    points_per_metric: int = 60,
    max_load_tests: int = 30,
) -> ReportData:
    """The page's data. `run_id` (an id or unique prefix) narrows it to one run, its
    task's optimizers and its batch; `task` to one task's runs. Either leaves benchmarks
    and load tests out: they belong to no run."""
    if run_id is not None:
        one = repo.get_run(run_id, with_details=True)
        scope = f"run {one.id}"
        rows = [one]
        peers = list(repo.list_runs(task=one.task, since=since, limit=max_runs))
        detailed = [one]
    else:
        rows = list(repo.list_runs(task=task, since=since, limit=max_runs))
        scope = f"task {task}" if task is not None else "everything"
        peers = rows
        # The newest runs that have a history or a program to show.
        shown = [r.id for r in rows if r.iterations or r.program_state][:max_detailed]
        detailed = [repo.get_run(i, with_details=True) for i in shown]
    batch_ids = list(dict.fromkeys(r.batch_id for r in rows if r.batch_id))[:max_batches]
    data = ReportData(
        generated_at=datetime.now(UTC).replace(tzinfo=None),
        database=repo.engine.url.render_as_string(hide_password=True),
        scope=scope,
        runs=[_run_point(r) for r in rows],
        details=[run_detail(r) for r in detailed],
        tradeoffs=task_tradeoffs(peers),
        batches=batch_views(repo, batch_ids),
    )
    if run_id is None and task is None:
        data.trends, data.metrics_total = _trends(repo, since, max_metrics, points_per_metric)
        listed = list(repo.list_load_tests(limit=max_load_tests))  # newest first
        data.load_tests = _load_tests(listed)
        data.load_windows = _newest_load_windows(repo, listed[0].id) if listed else None
    return data


def _trends(
    repo: Repository, since: datetime | None, max_metrics: int, points_per_metric: int
) -> tuple[list[Trend], int]:
    metrics = repo.benchmark_metrics()
    # One trend per metric: on the environment with the most results (like with like).
    best_env: dict[str, dict[str, Any]] = {}
    for m in metrics:
        if m["metric"] not in best_env or m["count"] > best_env[m["metric"]]["count"]:
            best_env[m["metric"]] = m
    chosen = sorted(best_env.values(), key=_metric_priority)[:max_metrics]
    trends = []
    for m in chosen:
        rows = list(
            repo.recent_benchmark_results(
                metric=m["metric"],
                env_fingerprint=m["env_fingerprint"],
                since=since,
                limit=points_per_metric,
            )
        )[::-1]
        if not rows:
            continue
        measures = [Measurement.from_row(r) for r in rows]
        points = []
        for i, r in enumerate(rows):
            q1, q3 = _quartiles(r.samples)
            # The nightly flow's own verdict for this point, against the points before it.
            flagged = i > 0 and compare(measures[i], measures[:i]).regression
            points.append(
                TrendPoint(
                    created_at=_utc(r.created_at),
                    session_id=r.session_id,
                    value=r.value,
                    q1=q1,
                    q3=q3,
                    regression=flagged,
                )
            )
        verdict = compare(measures[-1], measures[:-1]) if len(measures) > 1 else None
        trends.append(
            Trend(
                metric=m["metric"],
                suite=m["suite"],
                unit=m["unit"],
                env_fingerprint=m["env_fingerprint"],
                points=points,
                verdict=verdict,
            )
        )
    return trends, len(best_env)


def _load_tests(listed: list[LoadTestRun]) -> list[LoadPoint]:
    load_tests = []
    for lt in listed:
        summary = lt.summary or {}
        steady = (summary.get("phases") or {}).get("steady") or summary.get("overall") or {}
        resp = steady.get("response") or {}
        load_tests.append(
            LoadPoint(
                id=lt.id,
                name=lt.name,
                started_at=_utc(lt.started_at),
                pattern=lt.pattern,
                passed=lt.passed,
                achieved_rps=steady.get("achieved_rps"),
                p50_ms=resp.get("p50_ms"),
                p95_ms=resp.get("p95_ms"),
                p99_ms=resp.get("p99_ms"),
                error_rate=steady.get("error_rate"),
                where=_load_target(lt.config or {}, lt.target),
            )
        )
    return load_tests[::-1]


def _load_target(config: dict[str, Any], target: str) -> str:
    if config.get("program_run_id"):
        lm = config.get("lm")
        model = lm.get("model") if isinstance(lm, dict) else lm
        kind = "simulated LM" if model == "sim" else f"LM {model or 'of the run'}"
        return f"program of run {str(config['program_run_id'])[:12]} on the {kind}"
    return f"target {target}"


def _newest_load_windows(repo: Repository, newest_id: str) -> LoadWindows:
    from tasks.load.histograms import decode, value_at_ms

    lt = repo.get_load_test(newest_id)
    windows = []
    for w in sorted(lt.windows, key=lambda w: w.window_index):
        hist = decode(w.response_hist)
        windows.append(
            {
                "start_s": w.start_s,
                "phase": w.phase,
                "target_rate": w.target_rate,
                "achieved_rate": w.achieved_rate,
                "errors": w.errors,
                "p50_ms": value_at_ms(hist, 50.0),
                "p95_ms": value_at_ms(hist, 95.0),
                "p99_ms": value_at_ms(hist, 99.0),
            }
        )
    return LoadWindows(
        id=lt.id, name=lt.name, where=_load_target(lt.config or {}, lt.target), windows=windows
    )


# --- HTML ----------------------------------------------------------------------------------


def render_html(data: ReportData, *, max_run_rows: int = 100) -> str:
    runs = data.runs
    trend_rows, trend_classes = [], []
    for t in data.trends:
        v = t.verdict
        trend_rows.append(
            [
                t.metric,
                t.env_fingerprint,
                len(t.points),
                t.points[-1].value,
                t.unit,
                sparkline([p.value for p in t.points]),
                v.status if v else "no history",
                v.ratio if v else None,
                v.p_value if v else None,
            ]
        )
        improved = v is not None and v.status == "improvement"
        trend_classes.append("bad" if v and v.regression else ("good" if improved else ""))
    return render(
        "results.html.j2",
        data=data,
        simulated=sum(r.simulated for r in runs),
        plots={
            "scores": plot_scores(runs),
            "durations": plot_durations(runs),
            "trends": plot_trends(data.trends),
            "load": plot_load(data.load_tests),
            "load_windows": (
                plot_load_windows(lw.name, lw.where, lw.windows)
                if (lw := data.load_windows) is not None
                else None
            ),
        },
        details=[(d, plot_run_history(d), _detail_rows(d)) for d in data.details],
        tradeoffs=[(t, plot_tradeoff(t), _tradeoff_rows(t)) for t in data.tradeoffs],
        batches=[(b, plot_batch(b), _batch_rows(b)) for b in data.batches],
        runs_label=lm_label(simulated=sum(r.simulated for r in runs), total=len(runs)),
        run_rows=[
            [
                r.id,
                r.state,
                r.task,
                r.optimizer,
                r.lm + (" (sim)" if r.simulated else ""),
                r.baseline_score,
                r.best_score,
                r.duration_s,
                r.lm_calls,
                r.tokens,
                r.created_at,
            ]
            for r in runs[:max_run_rows]
        ],
        hidden_runs=max(0, len(runs) - max_run_rows),
        trend_rows=trend_rows,
        trend_classes=trend_classes,
        load_rows=[
            [
                p.id,
                p.name,
                p.pattern,
                p.started_at,
                p.passed,
                p.achieved_rps,
                p.p50_ms,
                p.p95_ms,
                p.p99_ms,
                p.error_rate,
            ]
            for p in data.load_tests
        ],
    )


def _detail_rows(d: RunDetail) -> list[list[Any]]:
    gain = (
        d.best_score - d.baseline_score
        if d.best_score is not None and d.baseline_score is not None
        else None
    )
    budget = f"{d.time_budget_s:g} s" + (
        f", {d.lm_call_budget} LM calls" if d.lm_call_budget else ""
    )
    return [
        ["state", d.state],
        ["LM", d.lm + (" (simulated)" if d.simulated else "")],
        ["baseline (test)", d.baseline_score],
        ["best on validation", d.val_score],
        ["optimized (test)", d.best_score],
        ["gain", gain],
        ["iterations", d.iterations],
        ["duration s", d.duration_s],
        ["budget", budget],
        ["LM calls", d.lm_calls],
        ["input tokens", d.input_tokens],
        ["output tokens", d.output_tokens],
        ["cost USD", d.cost_usd if d.cost_usd is not None else "no price given"],
    ]


def _tradeoff_rows(t: TaskTradeoff) -> list[list[Any]]:
    return [
        [p.run_id, p.optimizer, p.lm, p.best_score, p.lm_calls, p.cost_usd, p.pareto]
        for p in sorted(t.points, key=lambda p: (p.lm_calls, -p.best_score))
    ]


def _batch_rows(b: BatchView) -> list[list[Any]]:
    return [
        ["jobs", b.jobs],
        ["states", ", ".join(f"{k} {v}" for k, v in sorted(b.states.items()))],
        ["queue wait median s", median(b.queue_wait_s)],
        ["run time median s", median(b.run_s)],
        *([f"error: {e}", n] for e, n in b.top_errors.items()),
    ]


def write_report(repo: Repository, out: str | Path, **collect_options: Any) -> Path:
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(collect(repo, **collect_options)), encoding="utf-8")
    return path
