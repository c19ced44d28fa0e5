"""Benchmark dspyflow's GPU ops: ours vs plain torch, vs the CPU, vs measured peaks.

    python benchmarks/gpu_ops.py --device cpu --sizes small --reps 15
    python benchmarks/gpu_ops.py --device cuda --sizes full --store
    python benchmarks/gpu_ops.py --device cuda --sizes full --json-out gpu-full.json  # on a GPU box
    python benchmarks/gpu_ops.py --load gpu-full.json --store  # record it here, later
    python benchmarks/gpu_ops.py --load gpu-check.json --store  # scripts/gpu-check.sh's file

Each case prints one JSON line as soon as it is measured (flushed; `"error"` for a case
that failed, the others still run), then a table, then as its LAST line one JSON object
with all the figures (per op: ours and plain-torch median ms with min-max and n, ratio,
GB/s, TFLOP/s, % of peak, max error vs float64, which implementation ran, ...).
On a CPU the baseline is float32 torch, what a user would write there; CPU ratios are
not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout

from gpu.benchmark import (  # noqa: E402
    BenchmarkConfig,
    CaseError,
    OpResult,
    SuiteResult,
    format_table,
    run_suite,
)


def _emitter(stream: IO[str], jsonl: IO[str] | None) -> Callable[[OpResult | CaseError], None]:
    """Write each case's line the moment it is measured: a later crash loses nothing."""

    def emit(item: OpResult | CaseError) -> None:
        line = json.dumps(item.line(), separators=(",", ":"))
        for out in (stream, jsonl):
            if out is not None:
                out.write(line + "\n")
                out.flush()

    return emit


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
        "--jsonl", default=None, help="also append each case's line to this file as measured"
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
        try:
            data = json.loads(Path(args.load).read_text())
            # A scripts/gpu-check.sh report carries the suite under "suite_result".
            result = SuiteResult.model_validate(data.get("suite_result", data))
        except (OSError, ValueError) as exc:
            print(f"error: cannot load {args.load}: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 2
    else:
        jsonl = open(args.jsonl, "a", encoding="utf-8") if args.jsonl else None  # noqa: SIM115
        try:
            result = run_suite(
                BenchmarkConfig(
                    device=args.device,
                    sizes=args.sizes,
                    warmup=args.warmup,
                    reps=args.reps,
                    ops=args.ops,
                    cpu_baseline=not args.no_cpu_baseline,
                ),
                on_result=_emitter(sys.stdout, jsonl),
            )
        except ValueError as exc:  # DeviceUnavailableError and bad arguments: one clear line
            print(f"error: {exc}", file=sys.stderr)
            return 2
        finally:
            if jsonl is not None:
                jsonl.close()
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
    print(json.dumps(result.summary(), separators=(",", ":")), flush=True)
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
