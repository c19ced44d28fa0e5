"""`dspyflow loadtest` (run the `load-test` flow) and `dspyflow loadtests list|show`.

Exit codes: 0 passed, 1 a threshold was breached (or the run failed), 2 bad input. With no
`-t`, the default threshold `error_rate<0.1` applies (tasks/load/config.py says why). URL
passwords and secret headers are masked in everything stored and printed.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from typing import Any

import typer
from rich.markup import escape

from flows.cli.app import OutputFormat, app, console, emit_rows, fail, user_errors
from flows.cli.runtime import prepare_runtime

loadtests_app = typer.Typer(help="Query recorded load tests.", no_args_is_help=True)
app.add_typer(loadtests_app, name="loadtests")


@app.command("loadtest")
def loadtest(
    url: str = typer.Option(..., help="The HTTP endpoint to load."),
    pattern: str = typer.Option("constant", help="constant, ramp, spike or wave."),
    rps: float = typer.Option(..., help="Requests per second (peak for ramp, mean for wave)."),
    duration: float = typer.Option(..., help="Seconds of load."),
    max_concurrency: int = typer.Option(100, help="Requests in flight at most."),
    threshold: list[str] = typer.Option(
        [],
        "--threshold",
        "-t",
        help="k6-style, repeatable: p95<500ms, error_rate<0.01, rps>=95. Without any: "
        "error_rate<0.1 (`-t error_rate<=1` accepts every error rate).",
    ),
    report: str = typer.Option(None, help="HTML report path (Markdown goes next to it)."),
    name: str = typer.Option("load-test", help="A name for the run."),
    method: str = typer.Option("GET", help="HTTP method."),
    on_full: str = typer.Option("wait", help="At the cap: wait (counted) or drop (counted)."),
    timeout: float = typer.Option(30.0, help="Per-request timeout, seconds."),
    warmup: float = typer.Option(None, help="Warm-up seconds kept out of the steady state."),
    cooldown: float = typer.Option(None, help="Cool-down seconds kept out of the steady state."),
    arrivals: str = typer.Option("uniform", help="uniform or poisson inter-arrival times."),
    http_client: str = typer.Option("aiohttp", help="aiohttp or httpx."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect logs."),
) -> None:
    """Load an HTTP endpoint at an intended rate (open model) as the `load-test` flow."""
    prepare_runtime(verbose)
    from tasks.load.config import LoadTestConfig

    with user_errors():
        config = LoadTestConfig(
            name=name,
            url=url,
            pattern=pattern,
            rps=rps,
            duration_s=duration,
            max_concurrency=max_concurrency,
            thresholds=threshold,
            report_path=report,
            method=method.upper(),
            on_full=on_full,
            timeout_s=timeout,
            warmup_s=warmup,
            cooldown_s=cooldown,
            arrivals=arrivals,
            http_client=http_client,
        )
        if fmt is OutputFormat.csv:
            raise ValueError("--format: loadtest prints table or json")
        from storage.repository import Repository

        repo = Repository()  # the database answers before Prefect starts

    # The ephemeral server's telemetry write races its own SQLite ("database is locked").
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.load_test import load_test

    if not verbose:
        # A breach fails the flow run by raising; the CLI says so in one line, so Prefect's
        # traceback of it is noise here (it stays in the UI and in --verbose).
        logging.getLogger("prefect.flow_runs").setLevel(logging.CRITICAL)
    run_id = uuid.uuid4().hex
    state = load_test(config, run_id=run_id, return_state=True)
    with user_errors():
        run = repo.get_load_test(run_id)
    if run.state != "completed":
        error = (run.summary or {}).get("error") or state.message
        fail(f"load test {run_id} did not complete: {error}", code=1)
    payload = _run_payload(run)
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        _print_run(payload)
    if state.is_failed() and run.passed:  # recorded and passed, then the report failed
        fail(f"load test {run_id}: {state.message}", code=1)
    if not run.passed:
        breached = [t["expr"] for t in run.thresholds or [] if not t.get("passed")]
        hint = (
            " (the default threshold when no -t is given; `-t error_rate<=1` accepts any "
            "error rate)"
            if not config.thresholds
            else ""
        )
        fail(f"threshold breached: {', '.join(breached)}{hint}", code=1)


def _run_payload(run: Any) -> dict[str, Any]:
    return {
        "id": run.id,
        "name": run.name,
        "target": run.target,
        "pattern": run.pattern,
        "state": run.state,
        "passed": run.passed,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "report_path": run.report_path,
        "flow_run_id": run.flow_run_id,
        "config": run.config,
        "thresholds": run.thresholds,
        "summary": run.summary,
        "windows": len(run.windows) if "windows" in run.__dict__ else None,
    }


def _print_run(p: dict[str, Any]) -> None:
    summary = p.get("summary") or {}
    verdict = {True: "[green]passed[/]", False: "[red]FAILED[/]", None: "-"}[p["passed"]]
    # escape(): names, targets and errors are user text, not rich markup.
    console.print(
        f"load test [bold]{p['id']}[/] {escape(str(p['name']))} ({p['pattern']}): "
        f"{p['state']}, {verdict}"
    )
    console.print(f"  target {escape(str(p['target']))}", highlight=False)
    if "overall" not in summary:
        if summary.get("error"):
            console.print(f"  error: {escape(str(summary['error']))}", style="red")
        return
    rows = []
    for phase_name, stats in [("overall", summary["overall"]), *summary["phases"].items()]:
        r = stats["response"]
        rows.append(
            {
                "phase": phase_name,
                "requests": stats["requests"],
                "errors": stats["errors"],
                "error_rate": stats["error_rate"],
                "dropped": stats["dropped"],
                "target_rps": stats["target_rps"],
                "achieved_rps": stats["achieved_rps"],
                "p50_ms": r["p50_ms"],
                "p95_ms": r["p95_ms"],
                "p99_ms": r["p99_ms"],
                "max_ms": r["max_ms"],
            }
        )
    emit_rows(rows, OutputFormat.table)
    for t in p.get("thresholds") or []:
        if "passed" in t:
            mark = "[green]pass[/]" if t["passed"] else "[red]FAIL[/]"
            console.print(
                f"  threshold {escape(t['expr'])}: observed {t['observed']} {mark}",
                highlight=False,
            )
    for b in summary.get("bottlenecks", []):
        console.print(
            f"  bottleneck {b['component']} ({b['severity']}): {escape(b['message'])}",
            highlight=False,
        )
    if p.get("report_path"):
        console.print(f"  report {escape(p['report_path'])}", highlight=False)


@loadtests_app.command("list")
def loadtests_list(
    limit: int = typer.Option(50, help="Most recent first."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """Recorded load tests, most recent first."""
    from storage.repository import Repository

    with user_errors():
        runs = Repository().list_load_tests(limit=limit)
    rows = []
    for run in runs:
        steady = _steady(run.summary)
        rows.append(
            {
                "id": run.id,
                "name": run.name,
                "pattern": run.pattern,
                "target": run.target,
                "state": run.state,
                "passed": run.passed,
                "started_at": run.started_at,
                "requests": steady.get("requests"),
                "achieved_rps": steady.get("achieved_rps"),
                "p95_ms": (steady.get("response") or {}).get("p95_ms"),
                "p99_ms": (steady.get("response") or {}).get("p99_ms"),
                "error_rate": steady.get("error_rate"),
            }
        )
    emit_rows(
        rows,
        fmt,
        title="load tests",
        formatters={"id": lambda v: str(v)[:12], "started_at": lambda v: str(v)[:19]},
    )


def _steady(summary: dict[str, Any] | None) -> dict[str, Any]:
    if not summary or "overall" not in summary:
        return {}
    return dict(summary.get("phases", {}).get("steady") or summary["overall"])


@loadtests_app.command("show")
def loadtests_show(
    run_id: str = typer.Argument(..., help="A load test id (or a unique prefix)."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
) -> None:
    """One load test: summary, thresholds, bottlenecks (table/json) or its windows (csv)."""
    from storage.repository import Repository

    with user_errors():
        repo = Repository()
        run = repo.get_load_test(_resolve(repo, run_id))
    if fmt is OutputFormat.csv:
        emit_rows(
            [
                {
                    "window": w.window_index,
                    "start_s": w.start_s,
                    "phase": w.phase,
                    "target_rate": w.target_rate,
                    "achieved_rate": w.achieved_rate,
                    "requests": w.requests,
                    "errors": w.errors,
                    "dropped": w.dropped,
                    "max_in_flight": w.max_in_flight,
                }
                for w in run.windows
            ],
            fmt,
        )
        return
    payload = _run_payload(run)
    if run.windows:
        from tasks.load.store import remerge

        # Re-merged from the stored histograms: the proof that the windows hold the data.
        payload["remerged_steady"] = remerge(
            run, "steady" if any(w.phase == "steady" for w in run.windows) else None
        ).model_dump(mode="json")
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(payload, indent=2, default=str) + "\n")
    else:
        _print_run(payload)


def _resolve(repo: Any, run_id: str) -> str:
    """A full id, or a unique prefix of at least 4 characters."""
    if len(run_id) >= 32:
        return run_id
    matches = [r.id for r in repo.list_load_tests(limit=None) if r.id.startswith(run_id)]
    if len(matches) == 1 and len(run_id) >= 4:
        return matches[0]
    if len(matches) > 1:
        raise LookupError(f"load test id prefix {run_id!r} is ambiguous")
    return run_id
