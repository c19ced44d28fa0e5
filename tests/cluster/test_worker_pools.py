"""Two Prefect process workers polling the `cpu` pool run flow runs of the `cycle` and
`batch` deployments side by side, triggered as the UI does (`prefect deployment run`
creates a flow run of a deployment; a worker picks it up), results in PostgreSQL.

Everything is a real process: `prefect server start` (its own PostgreSQL database),
`prefect deploy` from prefect.yaml, two `prefect worker start --pool cpu --limit 2`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from storage.db import get_engine
from storage.repository import Repository
from tasks.batch.local_cluster import LocalCluster
from tests.cluster.conftest import ROOT, base_env

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.postgres]

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
BATCH_JOBS = 16


@pytest.fixture
def stack(
    tmp_path_factory: pytest.TempPathFactory, prefect_database: str, results_url: str
) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("worker-pools")
    env = base_env(tmp)
    env.update(
        {
            "DSPYFLOW_DATABASE_URL": results_url,  # the workers' and so the flow runs'
            "PREFECT_WORKER_QUERY_SECONDS": "2",
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
    )
    c = LocalCluster(tmp, env)
    try:
        c.start_prefect_server(prefect_database)
        yield c
    finally:
        c.close()


def _api(stack: LocalCluster, method: str, path: str, **kwargs: Any) -> Any:
    assert stack.api_url
    response = httpx.request(method, stack.api_url + path, timeout=30, **kwargs)
    response.raise_for_status()
    return response.json()


def _run(stack: LocalCluster, name: str, params: dict[str, Any]) -> str:
    out = stack.prefect("deployment", "run", name, "--params", json.dumps(params))
    assert out.returncode == 0, out.stdout + out.stderr
    match = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
    assert match, out.stdout
    return match.group(1)


def _when(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_two_workers_run_cycle_and_batch_deployments_side_by_side(stack: LocalCluster) -> None:
    pool = stack.prefect("work-pool", "create", "cpu", "--type", "process")
    assert pool.returncode == 0, pool.stdout + pool.stderr
    deployed = stack.prefect(
        "--no-prompt", "deploy", "--name", "cycle", "--name", "batch", cwd=ROOT
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    batch_deployment = _api(stack, "GET", "/deployments/name/optimization-batch/batch")
    assert batch_deployment["parameters"]["options"]["task_runner"] == "threads"
    schema = batch_deployment["parameter_openapi_schema"]
    assert set(schema["properties"]) == {"jobs", "options"}
    # The UI's form for `options` is BatchOptions itself, each field with its help.
    (options_model,) = (d for name, d in schema["definitions"].items() if name == "BatchOptions")
    assert {"task_runner", "dask_address", "workers"} <= set(options_model["properties"])
    for name in ("w1", "w2"):  # at most 2 flow runs each: 4 runs need both
        stack.start_prefect_worker(name, "cpu", "--limit", "2", "--name", name)

    cycle_spec = {
        "task": "intent",
        "optimizer": "mipro",
        "budget": "light",
        "lm": {"model": "sim", "sim_latency_ms": 20},
        "max_train": 10,
        "max_val": 10,
        "max_test": 10,
    }
    job = {
        "task": "intent",
        "optimizer": "capacity",
        "lm": {"model": "sim", "sim_latency_ms": 100, "sim_error_rate": 0.05},
        "max_train": 4,
        "max_val": 2,
        "max_test": 1,
    }
    runs = {
        _run(stack, "optimization-cycle/cycle", {"spec": cycle_spec}): "cycle",
        _run(
            stack,
            "optimization-batch/batch",
            {"jobs": [job] * BATCH_JOBS, "options": {"workers": 6}},
        ): "batch",
        _run(stack, "optimization-cycle/cycle", {"spec": {**cycle_spec, "seed": 1}}): "cycle",
        _run(
            stack,
            "optimization-batch/batch",
            {"jobs": [job] * BATCH_JOBS, "options": {"workers": 6}},
        ): "batch",
    }
    deadline = time.monotonic() + 300
    flow_runs: dict[str, Any] = {}
    while time.monotonic() < deadline:
        flow_runs = {fid: _api(stack, "GET", f"/flow_runs/{fid}") for fid in runs}
        if all(fr["state"] and fr["state"]["type"] in TERMINAL for fr in flow_runs.values()):
            break
        time.sleep(2)
    states = {fid: fr["state"]["type"] for fid, fr in flow_runs.items()}
    assert set(states.values()) == {"COMPLETED"}, (
        states,
        stack.log("w1"),
        stack.log("w2"),
    )

    # Each worker ran flow runs; together all four.
    picked = {w: {fid for fid in runs if fid in stack.log(w, tail=10**7)} for w in ("w1", "w2")}
    assert picked["w1"] and picked["w2"], picked
    assert picked["w1"] | picked["w2"] == set(runs)
    # Side by side: a cycle run and a batch run were running at the same moment.
    spans = {fid: (_when(fr["start_time"]), _when(fr["end_time"])) for fid, fr in flow_runs.items()}
    overlap = any(
        spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]
        for a in runs
        for b in runs
        if runs[a] == "cycle" and runs[b] == "batch"
    )
    assert overlap, {
        f"{runs[f]} {f[:8]}": (a.isoformat(timespec="seconds"), round((b - a).total_seconds(), 1))
        for f, (a, b) in spans.items()
    }

    repo = Repository(get_engine(stack.env["DSPYFLOW_DATABASE_URL"]))
    rows = repo.list_runs(limit=None)
    for fid, kind in runs.items():
        mine = [r for r in rows if r.flow_run_id == fid]
        assert len(mine) == (1 if kind == "cycle" else BATCH_JOBS), (kind, len(mine))
        assert all(r.state == "succeeded" and r.simulated for r in mine), [r.error for r in mine]
    assert len(rows) == 2 + 2 * BATCH_JOBS
