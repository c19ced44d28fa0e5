"""The results report: one self-contained HTML page (plots inlined as base64 PNGs) over
the results database: optimization scores and durations over time, benchmark trends with
the latest verdicts, and load-test percentiles. `dspyflow report --out PATH` writes it.

Collecting (`collect`) and rendering (`render_html`) are separate, so each is testable.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from storage.repository import Repository
from tasks.regression import Measurement, MetricVerdict, compare

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


class ReportData(BaseModel):
    generated_at: datetime
    database: str
    runs: list[RunPoint] = Field(default_factory=list)
    trends: list[Trend] = Field(default_factory=list)
    load_tests: list[LoadPoint] = Field(default_factory=list)
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


def collect(
    repo: Repository,
    *,
    since: datetime | None = None,
    max_runs: int = 500,
    max_metrics: int = 12,
    points_per_metric: int = 60,
    max_load_tests: int = 30,
) -> ReportData:
    runs = [
        RunPoint(
            id=r.id,
            created_at=_utc(r.created_at),
            state=r.state,
            task=r.task,
            optimizer=r.optimizer,
            lm=r.lm,
            simulated=r.simulated,
            baseline_score=r.baseline_score,
            best_score=r.best_score,
            duration_s=(r.finished_at - r.started_at).total_seconds()
            if r.finished_at and r.started_at
            else None,
            lm_calls=r.lm_calls or 0,
            tokens=(r.input_tokens or 0) + (r.output_tokens or 0),
        )
        for r in repo.list_runs(since=since, limit=max_runs)
    ]
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
        points = []
        for r in rows:
            q1, q3 = _quartiles(r.samples)
            points.append(
                TrendPoint(
                    created_at=_utc(r.created_at),
                    session_id=r.session_id,
                    value=r.value,
                    q1=q1,
                    q3=q3,
                )
            )
        measures = [Measurement.from_row(r) for r in rows]
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
    load_tests = []
    for lt in repo.list_load_tests(limit=max_load_tests):
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
            )
        )
    return ReportData(
        generated_at=datetime.now(UTC).replace(tzinfo=None),
        database=repo.engine.url.render_as_string(hide_password=True),
        runs=runs,
        trends=trends,
        load_tests=load_tests[::-1],
        metrics_total=len(best_env),
    )


# --- plots ---------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    return plt


def plot_scores(runs: list[RunPoint]) -> str | None:
    done = [r for r in runs if r.best_score is not None and r.created_at is not None]
    if not done:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.6), layout="constrained")
    groups: dict[str, list[RunPoint]] = defaultdict(list)
    for r in done:
        groups[f"{r.task}/{r.optimizer}/{r.lm}"].append(r)
    for label, pts in sorted(groups.items()):
        pts.sort(key=lambda r: r.created_at or datetime.min)
        xs = [r.created_at for r in pts]
        ax.plot(xs, [r.best_score for r in pts], marker="o", ms=4, lw=1, label=label)
        base = [(r.created_at, r.baseline_score) for r in pts if r.baseline_score is not None]
        if base:
            ax.scatter(*zip(*base, strict=True), marker="x", s=14, color="0.5")
    ax.set_ylabel("test score (o optimized, x baseline)")
    ax.set_title("Optimization score over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.autofmt_xdate()
    return _png(fig)


def plot_durations(runs: list[RunPoint]) -> str | None:
    done = [r for r in runs if r.duration_s is not None and r.created_at is not None]
    if not done:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2), layout="constrained")
    groups: dict[str, list[RunPoint]] = defaultdict(list)
    for r in done:
        groups[r.optimizer].append(r)
    for label, pts in sorted(groups.items()):
        ax.scatter([r.created_at for r in pts], [r.duration_s for r in pts], s=16, label=label)
    if max(r.duration_s or 0 for r in done) > 20 * max(min(r.duration_s or 0 for r in done), 1e-3):
        ax.set_yscale("log")
    ax.set_ylabel("cycle duration (s)")
    ax.set_title("Cycle durations")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.autofmt_xdate()
    return _png(fig)


def plot_trends(trends: list[Trend]) -> str | None:
    if not trends:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    cols = 3 if len(trends) > 4 else min(2, len(trends))
    rows = math.ceil(len(trends) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 2.6 * rows), squeeze=False, layout="constrained"
    )
    for ax, t in zip(axes.flat, trends, strict=False):
        xs = list(range(len(t.points)))
        ys = [p.value for p in t.points]
        ax.plot(xs, ys, marker="o", ms=3, lw=1)
        spread = [(i, p.q1, p.q3) for i, p in enumerate(t.points) if p.q1 is not None]
        if spread:
            i, lo, hi = zip(*spread, strict=True)
            ax.fill_between(i, lo, hi, alpha=0.2, lw=0)
        if t.verdict is not None and t.verdict.status == "regression":
            ax.plot(xs[-1], ys[-1], "o", color="red", ms=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{t.metric} ({t.unit})", fontsize=7)
        ax.set_xlabel("run (oldest to newest)", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(trends) :]:
        ax.set_visible(False)
    return _png(fig)


def plot_load(points: list[LoadPoint]) -> str | None:
    pts = [p for p in points if p.p50_ms is not None]
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4), layout="constrained")
    xs = list(range(len(pts)))
    width = 0.27
    for k, (label, attr) in enumerate((("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms"))):
        ax.bar(
            [x + (k - 1) * width for x in xs],
            [getattr(p, attr) or 0 for p in pts],
            width,
            label=label,
        )
    ax.set_xticks(xs, [f"{p.name}\n{p.id[:6]}" for p in pts], fontsize=6, rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel("response time, steady state (ms)")
    ax.set_title("Load-test percentiles")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _png(fig)


# --- HTML ----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:.5em 0}
td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
td.l,th.l{text-align:left} .bad{color:#b00;font-weight:bold} .good{color:#070}
.note{color:#666;font-size:12px} img{max-width:100%}
"""


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.4g}"
    if isinstance(v, datetime):
        return v.strftime("%Y-%m-%d %H:%M")
    return str(v)


def _table(headers: list[str], rows: list[list[Any]], left: int = 1, cls: list[str] | None = None):
    head = "".join(
        f'<th class="{"l" if i < left else ""}">{html.escape(h)}</th>'
        for i, h in enumerate(headers)
    )
    body = []
    for n, row in enumerate(rows):
        cells = "".join(
            f'<td class="{"l" if i < left else ""}">{html.escape(_fmt(v))}</td>'
            for i, v in enumerate(row)
        )
        body.append(f'<tr class="{(cls or [""] * len(rows))[n]}">{cells}</tr>')
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(b64: str | None, alt: str) -> str:
    if b64 is None:
        return f'<p class="note">{html.escape(alt)}: no data yet.</p>'
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def render_html(data: ReportData, *, max_run_rows: int = 100) -> str:
    runs = data.runs
    sim = sum(r.simulated for r in runs)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dspyflow report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>dspyflow results report</h1>",
        f"<p class='note'>Generated {_fmt(data.generated_at)} UTC from "
        f"<code>{html.escape(data.database)}</code>: {len(runs)} optimization runs, "
        f"{data.metrics_total} benchmark metrics, {len(data.load_tests)} load tests.</p>",
    ]
    if sim:
        parts.append(
            f"<p class='note'>{sim} run(s) used the simulated LM (<code>sim</code>): their "
            "scores show the machinery, not model quality.</p>"
        )
    parts += [
        "<h2>Optimization runs</h2>",
        _img(plot_scores(runs), "score over time"),
        _img(plot_durations(runs), "cycle durations"),
    ]
    if runs:
        rows = [
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
        ]
        parts.append(
            _table(
                [
                    "run",
                    "state",
                    "task",
                    "optimizer",
                    "lm",
                    "baseline",
                    "best",
                    "duration s",
                    "LM calls",
                    "tokens",
                    "created",
                ],
                rows,
                left=5,
            )
        )
        if len(runs) > max_run_rows:
            parts.append(f"<p class='note'>{len(runs) - max_run_rows} older run(s) not listed.</p>")
    parts += ["<h2>Benchmark trends</h2>", _img(plot_trends(data.trends), "benchmark trends")]
    if data.trends:
        rows, cls = [], []
        for t in data.trends:
            v = t.verdict
            rows.append(
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
            cls.append(
                "bad" if v and v.regression else ("good" if v and v.status == "improvement" else "")
            )
        parts.append(
            _table(
                [
                    "metric",
                    "environment",
                    "runs",
                    "latest",
                    "unit",
                    "trend",
                    "latest vs history",
                    "ratio (>1 worse)",
                    "p",
                ],
                rows,
                left=2,
                cls=cls,
            )
        )
        if data.metrics_total > len(data.trends):
            parts.append(
                f"<p class='note'>{data.metrics_total - len(data.trends)} more metric(s): "
                "<code>dspyflow benchmarks list</code>, <code>dspyflow benchmarks trend</code>."
                "</p>"
            )
    parts += ["<h2>Load tests</h2>", _img(plot_load(data.load_tests), "load-test percentiles")]
    if data.load_tests:
        parts.append(
            _table(
                [
                    "load test",
                    "name",
                    "pattern",
                    "started",
                    "passed",
                    "achieved rps",
                    "p50 ms",
                    "p95 ms",
                    "p99 ms",
                    "error rate",
                ],
                [
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
                left=3,
            )
        )
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(repo: Repository, out: str | Path, **collect_options: Any) -> Path:
    path = Path(out).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(collect(repo, **collect_options)), encoding="utf-8")
    return path
