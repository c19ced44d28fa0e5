"""Result queries on SQLite and PostgreSQL: `runs compare`, `benchmarks list|trend` and
`report --out`, over rows written through the repository."""

from __future__ import annotations

import base64
import csv
import io
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.models import RunState
from storage.repository import Repository

runner = CliRunner()
ENV = "feedc0ffee123456"


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


def _program(instructions: str, demos: list[dict[str, str]]) -> dict:
    return {
        "classify": {
            "traces": [],
            "train": [],
            "demos": demos,
            "signature": {"instructions": instructions, "fields": []},
            "lm": None,
        }
    }


def _run(repo: Repository, *, optimizer: str, seed: int, best: float, program: dict) -> str:
    spec = {"task": "intent", "optimizer": optimizer, "seed": seed, "lm": {"model": "sim"}}
    run_id = repo.create_run(
        task="intent", optimizer=optimizer, budget="light", lm="sim", spec=spec, simulated=True
    )
    lease = repo.start_run(run_id)
    assert lease
    repo.finish_run(
        run_id,
        RunState.succeeded,
        lease=lease,
        baseline_score=0.3,
        best_score=best,
        lm_calls=100 + seed,
        input_tokens=5000,
        output_tokens=700,
        iterations=10,
        program_state=program,
    )
    return run_id


def _benchmarks(repo: Repository, metric: str, centers: list[float], unit: str = "s") -> None:
    rng = random.Random(0)
    for i, c in enumerate(centers):
        samples = [c * (1 + rng.gauss(0, 0.02)) for _ in range(7)]
        repo.add_benchmark_results(
            [
                {
                    "session_id": f"session{i:02d}" + "0" * 23,
                    "suite": "cycle",
                    "metric": metric,
                    "value": sorted(samples)[3],
                    "unit": unit,
                    "samples": samples,
                    "params": {"direction": "lower"},
                    "env_fingerprint": ENV,
                    "environment": {"cpu_count": 2},
                    "commit": f"c{i:039d}",
                }
            ]
        )


@pytest.fixture(autouse=True)
def _close_connections(db_url: str) -> Iterator[None]:
    """Give this test's pooled connections back to the shared PostgreSQL server."""
    yield
    from storage.db import get_engine

    get_engine(db_url).dispose()


@pytest.fixture
def seeded(use_database: str) -> dict[str, str]:
    repo = Repository()
    a = _run(
        repo,
        optimizer="mipro",
        seed=0,
        best=0.6,
        program=_program("Classify the intent.", [{"text": "hi", "intent": "greet"}]),
    )
    b = _run(
        repo,
        optimizer="gepa",
        seed=1,
        best=0.8,
        program=_program(
            "Read the message and name the customer's intent.",
            [{"text": "hi", "intent": "greet"}, {"text": "lost card", "intent": "card_lost"}],
        ),
    )
    _benchmarks(repo, "cycle.sim.intent.mipro.wall_s", [10, 10.1, 9.9, 10.0, 10.05, 13.0])
    _benchmarks(repo, "load.high.p99_ms", [5.0, 5.1, 4.9], unit="ms")
    lt = repo.create_load_test(
        name="nightly-high", target="http://127.0.0.1:1/", pattern="constant", config={}
    )
    steady = {
        "achieved_rps": 99.0,
        "error_rate": 0.0,
        "response": {"p50_ms": 2.0, "p95_ms": 4.0, "p99_ms": 6.5},
    }
    repo.finish_load_test(
        lt,
        windows=[],
        state="completed",
        summary={"overall": steady, "phases": {"steady": steady}},
        passed=True,
    )
    return {"a": a, "b": b, "load": lt}


def test_runs_compare(seeded: dict[str, str]) -> None:
    a, b = seeded["a"], seeded["b"]
    out = invoke("runs", "compare", a[:8], b[:8], "--format", "json")
    assert out.exit_code == 0, out.output
    cmp = json.loads(out.stdout)
    assert (cmp["a"], cmp["b"]) == (a, b)
    figures = {f["field"]: f for f in cmp["figures"]}
    assert figures["best_score"]["a"] == 0.6 and figures["best_score"]["b"] == 0.8
    assert figures["best_score"]["delta"] == pytest.approx(0.2)
    assert figures["lm_calls"]["delta"] == 1 and figures["total_tokens"]["a"] == 5700
    assert figures["duration_s"]["a"] is not None
    spec = {d["field"]: d for d in cmp["spec_differences"]}
    assert set(spec) == {"optimizer", "seed"} and spec["optimizer"]["b"] == "gepa"
    (pred,) = cmp["predictors"]
    assert pred["predictor"] == "classify" and not pred["same_instructions"]
    assert (pred["demos_a"], pred["demos_b"]) == (1, 2)
    assert pred["demos_only_in_b"] == [{"text": "lost card", "intent": "card_lost"}]
    assert pred["demos_only_in_a"] == [] and cmp["simulated"] is True

    table = invoke("runs", "compare", a, b)
    assert table.exit_code == 0
    for text in ("best_score", "spec.optimizer", "classify.instructions", "name the customer"):
        assert text in table.stdout
    rows = list(
        csv.DictReader(io.StringIO(invoke("runs", "compare", a, b, "--format", "csv").stdout))
    )
    assert {r["field"] for r in rows} >= {"best_score", "lm_calls", "classify.demos"}


def test_runs_compare_unknown_run(seeded: dict[str, str]) -> None:
    out = invoke("runs", "compare", seeded["a"], "ffffffffffff")
    assert out.exit_code == 2 and "no run with id 'ffffffffffff'" in out.output


def test_benchmarks_list(seeded: dict[str, str]) -> None:
    out = invoke("benchmarks", "list", "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert len(rows) == 9
    assert rows[0]["created_at"] >= rows[-1]["created_at"]  # newest first
    only = json.loads(invoke("benchmarks", "list", "--metric", "load.*", "--format", "json").stdout)
    assert {r["metric"] for r in only} == {"load.high.p99_ms"} and len(only) == 3
    assert only[0]["n_samples"] == 7 and len(only[0]["samples"]) == 7
    suite = json.loads(invoke("benchmarks", "list", "--suite", "gpu", "--format", "json").stdout)
    assert suite == []
    limited = invoke("benchmarks", "list", "--limit", "2", "--format", "csv").stdout
    assert len(list(csv.DictReader(io.StringIO(limited)))) == 2
    table = invoke("benchmarks", "list", "--metric", "cycle.sim.intent.mipro.wall_s")
    assert "cycle.sim.intent.mipro.wall_s" in table.stdout and ENV in table.stdout


def test_benchmarks_trend(seeded: dict[str, str]) -> None:
    metric = "cycle.sim.intent.mipro.wall_s"
    out = invoke("benchmarks", "trend", metric, "--format", "json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [round(r["value"]) for r in rows] == [10, 10, 10, 10, 10, 13]  # oldest first
    assert rows[0]["change_pct"] is None and rows[-1]["change_pct"] > 20
    table = invoke("benchmarks", "trend", metric)
    assert table.exit_code == 0
    assert re.search("[▁▂▃▄▅▆▇█]{6}", table.stdout)
    assert "latest vs history: regression" in table.stdout
    missing = invoke("benchmarks", "trend", "no.such.metric")
    assert missing.exit_code == 2 and "no results for metric 'no.such.metric'" in missing.output


def test_report_html(seeded: dict[str, str], tmp_path: Path) -> None:
    out_path = tmp_path / "reports" / "dspyflow.html"
    out = invoke("report", "--out", str(out_path))
    assert out.exit_code == 0, out.output
    page = out_path.read_text(encoding="utf-8")
    images = re.findall(r'alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert {alt for alt, _ in images} == {
        "optimizers on intent",  # the two runs side by side (mipro, gepa)
        "score over time",
        "cycle durations",
        "benchmark trends",
        "load-test percentiles",
    }, [alt for alt, _ in images]
    assert all(base64.b64decode(png).startswith(b"\x89PNG") for _, png in images)
    # The seeded runs have no progress samples: their history says so instead of a plot.
    assert f"optimization history of run {seeded['a']}: no data yet" in page
    assert seeded["a"] in page and seeded["b"] in page and seeded["load"] in page
    assert "cycle.sim.intent.mipro.wall_s" in page and "simulated LM" in page
    assert "http" not in page.replace("http://127.0.0.1:1/", "")  # self-contained


def test_report_on_an_empty_database(use_database: str, tmp_path: Path) -> None:
    out = invoke("report", "--out", str(tmp_path / "empty.html"))
    assert out.exit_code == 0, out.output
    page = (tmp_path / "empty.html").read_text()
    assert "no data yet" in page and "0 optimization runs" in page
