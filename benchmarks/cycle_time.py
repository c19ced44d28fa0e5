"""Benchmark the optimizers at the same LM-call budget: cycle time, LM calls, throughput,
baseline and optimized test scores, and score against LM calls.

    python benchmarks/cycle_time.py --lm sim                      # seconds, simulated LM
    python benchmarks/cycle_time.py --lm local --max-val 20 --lm-calls 300

Every optimizer gets the same number of LM calls for its search (`--lm-calls`; the cycle's
`lm_call_budget` is that plus the baseline's test-set calls) on the `medium` preset, so no
optimizer ends early by itself (at 300 calls on a 20-example valset): each is stopped by
the budget with its best program so far, which is then scored on the test split. Cycles
run in-process (no Prefect), recorded in a throwaway SQLite database unless `--db` names
one.

Prints a table, writes the plot (best validation score against LM calls, one panel per
task), and as its LAST line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
os.environ.setdefault("TQDM_DISABLE", "1")

DOCS = Path(__file__).resolve().parent.parent / "docs"


def run_one(
    task: str, optimizer: str, args: argparse.Namespace, repo: Any
) -> tuple[dict[str, Any], list[tuple[int, float]]]:
    """One cycle, step by step so the optimizer's own time is measured."""
    from tasks.cycle import steps as cycle
    from tasks.cycle.spec import CycleSpec, LMSpec

    lm = LMSpec(model=args.lm, sim_latency_ms=args.sim_latency_ms)
    n_test = args.max_test
    spec = CycleSpec(
        task=task,
        optimizer=optimizer,
        budget=args.budget,
        lm=lm,
        time_budget_s=args.time_budget,
        lm_call_budget=args.lm_calls + n_test,
        seed=args.seed,
        num_threads=args.num_threads,
        max_train=args.max_train,
        max_val=args.max_val,
        max_test=n_test,
    )
    started = time.perf_counter()
    steps = cycle.TimedSteps()  # the cycle's one sequence, each step timed
    cycle.run_cycle(spec, repo, run_step=steps)
    cycle_s = time.perf_counter() - started
    assert steps.ctx is not None
    run = repo.get_run(steps.ctx.run_id, with_details=True)
    if run.best_score is None or run.baseline_score is None:
        raise RuntimeError(f"{task}/{optimizer}: the cycle ended {run.state}: {run.error}")
    compile_s = steps.seconds["optimize"]
    calls_before = steps.lm_calls_before["optimize"]
    optimizer_calls = steps.lm_calls_before["evaluate"] - calls_before
    baseline, test_score = run.baseline_score, run.best_score
    curve = [
        (s.lm_calls - calls_before, s.best_score)
        for s in run.samples
        if s.best_score is not None and s.lm_calls is not None
    ]
    row = {
        "task": task,
        "optimizer": optimizer,
        "state": run.state,
        "baseline": round(baseline, 4),
        "optimized": round(test_score, 4),
        "gain": round(test_score - baseline, 4),
        "best_val": round(run.val_score, 4) if run.val_score is not None else None,
        "cycle_s": round(cycle_s, 2),
        "compile_s": round(compile_s, 2),
        "lm_calls": run.lm_calls,
        "optimizer_lm_calls": optimizer_calls,
        "iterations": run.iterations,
        "iterations_per_s": round(run.iterations / compile_s, 3) if compile_s else None,
        "tokens": run.input_tokens + run.output_tokens,
        "run_id": run.id,
    }
    return row, curve


def format_table(rows: list[dict[str, Any]]) -> str:
    columns = [
        ("task", 10),
        ("optimizer", 9),
        ("state", 16),
        ("baseline", 8),
        ("optimized", 9),
        ("gain", 7),
        ("best_val", 8),
        ("compile_s", 9),
        ("cycle_s", 8),
        ("optimizer_lm_calls", 18),
        ("iterations", 10),
        ("iterations_per_s", 16),
    ]
    lines = [" ".join(name.rjust(width) for name, width in columns)]
    for row in rows:
        cells = []
        for name, width in columns:
            value = row.get(name)
            text = "-" if value is None else (f"{value:.3f}" if isinstance(value, float) else value)
            cells.append(str(text).rjust(width))
        lines.append(" ".join(cells))
    return "\n".join(lines)


def plot(
    curves: dict[tuple[str, str], list[tuple[int, float]]], rows: list[dict], path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({task for task, _ in curves})
    width = max(8.0, 5.5 * len(tasks))  # room for the title with one panel
    fig, axes = plt.subplots(1, len(tasks), figsize=(width, 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for (t, optimizer), points in sorted(curves.items()):
            if t != task or not points:
                continue
            xs, ys = zip(*sorted(points), strict=True)
            # The GA reports its leader's minibatch fitness until the final selection.
            label = f"{optimizer} (minibatch fitness)" if optimizer == "genetic" else optimizer
            ax.step(xs, ys, where="post", marker="o", markersize=3, label=label)
        baseline = next((r["baseline"] for r in rows if r["task"] == task), None)
        if baseline is not None:
            ax.axhline(baseline, color="grey", linestyle=":", label="baseline (test)")
        ax.set_title(task)
        ax.set_xlabel("LM calls spent by the optimizer")
        ax.set_ylabel("best validation score")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="sim", help="sim or local (or a dspy.LM model string)")
    parser.add_argument("--tasks", default="intent,extraction")
    parser.add_argument("--optimizers", default="mipro,gepa,genetic")
    parser.add_argument("--lm-calls", type=int, default=300, help="the optimizer's LM calls")
    parser.add_argument(
        "--budget", default="medium", help="preset (medium: none ends before 300 calls)"
    )
    parser.add_argument("--max-train", type=int, default=20)
    parser.add_argument("--max-val", type=int, default=20)
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=7200.0)
    parser.add_argument("--sim-latency-ms", type=float, default=0.0)
    parser.add_argument("--db", default=None, help="database URL (default: a temporary SQLite)")
    parser.add_argument("--plot", default=None, help="PNG path (default docs/cycle-time-<lm>.png)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)  # DSPy/GEPA chatter; the table is the output

    import tasks.cycle.timer as cycle_timer
    from storage.db import get_engine
    from storage.repository import Repository

    cycle_timer.SAMPLE_INTERVAL_S = 0.05  # a finer score-vs-calls curve than the default 1 s
    url = args.db or f"sqlite:///{tempfile.mkdtemp(prefix='dspyflow-bench-')}/bench.db"
    repo = Repository(get_engine(url))
    rows: list[dict[str, Any]] = []
    curves: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for task in args.tasks.split(","):
        for optimizer in args.optimizers.split(","):
            # DSPy and GEPA print progress bars on stdout: keep stdout for our output.
            with contextlib.redirect_stdout(sys.stderr):
                row, curve = run_one(task, optimizer, args, repo)
            rows.append(row)
            curves[(task, optimizer)] = curve
            print(
                f"{task}/{optimizer}: {row['baseline']:.3f} -> {row['optimized']:.3f} "
                f"in {row['compile_s']} s, {row['optimizer_lm_calls']} LM calls",
                file=sys.stderr,
            )
    simulated = args.lm == "sim"
    print(format_table(rows))
    if simulated:
        print("note: simulated LM (`sim`): scores show the machinery, not model quality")
    plot_path = None
    if not args.no_plot:
        plot_path = Path(args.plot) if args.plot else DOCS / f"cycle-time-{args.lm}.png"
        title = (
            f"best validation score vs LM calls, lm={args.lm}, {args.lm_calls} optimizer calls, "
            f"train/val/test {args.max_train}/{args.max_val}/{args.max_test}"
        )
        plot(curves, rows, plot_path, title)
        print(f"plot: {plot_path}")
    print(
        json.dumps(
            {
                "benchmark": "cycle_time",
                "lm": args.lm,
                "simulated": simulated,
                "lm_call_budget": args.lm_calls,
                "budget": args.budget,
                "split": [args.max_train, args.max_val, args.max_test],
                "plot": str(plot_path) if plot_path else None,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
