"""`dspyflow runs ...`: query optimization runs."""

from __future__ import annotations

import contextlib
import json
import sys
from datetime import datetime
from typing import Any

import typer
from rich.markup import escape

from flows.cli.app import (
    OutputFormat,
    app,
    console,
    emit_rows,
    fail,
    open_repository,
    user_errors,
)

runs_app = typer.Typer(help="Query optimization runs.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")

LIST_COLUMNS = [
    "id",
    "state",
    "task",
    "optimizer",
    "lm",
    "baseline_score",
    "best_score",
    "duration_s",
    "lm_calls",
    "created_at",
]


def run_row(run: Any) -> dict[str, Any]:
    duration = run.duration_s
    return {
        "id": run.id,
        "state": run.state,
        "task": run.task,
        "optimizer": run.optimizer,
        "budget": run.budget,
        "lm": run.lm,
        "simulated": run.simulated,
        "priority": run.priority,
        "baseline_score": run.baseline_score,
        "best_score": run.best_score,
        "duration_s": duration,
        "lm_calls": run.lm_calls,
        "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
        "cost_usd": run.cost_usd,
        "iterations": run.iterations,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(run.finished_at),
        "batch_id": run.batch_id,
        "flow_run_id": run.flow_run_id,
        "error": run.error,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


@runs_app.command("list")
def runs_list(
    state: str = typer.Option(None, help="Filter by state (succeeded, failed, ...)."),
    task: str = typer.Option(None),
    optimizer: str = typer.Option(None),
    lm: str = typer.Option(None),
    since: datetime = typer.Option(None, help="Only runs created at or after (ISO time)."),
    limit: int = typer.Option(100, min=1),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """List runs, newest first."""

    with user_errors():
        runs = open_repository().list_runs(
            state=state, task=task, optimizer=optimizer, lm=lm, since=since, limit=limit
        )
    rows = [run_row(r) for r in runs]
    short = {"id": lambda v: v[:12], "created_at": lambda v: v[:19]}
    emit_rows(rows, fmt, columns=LIST_COLUMNS, formatters=short, title="optimization runs")


@runs_app.command("show")
def runs_show(
    run_id: str = typer.Argument(..., help="Run id or a unique prefix (>= 4 characters)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """One run with its spec, progress samples, alerts and optimized program."""

    with user_errors():
        run = open_repository().get_run(run_id, with_details=True)
    detail = run_row(run)
    detail["spec"] = run.spec
    detail["program_state"] = run.program_state
    detail["progress_samples"] = [
        {
            "recorded_at": _iso(s.recorded_at),
            "iteration": s.iteration,
            "total_iterations": s.total_iterations,
            "elapsed_s": s.elapsed_s,
            "throughput": s.throughput,
            "eta_s": s.eta_s,
            "score": s.score,
            "best_score": s.best_score,
            "lm_calls": s.lm_calls,
        }
        for s in run.samples
    ]
    detail["alerts"] = [
        {
            "recorded_at": _iso(a.recorded_at),
            "kind": a.kind,
            "message": a.message,
            "elapsed_s": a.elapsed_s,
        }
        for a in run.alerts
    ]
    if fmt is OutputFormat.json:
        print(json.dumps(detail, indent=2, default=str))
        return
    scalar = {k: v for k, v in detail.items() if not isinstance(v, dict | list)}
    emit_rows(
        [{"field": k, "value": v} for k, v in scalar.items()],
        OutputFormat.table,
        title=f"run {run.id}",
    )
    if detail["progress_samples"]:
        emit_rows(detail["progress_samples"], OutputFormat.table, title="progress")
    if detail["alerts"]:
        emit_rows(detail["alerts"], OutputFormat.table, title="alerts")
    if run.program_state:
        for name, predictor in run.program_state.items():
            if isinstance(predictor, dict) and "signature" in predictor:
                instructions = predictor["signature"].get("instructions", "")
                # escape(): instructions and names are user text; `[/x]` is not markup here.
                demos = len(predictor.get("demos", []))
                console.print(f"[bold]{escape(name)}[/]: {demos} demos")
                console.print(f"  instructions: {escape(str(instructions))}", highlight=False)


@runs_app.command("recover")
def runs_recover(
    stale_after: float = typer.Option(
        60.0, "--stale-after", help="Seconds without a heartbeat after which a run is stale."
    ),
    requeue: bool = typer.Option(False, "--requeue", help="Put stale runs back in the queue."),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Re-queue stale runs and finish them here: GEPA and genetic runs continue "
        "from their saved state, MIPROv2 runs replay their recorded LM answers.",
    ),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """Mark runs whose worker died (stale heartbeat) `stale`; optionally re-queue them, or
    resume them in this process."""
    from storage.repository import Repository
    from tasks.cycle.recovery import recover_stale_runs, resume_runs

    with user_errors():
        repo = Repository()
        report = recover_stale_runs(repo, stale_after_s=stale_after, requeue=requeue or resume)
    resumed: dict[str, str] = {}
    if resume and report.requeued:
        from flows.cli.runtime import quiet_libraries

        quiet_libraries()
        # DSPy and MIPROv2 print progress to stdout; stdout is for our output (JSON).
        with user_errors(), contextlib.redirect_stdout(sys.stderr):
            resumed = resume_runs(repo, report.requeued)
    if fmt is OutputFormat.json:
        print(json.dumps({**report.model_dump(), "resumed": resumed}, indent=2))
        return
    console.print(
        f"{len(report.marked_stale)} run(s) marked stale (no heartbeat for "
        f"{report.stale_after_s:g} s), {len(report.requeued)} re-queued"
    )
    for run_id in report.marked_stale:
        console.print(f"  stale    {run_id}")
    for run_id in report.requeued:
        console.print(f"  requeued {run_id}")
    for run_id, state in resumed.items():
        console.print(f"  resumed  {run_id}: {state}")


@runs_app.command("cancel")
def runs_cancel(
    run_id: str = typer.Argument(..., help="Run id or a unique prefix (>= 4 characters)."),
    reason: str = typer.Option("cancelled by an operator", "--reason", help="Recorded on the run."),
) -> None:
    """Cancel a run. A running one is asked through the database, so this reaches any
    worker (a `dspyflow optimize`, a batch, a Dask worker, a deployment): it stops at its
    next heartbeat (DSPYFLOW_HEARTBEAT_S, 10 s) and ends `cancelled` with its best program
    so far (one that finishes first still ends `cancelled`, its result kept). A queued or
    stale one (nobody holds it) is cancelled at once."""
    from storage.repository import CancelOutcome, Repository

    with user_errors():
        repo = Repository()
        run = repo.get_run(run_id)
        outcome = repo.cancel(run.id, reason)
        if outcome is CancelOutcome.requested:
            console.print(f"cancel requested for run {run.id}: it stops at its next heartbeat")
            return
        if outcome is CancelOutcome.cancelled:
            console.print(f"cancelled run {run.id}: nobody held it")
            return
        run = repo.get_run(run.id)  # say what it is now
    fail(f"run {run.id} is {run.state}: nothing to cancel")


@runs_app.command("compare")
def runs_compare(
    run_a: str = typer.Argument(..., help="Run A: id or a unique prefix (>= 4 characters)."),
    run_b: str = typer.Argument(..., help="Run B: id or a unique prefix (>= 4 characters)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """Two runs side by side: scores, duration, LM calls, tokens, spec and program changes."""
    from storage.repository import Repository
    from tasks.reports.compare import compare_runs

    with user_errors():
        repo = Repository()
        cmp = compare_runs(repo.get_run(run_a), repo.get_run(run_b))
    if fmt is OutputFormat.json:
        print(json.dumps(cmp.model_dump(mode="json"), indent=2, default=str))
        return
    rows = [
        {"field": f.field, "A": f.a, "B": f.b, "B - A": f.delta}
        for f in [
            *cmp.figures,
            *(s.model_copy(update={"field": f"spec.{s.field}"}) for s in cmp.spec_differences),
        ]
    ]
    for p in cmp.predictors:
        rows += [
            {
                "field": f"{p.predictor}.instructions",
                "A": p.instructions_a,
                "B": p.instructions_b,
                "B - A": None if p.same_instructions else "changed",
            },
            {
                "field": f"{p.predictor}.demos",
                "A": p.demos_a,
                "B": p.demos_b,
                "B - A": f"-{len(p.demos_only_in_a)} +{len(p.demos_only_in_b)} differ",
            },
        ]
    if fmt is OutputFormat.csv:
        emit_rows(rows, fmt)
        return
    emit_rows(rows, fmt, title=f"A {cmp.a}  vs  B {cmp.b}")
    if not cmp.spec_differences:
        console.print("specs: identical")
    if cmp.simulated:
        console.print("[yellow]note: the simulated LM (`sim`) produced at least one run[/]")
