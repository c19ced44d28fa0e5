"""Does embedding-based demo selection help? Score of the same program with k demos chosen
three ways, on the real LM, in one run:

- first:   the first k training examples (what a naive labeled few-shot does)
- diverse: k examples spread over the embedding space (farthest point, cosine)
- nearest: per test input, its k nearest training examples (cosine top-k)

    python benchmarks/demo_selection.py --task intent --lm local --k 4 --max-test 40
    python benchmarks/demo_selection.py --task intent --lm sim --k 4 --max-test 70

Per test input the three ways run in alternating order after a discarded warm-up call of
each. Scores are over the same n inputs; each way is compared with `first` per input
(better / worse counts, mean difference with a 95 % bootstrap interval).

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="intent")
    parser.add_argument("--lm", default="local")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument("--sim-latency-ms", type=float, default=0.0)
    args = parser.parse_args()

    from benchmarks._ab import bootstrap_mean_diff, round_order, spread
    from gpu.device import resolve_device
    from tasks.cycle.spec import LMSpec
    from tasks.lm.providers import build_lm
    from tasks.optimizers.demo_selection import DemoSelector
    from tasks.programs import get_task

    task = get_task(args.task)
    splits = task.load_splits()
    test = splits.test[: args.max_test]
    lm_spec = LMSpec(model=args.lm)
    if lm_spec.provider == "sim":
        lm_spec = lm_spec.model_copy(update={"sim_latency_ms": args.sim_latency_ms})
    cycle_lm = build_lm(lm_spec, task)
    t0 = time.perf_counter()
    selector = DemoSelector(splits.train, task.input_fields)
    embed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nearest = selector.nearest_demos_batch(test, args.k)
    select_ms = (time.perf_counter() - t0) * 1000
    pools = {
        "first": [splits.train[: args.k]] * len(test),
        "diverse": [selector.diverse_demos(args.k)] * len(test),
        "nearest": nearest,
    }
    names = list(pools)
    scores: dict[str, list[float]] = {name: [] for name in names}
    seconds: dict[str, list[float]] = {name: [] for name in names}
    programs = {name: task.build_program() for name in names}

    def answer(name: str, example: Any, demos: list[Any]) -> float:
        program = programs[name]
        (predictor,) = program.predictors()
        predictor.demos = list(demos)
        return float(task.metric(example, program(**example.inputs())))

    with cycle_lm.context():
        # Warm-up, discarded: one call per way on a training input (model load, caches).
        warm = splits.train[-1]
        for name in names:
            answer(name, warm, pools[name][0])
        # Per input, the three ways in alternating order: a machine that gets busier
        # mid-run slows all three alike.
        for i, example in enumerate(test):
            for name in round_order(names, i):
                t0 = time.perf_counter()
                scores[name].append(answer(name, example, pools[name][i]))
                seconds[name].append(time.perf_counter() - t0)

    results: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {
            "score": round(sum(scores[name]) / len(test), 4),
            "n": len(test),
            "s_per_call": spread(seconds[name], 3),
        }
        if name != "first":
            mean, lo, hi = bootstrap_mean_diff(scores["first"], scores[name])
            row["vs_first"] = {
                "mean_diff": round(mean, 4),
                "ci95": [round(lo, 4), round(hi, 4)],
                "better": sum(b > a for a, b in zip(scores["first"], scores[name], strict=True)),
                "worse": sum(b < a for a, b in zip(scores["first"], scores[name], strict=True)),
            }
        results[name] = row
        vs = row.get("vs_first")
        print(
            f"{name:>8}: score {row['score']:.3f} (n={len(test)}, k={args.k})"
            + (
                f", vs first {vs['mean_diff']:+.3f} [95 % CI {vs['ci95'][0]:+.3f}, "
                f"{vs['ci95'][1]:+.3f}], better on {vs['better']}, worse on {vs['worse']}"
                if vs
                else ""
            )
            + f"; {row['s_per_call']['median']:.3f} s per call"
            + (" [sim LM]" if lm_spec.provider == "sim" else "")
        )
    print(
        json.dumps(
            {
                "benchmark": "demo_selection",
                "task": args.task,
                "lm": args.lm,
                "simulated": lm_spec.provider == "sim",
                "k": args.k,
                "test_examples": len(test),
                "order": "one discarded warm-up call per way, then per input in alternating order",
                "device": str(resolve_device("auto")),
                "embedder": type(selector.embedder).__name__,
                "embed_trainset_s": round(embed_s, 2),
                "nearest_selection_ms": round(select_ms, 2),
                "scores": results,
            }
        )
    )


if __name__ == "__main__":
    main()
