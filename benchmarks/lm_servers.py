"""The embedded LM against the same model behind an OpenAI-compatible server, in one run.

Starts llama-cpp-python's server (`python -m llama_cpp.server`) on a free loopback port
serving the SmolLM2 file the `local` LM runs in-process, with the same thread count,
then evaluates the unoptimized intent classifier on the same test examples through:

- `local`: in-process llama.cpp (JSON schema as a grammar);
- `server json_schema`: `--lm openai/smollm2 --api-base ...` as dspyflow sends it
  (`--structured-output auto`);
- `server json_object`: what DSPy alone sends to a model LiteLLM does not know.

Rounds interleave the three in alternating order after a discarded warm-up round.
Per mode: calls/s, parse rate and accuracy as medians with min-max and n.

    python benchmarks/lm_servers.py --examples 12 --rounds 2

Prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

ALIAS = "smollm2"


def start_server(threads: int) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    from tasks.lm.llama_runtime import server_command
    from tasks.lm.local import local_model_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    command = server_command(local_model_path(), alias=ALIAS, port=port, threads=threads)
    log = tempfile.NamedTemporaryFile(prefix="lm-server-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}; log: {log.name}")
        try:
            if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"server did not answer in 120 s; log: {log.name}")


def evaluate(spec: Any, task: Any, examples: list[Any]) -> dict[str, float]:
    from tasks.lm.providers import build_lm

    cycle_lm = build_lm(spec, task)
    program = task.build_program()
    parsed = correct = 0
    started = time.perf_counter()
    with cycle_lm.context():
        for example in examples:
            try:
                prediction = program(**{f: example[f] for f in task.input_fields})
            except Exception:  # noqa: BLE001 - a parse failure is what we count
                continue
            parsed += 1
            correct += int(str(prediction.intent) == str(example.intent))
    elapsed = time.perf_counter() - started
    calls = cycle_lm.usage.snapshot()["lm_calls"]
    return {
        "calls_per_s": calls / elapsed,
        "parse_rate": parsed / len(examples),
        "accuracy": correct / len(examples),
        "calls": calls,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (+1 warm-up)")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    from tasks.cycle.spec import LMSpec
    from tasks.programs import get_task

    threads = int(os.environ.get("DSPYFLOW_LOCAL_THREADS", os.cpu_count() or 1))
    task = get_task("intent")
    examples = task.load_splits().test[: args.examples]
    proc, base = start_server(threads)
    remote = LMSpec(model=f"openai/{ALIAS}", api_base=base, max_tokens=args.max_tokens)
    modes = {
        "local": LMSpec(model="local", max_tokens=args.max_tokens),
        "server json_schema": remote,
        "server json_object": remote.model_copy(update={"structured_output": "json_object"}),
    }
    results: dict[str, list[dict[str, float]]] = {name: [] for name in modes}
    try:
        for round_no in range(args.rounds + 1):
            order = list(modes) if round_no % 2 == 0 else list(reversed(modes))
            for name in order:
                figures = evaluate(modes[name], task, examples)
                if round_no > 0:
                    results[name].append(figures)
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    rows = []
    print(f"{'mode':<22}{'calls/s':>9}{'(min-max)':>14}{'parse':>7}{'accuracy':>10}{'n':>3}")
    for name, runs in results.items():
        rate = [r["calls_per_s"] for r in runs]
        parse = statistics.median(r["parse_rate"] for r in runs)
        accuracy = statistics.median(r["accuracy"] for r in runs)
        rows.append(
            {
                "mode": name,
                "calls_per_s_median": round(statistics.median(rate), 3),
                "calls_per_s_min": round(min(rate), 3),
                "calls_per_s_max": round(max(rate), 3),
                "parse_rate": parse,
                "accuracy": accuracy,
                "n": len(runs),
            }
        )
        print(
            f"{name:<22}{statistics.median(rate):>9.2f}"
            f"{f'({min(rate):.2f}-{max(rate):.2f})':>14}{parse:>7.2f}{accuracy:>10.2f}{len(runs):>3}"
        )
    print(
        json.dumps(
            {
                "benchmark": "lm_servers",
                "examples": len(examples),
                "rounds": args.rounds,
                "max_tokens": args.max_tokens,
                "threads": threads,
                "load_avg_1m": os.getloadavg()[0],
                "modes": rows,
            }
        )
    )


if __name__ == "__main__":
    main()
