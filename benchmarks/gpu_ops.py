"""Benchmark dspyflow's GPU ops: ours vs plain torch, vs the CPU, vs measured peaks.

    python benchmarks/gpu_ops.py --device cpu --sizes small
    python benchmarks/gpu_ops.py --device cuda --sizes full --store
    python benchmarks/gpu_ops.py --device cuda --sizes full --json-out gpu-full.json  # on a GPU box
    python benchmarks/gpu_ops.py --load gpu-full.json --store  # record it here, later

Prints a table, then as its LAST line one JSON object with the figures (per op: ours ms,
plain-torch ms, ratio, GB/s, TFLOP/s, % of peak, max error vs float64, ...).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from gpu.benchmark import BenchmarkConfig, SuiteResult, format_table, run_suite  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--sizes", choices=["small", "full"], default="small")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--ops", nargs="*", default=None, help="only these ops (default: all)")
    parser.add_argument(
        "--no-cpu-baseline",
        action="store_true",
        help="on a GPU, skip timing ours on the CPU (no speedup figure)",
    )
    parser.add_argument(
        "--json-out", default=None, help="also write the whole result (samples too) as JSON"
    )
    parser.add_argument(
        "--load",
        default=None,
        help="don't run: read a result written by --json-out (e.g. on a GPU machine)",
    )
    parser.add_argument(
        "--store",
        action="store_true",
        help="also record the rows in DSPYFLOW_DATABASE_URL's database",
    )
    args = parser.parse_args(argv)
    if args.load:
        result = SuiteResult.model_validate_json(Path(args.load).read_text())
    else:
        try:
            result = run_suite(
                BenchmarkConfig(
                    device=args.device,
                    sizes=args.sizes,
                    warmup=args.warmup,
                    reps=args.reps,
                    ops=args.ops,
                    cpu_baseline=not args.no_cpu_baseline,
                )
            )
        except ValueError as exc:  # DeviceUnavailableError and bad arguments: one clear line
            print(f"error: {exc}", file=sys.stderr)
            return 2
    if args.json_out:
        Path(args.json_out).write_text(result.model_dump_json())
    print(format_table(result))
    for r in result.results:
        if r.notes:
            print(f"note: {r.case.key}: {'; '.join(r.notes)}")
    if args.store:
        from storage.repository import Repository

        n = Repository().add_benchmark_results(result.to_rows())
        print(f"stored {n} rows, session {result.session_id}")
    print(json.dumps(result.summary(), separators=(",", ":")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
