"""Does embedding-based demo selection help? Score of the same program with k demos chosen
three ways, on the real LM, in one run:

- first:   the first k training examples (what a naive labeled few-shot does)
- diverse: k examples spread over the embedding space (farthest point, cosine)
- nearest: per test input, its k nearest training examples (cosine top-k)

    python benchmarks/demo_selection.py --task intent --lm local --k 4 --max-test 40

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="intent")
    parser.add_argument("--lm", default="local")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--max-test", type=int, default=40)
    args = parser.parse_args()

    from gpu.device import resolve_device
    from tasks.demo_selection import DemoSelector
    from tasks.lm import build_lm
    from tasks.programs import get_task
    from tasks.spec import LMSpec

    task = get_task(args.task)
    splits = task.load_splits()
    test = splits.test[: args.max_test]
    cycle_lm = build_lm(LMSpec(model=args.lm), task)
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
    results: dict[str, dict[str, float]] = {}
    with cycle_lm.context():
        for name, demos_per_input in pools.items():
            program = task.build_program()
            (predictor,) = program.predictors()
            total = 0.0
            t0 = time.perf_counter()
            for example, demos in zip(test, demos_per_input, strict=True):
                predictor.demos = list(demos)
                prediction = program(**example.inputs())
                total += float(task.metric(example, prediction))
            results[name] = {
                "score": round(total / len(test), 4),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(
                f"{name:>8}: score {results[name]['score']:.3f} "
                f"({results[name]['seconds']:.0f} s, {len(test)} inputs, k={args.k})"
            )
    print(
        json.dumps(
            {
                "benchmark": "demo_selection",
                "task": args.task,
                "lm": args.lm,
                "simulated": args.lm == "sim",
                "k": args.k,
                "test_examples": len(test),
                "device": str(resolve_device("auto")),
                "embed_trainset_s": round(embed_s, 2),
                "nearest_selection_ms": round(select_ms, 2),
                "scores": results,
            }
        )
    )


if __name__ == "__main__":
    main()
