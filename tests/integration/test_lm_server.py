"""A real OpenAI-compatible LM server works as well as the embedded LM.

The test starts llama-cpp-python's own server (its `[server]` extra) on a free port,
serving the same SmolLM2 file the `local` LM runs in-process, and talks to it the way
users reach vLLM, SGLang or Ollama: `--lm openai/<alias> --api-base http://.../v1`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

pytestmark = [
    pytest.mark.local_lm,
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llama_cpp") is None
        or importlib.util.find_spec("sse_starlette") is None,
        reason="needs the `local` extra and llama-cpp-python[server] (the `dev` extra)",
    ),
]

ALIAS = "smollm2"
N_EXAMPLES = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def lm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from tasks.lm.llama_runtime import server_command
    from tasks.lm.local import local_model_path

    port = _free_port()
    # A file, not a pipe: llama.cpp's load log alone can fill a pipe and block the server.
    log_path = tmp_path_factory.mktemp("lm-server") / "server.log"
    log = log_path.open("w")
    # The server loads the model as the `local` LM does (the probe's decision applies).
    command = server_command(local_model_path(), alias=ALIAS, port=port, threads=1)
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"LM server exited {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("LM server did not answer within 120 s")
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _answers(spec, task, examples):  # type: ignore[no-untyped-def]
    """(parsed answers or None per example, LM calls) for the unoptimized program."""
    from tasks.lm.providers import build_lm

    cycle_lm = build_lm(spec, task)
    program = task.build_program()
    answers: list[str | None] = []
    with cycle_lm.context():
        for example in examples:
            try:
                prediction = program(**{f: example[f] for f in task.input_fields})
                answers.append(str(prediction.intent))
            except Exception:  # noqa: BLE001 - a parse failure is what we count
                answers.append(None)
    return answers, cycle_lm.usage.snapshot()["lm_calls"]


def test_server_answers_parse_and_match_the_embedded_lm(lm_server: str) -> None:
    from tasks.cycle.spec import LMSpec
    from tasks.programs import get_task

    task = get_task("intent")
    examples = task.load_splits().test[:N_EXAMPLES]
    remote, calls = _answers(
        LMSpec(model=f"openai/{ALIAS}", api_base=lm_server, max_tokens=256), task, examples
    )
    local, _ = _answers(LMSpec(model="local"), task, examples)
    parsed = sum(a is not None for a in remote)
    assert parsed / len(examples) >= 0.95, remote
    assert calls == len(examples)  # one call an answer: no JSON-mode retries
    gold = [str(e.intent) for e in examples]
    remote_score = sum(a == g for a, g in zip(remote, gold, strict=True)) / len(gold)
    local_score = sum(a == g for a, g in zip(local, gold, strict=True)) / len(gold)
    # Same weights, same prompt, greedy decoding to the same schema: the scores agree
    # within noise (two answers of twenty).
    assert abs(remote_score - local_score) <= 0.10, (remote_score, local_score)


def test_without_a_schema_answers_fail_to_parse(lm_server: str) -> None:
    """The defect this fixes, shown on the same server: json_object alone lets the model
    ramble, and answers fail to parse."""
    from tasks.cycle.spec import LMSpec
    from tasks.programs import get_task

    task = get_task("intent")
    examples = task.load_splits().test[:6]
    spec = LMSpec(
        model=f"openai/{ALIAS}", api_base=lm_server, structured_output="json_object", max_tokens=64
    )
    remote, _ = _answers(spec, task, examples)
    with_schema, _ = _answers(
        spec.model_copy(update={"structured_output": "json_schema"}), task, examples
    )
    assert sum(a is not None for a in with_schema) > sum(a is not None for a in remote)


def test_cycle_through_the_server_from_the_cli(lm_server: str, tmp_path: Path) -> None:
    """`dspyflow optimize --lm openai/... --api-base ...`: a MIPROv2 cycle through the server,
    recorded with its scores. A time budget keeps it short on a loaded CI machine: the run
    ends `succeeded` or, stopped by the budget, `timed_out` with its best program scored."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
        "DSPYFLOW_HOME": str(tmp_path / "home"),
        "DSPYFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'results.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "SERVER_KEY": "not-checked",
    }
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "dspyflow"),
            "optimize",
            "--task", "intent",
            "--lm", f"openai/{ALIAS}",
            "--api-base", lm_server,
            "--api-key-env", "SERVER_KEY",
            "--max-train", "8", "--max-val", "6", "--max-test", "8",
            "--time-budget", "120",
            "--format", "json",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    summary = json.loads(done.stdout)
    assert summary["state"] in ("succeeded", "timed_out"), summary
    assert done.returncode == (0 if summary["state"] == "succeeded" else 1)
    assert summary["lm"] == f"openai/{ALIAS}" and not summary["simulated"]
    assert summary["baseline_score"] is not None and summary["best_score"] is not None
    assert summary["lm_calls"] > 8  # the baseline and at least part of the search
    from storage.db import get_engine
    from storage.repository import Repository

    run = Repository(get_engine(env["DSPYFLOW_DATABASE_URL"])).get_run(summary["run_id"])
    assert run.program_state  # the optimized (or best-so-far) program is stored
