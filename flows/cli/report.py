"""`dspyflow report --out PATH`: a self-contained HTML report of the results database."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import typer

from flows.cli.app import app, console, user_errors


@app.command("report")
def report(
    out: Path = typer.Option(..., "--out", help="Where to write the HTML file."),
    run: str = typer.Option(
        None, "--run", help="One run (id or unique prefix): its history, changes, its task."
    ),
    task: str = typer.Option(None, "--task", help="One task's runs, optimizers side by side."),
    since: datetime = typer.Option(None, help="Only results at or after (ISO time)."),
    max_runs: int = typer.Option(500, min=1, help="The newest N optimization runs."),
    max_detailed: int = typer.Option(5, min=0, help="Runs shown in detail (newest first)."),
    max_metrics: int = typer.Option(12, min=1, help="Benchmark trends to plot."),
) -> None:
    """How each optimization went (history, budget, usage, what changed), optimizers side
    by side per task, batches, benchmark trends and load tests."""
    from storage.repository import Repository
    from tasks.reports.results import write_report

    if run is not None and task is not None:
        raise typer.BadParameter("give --run or --task, not both", param_hint="--run/--task")
    with user_errors(OSError):
        path = write_report(
            Repository(),
            out,
            run_id=run,
            task=task,
            since=since,
            max_runs=max_runs,
            max_detailed=max_detailed,
            max_metrics=max_metrics,
        )
    console.print(f"report written to {path}", highlight=False)
