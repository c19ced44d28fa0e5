"""`dspyflow batch --task-runner dask` on a real cluster: a `prefect server start` (its
own PostgreSQL database), a `dask scheduler`, two `dask worker` processes (8 threads
each, under their nannies), results in a fresh PostgreSQL database per test. The batch
is the CLI, in its own process, as an operator runs it.

Job counts are scaled to keep this module near two minutes on 2 busy cores (the
1000-job run is `benchmarks/scale_out.py --long 1000`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from storage.db import get_engine
from storage.repository import Repository
from tasks.batch.local_cluster import BIN, LocalCluster
from tests.cluster.conftest import CALL_LOG_PRELOAD, ROOT, base_env
from tests.cluster.sim_call_log import read_calls, read_outcomes

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.postgres]

TERMINAL = {"succeeded", "failed", "timed_out", "budget_exhausted", "cancelled", "stale"}


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, prefect_database: str
) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("dask-cluster")
    env = base_env(tmp)
    env["DSPYFLOW_SIM_CALL_LOG"] = str(tmp / "calls")
    (tmp / "calls").mkdir()
    c = LocalCluster(tmp, env)
    try:
        c.start_prefect_server(prefect_database)
        c.start_scheduler()
        c.start_dask_workers(2, nthreads=8, preload=CALL_LOG_PRELOAD)
        yield c
    finally:
        c.close()


def _batch(
    cluster: LocalCluster, results_url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "dspyflow"), "batch", "--format", "json", *args],
        cwd=ROOT,
        env={**(env or cluster.env), "DSPYFLOW_DATABASE_URL": results_url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"dspyflow batch still running after {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def _summary(out: str) -> dict[str, Any]:
    return json.loads(out[out.index("{") :])


def _dask_args(cluster: LocalCluster) -> list[str]:
    assert cluster.scheduler
    return ["--task-runner", "dask", "--dask-address", cluster.scheduler]


def test_kill_9_of_a_dask_worker_mid_batch_loses_nothing(
    cluster: LocalCluster, results_url: str
) -> None:
    """200 sim jobs, 5 % transient LM faults (counted as the provider raised them); one
    Dask worker process is `kill -9`ed while it runs cycles. Every job ends `succeeded`:
    the killed worker's jobs run again on a live worker (attempt 2, with a `worker_lost`
    alert naming the dead process)."""
    jobs = 200
    calls_dir = Path(cluster.env["DSPYFLOW_SIM_CALL_LOG"])
    for old in calls_dir.glob("*.log"):
        old.unlink()
    proc = _batch(
        cluster,
        results_url,
        "--generate", str(jobs), "--lm", "sim", "--sim-latency-ms", "20",
        "--sim-error-rate", "0.05", "--lm-calls", "10", "--workers", "16",
        *_dask_args(cluster),
    )  # fmt: skip
    repo = Repository(get_engine(results_url))
    victim: int | None = None
    held: list[str] = []
    worker_pids = {int(w["pid"]) for w in cluster.dask_workers().values()}
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            runs = repo.list_runs(limit=None)
        except Exception:  # noqa: BLE001 - the batch creates the schema
            continue
        done = sum(r.state == "succeeded" for r in runs)
        running = [r for r in runs if r.state == "running"]
        if done < 20 or len(running) < 6:
            continue
        by_pid: dict[int, list[str]] = {}
        for r in running:
            by_pid.setdefault(int(r.worker.rpartition(":")[2]), []).append(r.id)
        pid, ids = max(by_pid.items(), key=lambda kv: len(kv[1]))
        assert pid in worker_pids, (pid, worker_pids)
        os.kill(pid, signal.SIGKILL)
        victim, held = pid, _still_held_after_death(repo, pid, ids)
    assert victim is not None, f"never saw the batch mid-run:\n{proc.stderr and ''}"
    assert held, "every run of the killed worker had finished before the kill landed"
    rc, out, err = _finish(proc, timeout=300)
    assert rc == 0, err[-4000:]
    summary = _summary(out)
    runs = repo.list_runs(limit=None)
    assert len(runs) == jobs and all(r.state in TERMINAL for r in runs)
    assert summary["succeeded"] == jobs, summary["top_errors"]
    outcomes = [o for rows in read_outcomes(calls_dir).values() for _, o in rows]
    faults = sum(o in ("RateLimitError", "ServerError") for o in outcomes)
    assert 0.02 * len(outcomes) < faults < 0.08 * len(outcomes), (faults, len(outcomes))
    victim_name = f":{victim}"
    for run_id in held:
        run = repo.get_run(run_id)
        assert run.state == "succeeded" and not run.worker.endswith(victim_name), run
        assert run.attempt == 2
    alerts = [a for rid in held for a in repo.get_run(rid, with_details=True).alerts]
    assert {a.kind for a in alerts} == {"worker_lost"}
    assert all(f"worker process {victim} " in a.message for a in alerts)
    # The cycles ran in both worker processes, never in the CLI's.
    assert len({r.worker for r in runs}) >= 2


def _still_held_after_death(repo: Repository, pid: int, run_ids: list[str]) -> list[str]:
    """The runs among `run_ids` that the killed process had not finished. The snapshot
    that chose the victim is up to a poll old, and a 200 ms sim cycle can end in between;
    once the process is gone it can write nothing more, so what it finished is final."""
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    victim_name = f":{pid}"
    held = []
    for run_id in run_ids:
        run = repo.get_run(run_id)
        if run.state in TERMINAL and run.worker.endswith(victim_name) and run.attempt == 1:
            continue  # finished before the kill landed
        held.append(run_id)
    return held


def test_concurrency_and_rate_limits_hold_across_worker_processes(
    cluster: LocalCluster, results_url: str
) -> None:
    """The global `optimization` limit (`prefect concurrency-limit create optimization
    3`) caps the cycles running in all worker processes together; the Prefect rate limit
    (`--prefect-rate-limit --lm-rps 12`) caps the LM calls the simulated provider
    receives from all of them: every window of W seconds sees at most 12 W + 1 calls."""
    rps, cap = 12.0, 3
    created = cluster.prefect("concurrency-limit", "create", "optimization", str(cap))
    assert created.returncode == 0, created.stdout + created.stderr
    calls_dir = Path(cluster.env["DSPYFLOW_SIM_CALL_LOG"])
    for old in calls_dir.glob("*.log"):
        old.unlink()
    try:
        started = time.time()
        proc = _batch(
            cluster,
            results_url,
            "--generate", "24", "--lm", "sim", "--sim-latency-ms", "5", "--lm-calls", "4",
            "--workers", "16", "--lm-rps", str(rps), "--prefect-rate-limit", "lm-rps",
            *_dask_args(cluster),
        )  # fmt: skip
        rc, out, err = _finish(proc, timeout=300)
    finally:
        cluster.prefect("concurrency-limit", "delete", "optimization")
    assert rc == 0, err[-4000:]
    assert _summary(out)["succeeded"] == 24

    runs = Repository(get_engine(results_url)).list_runs(limit=None)
    assert len({r.worker for r in runs}) >= 2, "cycles ran in both worker processes"
    events = sorted(
        [(r.started_at, 1) for r in runs] + [(r.finished_at, -1) for r in runs],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert 2 <= peak <= cap, f"peak {peak} cycles running at once, limit {cap}"

    calls = read_calls(calls_dir)
    stamps = sorted(t for pid_calls in calls.values() for t in pid_calls if t >= started)
    assert len([p for p, c in calls.items() if c]) >= 2, "LM calls came from both processes"
    assert len(stamps) >= 24 * 4
    for window in (1.0, 2.0, 5.0):
        worst = max(sum(1 for t in stamps[i:] if t < s + window) for i, s in enumerate(stamps))
        assert worst <= rps * window + 1, f"{worst} LM calls in {window} s, limit {rps}/s"
    overall = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert overall <= rps


def test_a_batch_without_a_reachable_prefect_api_is_refused_before_any_row(
    cluster: LocalCluster, results_url: str
) -> None:
    """The issue's lost batch, refused: a real scheduler with workers, but no
    PREFECT_API_URL in the submitting shell. Exit 2, one line with the fix, no rows."""
    env = {k: v for k, v in cluster.env.items() if k != "PREFECT_API_URL"}
    proc = _batch(
        cluster, results_url, "--generate", "5", "--lm", "sim", *_dask_args(cluster), env=env
    )
    rc, out, err = _finish(proc, timeout=120)
    assert rc == 2, out + err
    line = " ".join(err.split())
    assert "PREFECT_API_URL is unset" in line and "prefect server start" in line
    assert "Traceback" not in err
    assert Repository(get_engine(results_url)).list_runs(limit=None) == []


def test_sigterm_of_a_dask_batch_stops_the_cycles_in_worker_processes(
    cluster: LocalCluster, results_url: str
) -> None:
    """SIGTERM of the submitting `dspyflow batch`: the queued rows are cancelled at once
    and the cycles in flight in the Dask worker processes stop at their next heartbeat
    (the cancel goes through the database), each keeping its best program. Before: those
    cycles ran to their end, long after the command was told to stop."""
    proc = _batch(
        cluster,
        results_url,
        "--generate", "24", "--lm", "sim", "--sim-latency-ms", "500",
        "--lm-calls", "3000", "--workers", "8",
        *_dask_args(cluster),
    )  # fmt: skip
    repo = Repository(get_engine(results_url))
    deadline = time.monotonic() + 240
    in_flight: set[str] = set()
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            runs = repo.list_runs(state="running", limit=None)
        except Exception:  # noqa: BLE001 - the batch creates the schema
            continue
        if len(runs) >= 4:
            in_flight = {r.id for r in runs}
            break
    assert in_flight, "never saw 4 cycles in flight"
    stopped_at = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc, out, err = _finish(proc, timeout=180)
    took = time.monotonic() - stopped_at
    assert rc == 1, err[-4000:]
    runs = {r.id: r for r in repo.list_runs(limit=None)}
    assert len(runs) == 24 and all(r.state in ("succeeded", "cancelled") for r in runs.values())
    cancelled = [runs[i] for i in in_flight if runs[i].state == "cancelled"]
    assert len(cancelled) >= len(in_flight) - 1, (
        took,
        [(runs[i].state, runs[i].error, runs[i].lm_calls) for i in in_flight],
        err[-3000:],
    )
    for run in cancelled:
        assert "batch terminated (SIGTERM)" in (run.error or "")
        if "during the baseline evaluation" in (run.error or ""):
            continue  # stopped before anything was optimized: no program to keep
        assert run.program_state, f"run {run.id} kept no program: {run.error}"
    # A heartbeat (10 s) and the final evaluation, not the whole cycles (240 calls each).
    assert took < 60, took
