"""What the flow and the database cost: the same MIPROv2 cycle bare and through dspyflow.

Bare: baseline evaluation, MIPROv2 compile and final evaluation in plain DSPy.
dspyflow: the same spec through the `optimization_cycle` flow (Prefect task runs, the run
row, heartbeats, the optimized program stored). Same LM, same seed, same data: the same
LM calls. Runs alternate (bare, flow, bare, flow, ...) and the medians are compared.

    python benchmarks/cycle_overhead.py --lm sim --sim-latency-ms 10 --repeats 3
    python benchmarks/cycle_overhead.py --lm local --repeats 1          # the real local LM
    python benchmarks/cycle_overhead.py --lm local --full-cycle-only     # MIPROv2 light wall time

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def bare_cycle(spec) -> dict:  # type: ignore[no-untyped-def]
    """The same work without Prefect or the database."""
    import dspy

    from tasks.cycle import resolve_task
    from tasks.lm import build_lm
    from tasks.optimizers import CompileRequest, get_optimizer

    task = resolve_task(spec)
    splits = task.load_splits()
    train, val, test = (
        splits.train[: spec.max_train],
        splits.val[: spec.max_val],
        splits.test[: spec.max_test],
    )
    cycle_lm = build_lm(spec.lm, task)

    def evaluate(program) -> float:  # type: ignore[no-untyped-def]
        evaluator = dspy.Evaluate(
            devset=test,
            metric=task.metric,
            num_threads=spec.num_threads,
            display_progress=False,
            max_errors=len(test),
        )
        return float(evaluator(program).score) / 100.0

    with cycle_lm.context():
        baseline = evaluate(task.build_program())
        result = get_optimizer(spec.optimizer).compile(
            CompileRequest(
                program=task.build_program(),
                trainset=train,
                valset=val,
                metric=task.metric,
                budget=spec.budget,
                seed=spec.seed,
                num_threads=spec.num_threads,
            )
        )
        best = evaluate(result.program)
    return {"baseline": baseline, "best": best, "lm_calls": cycle_lm.usage.calls}


def flow_cycle(spec) -> dict:  # type: ignore[no-untyped-def]
    from flows.optimization import optimization_cycle

    summary = optimization_cycle(spec)
    assert summary.state == "succeeded", summary.error
    return {
        "baseline": summary.baseline_score,
        "best": summary.best_score,
        "lm_calls": summary.lm_calls,
        "run_id": summary.run_id,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="sim", choices=["sim", "local"])
    parser.add_argument("--task", default="intent")
    parser.add_argument("--sim-latency-ms", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-train", type=int, default=40)
    parser.add_argument("--max-val", type=int, default=20)
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument(
        "--full-cycle-only",
        action="store_true",
        help="Only time one full flow cycle (the quick-start job).",
    )
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="dspyflow-bench-"))
    os.environ.setdefault("DSPYFLOW_HOME", str(home))

    from tasks.spec import CycleSpec, LMSpec

    spec = CycleSpec(
        task=args.task,
        optimizer="mipro",
        budget="light",
        lm=LMSpec(model=args.lm, sim_latency_ms=args.sim_latency_ms if args.lm == "sim" else 0),
        max_train=args.max_train,
        max_val=args.max_val,
        max_test=args.max_test,
    )

    # Start Prefect's ephemeral server once, outside the timings (a one-off per process).
    from prefect import flow

    @flow(name="warm-up")
    def warm_up() -> None:
        return None

    t0 = time.perf_counter()
    warm_up()
    server_start_s = time.perf_counter() - t0

    if args.full_cycle_only:
        t0 = time.perf_counter()
        result = flow_cycle(spec)
        wall = time.perf_counter() - t0
        figures = {
            "benchmark": "cycle_wall_time",
            "lm": args.lm,
            "task": args.task,
            "simulated": args.lm == "sim",
            "wall_s": round(wall, 2),
            "server_start_s": round(server_start_s, 2),
            **result,
        }
        print(
            f"{args.task} MIPROv2 light on {args.lm}: {wall:.1f} s, baseline "
            f"{result['baseline']:.3f} -> {result['best']:.3f}, {result['lm_calls']} LM calls"
        )
        print(json.dumps(figures))
        return

    bare_times: list[float] = []
    flow_times: list[float] = []
    calls: dict[str, list[int]] = {"bare": [], "flow": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        calls["bare"].append(bare_cycle(spec)["lm_calls"])
        bare_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        calls["flow"].append(flow_cycle(spec)["lm_calls"])
        flow_times.append(time.perf_counter() - t0)

    bare, through = statistics.median(bare_times), statistics.median(flow_times)
    ratio = through / bare
    print(f"{'':>10} {'median s':>10} {'runs':>24} {'LM calls':>10}")
    print(
        f"{'bare':>10} {bare:>10.2f} {str([round(t, 2) for t in bare_times]):>24} "
        f"{calls['bare'][0]:>10}"
    )
    print(
        f"{'dspyflow':>10} {through:>10.2f} {str([round(t, 2) for t in flow_times]):>24} "
        f"{calls['flow'][0]:>10}"
    )
    print(
        f"overhead ratio {ratio:.3f} (target <= 1.05); Prefect server start {server_start_s:.1f} s"
        f" (once per process, not in the ratio){' [simulated LM]' if args.lm == 'sim' else ''}"
    )
    print(
        json.dumps(
            {
                "benchmark": "cycle_overhead",
                "lm": args.lm,
                "simulated": args.lm == "sim",
                "sim_latency_ms": args.sim_latency_ms if args.lm == "sim" else None,
                "bare_s": round(bare, 3),
                "flow_s": round(through, 3),
                "ratio": round(ratio, 4),
                "bare_runs_s": [round(t, 3) for t in bare_times],
                "flow_runs_s": [round(t, 3) for t in flow_times],
                "lm_calls_bare": calls["bare"],
                "lm_calls_flow": calls["flow"],
                "server_start_s": round(server_start_s, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
