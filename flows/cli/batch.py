"""`dspyflow batch`: many optimization cycles in one Prefect flow run, in priority order.

    dspyflow batch jobs.jsonl --workers 64 --lm-rps 50
    dspyflow batch --generate 1000 --lm sim --sim-latency-ms 20 --sim-error-rate 0.05
    dspyflow batch jobs.jsonl --task-runner dask --dask-address tcp://scheduler:8786

A jobs file is checked whole before anything is written: bad lines are listed with their
line numbers and nothing runs (`--skip-invalid` runs the valid ones and reports the rest).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from flows.cli.app import OutputFormat, app, console, fail, open_repository, user_errors
from flows.cli.runtime import freeze_startup_heap, prepare_runtime, temporary_prefect_server


@app.command()
def batch(
    jobs_file: Path = typer.Argument(
        None, metavar="JOBS.jsonl", help="One cycle spec (JSON object) per line."
    ),
    generate: int = typer.Option(
        None, "--generate", help="Run N generated capacity jobs instead of a file."
    ),
    lm: str = typer.Option("sim", help="LM of generated jobs: sim, local or a model string."),
    sim_latency_ms: float = typer.Option(20.0, help="Generated sim jobs: median LM latency."),
    sim_error_rate: float = typer.Option(0.0, help="Generated sim jobs: transient 429/503 rate."),
    sim_permanent_error_rate: float = typer.Option(0.0, help="Generated sim jobs: HTTP 400 rate."),
    lm_calls: int = typer.Option(10, help="Generated jobs: LM calls per job (even, >= 4)."),
    priorities: str = typer.Option("0", help="Generated jobs: priorities to cycle, e.g. 0,1,2."),
    workers: int = typer.Option(
        64, help="Task-runner threads, or Dask task slots (at most the cluster's threads)."
    ),
    max_concurrent: int = typer.Option(500, help="Cap on cycles in flight."),
    capacity: int = typer.Option(2000, help="Queue capacity (backpressure from 90 %)."),
    backpressure: str = typer.Option("refuse", help="refuse or defer jobs above 90 %."),
    lm_rps: float = typer.Option(None, help="LM requests/s shared by all cycles."),
    lm_tpm: float = typer.Option(None, help="LM prompt tokens/min shared by all cycles."),
    prefect_rate_limit: str = typer.Option(
        None, help="Prefect global rate limit name, to share --lm-rps across processes."
    ),
    task_runner: str = typer.Option(
        "threads",
        help="threads (this process) or dask (the cluster at --dask-address).",
    ),
    dask_address: str = typer.Option(
        None,
        help="Dask scheduler, tcp://HOST:PORT; needs PREFECT_API_URL and a PostgreSQL "
        "DSPYFLOW_DATABASE_URL (docs/operations.md, 'A cluster').",
    ),
    skip_invalid: bool = typer.Option(
        False, help="Run the valid lines of a jobs file and report the bad ones."
    ),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect and DSPy logs."),
) -> None:
    """Run a batch of optimization cycles and print its summary (exit 1 unless all succeed)."""
    prepare_runtime(verbose)
    if (jobs_file is None) == (generate is None):
        fail("give a JOBS.jsonl file or --generate N (one of them)")
    if fmt is OutputFormat.csv:
        fail("--format: batch prints table or json")
    from tasks.batch.jobs import JobsFileError, capacity_jobs, load_jobs
    from tasks.batch.models import BatchOptions

    # Everything is validated here, before Prefect starts or a row is written.
    with user_errors(JobsFileError):
        options = BatchOptions(
            workers=workers,
            max_concurrent=max_concurrent,
            capacity=capacity,
            backpressure=backpressure,
            lm_rps=lm_rps,
            lm_tokens_per_min=lm_tpm,
            prefect_rate_limit=prefect_rate_limit,
            task_runner=task_runner,
            dask_address=dask_address,
            skip_invalid=skip_invalid,
        )
        jobs: Any
        if jobs_file is not None:
            load_jobs(jobs_file, skip_invalid=skip_invalid)  # fail fast, listing bad lines
            jobs = str(jobs_file)
        else:
            jobs = capacity_jobs(
                generate,
                lm=lm,
                lm_calls=lm_calls,
                sim_latency_ms=sim_latency_ms,
                sim_error_rate=sim_error_rate,
                sim_permanent_error_rate=sim_permanent_error_rate,
                priorities=_priorities(priorities),
            )

        # Workers in other processes: a reachable Prefect server and a shared results
        # database, checked with the workers themselves, before the temporary server
        # below would stand in for a missing PREFECT_API_URL.
        from storage.db import database_url
        from tasks.batch.cluster import check_cluster_setup

        check_cluster_setup(options, database_url())
        open_repository()  # reachable, at the current schema, dead runs marked

    from flows.optimization import optimization_batch, run_optimization_batch

    with user_errors(JobsFileError), temporary_prefect_server():
        freeze_startup_heap()
        run = optimization_batch if isinstance(jobs, str) else run_optimization_batch
        summary = run(jobs, options)
    if fmt is OutputFormat.json:
        print(json.dumps(summary.model_dump(mode="json"), indent=2))
    else:
        _print_table(summary)
    if summary.succeeded != summary.jobs or summary.rejected_lines:
        raise typer.Exit(1)


def _priorities(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"--priorities: integers separated by commas, got {text!r}") from None
    if not values:
        raise ValueError("--priorities: give at least one integer")
    return values


def _print_table(summary: Any) -> None:
    from rich.table import Table

    sim = " [yellow](simulated LM: capacity figures)[/]" if summary.simulated else ""
    console.print(f"batch [bold]{summary.batch_id}[/]{sim}")
    table = Table(show_header=False)
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("jobs", summary.jobs),
        *sorted(summary.states.items()),
        ("refused (backpressure)", summary.refused),
        ("success rate", f"{summary.success_rate:.2%}"),
        ("wall time", f"{summary.wall_s:.2f} s"),
        ("throughput", f"{summary.jobs_per_s:.1f} jobs/s"),
        (
            "queue wait p50 / p95",
            f"{_ms(summary.queue_wait_p50_s)} / {_ms(summary.queue_wait_p95_s)}",
        ),
        ("run time p50 / p95", f"{_ms(summary.run_p50_s)} / {_ms(summary.run_p95_s)}"),
        ("max in flight", summary.max_in_flight),
        ("LM calls", summary.lm_calls),
    ]
    for name, value in rows:
        table.add_row(str(name), str(value))
    console.print(table)
    for error, count in summary.top_errors.items():
        console.print(f"  {count} x {escape(str(error))}", style="red", highlight=False)
    for bad in summary.rejected_lines:
        console.print(
            f"  line {bad.line} skipped: {escape(str(bad.error))}", style="red", highlight=False
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"
