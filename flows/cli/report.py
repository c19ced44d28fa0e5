"""`dspyflow report --out PATH`: a self-contained HTML report of the results database."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from flows.cli.app import app, console, user_errors


@app.command("report")
def report(
    out: Path = typer.Option(..., "--out", help="Where to write the HTML file."),
    since: datetime = typer.Option(None, help="Only results at or after (ISO time)."),
    max_runs: int = typer.Option(500, min=1, help="The newest N optimization runs."),
    max_metrics: int = typer.Option(12, min=1, help="Benchmark trends to plot."),
) -> None:
    """Scores and cycle durations over time, benchmark trends, load-test percentiles."""
    from storage.repository import Repository
    from tasks.report import write_report

    with user_errors(OSError):
        path = write_report(
            Repository(), out, since=since, max_runs=max_runs, max_metrics=max_metrics
        )
    console.print(f"report written to {path}", highlight=False)
