"""`dspyflow benchmarks list|trend`: query stored benchmark results."""

from __future__ import annotations

import fnmatch
import sys
from datetime import datetime
from typing import Any

import typer

from flows.cli.app import OutputFormat, app, console, emit_rows, err_console, user_errors

benchmarks_app = typer.Typer(
    help="Query benchmark results (cycle, GPU ops, load tiers).", no_args_is_help=True
)
app.add_typer(benchmarks_app, name="benchmarks")

LIST_COLUMNS = [
    "created_at",
    "session_id",
    "suite",
    "metric",
    "value",
    "unit",
    "n_samples",
    "env_fingerprint",
    "commit",
]


def result_row(r: Any) -> dict[str, Any]:
    return {
        "id": r.id,
        "created_at": r.created_at.isoformat() if r.created_at else None,
        "session_id": r.session_id,
        "suite": r.suite,
        "metric": r.metric,
        "value": r.value,
        "unit": r.unit,
        "n_samples": len(r.samples) if r.samples else 0,
        "samples": r.samples,
        "env_fingerprint": r.env_fingerprint,
        "commit": r.commit,
        "params": r.params,
    }


_SHORT = {
    "created_at": lambda v: str(v)[:19],
    "session_id": lambda v: str(v)[:12],
    "commit": lambda v: str(v)[:10],
}


@benchmarks_app.command("list")
def benchmarks_list(
    suite: str = typer.Option(None, help="cycle, gpu or load."),
    metric: str = typer.Option(None, help="A metric name, or a glob such as 'load.*.p99_ms'."),
    session: str = typer.Option(None, help="One benchmark session (a nightly run)."),
    env: str = typer.Option(None, help="One environment fingerprint."),
    since: datetime = typer.Option(None, help="Only results at or after (ISO time)."),
    limit: int = typer.Option(100, min=1),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """Benchmark results, newest first."""
    from storage.repository import Repository

    glob = metric is not None and any(c in metric for c in "*?[")
    with user_errors():
        repo = Repository()
        found = repo.recent_benchmark_results(
            metric=None if glob else metric,
            suite=suite,
            env_fingerprint=env,
            session_id=session,
            since=since,
            limit=None if glob else limit,
        )
    rows = [result_row(r) for r in found]
    if metric is not None:
        rows = [r for r in rows if fnmatch.fnmatchcase(r["metric"], metric)]
    rows = rows[:limit]
    emit_rows(rows, fmt, columns=LIST_COLUMNS, formatters=_SHORT, title="benchmark results")


@benchmarks_app.command("trend")
def benchmarks_trend(
    metric: str = typer.Argument(..., help="The metric, e.g. cycle.sim.intent.mipro.wall_s."),
    env: str = typer.Option(
        None, help="Environment fingerprint (default: the newest result's, like with like)."
    ),
    limit: int = typer.Option(30, min=1, help="The newest N results."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """One metric over time (oldest first), with a sparkline and the latest verdict."""
    from storage.repository import Repository
    from tasks.nightly.regression import Measurement, compare
    from tasks.reports.results import sparkline

    with user_errors():
        repo = Repository()
        newest = repo.recent_benchmark_results(metric=metric, env_fingerprint=env, limit=1)
        if not newest:
            raise LookupError(
                f"no results for metric {metric!r}"
                + (f" on environment {env}" if env else "")
                + ": see `dspyflow benchmarks list`"
            )
        fingerprint = env or newest[0].env_fingerprint
        found = list(
            repo.recent_benchmark_results(metric=metric, env_fingerprint=fingerprint, limit=limit)
        )[::-1]
        others = {
            m["env_fingerprint"]: m["count"]
            for m in repo.benchmark_metrics()
            if m["metric"] == metric and m["env_fingerprint"] != fingerprint
        }
    rows: list[dict[str, Any]] = []
    previous: float | None = None
    for r in found:
        row = result_row(r)
        row["change_pct"] = (r.value / previous - 1) * 100 if previous else None
        rows.append(row)
        previous = r.value
    columns = ["created_at", "session_id", "value", "unit", "change_pct", "n_samples", "commit"]
    if fmt is not OutputFormat.table:
        emit_rows(rows, fmt, columns=[*columns, "env_fingerprint"])
        return
    emit_rows(
        rows,
        fmt,
        columns=columns,
        formatters={**_SHORT, "change_pct": lambda v: f"{v:+.1f} %"},
        title=f"{metric} on {fingerprint}",
    )
    values = [r.value for r in found]
    console.print(
        f"{sparkline(values)}  min {min(values):.4g}  max {max(values):.4g}  "
        f"last {values[-1]:.4g} {found[-1].unit}",
        highlight=False,
    )
    measures = [Measurement.from_row(r) for r in found]
    if len(measures) > 1:
        verdict = compare(measures[-1], measures[:-1])
        console.print(f"latest vs history: {verdict.status} ({verdict.message})", highlight=False)
    if others:
        listed = ", ".join(f"{fp} ({n})" for fp, n in sorted(others.items()))
        err_console.print(f"other environments with this metric: {listed}; pass --env")
    sys.stdout.flush()
