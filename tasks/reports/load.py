"""Load-test reports: Markdown (also the Prefect artifact) and one self-contained HTML page.

The HTML page embeds its plots as base64 PNGs (matplotlib, Agg backend) and needs
nothing from the network: percentiles over time, achieved vs target rate, errors, and
resources. Both reports are built from per-window series, so a stored run can be
reported again from the database alone.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from markupsafe import Markup

from tasks.load.bottlenecks import Bottleneck
from tasks.load.histograms import Percentiles, percentiles
from tasks.load.results import LoadSummary, PhaseStats, Window
from tasks.load.thresholds import ThresholdResult
from tasks.reports.render import render

MAX_WINDOW_ROWS = 120  # longer runs show their first and last windows in the tables


@dataclass
class WindowPoint:
    index: int
    start_s: float
    length_s: float
    phase: str
    target_rate: float
    achieved_rate: float
    sent_rate: float
    requests: int
    errors: int
    dropped: int
    max_in_flight: int
    response: Percentiles
    service: Percentiles
    error_kinds: dict[str, int] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)


def series(windows: Sequence[Window]) -> list[WindowPoint]:
    return [
        WindowPoint(
            index=w.index,
            start_s=w.start_s,
            length_s=w.length_s,
            phase=w.phase.value,
            target_rate=w.target_rate,
            achieved_rate=w.achieved_rate,
            sent_rate=w.sent / w.length_s,
            requests=w.requests,
            errors=w.errors,
            dropped=w.dropped,
            max_in_flight=w.max_in_flight,
            response=percentiles(w.response),
            service=percentiles(w.service),
            error_kinds=dict(w.error_kinds),
            resources=dict(w.resources),
        )
        for w in windows
    ]


@dataclass
class ReportData:
    summary: LoadSummary
    points: list[WindowPoint]
    thresholds: list[ThresholdResult]
    bottlenecks: list[Bottleneck]
    run_id: str | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(t.passed for t in self.thresholds)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} %"


# --- Markdown ------------------------------------------------------------------------------


def _phase_rows(summary: LoadSummary) -> list[tuple[str, PhaseStats]]:
    return [("overall", summary.overall), *summary.phases.items()]


def render_markdown(data: ReportData, *, html_path: str | None = None) -> str:
    s = data.summary
    st = s.steady
    verdict = "PASSED" if data.passed else "FAILED: threshold breached"
    lines = [
        f"# Load test `{s.name}`: {verdict}",
        "",
        f"- target: `{s.target}`; pattern **{s.pattern}**; {s.planned_requests} requests "
        f"planned; cap {s.max_concurrency} in flight ({s.on_full} when full)",
        f"- ran {s.duration_s:.1f} s; steady state: {st.achieved_rps:.1f} of "
        f"{st.target_rps:.1f} req/s, p95 {_ms(st.response.p95_ms)} ms, p99 "
        f"{_ms(st.response.p99_ms)} ms, errors {st.error_rate:.2%}",
    ]
    if data.run_id:
        lines.append(f"- run id: `{data.run_id}`")
    if html_path:
        lines.append(f"- HTML report with plots: `{html_path}`")
    lines += [
        "",
        "Response time is measured from each request's intended start (it includes any wait "
        "for a slot); service time from the actual send.",
        "",
        "## Summary",
        "",
        "| phase | requests | errors | dropped | target rps | achieved rps | p50 ms | p95 ms "
        "| p99 ms | max ms | service p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in _phase_rows(s):
        r = p.response
        lines.append(
            f"| {name} | {p.requests} | {p.errors} ({p.error_rate:.1%}) | {p.dropped} | "
            f"{p.target_rps:.1f} | {p.achieved_rps:.1f} | {_ms(r.p50_ms)} | {_ms(r.p95_ms)} | "
            f"{_ms(r.p99_ms)} | {_ms(r.max_ms)} | {_ms(p.service.p99_ms)} |"
        )
    lines += ["", "## Thresholds", ""]
    if data.thresholds:
        lines += ["| threshold | observed | result |", "|---|---:|---|"]
        for t in data.thresholds:
            obs = "no data" if t.observed is None else f"{t.observed:.4g}"
            lines.append(f"| `{t.expr}` | {obs} | {'pass' if t.passed else '**FAIL**'} |")
    else:
        lines.append("None set.")
    lines += ["", "## Bottlenecks", ""]
    if data.bottlenecks:
        for b in data.bottlenecks:
            lines.append(
                f"- **{b.component}** ({b.severity}): {b.message} "
                f"_Recommendation:_ {b.recommendation}"
            )
    else:
        lines.append("None detected.")
    o = s.overall
    if o.error_kinds:
        lines += ["", "## Errors", "", "| kind | count | first message |", "|---|---:|---|"]
        for kind, n in sorted(o.error_kinds.items(), key=lambda kv: -kv[1]):
            sample = s.error_samples.get(kind, "").replace("|", "\\|")
            lines.append(f"| {kind} | {n} | {sample} |")
    res = s.resources
    lines += [
        "",
        "## Resources",
        "",
        f"- machine CPU: mean {_pct(res.cpu_pct_mean)}, max {_pct(res.cpu_pct_max)}; "
        f"memory max {_pct(res.mem_pct_max)}",
        f"- generator process CPU (100 % = one core): mean {_pct(res.proc_cpu_pct_mean)}, "
        f"max {_pct(res.proc_cpu_pct_max)}; RSS max "
        f"{'-' if res.proc_rss_mb_max is None else f'{res.proc_rss_mb_max:.0f} MB'}",
        f"- event-loop lag: p99 {_ms(res.loop_lag_ms_p99)} ms, max {_ms(res.loop_lag_ms_max)} ms; "
        f"schedule lag (send - intended) p99 {_ms(st.schedule_lag.p99_ms)} ms",
        f"- GPU: {res.gpu or '-'}"
        + (
            f"; utilization max {_pct(res.gpu_util_pct_max)}"
            if res.gpu_util_pct_max is not None
            else ""
        ),
        "",
        "## Windows",
        "",
        "| s | phase | target rps | achieved rps | requests | errors | dropped | in flight "
        "| p50 ms | p95 ms | p99 ms | CPU | gen CPU |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    points = data.points
    if len(points) > MAX_WINDOW_ROWS:
        half = MAX_WINDOW_ROWS // 2
        points = [*points[:half], *points[-half:]]
    for w in points:
        r = w.response
        lines.append(
            f"| {w.start_s:g} | {w.phase} | {w.target_rate:.1f} | {w.achieved_rate:.1f} | "
            f"{w.requests} | {w.errors} | {w.dropped} | {w.max_in_flight} | {_ms(r.p50_ms)} | "
            f"{_ms(r.p95_ms)} | {_ms(r.p99_ms)} | {_pct(w.resources.get('cpu_pct'))} | "
            f"{_pct(w.resources.get('proc_cpu_pct'))} |"
        )
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------------


def _figure_png(fig: Any) -> str:
    buf = io.BytesIO()
    # Fast zlib level: the page is read locally, and encoding is a large part of the cost.
    fig.savefig(buf, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _new_axes() -> tuple[Any, Any]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    # Fixed margins: constrained/tight layout draw the figure twice (2x the cost).
    fig.subplots_adjust(left=0.07, right=0.92, bottom=0.15, top=0.9)
    return fig, ax


def _shade_phases(ax: Any, points: list[WindowPoint]) -> None:
    for p in points:
        if p.phase != "steady":
            ax.axvspan(p.start_s, p.start_s + p.length_s, color="0.92", zorder=0, lw=0)


def plots(points: list[WindowPoint]) -> dict[str, str]:
    """Four base64 PNGs keyed by name."""
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display, and no GUI event loop in a worker

    t = [p.start_s + p.length_s / 2 for p in points]  # lines at window midpoints
    starts = [p.start_s for p in points]
    width = points[0].length_s * 0.8 if points else 0.8
    out: dict[str, str] = {}

    fig, ax = _new_axes()
    _shade_phases(ax, points)
    for label, attr, style in (
        ("p50", "p50_ms", "-"),
        ("p95", "p95_ms", "-"),
        ("p99", "p99_ms", "-"),
    ):
        ax.plot(t, [getattr(p.response, attr) for p in points], style, label=f"response {label}")
    ax.plot(t, [p.service.p99_ms for p in points], "--", label="service p99")
    ax.set(xlabel="seconds", ylabel="ms", title="Latency percentiles per window")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    out["latency"] = _figure_png(fig)

    fig, ax = _new_axes()
    _shade_phases(ax, points)
    # The target is constant within a window: a step through the window edges.
    edges = starts + ([starts[-1] + points[-1].length_s] if points else [])
    targets = [p.target_rate for p in points] + ([points[-1].target_rate] if points else [])
    ax.step(edges, targets, where="post", label="target", color="k")
    ax.plot(t, [p.achieved_rate for p in points], "o-", ms=3, label="achieved (completed)")
    ax.plot(t, [p.sent_rate for p in points], "x--", ms=3, label="sent")
    ax.set(xlabel="seconds", ylabel="requests / s", title="Achieved vs target rate")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    out["rate"] = _figure_png(fig)

    fig, ax = _new_axes()
    kinds = sorted({k for p in points for k in p.error_kinds})
    bottom = [0.0] * len(points)
    for kind in kinds:
        values = [float(p.error_kinds.get(kind, 0)) for p in points]
        ax.bar(starts, values, bottom=bottom, width=width, align="edge", label=kind)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.bar(
        starts,
        [p.dropped for p in points],
        bottom=bottom,
        width=width,
        align="edge",
        label="dropped",
        color="0.5",
    )
    ax.set(xlabel="seconds", ylabel="requests", title="Errors and drops per window")
    if kinds or any(p.dropped for p in points):
        ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    out["errors"] = _figure_png(fig)

    fig, ax = _new_axes()
    for key, label in (
        ("cpu_pct", "machine CPU %"),
        ("proc_cpu_pct", "generator CPU % of a core"),
        ("mem_pct", "memory %"),
        ("gpu_util_pct", "GPU util %"),
    ):
        readings = [p.resources.get(key) for p in points]
        if any(v is not None for v in readings):
            ax.plot(t, [float("nan") if v is None else v for v in readings], label=label)
    ax.set(xlabel="seconds", ylabel="%", title="Resources")
    lag = [p.resources.get("loop_lag_ms") for p in points]
    if any(v is not None for v in lag):
        ax2 = ax.twinx()
        ax2.plot(
            t,
            [float("nan") if v is None else v for v in lag],
            ":",
            color="tab:red",
            label="loop lag ms",
        )
        ax2.set_ylabel("loop lag ms")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    out["resources"] = _figure_png(fig)
    return out


# --- HTML ------------------------------------------------------------------------------------


def render_html(data: ReportData) -> str:
    s = data.summary
    points = data.points
    if len(points) > MAX_WINDOW_ROWS:
        half = MAX_WINDOW_ROWS // 2
        points = [*points[:half], *points[-half:]]
    res = s.resources
    return render(
        "load.html.j2",
        s=s,
        passed=data.passed,
        run_id=data.run_id,
        images=plots(data.points),
        bottlenecks=data.bottlenecks,
        phase_rows=[
            [
                name,
                str(p.requests),
                f"{p.errors} ({p.error_rate:.1%})",
                str(p.dropped),
                f"{p.target_rps:.1f}",
                f"{p.achieved_rps:.1f}",
                _ms(p.response.p50_ms),
                _ms(p.response.p95_ms),
                _ms(p.response.p99_ms),
                _ms(p.response.max_ms),
                _ms(p.service.p99_ms),
            ]
            for name, p in _phase_rows(s)
        ],
        threshold_rows=[
            [
                Markup("<code>{}</code>").format(t.expr),
                "no data" if t.observed is None else f"{t.observed:.4g}",
                Markup('<span class="pass">pass</span>')
                if t.passed
                else Markup('<span class="fail">FAIL</span>'),
            ]
            for t in data.thresholds
        ],
        resource_rows=[
            ["machine CPU mean / max", f"{_pct(res.cpu_pct_mean)} / {_pct(res.cpu_pct_max)}"],
            ["memory max", _pct(res.mem_pct_max)],
            [
                "generator CPU mean / max (of one core)",
                f"{_pct(res.proc_cpu_pct_mean)} / {_pct(res.proc_cpu_pct_max)}",
            ],
            [
                "event-loop lag p99 / max",
                f"{_ms(res.loop_lag_ms_p99)} / {_ms(res.loop_lag_ms_max)} ms",
            ],
            ["GPU", res.gpu or "-"],
        ],
        error_rows=[
            [kind, str(n), s.error_samples.get(kind, "")]
            for kind, n in sorted(s.overall.error_kinds.items(), key=lambda kv: -kv[1])
        ],
        window_rows=[
            [
                f"{p.start_s:g}",
                p.phase,
                f"{p.target_rate:.1f}",
                f"{p.achieved_rate:.1f}",
                str(p.requests),
                str(p.errors),
                str(p.dropped),
                str(p.max_in_flight),
                _ms(p.response.p50_ms),
                _ms(p.response.p95_ms),
                _ms(p.response.p99_ms),
            ]
            for p in points
        ],
    )


def write_reports(data: ReportData, path: str | Path) -> tuple[Path, Path]:
    """Write ``<path>.html`` and ``<path>.md`` (either suffix may be given); returns both."""
    path = Path(path).expanduser()
    base = path.with_suffix("") if path.suffix.lower() in (".html", ".htm", ".md") else path
    html_path, md_path = base.with_suffix(".html"), base.with_suffix(".md")
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(render_html(data), encoding="utf-8")
    md_path.write_text(render_markdown(data, html_path=str(html_path)), encoding="utf-8")
    return html_path, md_path
