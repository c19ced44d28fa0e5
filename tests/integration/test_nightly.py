"""The `nightly-benchmarks` flow for real (sim LM, GPU ops on the CPU, a loopback load tier):
one stored session, history comparison, the report artifact and the regression event."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from storage.db import get_engine
from storage.repository import Repository

WALL = "cycle.sim.intent.mipro.wall_s"


def _seed_fast_history(repo: Repository, fingerprint: str) -> None:
    """Five earlier nights where the sim cycle took ~10 ms: tonight's real cycle is far
    slower, so it must be flagged (ratio AND U test) on this fingerprint."""
    for night in range(5):
        samples = [0.010 + 0.0005 * k + 0.0001 * night for k in range(3)]
        repo.add_benchmark_results(
            [
                {
                    "session_id": f"oldnight{night}".ljust(32, "0"),
                    "suite": "cycle",
                    "metric": WALL,
                    "value": samples[1],
                    "unit": "s",
                    "samples": samples,
                    "params": {"direction": "lower"},
                    "env_fingerprint": fingerprint,
                }
            ]
        )


def _events(prefix: str, timeout_s: float = 30.0) -> list[dict]:
    """Events the server stored under ``prefix`` (they arrive asynchronously)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            response = client.request(
                "POST",
                "/events/filter",
                json={"filter": {"event": {"prefix": [prefix]}}, "limit": 50},
            )
            found = response.json().get("events", [])
        if found or time.monotonic() > deadline:
            return found
        time.sleep(1)


@pytest.mark.slow
def test_nightly_benchmarks_end_to_end(
    prefect_harness: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'nightly.db'}"
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", url)
    from flows.load_test import Tier
    from flows.nightly import NightlyOptions, nightly_benchmarks
    from tasks.nightly.suite import nightly_environment

    repo = Repository(get_engine(url))
    fingerprint = nightly_environment("probe", "auto").env_fingerprint
    _seed_fast_history(repo, fingerprint)

    report = nightly_benchmarks(
        NightlyOptions(
            sim_repeats=3,
            local_lm=False,
            gpu_reps=3,
            tiers=[Tier(name="low", rps=20, max_concurrency=10, duration_s=2)],
        )
    )

    assert report.env_fingerprint == fingerprint
    statuses = {p.name: p.status for p in report.parts}
    assert statuses == {
        "cycle-sim-mipro": "ok",
        "cycle-local": "skipped",
        "gpu-ops": "ok",
        "load-low": "ok",
    }
    rows = repo.list_benchmark_results(session_id=report.session_id)
    assert len(rows) == report.stored > 20
    assert {r.suite for r in rows} == {"cycle", "gpu", "load"}
    assert {r.env_fingerprint for r in rows} == {fingerprint}
    by_metric = {r.metric: r for r in rows}
    assert len(by_metric[WALL].samples) == 3
    assert by_metric["load.low.p99_ms"].samples and by_metric["load.low.achieved_rps"].value > 0
    assert any(m.startswith("gpu.matmul.") and m.endswith(".ms") for m in by_metric)
    # The cycles are real runs, grouped under the session id.
    runs = repo.list_runs(batch_id=report.session_id)
    assert len(runs) == 3 and {r.state for r in runs} == {"succeeded"}

    # Only the seeded metric has history: it is the one regression.
    assert [v.metric for v in report.regressions] == [WALL]
    (verdict,) = report.regressions
    assert verdict.ratio > 10 and verdict.p_value < 0.05
    assert report.counts["no_history"] == len(rows) - 1
    assert "**REGRESSION**" in report.markdown and WALL in report.markdown

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts()
    keys = {a.key for a in artifact}
    assert "nightly-benchmarks" in keys

    events = _events("dspyflow.benchmark.regression")
    assert any(
        e["resource"]["prefect.resource.id"] == f"dspyflow.metric.{WALL}"
        and e["payload"]["session_id"] == report.session_id
        for e in events
    ), events


def test_nightly_rejects_bad_parameters(prefect_harness: None) -> None:
    from prefect.exceptions import ParameterTypeError

    from flows.nightly import nightly_benchmarks

    # A deployment's run gets its parameters as JSON: Prefect validates them against the
    # model before the flow body runs, and names the field.
    with pytest.raises(ParameterTypeError, match=r"options\.sim_repeats"):
        nightly_benchmarks({"sim_repeats": 0, "local_lm": False, "gpu": False, "load": False})
    with pytest.raises(ParameterTypeError, match="unknown optimizer 'capacity'"):
        nightly_benchmarks({"sim_optimizer": "capacity"})


def test_gpu_part_holds_the_gpu_limit_on_a_gpu(
    prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU the nightly's GPU ops hold one slot of the global `gpu` limit (the one the
    gpu-benchmark flow uses), so the two never time each other. The suite is faked: this
    checks the plumbing, which runs only where torch sees a GPU."""
    from prefect.client.orchestration import get_client

    import flows.nightly as nightly
    from tasks.nightly.suite import NightlyEnvironment

    seen: dict[str, int] = {}

    def fake_suite(env: NightlyEnvironment, reps: int) -> list:
        with get_client(sync_client=True) as client:
            seen["active"] = client.read_global_concurrency_limit_by_name("gpu").active_slots
        return []

    monkeypatch.setattr(nightly, "run_gpu_benchmark", fake_suite)
    env = NightlyEnvironment(session_id="s", device="cuda:0", environment={}, env_fingerprint="f")
    assert nightly._gpu_rows(env, 3) == []
    assert seen["active"] == 1
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name("gpu").active_slots == 0
