"""`dspyflow optimize`: run one optimization cycle as a Prefect flow."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from flows.cli.app import OutputFormat, app, console, fail, open_repository, user_errors
from flows.cli.runtime import (
    freeze_startup_heap,
    prepare_runtime,
    quiet_libraries,
    temporary_prefect_server,
)
from tasks.cycle.spec import BudgetPreset


@app.command()
def optimize(
    task: str = typer.Option("intent", help="Built-in task: intent or extraction."),
    optimizer: str = typer.Option("mipro", help="mipro, gepa or genetic."),
    budget: BudgetPreset = typer.Option(BudgetPreset.light, help="Budget preset."),
    lm: str = typer.Option("local", help="local, sim, or a dspy.LM model string."),
    api_base: str = typer.Option(None, help="OpenAI-compatible server for --lm."),
    api_key_env: str = typer.Option(None, help="Environment variable holding the API key."),
    structured_output: str = typer.Option(
        "auto",
        help="Remote LM output format: auto, json_schema, json_object or off "
        "(auto sends the JSON schema to an --api-base server).",
    ),
    time_budget: float = typer.Option(7200.0, "--time-budget", help="Seconds; hard limit."),
    program: str = typer.Option(None, help="Your program, module:attr."),
    metric: str = typer.Option(None, help="Your metric, module:function."),
    dataset: Path = typer.Option(None, help="Your dataset, a JSONL file."),
    seed: int = typer.Option(0),
    num_threads: int = typer.Option(1, help="DSPy evaluation threads."),
    max_train: int = typer.Option(None, help="Use at most N train examples."),
    max_val: int = typer.Option(None, help="Use at most N validation examples."),
    max_test: int = typer.Option(None, help="Use at most N test examples."),
    lm_call_budget: int = typer.Option(None, help="Stop after N LM calls (best program kept)."),
    token_budget: int = typer.Option(None, help="Stop after N LM tokens (input + output)."),
    cost_budget: float = typer.Option(None, help="Stop at this LM cost in USD."),
    price_in: float = typer.Option(None, help="USD per 1k input tokens of --lm."),
    price_out: float = typer.Option(None, help="USD per 1k output tokens of --lm."),
    reflection_lm: str = typer.Option(
        None, help="LM that proposes instructions (GEPA reflection, GA rewrites); default --lm."
    ),
    demo_selection: str = typer.Option(
        "none", help="Demo pool by embeddings: none, diverse or nearest (GPU when present)."
    ),
    demo_pool_size: int = typer.Option(16, help="Size of the selected demo pool."),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect and DSPy logs."),
) -> None:
    """Optimize a DSPy program on the embedded defaults (local LM, SQLite, ephemeral Prefect)."""
    prepare_runtime(verbose)
    from tasks.cycle.spec import CycleSpec, LMSpec
    from tasks.lm.local import LocalLMUnavailableError

    with user_errors(LocalLMUnavailableError):
        spec = CycleSpec(
            task=task,
            optimizer=optimizer,
            budget=budget,
            lm=LMSpec(
                model=lm,
                api_base=api_base,
                api_key_env=api_key_env,
                structured_output=structured_output,
                price_per_1k_input_usd=price_in,
                price_per_1k_output_usd=price_out,
            ),
            reflection_lm=LMSpec(model=reflection_lm) if reflection_lm else None,
            time_budget_s=time_budget,
            lm_call_budget=lm_call_budget,
            token_budget=token_budget,
            cost_budget_usd=cost_budget,
            program=program,
            metric=metric,
            dataset=dataset,
            seed=seed,
            num_threads=num_threads,
            max_train=max_train,
            max_val=max_val,
            max_test=max_test,
            demo_selection=demo_selection,
            demo_pool_size=demo_pool_size,
        )
        # Fail fast, before Prefect starts: task, dataset, LM availability, database.
        from tasks.cycle.data import load_cycle_data
        from tasks.lm.providers import build_lm

        quiet_libraries(verbose)  # DSPy is loaded now and has set its own level

        task_def, _ = load_cycle_data(spec)  # also refuses budgets too small for one eval
        build_lm(spec.lm, task_def)
        repo = open_repository()

    from flows.optimization import optimization_cycle

    run_id = uuid.uuid4().hex
    stop = threading.Event()
    started = time.monotonic()
    progress_console = Console(file=sys.stdout)  # bound now: stdout is redirected below
    watcher = threading.Thread(
        target=_show_progress,
        args=(repo, run_id, stop, started, fmt, progress_console),
        daemon=True,
    )
    watcher.start()
    restore_sigint = _cancel_on_ctrl_c(run_id)
    try:
        # DSPy prints tqdm bars to stdout; keep stdout for our output (JSON must parse).
        noise = sys.stderr if verbose else open(os.devnull, "w")  # noqa: SIM115
        with (
            user_errors(LocalLMUnavailableError),
            contextlib.redirect_stdout(noise),
            temporary_prefect_server(),
        ):
            freeze_startup_heap()
            try:
                summary = optimization_cycle(spec, run_id=run_id)
            except Exception:
                summary = None
    finally:
        restore_sigint()
        stop.set()
        watcher.join()
    from tasks.cycle.summary import summarize

    summary = summary or summarize(repo, run_id)
    if fmt is OutputFormat.json:
        print(json.dumps(summary.model_dump(), indent=2))
    else:
        sim = " [yellow](simulated LM)[/]" if summary.simulated else ""
        console.print(f"run [bold]{summary.run_id}[/] {summary.state}{sim}")
        console.print(
            f"  task {escape(summary.task)}, optimizer {summary.optimizer}, lm {escape(summary.lm)}"
        )
        console.print(f"  baseline score  {_score(summary.baseline_score)}")
        console.print(f"  optimized score {_score(summary.best_score)}")
        console.print(f"  duration {summary.duration_s or 0:.1f} s, {summary.lm_calls} LM calls")
        if summary.error:
            console.print(f"  error: {escape(summary.error)}", style="red")
    if summary.state != "succeeded":
        fail(f"run {summary.run_id} ended {summary.state}: {summary.error}", code=1)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _show_progress(repo, run_id, stop, started, fmt, out_console) -> None:
    """Poll the run's row: the flow may run in this process or on a worker."""
    if fmt is not OutputFormat.table:
        stop.wait()
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from storage.repository import RunNotFoundError

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=out_console,
        transient=True,
    ) as progress:
        bar = progress.add_task("starting Prefect and the LM", total=None)
        while not stop.wait(0.5):
            try:
                run = repo.get_run(run_id)
            except RunNotFoundError:
                continue
            except Exception:  # noqa: BLE001 - progress display must never kill the run
                continue
            stage = "baseline" if run.baseline_score is None else _stage(repo, run)
            progress.update(
                bar,
                description=f"{run.state}: {stage}, {run.lm_calls} LM calls"
                + (
                    f", baseline {run.baseline_score:.3f}" if run.baseline_score is not None else ""
                ),
            )


def _stage(repo, run) -> str:
    """`optimizing, iteration 7/11, ETA 42 s` from the latest progress sample."""
    sample = repo.latest_progress_sample(run.id)
    if sample is None:
        return "optimizing"
    total = f"/{sample.total_iterations}" if sample.total_iterations else ""
    text = f"optimizing, iteration {sample.iteration}{total}"
    if sample.best_score is not None:
        text += f", best val {sample.best_score:.3f}"
    if sample.eta_s is not None:
        budget = float(run.spec.get("time_budget_s") or 0) - sample.elapsed_s
        eta = min(sample.eta_s, budget) if budget > 0 else sample.eta_s
        text += f", ETA {eta:.0f} s"
    return text


def _cancel_on_ctrl_c(run_id: str):
    """First Ctrl-C: cancel the cycle gracefully (it keeps and scores its best program);
    a second one interrupts. Returns a function that restores the previous handler."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    from tasks.cycle.budget import cancel_run

    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        cancel_run(run_id, "interrupted (Ctrl-C)")
        console.print("[yellow]stopping: keeping the best program so far (Ctrl-C again to abort)")
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    return lambda: signal.signal(signal.SIGINT, previous)
