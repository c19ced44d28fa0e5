"""The Prefect tasks of a load test: thin wrappers over runner, store and report.

Results stay in memory between tasks (``persist_result=False``, no cache): histograms
are large and a load test is never replayed from a cache.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE
from pydantic import BaseModel

from storage.db import StorageSettings
from storage.repository import Repository
from tasks.load import store
from tasks.load.bottlenecks import Bottleneck
from tasks.load.config import LoadTestConfig
from tasks.load.results import LoadSummary, LoadTestResult
from tasks.load.runner import Verdict, judge, run_load_test
from tasks.load.thresholds import ThresholdResult
from tasks.reports.load import ReportData, render_markdown, series, write_reports


class LoadTestOutcome(BaseModel):
    """What the flow returns (and the CLI prints)."""

    run_id: str
    name: str
    passed: bool
    summary: LoadSummary
    thresholds: list[ThresholdResult]
    bottlenecks: list[Bottleneck]
    report_html: str | None = None
    report_md: str | None = None


class ThresholdsBreachedError(RuntimeError):
    """Raised after recording, so the flow run ends Failed (k6 exits 99 here)."""

    def __init__(self, outcome: LoadTestOutcome) -> None:
        self.outcome = outcome
        failed = ", ".join(
            f"{t.expr} (observed {'no data' if t.observed is None else f'{t.observed:.4g}'})"
            for t in outcome.thresholds
            if not t.passed
        )
        super().__init__(f"load test {outcome.run_id}: threshold breached: {failed}")


def default_report_path(run_id: str) -> Path:
    return StorageSettings().home.expanduser() / "reports" / f"load-test-{run_id}.html"


_TASK_OPTIONS: dict[str, Any] = {"persist_result": False, "cache_policy": NONE}


@task(name="load-test-start", **_TASK_OPTIONS)
def start(config: LoadTestConfig, run_id: str | None, flow_run_id: str | None) -> str:
    return store.start_record(Repository(), config, run_id=run_id, flow_run_id=flow_run_id)


@task(name="load-test-generate", **_TASK_OPTIONS)
def generate(config: LoadTestConfig) -> LoadTestResult:
    return run_load_test(config)


@task(name="load-test-judge", **_TASK_OPTIONS)
def evaluate(result: LoadTestResult, config: LoadTestConfig) -> Verdict:
    return judge(result, config)


@task(name="load-test-report", **_TASK_OPTIONS)
def report(
    run_id: str, config: LoadTestConfig, result: LoadTestResult, verdict: Verdict
) -> tuple[str, str]:
    data = ReportData(
        summary=result.summary,
        points=series(result.windows),
        thresholds=verdict.thresholds,
        bottlenecks=verdict.bottlenecks,
        run_id=run_id,
        config=config.redacted_dump(),
    )
    html_path, md_path = write_reports(data, config.report_path or default_report_path(run_id))
    store.set_report_path(Repository(), run_id, str(html_path))
    create_markdown_artifact(
        key=f"load-test-{run_id[:12]}",
        markdown=render_markdown(data, html_path=str(html_path)),
        description=f"Load test {config.name}: {'passed' if verdict.passed else 'FAILED'}",
    )
    return str(html_path), str(md_path)


@task(name="load-test-record", **_TASK_OPTIONS)
def record(run_id: str, result: LoadTestResult, verdict: Verdict) -> None:
    store.finish_record(Repository(), run_id, result, verdict)


def record_crash(run_id: str, exc: BaseException, config: LoadTestConfig | None = None) -> None:
    """Best effort: the original error matters more than a second one from the database."""
    with contextlib.suppress(Exception):  # the database itself may be the problem
        store.crash_record(Repository(), run_id, exc, config.secrets() if config else None)
