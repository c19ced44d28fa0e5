"""Load tests in the results database: the run, its windows and their encoded histograms.

Windows keep their HDR histograms (``encode()``, base64), so any phase's percentiles can
be re-merged later, exactly, from the stored run alone (``remerge``). Generator counters
that have no column of their own (sent, completed, waited, schedule lag) ride in each
window's ``resources`` JSON under ``generator``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from storage.models import LoadTestRun, LoadTestWindow
from storage.repository import Repository
from tasks.load.config import LoadTestConfig
from tasks.load.histograms import decode, encode, percentiles
from tasks.load.patterns import Phase
from tasks.load.redact import scrub
from tasks.load.results import LoadSummary, LoadTestResult, PhaseStats, Window, phase_stats
from tasks.load.runner import Verdict

RUNNING, COMPLETED, CRASHED = "running", "completed", "crashed"


def start_record(
    repo: Repository,
    config: LoadTestConfig,
    *,
    run_id: str | None = None,
    flow_run_id: str | None = None,
) -> str:
    return repo.create_load_test(
        id=run_id,
        name=config.name,
        target=config.target_label[:500],
        pattern=config.pattern,
        config=config.redacted_dump(),
        state=RUNNING,
        thresholds=[{"expr": t} for t in config.effective_thresholds],
        flow_run_id=flow_run_id,
    )


def window_rows(windows: list[Window]) -> list[dict[str, Any]]:
    rows = []
    for w in windows:
        lag = percentiles(w.lag)
        rows.append(
            {
                "window_index": w.index,
                "start_s": w.start_s,
                "phase": w.phase.value,
                "target_rate": w.target_rate,
                "achieved_rate": w.achieved_rate,
                "requests": w.requests,
                "errors": w.errors,
                "dropped": w.dropped,
                "max_in_flight": w.max_in_flight,
                "error_kinds": dict(w.error_kinds) or None,
                "response_hist": encode(w.response),
                "service_hist": encode(w.service),
                "resources": {
                    **w.resources,
                    "generator": {
                        "length_s": w.length_s,
                        "target": w.target,
                        "sent": w.sent,
                        "completed": w.completed,
                        "waited": w.waited,
                        "lag_p99_ms": lag.p99_ms,
                        "lag_max_ms": lag.max_ms,
                    },
                },
            }
        )
    return rows


def stored_summary(result: LoadTestResult, verdict: Verdict) -> dict[str, Any]:
    return {
        **result.summary.model_dump(mode="json"),
        "bottlenecks": [b.model_dump(mode="json") for b in verdict.bottlenecks],
    }


def finish_record(
    repo: Repository,
    run_id: str,
    result: LoadTestResult,
    verdict: Verdict,
    *,
    report_path: str | None = None,
) -> None:
    repo.finish_load_test(
        run_id,
        windows=window_rows(result.windows),
        state=COMPLETED,
        summary=stored_summary(result, verdict),
        thresholds=[t.model_dump(mode="json") for t in verdict.thresholds],
        passed=verdict.passed,
        report_path=report_path,
    )


def set_report_path(repo: Repository, run_id: str, path: str) -> None:
    repo.finish_load_test(run_id, windows=[], report_path=path)  # no windows: fields only


def crash_record(
    repo: Repository, run_id: str, error: BaseException, secrets: list[str] | None = None
) -> None:
    repo.finish_load_test(
        run_id,
        windows=[],
        state=CRASHED,
        summary={"error": scrub(f"{type(error).__name__}: {error}", secrets or [])[:2000]},
        passed=False,
    )


def windows_from_rows(rows: list[LoadTestWindow]) -> list[Window]:
    """Rebuild windows (histograms decoded) from stored rows."""
    windows = []
    for row in rows:
        gen = (row.resources or {}).get("generator", {})
        length = float(gen.get("length_s", 1.0))
        w = Window(
            index=row.window_index,
            start_s=row.start_s,
            length_s=length,
            phase=Phase(row.phase),
            target=float(gen.get("target", row.target_rate * length)),
            requests=row.requests,
            errors=row.errors,
            dropped=row.dropped,
            waited=int(gen.get("waited", 0)),
            error_kinds=Counter(row.error_kinds or {}),
            sent=int(gen.get("sent", 0)),
            completed=int(gen.get("completed", round(row.achieved_rate * length))),
            max_in_flight=row.max_in_flight,
            resources={k: v for k, v in (row.resources or {}).items() if k != "generator"},
        )
        for attr, encoded in (("response", row.response_hist), ("service", row.service_hist)):
            hist = decode(encoded)
            if hist is not None:
                setattr(w, attr, hist)
        windows.append(w)
    return windows


def remerge(
    run: LoadTestRun | str, phase: str | None = None, *, repo: Repository | None = None
) -> PhaseStats:
    """Percentiles of a stored run re-merged from its windows' histograms.

    ``phase``: ``warmup``, ``steady``, ``cooldown``, or None for every window of the run.
    """
    if isinstance(run, str):
        run = (repo or Repository()).get_load_test(run)
    windows = windows_from_rows(list(run.windows))
    if phase is not None:
        duration = float((run.config or {}).get("duration_s", float("inf")))
        windows = [w for w in windows if w.phase.value == phase and w.start_s < duration]
    stats, _ = phase_stats(phase or "overall", windows)
    return stats


def load_summary(run: LoadTestRun) -> LoadSummary | None:
    if not run.summary or "overall" not in run.summary:
        return None
    return LoadSummary.model_validate(run.summary)
