"""The embedded LM's settings, measured: llama.cpp threads and extra buffer types.

The workload is the quick start's: real intent-classifier prompts as DSPy's JSONAdapter
writes them (with the output JSON schema), for a program without demos and one with 4
demos, in trials that revisit candidates as MIPROv2 does. The prompts are captured once; every
configuration then answers the same requests through `LocalLlamaEngine` (the code path
of a cycle). Rounds interleave the configurations in alternating order, the first round
is a discarded warm-up, and each figure is the median seconds per LM call with min-max
and n. Ratios are against the first configuration, in the same run.

    python benchmarks/local_lm.py --calls 48 --rounds 3
    python benchmarks/local_lm.py --configs t1,t2,t1-nobufts

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")

# name -> LocalLlamaEngine options
CONFIGS: dict[str, dict[str, Any]] = {
    "t1": {"n_threads": 1, "n_threads_batch": 1, "extra_bufts": True, "prompt_cache_mb": 0},
    "t1b2-cache": {
        "n_threads": 1,
        "n_threads_batch": 2,
        "extra_bufts": True,
        "prompt_cache_mb": 512,
    },
    "t2": {"n_threads": 2, "n_threads_batch": 2, "extra_bufts": True, "prompt_cache_mb": 0},
    "t1-nobufts": {
        "n_threads": 1,
        "n_threads_batch": 1,
        "extra_bufts": False,
        "prompt_cache_mb": 0,
    },
    "t1-cache": {"n_threads": 1, "n_threads_batch": 1, "extra_bufts": True, "prompt_cache_mb": 512},
    "t2-cache": {"n_threads": 2, "n_threads_batch": 2, "extra_bufts": True, "prompt_cache_mb": 512},
}
# The same with llama.cpp's batch size (llama-cpp-python keeps n_batch x vocabulary
# logits and copies them with every cached state): -b128, -b64, ...
for _name, _options in list(CONFIGS.items()):
    for _n_batch in (256, 128, 64, 32):
        CONFIGS[f"{_name}-b{_n_batch}"] = {**_options, "n_batch": _n_batch}


def capture_requests(calls: int, per_trial: int) -> list[Any]:
    """The requests a MIPROv2-like search on the intent task sends, in order: trials of
    `per_trial` validation examples, each trial one candidate (instruction x demo set),
    candidates revisited as Optuna does."""
    from tasks.cycle.spec import LMSpec
    from tasks.lm.providers import build_lm
    from tasks.programs import get_task

    task = get_task("intent")
    splits = task.load_splits()
    cycle_lm = build_lm(LMSpec(model="sim"), task)
    assert cycle_lm.engine is not None
    inner = cycle_lm.engine.inner
    captured: list[Any] = []

    class Recorder:
        supports_response_schema = True
        supported_params = inner.supported_params

        def complete(self, request: Any) -> Any:
            captured.append(request)
            return inner.complete(request)

    cycle_lm.engine.inner = Recorder()  # type: ignore[assignment]
    candidates = []
    for instructions, demos in (
        (None, []),
        (None, splits.train[:4]),
        ("Read the bank customer's message and name the single intent it expresses.", []),
        ("Read the bank customer's message and name the single intent it expresses.",
         splits.train[4:8]),
    ):  # fmt: skip
        program = task.build_program()
        for predictor in program.predictors():
            predictor.demos = list(demos)
            if instructions:
                predictor.signature = predictor.signature.with_instructions(instructions)
        candidates.append(program)
    trial_order = [0, 1, 2, 1, 3, 0, 3, 2]  # revisits, as a TPE search does
    examples = splits.val
    trial = 0
    with cycle_lm.context():
        while len(captured) < calls:
            program = candidates[trial_order[trial % len(trial_order)]]
            for i in range(per_trial):
                example = examples[i % len(examples)]
                program(**{f: example[f] for f in task.input_fields})
            trial += 1
    return captured[:calls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=48, help="LM calls per round and config")
    parser.add_argument("--per-trial", type=int, default=6, help="validation examples a trial")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (+1 warm-up)")
    parser.add_argument("--configs", default="t1,t2,t1-nobufts,t1-cache")
    parser.add_argument(
        "--busy-core", action="store_true",
        help="keep one core busy meanwhile (a spinning process), as a Prefect server or a "
        "test run does",
    )  # fmt: skip
    args = parser.parse_args()

    from tasks.lm.local import LocalLlamaEngine

    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    requests = capture_requests(args.calls, args.per_trial)
    engines = {name: LocalLlamaEngine(**CONFIGS[name]) for name in names}
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if args.busy_core else None
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for round_no in range(args.rounds + 1):
        order = names if round_no % 2 == 0 else list(reversed(names))
        for name in order:
            engine = engines[name]
            engine.forget_prompts()  # each round starts cold: no state from the last one
            started = time.perf_counter()
            for request in requests:
                engine.complete(request)
            elapsed = (time.perf_counter() - started) / len(requests)
            if round_no > 0:  # round 0 is the warm-up
                per_call[name].append(elapsed)

    if busy is not None:
        busy.kill()
        busy.wait()
    base = statistics.median(per_call[names[0]])
    rows = []
    print(f"{'config':<22}{'s/call median':>14}{'min':>8}{'max':>8}{'n':>4}{'vs ' + names[0]:>10}")
    for name in names:
        values = per_call[name]
        med = statistics.median(values)
        rows.append(
            {
                "config": name,
                **CONFIGS[name],
                "s_per_call_median": round(med, 4),
                "min": round(min(values), 4),
                "max": round(max(values), 4),
                "n": len(values),
                "ratio_vs_first": round(med / base, 3),
            }
        )
        print(
            f"{name:<22}{med:>14.3f}{min(values):>8.3f}{max(values):>8.3f}"
            f"{len(values):>4}{med / base:>10.3f}"
        )
    print(
        json.dumps(
            {
                "benchmark": "local_lm",
                "calls_per_round": len(requests),
                "rounds": args.rounds,
                "busy_core": args.busy_core,
                "cpu_count": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
                "configs": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
