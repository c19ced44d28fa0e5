"""`dspyflow report` as a user reads it, over real cycles: MIPROv2 and the genetic
optimizer on the simulated LM (real optimizers, real progress samples, alerts and
programs; the sim LM only makes them fast). The page must carry the same data as
`dspyflow runs show --format json`, narrow to one run or one task, and display on a
phone-wide screen in headless Chromium."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.db import dispose_engines, get_engine
from storage.repository import Repository
from tasks.cycle.steps import run_cycle
from tests.browser import CHROMIUM, render_in_chromium
from tests.faults._helpers import quiet, sim_spec

runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(scope="module")
def cycles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Three finished runs of the `intent` task in one SQLite database: two MIPROv2 (one
    held to an LM-call budget, so it warns at 80 % and stops) and one genetic."""
    url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'runs.db'}"
    repo = Repository(get_engine(url))
    specs = {
        "mipro": sim_spec(optimizer="mipro", sim_latency_ms=0, seed=1),
        "capped": sim_spec(optimizer="mipro", sim_latency_ms=0, seed=2, lm_call_budget=60),
        "genetic": sim_spec(optimizer="genetic", sim_latency_ms=0, seed=3),
    }
    # Samples every few milliseconds, not every second: on CI's machine the capped run
    # stopped 0.17 s in and left one sample, so the history had nothing to compare.
    with pytest.MonkeyPatch.context() as patch, quiet():
        patch.setattr("tasks.cycle.timer.SAMPLE_INTERVAL_S", 1e-9)
        patch.setattr("tasks.cycle.timer.MONITOR_TICK_S", 0.002)
        runs = {name: run_cycle(spec, repo).run_id for name, spec in specs.items()}
    yield {"url": url, "runs": runs}
    dispose_engines()


@pytest.fixture
def db(cycles: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", cycles["url"])
    return cycles


def _show(run_id: str) -> dict[str, Any]:
    out = invoke("runs", "show", run_id, "--format", "json")
    assert out.exit_code == 0, out.output
    return json.loads(out.stdout)


def test_a_run_page_carries_what_runs_show_prints(db: dict[str, Any], tmp_path: Path) -> None:
    from tasks.reports.results import collect

    run_id = db["runs"]["capped"]
    shown = _show(run_id)
    data = collect(Repository(get_engine(db["url"])), run_id=run_id[:8])
    (detail,) = data.details
    assert data.scope == f"run {run_id}" and [r.id for r in data.runs] == [run_id]
    # The history is the run's progress samples, as `runs show` prints them.
    samples = shown["progress_samples"]
    assert len(detail.history) == len(samples) >= 2
    assert [p.best_score for p in detail.history] == [s["best_score"] for s in samples]
    assert [p.score for p in detail.history] == [s["score"] for s in samples]
    assert any(p.score is not None for p in detail.history)  # MIPROv2 scores its trials
    # Usage and the budget it ran against.
    assert (detail.lm_calls, detail.input_tokens) == (shown["lm_calls"], shown["input_tokens"])
    assert detail.lm_call_budget == 60 and detail.lm_calls >= 60 * 0.8
    assert {a.kind for a in detail.alerts} == {a["kind"] for a in shown["alerts"]}
    assert "lm_call_budget_warning" in {a.kind for a in detail.alerts}
    # What changed: the stored program against the unoptimized `intent` program.
    (change,) = detail.changes
    stored = next(iter(shown["program_state"].values()))
    assert change.instructions_b == stored["signature"]["instructions"]
    assert change.demos_b == len(stored["demos"])
    assert change.instructions_a and change.demos_a == 0  # the program it started from

    page_path = tmp_path / "run.html"
    out = invoke("report", "--run", run_id[:8], "--out", str(page_path))
    assert out.exit_code == 0, out.output
    page = page_path.read_text(encoding="utf-8")
    assert f'id="run-{run_id}"' in page and "How each optimization went" in page
    assert "lm_call_budget_warning" in page
    assert "simulated LM" in page
    assert "Benchmark trends" not in page  # narrowed to the run
    other = db["runs"]["genetic"]
    assert f'id="run-{other}"' not in page  # one run's page shows that run in detail
    assert other in page  # ... and its task's other optimizers beside it


def test_a_task_page_puts_the_optimizers_side_by_side(db: dict[str, Any], tmp_path: Path) -> None:
    from tasks.reports.results import collect

    data = collect(Repository(get_engine(db["url"])), task="intent")
    (tradeoff,) = data.tradeoffs
    assert {p.optimizer for p in tradeoff.points} == {"mipro", "genetic"}
    assert len(tradeoff.points) == 3 and tradeoff.simulated
    front = [p for p in tradeoff.points if p.pareto]
    assert front
    for p in tradeoff.points:  # off the front: some point scores as high for fewer calls
        dominated = any(
            q.best_score >= p.best_score
            and q.lm_calls <= p.lm_calls
            and (q.best_score, -q.lm_calls) != (p.best_score, -p.lm_calls)
            for q in tradeoff.points
        )
        assert p.pareto is not dominated, p
    assert len(data.details) == 3  # every run of the task, newest first
    assert data.trends == [] and data.load_tests == []


def test_narrowing_errors_are_named(db: dict[str, Any], tmp_path: Path) -> None:
    both = invoke("report", "--run", "abcd", "--task", "intent", "--out", str(tmp_path / "x"))
    assert both.exit_code == 2 and "not both" in both.output
    missing = invoke("report", "--run", "0000ffff", "--out", str(tmp_path / "y.html"))
    assert missing.exit_code != 0 and "no run with id '0000ffff'" in missing.output
    assert not (tmp_path / "y.html").exists()


@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium: apt-get install -y chromium")
def test_the_page_displays_on_a_phone_and_a_desktop(db: dict[str, Any], tmp_path: Path) -> None:
    page_path = tmp_path / "all.html"
    out = invoke("report", "--out", str(page_path))
    assert out.exit_code == 0, out.output
    page = page_path.read_text(encoding="utf-8")
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # one offline file
    # 3 run histories, 1 task's optimizers, scores and durations over time.
    expected = 6
    for width in (390, 1200):
        check = render_in_chromium(page_path, tmp_path, width=width)
        assert check["total"] == expected and check["rendered"] == expected, check
        assert all(w > 300 for w in check["widths"])  # decoded, full-size PNGs
        # Scaled to the screen, never wider than it: no sideways scrolling for a plot.
        assert all(0 < shown <= check["viewport"] for shown in check["shown"]), check
