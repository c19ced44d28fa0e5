"""How each optimization went, for the results report: a run's history (score and best so
far against LM calls and time, with its baseline, budget and 80 % warning), its usage and
what the optimizer changed; per task, the optimizers side by side with the Pareto front;
per batch, queue waits, run times, states and errors.

Collecting reads the same rows `dspyflow runs show/compare --format json` print; the
plots live in tasks.reports.plots.
"""

from __future__ import annotations

import collections
import statistics
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from storage.models import OptimizationRun
from storage.repository import Repository
from tasks.batch.models import top_errors
from tasks.cycle.spec import DEFAULT_TIME_BUDGET_S, DEFAULT_WARNING_AT
from tasks.reports.compare import PredictorComparison, program_differences


class HistoryPoint(BaseModel):
    """One progress sample: where the optimizer stood at that moment."""

    elapsed_s: float
    iteration: int
    lm_calls: int | None
    score: float | None  # the latest iteration's candidate (None: the optimizer gives none)
    best_score: float | None


class AlertPoint(BaseModel):
    kind: str
    message: str
    elapsed_s: float | None


class RunDetail(BaseModel):
    id: str
    state: str
    task: str
    optimizer: str
    budget: str
    lm: str
    simulated: bool
    error: str | None
    baseline_score: float | None
    val_score: float | None
    best_score: float | None
    duration_s: float | None
    lm_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float | None
    iterations: int
    time_budget_s: float
    warning_at: float
    lm_call_budget: int | None
    history: list[HistoryPoint] = Field(default_factory=list)
    alerts: list[AlertPoint] = Field(default_factory=list)
    # What changed from the unoptimized program, predictor by predictor (A = baseline).
    changes: list[PredictorComparison] = Field(default_factory=list)
    baseline_program_note: str | None = None  # why the baseline program is not shown


def baseline_state(spec: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The unoptimized program's state (what the run started from), or why it is unknown
    here: a user program must be importable where the report is made."""
    from tasks.cycle.data import resolve_task
    from tasks.cycle.spec import CycleSpec

    try:
        program = resolve_task(CycleSpec.model_validate(spec)).build_program()
        return program.dump_state(), None
    except Exception as exc:  # noqa: BLE001 - the page says why, the rest still renders
        return None, f"the unoptimized program could not be built here: {exc}"


def run_detail(run: OptimizationRun) -> RunDetail:
    """`run` loaded with its samples and alerts (`Repository.get_run(..., with_details)`)."""
    spec = run.spec or {}
    start, note = baseline_state(spec) if run.program_state else (None, None)
    return RunDetail(
        id=run.id,
        state=run.state,
        task=run.task,
        optimizer=run.optimizer,
        budget=run.budget,
        lm=run.lm,
        simulated=run.simulated,
        error=run.error,
        baseline_score=run.baseline_score,
        val_score=run.val_score,
        best_score=run.best_score,
        duration_s=run.duration_s,
        lm_calls=run.lm_calls or 0,
        input_tokens=run.input_tokens or 0,
        output_tokens=run.output_tokens or 0,
        cost_usd=run.cost_usd,
        iterations=run.iterations or 0,
        time_budget_s=float(spec.get("time_budget_s") or DEFAULT_TIME_BUDGET_S),
        warning_at=float(spec.get("warning_at") or DEFAULT_WARNING_AT),
        lm_call_budget=spec.get("lm_call_budget"),
        history=[
            HistoryPoint(
                elapsed_s=s.elapsed_s,
                iteration=s.iteration,
                lm_calls=s.lm_calls,
                score=s.score,
                best_score=s.best_score,
            )
            for s in sorted(run.samples, key=lambda s: (s.elapsed_s, s.id))
        ],
        alerts=[
            AlertPoint(kind=a.kind, message=a.message, elapsed_s=a.elapsed_s) for a in run.alerts
        ],
        changes=program_differences(start, run.program_state) if start is not None else [],
        baseline_program_note=note,
    )


# --- per task: the optimizers side by side ---------------------------------------------------


class TradeoffPoint(BaseModel):
    run_id: str
    optimizer: str
    lm: str
    simulated: bool
    lm_calls: int
    cost_usd: float | None
    best_score: float
    pareto: bool = False  # no other run of the task scores as high for as few LM calls


class TaskTradeoff(BaseModel):
    task: str
    points: list[TradeoffPoint]

    @property
    def simulated(self) -> bool:
        return any(p.simulated for p in self.points)


def mark_pareto(points: list[TradeoffPoint]) -> None:
    """Mark the points no other point dominates (higher or equal score for fewer or equal
    LM calls, better in one): the front a user picks a budget from."""
    for p in points:
        p.pareto = not any(
            q is not p
            and q.best_score >= p.best_score
            and q.lm_calls <= p.lm_calls
            and (q.best_score > p.best_score or q.lm_calls < p.lm_calls)
            for q in points
        )


def task_tradeoffs(runs: list[OptimizationRun]) -> list[TaskTradeoff]:
    by_task: dict[str, list[TradeoffPoint]] = collections.defaultdict(list)
    for r in runs:
        if r.best_score is None or r.optimizer == "capacity":
            continue  # `capacity` is a load workload, not an optimizer to compare
        by_task[r.task].append(
            TradeoffPoint(
                run_id=r.id,
                optimizer=r.optimizer,
                lm=r.lm,
                simulated=r.simulated,
                lm_calls=r.lm_calls or 0,
                cost_usd=r.cost_usd,
                best_score=r.best_score,
            )
        )
    out = []
    for task, points in sorted(by_task.items()):
        mark_pareto(points)
        out.append(TaskTradeoff(task=task, points=points))
    return out


# --- batches ----------------------------------------------------------------------------------


class BatchView(BaseModel):
    batch_id: str
    jobs: int
    simulated: bool
    states: dict[str, int]
    queue_wait_s: list[float]  # created -> started, per job that started
    run_s: list[float]  # started -> finished
    top_errors: dict[str, int]
    first_created: datetime | None


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    """b - a; one row's times come from one database, so both are naive or both aware."""
    return None if a is None or b is None else (b - a).total_seconds()


def batch_views(repo: Repository, batch_ids: list[str]) -> list[BatchView]:
    views = []
    for batch_id in batch_ids:
        rows = repo.list_runs(batch_id=batch_id, limit=None)
        if not rows:
            continue
        waits = [_seconds(r.created_at, r.started_at) for r in rows]
        runs = [_seconds(r.started_at, r.finished_at) for r in rows]
        views.append(
            BatchView(
                batch_id=batch_id,
                jobs=len(rows),
                simulated=any(r.simulated for r in rows),
                states=dict(collections.Counter(r.state for r in rows)),
                queue_wait_s=[w for w in waits if w is not None and w >= 0],
                run_s=[t for t in runs if t is not None and t >= 0],
                top_errors=top_errors(rows),
                first_created=min((r.created_at for r in rows if r.created_at), default=None),
            )
        )
    return views
