"""What the flow and the database cost: the same MIPROv2 cycle bare and through dspyflow.

Bare: baseline evaluation, MIPROv2 compile and final evaluation in plain DSPy.
dspyflow: the same spec through the `optimization_cycle` flow (Prefect task runs, the run
row, heartbeats, the LM journal, the optimized program stored). No-Prefect: the same
`run_cycle` with its steps called directly (as a batch job runs them), which splits the
overhead into dspyflow's own machinery and Prefect's. Same LM, same seed, same data: the
same LM calls. One warm-up round of each is discarded (imports, Optuna, caches: the first
run of any arm pays them), then rounds run in alternating order (A B C, C B A, ...).
Every run starts from a collected, frozen heap (gc.freeze, as `dspyflow optimize` does
after start-up): otherwise a 0.2-0.3 s full collection of the start-up heap lands in
whichever arm crosses the threshold (`--no-freeze` shows it; GC seconds are reported per
arm). Figures: median with min-max and n of each, the ratio of the medians, the per-round
ratios and the fixed overhead in seconds. Prefect's server start, which every CLI user
pays once per process, is reported on its own.

    python benchmarks/cycle_overhead.py --lm sim --sim-latency-ms 10 --repeats 4
    python benchmarks/cycle_overhead.py --lm sim --repeats 2 --profile /tmp/cycle.prof
    python benchmarks/cycle_overhead.py --lm local --repeats 1          # the real local LM
    python benchmarks/cycle_overhead.py --lm local --full-cycle-only     # MIPROv2 light wall time

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def bare_cycle(spec) -> dict:  # type: ignore[no-untyped-def]
    """The same work without Prefect or the database."""
    import dspy

    from tasks.cycle.data import resolve_task
    from tasks.lm.providers import build_lm
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


def _figures(summary) -> dict:  # type: ignore[no-untyped-def]
    assert summary.state == "succeeded", summary.error
    return {
        "baseline": summary.baseline_score,
        "best": summary.best_score,
        "lm_calls": summary.lm_calls,
        "run_id": summary.run_id,
    }


def flow_cycle(spec) -> dict:  # type: ignore[no-untyped-def]
    from flows.optimization import optimization_cycle

    summary = optimization_cycle(spec)
    return _figures(summary)


def no_prefect_cycle(spec) -> dict:  # type: ignore[no-untyped-def]
    """dspyflow's cycle without Prefect: run row, monitor, journal, record."""
    from storage.repository import Repository
    from tasks.cycle.steps import run_cycle

    summary = run_cycle(spec, Repository())
    return _figures(summary)


class GCClock:
    """Seconds the cyclic GC spent (all generations) since `reset()`."""

    def __init__(self) -> None:
        import gc

        self.seconds = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:  # type: ignore[type-arg]
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started

    def reset(self) -> None:
        self.seconds = 0.0


def profile_flow(spec, path: Path) -> None:  # type: ignore[no-untyped-def]
    """One more flow cycle and one bare cycle under cProfile: where the extra time goes."""
    import cProfile
    import pstats

    for name, fn in (("bare", bare_cycle), ("flow", flow_cycle)):
        profiler = cProfile.Profile()
        profiler.enable()
        fn(spec)
        profiler.disable()
        out = path.with_name(f"{path.stem}-{name}{path.suffix or '.prof'}")
        profiler.dump_stats(out)
        print(f"--- {name}: top 15 by own time ({out}) ---")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm", default="sim", choices=["sim", "local"])
    parser.add_argument("--task", default="intent")
    parser.add_argument("--sim-latency-ms", type=float, default=10.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=4,
        help="measured rounds of (bare, dspyflow), alternating order, after one discarded "
        "warm-up round",
    )
    parser.add_argument("--max-train", type=int, default=40)
    parser.add_argument("--max-val", type=int, default=20)
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument(
        "--full-cycle-only",
        action="store_true",
        help="Only time one full flow cycle (the quick-start job).",
    )
    parser.add_argument(
        "--profile", type=Path, default=None, help="cProfile one more cycle each way to FILE"
    )
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="do not collect and freeze the heap before each run (GC pauses then land in "
        "whichever arm crosses the threshold)",
    )
    parser.add_argument(
        "--prefect-heartbeat",
        type=int,
        default=None,
        help="turn Prefect's flow-run heartbeat back on every N s (>= 30; off under the "
        "CLI's temporary server): what it costs",
    )
    args = parser.parse_args()

    for name in ("dspy", "optuna", "httpx", "LiteLLM", "litellm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    home = Path(tempfile.mkdtemp(prefix="dspyflow-bench-"))
    os.environ.setdefault("DSPYFLOW_HOME", str(home))

    from tasks.cycle.spec import CycleSpec, LMSpec

    spec = CycleSpec(
        task=args.task,
        optimizer="mipro",
        budget="light",
        lm=LMSpec(model=args.lm, sim_latency_ms=args.sim_latency_ms if args.lm == "sim" else 0),
        max_train=args.max_train,
        max_val=args.max_val,
        max_test=args.max_test,
    )

    # The Prefect setup `dspyflow optimize` runs in: its temporary server (started once
    # per process; every CLI user pays it: reported, not in the ratio), or the server at
    # PREFECT_API_URL when one is set.
    import contextlib

    from flows.cli.runtime import temporary_prefect_server

    with contextlib.ExitStack() as stack:
        t0 = time.perf_counter()
        stack.enter_context(temporary_prefect_server())
        server_start_s = time.perf_counter() - t0
        if args.prefect_heartbeat is not None:
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            stack.enter_context(
                temporary_settings(
                    updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: args.prefect_heartbeat}
                )
            )
        run_benchmark(args, spec, server_start_s)


def run_benchmark(args: argparse.Namespace, spec: Any, server_start_s: float) -> None:
    from benchmarks._ab import fmt, interleaved, paired_ratios, spread

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

    def show(name: str, round_no: int, seconds: float, result: dict) -> None:  # type: ignore[type-arg]
        label = "warm-up" if round_no < 0 else f"round {round_no}"
        print(
            f"  {label:>8} {name:>10}: {seconds:6.2f} s, {result['lm_calls']} LM calls, "
            f"baseline {result['baseline']:.3f} -> {result['best']:.3f}",
            flush=True,
        )

    gc_clock = GCClock()

    def fresh_heap() -> None:
        import gc

        if not args.no_freeze:
            gc.collect()
            gc.freeze()
        gc_clock.reset()

    def timed(fn: Any) -> Any:
        def run() -> dict:  # type: ignore[type-arg]
            out = fn(spec)
            return {**out, "gc_s": gc_clock.seconds}

        return run

    load_before = os.getloadavg()[0]
    samples = interleaved(
        {
            "bare": timed(bare_cycle),
            "no-prefect": timed(no_prefect_cycle),
            "dspyflow": timed(flow_cycle),
        },
        args.repeats,
        on_run=show,
        before_each=fresh_heap,
    )
    load_after = os.getloadavg()[0]
    bare_s, flow_s = samples["bare"].seconds, samples["dspyflow"].seconds
    direct_s = samples["no-prefect"].seconds
    bare, through, direct = spread(bare_s), spread(flow_s), spread(direct_s)
    ratio = float(through["median"]) / float(bare["median"])
    per_round = spread(paired_ratios(bare_s, flow_s))
    direct_per_round = spread(paired_ratios(bare_s, direct_s))
    extra_s = spread([f - b for b, f in zip(bare_s, flow_s, strict=True)])
    gc_s = {name: spread([r["gc_s"] for r in s.results]) for name, s in samples.items()}
    calls = {name: [r["lm_calls"] for r in s.results] for name, s in samples.items()}
    sim = " [sim LM]" if args.lm == "sim" else ""
    print(f"bare DSPy:            {fmt(bare, ' s', 2)}, GC {fmt(gc_s['bare'], ' s', 3)}")
    print(f"dspyflow, no Prefect: {fmt(direct, ' s', 2)}, GC {fmt(gc_s['no-prefect'], ' s', 3)}")
    print(f"dspyflow:             {fmt(through, ' s', 2)}, GC {fmt(gc_s['dspyflow'], ' s', 3)}")
    print(
        f"overhead: ratio of medians {ratio:.3f}, per-round ratio {fmt(per_round)} "
        f"(target <= 1.05), {fmt(extra_s, ' s', 2)} per cycle; without Prefect "
        f"{fmt(direct_per_round)}; Prefect server start {server_start_s:.1f} s once per "
        f"process, not in the ratio{sim}"
    )
    if args.profile is not None:
        profile_flow(spec, args.profile)
    print(
        json.dumps(
            {
                "benchmark": "cycle_overhead",
                "lm": args.lm,
                "simulated": args.lm == "sim",
                "sim_latency_ms": args.sim_latency_ms if args.lm == "sim" else None,
                "task": args.task,
                "order": "one warm-up round discarded, then rounds in alternating order",
                "bare_s": bare,
                "flow_s": through,
                "ratio_of_medians": round(ratio, 4),
                "per_round_ratio": per_round,
                "target_ratio_max": 1.05,
                "overhead_s": extra_s,
                "no_prefect_s": direct,
                "no_prefect_per_round_ratio": direct_per_round,
                "gc_s": gc_s,
                "heap_frozen_before_each_run": not args.no_freeze,
                "bare_runs_s": [round(t, 3) for t in bare_s],
                "no_prefect_runs_s": [round(t, 3) for t in direct_s],
                "flow_runs_s": [round(t, 3) for t in flow_s],
                "lm_calls_bare": calls["bare"],
                "lm_calls_no_prefect": calls["no-prefect"],
                "lm_calls_flow": calls["dspyflow"],
                "server_start_s": round(server_start_s, 2),
                "prefect_flow_heartbeat_s": args.prefect_heartbeat,
                "cpus": os.cpu_count(),
                "load_avg_1m": [round(load_before, 2), round(load_after, 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
