"""The results report's figures, as base64 PNGs (the page stays one offline file). Each
title says where its data came from: the simulated LM (machinery, not model quality) or a
real one. Sized to stay legible when a phone scales them to its width."""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tasks.reports.runs import median

if TYPE_CHECKING:
    from tasks.reports.results import LoadPoint, RunPoint, Trend
    from tasks.reports.runs import BatchView, RunDetail, TaskTradeoff


def _spans_decades(values: list[float], floor: float) -> bool:
    """Wide enough (over 20x the smallest, or `floor`) for a log axis to read better."""
    return min(values) > 0 and max(values) > 20 * max(min(values), floor)


def metric_source(metric: str) -> str:
    """What a benchmark metric ran on: cycle metrics are named cycle.<lm>.<task>...."""
    if metric.startswith("cycle.sim."):
        return "simulated LM"
    if metric.startswith("cycle."):
        return "real LM " + metric.split(".")[1]
    return "no LM"


def lm_label(simulated: int, total: int) -> str:
    """What a figure's data ran on, for its title."""
    if total and simulated == total:
        return "simulated LM"
    if simulated:
        return f"{simulated} of {total} runs on the simulated LM"
    return "real LM"


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
    sim = sum(r.simulated for r in done)
    ax.set_title(f"Optimization score over time ({lm_label(sim, len(done))})")
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
    if _spans_decades([r.duration_s or 0 for r in done], 1e-3):
        ax.set_yscale("log")
    ax.set_ylabel("cycle duration (s)")
    sim = sum(r.simulated for r in done)
    ax.set_title(f"Cycle durations ({lm_label(sim, len(done))})")
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
        flagged = [(i, p.value) for i, p in enumerate(t.points) if p.regression]
        if flagged:  # by the nightly flow's own test, each point against the ones before it
            ax.plot(*zip(*flagged, strict=True), "o", color="red", ms=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{t.metric} ({t.unit}; {metric_source(t.metric)})", fontsize=7)
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
    sim = sum("simulated LM" in p.where for p in pts)
    lms = sum(" LM " in f"{p.where} " for p in pts)
    source = "HTTP targets, no LM" if not lms else lm_label(sim, len(pts))
    ax.set_title(f"Load-test percentiles ({source})")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    return _png(fig)


# --- how each optimization went -----------------------------------------------------------


def _budget_lines(ax: Any, budget: float | None, warning_at: float, seen: float, what: str) -> None:
    """The budget and its warning mark as vertical lines when they are within reach of the
    data; else one note, so a 2 h budget does not squash a 30 s run into the axis."""
    if budget is None:
        return
    if budget <= max(seen, 1e-9) * 1.5:
        ax.axvline(budget, color="0.3", lw=1, label=f"{what} budget")
        ax.axvline(
            budget * warning_at, color="0.3", ls=":", lw=1, label=f"warning ({warning_at:.0%})"
        )
    else:
        note = f"{what} budget {budget:g}: {seen / budget:.0%} used"
        ax.text(0.99, 0.02, note, transform=ax.transAxes, ha="right", va="bottom",
                fontsize=7, color="0.3")  # fmt: skip


def plot_run_history(run: RunDetail) -> str | None:
    """Score per iteration (dots) and best so far (steps) against LM calls and against
    time, with the baseline, the budget and the warning at 80 % of it."""
    points = run.history
    if not points:
        return None
    plt = _pyplot()
    fig, (by_calls, by_time) = plt.subplots(
        1, 2, figsize=(9, 3.4), sharey=True, layout="constrained"
    )
    series = (
        (by_calls, [p.lm_calls for p in points], "LM calls", run.lm_call_budget, "LM-call"),
        (by_time, [p.elapsed_s for p in points], "seconds", run.time_budget_s, "time"),
    )
    for ax, xs, xlabel, budget, what in series:
        pairs = [(x, p) for x, p in zip(xs, points, strict=True) if x is not None]
        if pairs:
            scored = [(x, p.score) for x, p in pairs if p.score is not None]
            if scored:
                ax.scatter(*zip(*scored, strict=True), s=12, color="C0", alpha=0.6,
                           label="iteration score")  # fmt: skip
            best = [(x, p.best_score) for x, p in pairs if p.best_score is not None]
            if best:
                ax.step(*zip(*best, strict=True), where="post", color="C1", lw=1.6,
                        label="best so far (val)")  # fmt: skip
            _budget_lines(ax, budget, run.warning_at, max(x for x, _ in pairs), what)
        if run.baseline_score is not None:
            ax.axhline(run.baseline_score, color="0.5", ls="--", lw=1, label="baseline (test)")
        if run.best_score is not None:
            ax.axhline(run.best_score, color="C2", ls="-.", lw=1, label="optimized (test)")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    for alert in run.alerts:
        if alert.elapsed_s is not None:
            by_time.axvline(alert.elapsed_s, color="red", lw=0.8, alpha=0.6)
    by_calls.set_ylabel("score")
    by_calls.legend(fontsize=7, loc="lower right")
    where = "simulated LM" if run.simulated else f"real LM {run.lm}"
    fig.suptitle(f"{run.task} / {run.optimizer} / {run.budget}, run {run.id[:12]} ({where})",
                 fontsize=9)  # fmt: skip
    return _png(fig)


def plot_tradeoff(tradeoff: TaskTradeoff) -> str | None:
    """Test score against LM calls, one point per run, by optimizer; the Pareto front
    (nothing scores higher for fewer calls) joined and ringed."""
    points = tradeoff.points
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.4), layout="constrained")
    by_optimizer: dict[str, list[Any]] = defaultdict(list)
    for p in points:
        by_optimizer[p.optimizer].append(p)
    for name, pts in sorted(by_optimizer.items()):
        ax.scatter([p.lm_calls for p in pts], [p.best_score for p in pts], s=22, label=name)
    front = sorted((p for p in points if p.pareto), key=lambda p: p.lm_calls)
    ax.step([p.lm_calls for p in front], [p.best_score for p in front], where="post",
            color="0.2", lw=1, label="Pareto front")  # fmt: skip
    ax.scatter([p.lm_calls for p in front], [p.best_score for p in front], s=70,
               facecolors="none", edgecolors="0.2")  # fmt: skip
    if _spans_decades([p.lm_calls for p in points], 1):
        ax.set_xscale("log")
    ax.set_xlabel("LM calls (the run's whole cycle)")
    ax.set_ylabel("test score")
    sim = sum(p.simulated for p in points)
    ax.set_title(f"{tradeoff.task}: optimizers side by side ({lm_label(sim, len(points))})",
                 fontsize=9)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def plot_batch(view: BatchView) -> str | None:
    """Queue wait and run time distributions of one batch's jobs."""
    if not view.queue_wait_s and not view.run_s:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 2.8), layout="constrained")
    for ax, values, label in (
        (axes[0], view.queue_wait_s, "queue wait (s)"),
        (axes[1], view.run_s, "run time (s)"),
    ):
        if values:
            ax.hist(values, bins=min(30, max(5, len(values) // 3)), color="C0")
            ax.axvline(median(values) or 0, color="C1", lw=1, label="median")
            ax.legend(fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel("jobs")
        ax.grid(alpha=0.3)
    where = "simulated LM" if view.simulated else "real LM"
    fig.suptitle(f"batch {view.batch_id[:12]}: {view.jobs} jobs ({where})", fontsize=9)
    return _png(fig)


def plot_load_windows(name: str, where: str, windows: list[dict[str, Any]]) -> str | None:
    """One load test's percentiles per window over time, with the target and achieved
    rate and the errors on a second axis."""
    if not windows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2), layout="constrained")
    t = [w["start_s"] for w in windows]
    for key, label in (("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")):
        ax.plot(t, [w[key] for w in windows], lw=1.2, label=label)
    ax.set_ylabel("response time (ms)")
    ax.set_xlabel("seconds into the test")
    ax.grid(alpha=0.3)
    rate = ax.twinx()
    rate.plot(
        t, [w["target_rate"] for w in windows], color="0.4", ls="--", lw=1, label="target rps"
    )
    rate.plot(t, [w["achieved_rate"] for w in windows], color="0.4", lw=1, label="achieved rps")
    errors = [(x, w["errors"]) for x, w in zip(t, windows, strict=True) if w["errors"]]
    if errors:
        rate.scatter(*zip(*errors, strict=True), color="red", s=14, label="errors")
    rate.set_ylabel("requests/s")
    lines = ax.get_legend_handles_labels()
    more = rate.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="upper left", ncol=3)
    ax.set_title(f"load test {name}: latency per window ({where})", fontsize=9)
    return _png(fig)
