"""The repository: the only module that reads or writes dspyflow's tables.

Modelled on Optuna's RDB storage: short transactions, compare-and-set state changes
(a run leaves a terminal state never), times from the database clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, Select, func, select, update
from sqlalchemy.orm import Session, selectinload

from storage.db import check_schema, connect_checked, get_engine, session_factory
from storage.models import (
    TERMINAL_STATES,
    BenchmarkResult,
    LoadTestRun,
    LoadTestWindow,
    OptimizationRun,
    ProgressSample,
    RunAlert,
    RunState,
)


def new_id() -> str:
    return uuid.uuid4().hex


class RunNotFoundError(LookupError):
    pass


class Repository:
    """All SQL of dspyflow. Thread-safe: each call opens its own short session."""

    def __init__(self, engine: Engine | None = None, *, check: bool = True) -> None:
        self.engine = engine or get_engine()
        if check:
            check_schema(self.engine)
        self._sessions = session_factory(self.engine)

    def _session(self) -> Session:
        return self._sessions()

    # --- optimization runs ------------------------------------------------------------

    def create_run(
        self,
        *,
        task: str,
        optimizer: str,
        budget: str,
        lm: str,
        spec: dict[str, Any],
        priority: int = 0,
        batch_id: str | None = None,
        simulated: bool = False,
        run_id: str | None = None,
    ) -> str:
        run = OptimizationRun(
            id=run_id or new_id(),
            task=task,
            optimizer=optimizer,
            budget=budget,
            lm=lm,
            spec=spec,
            priority=priority,
            batch_id=batch_id,
            simulated=simulated,
            state=RunState.queued.value,
        )
        with connect_checked(self.engine), self._session() as s, s.begin():
            s.add(run)
        return run.id

    def create_runs(self, rows: Iterable[dict[str, Any]]) -> list[str]:
        """Insert many queued runs in one transaction (a batch's jobs): all or none."""
        runs = [
            OptimizationRun(
                id=row.get("run_id") or new_id(),
                state=RunState.queued.value,
                **{k: v for k, v in row.items() if k != "run_id"},
            )
            for row in rows
        ]
        with connect_checked(self.engine), self._session() as s, s.begin():
            s.add_all(runs)
        return [r.id for r in runs]

    def start_run(
        self, run_id: str, *, flow_run_id: str | None = None, worker: str | None = None
    ) -> bool:
        """queued -> running (compare-and-set). False if it was not queued."""
        with self._session() as s, s.begin():
            result = s.execute(
                update(OptimizationRun)
                .where(OptimizationRun.id == run_id, OptimizationRun.state == RunState.queued.value)
                .values(
                    state=RunState.running.value,
                    started_at=func.now(),
                    heartbeat_at=func.now(),
                    flow_run_id=flow_run_id,
                    worker=worker,
                )
            )
            return result.rowcount == 1

    def heartbeat(self, run_id: str, **progress: Any) -> None:
        with self._session() as s, s.begin():
            s.execute(
                update(OptimizationRun)
                .where(
                    OptimizationRun.id == run_id, OptimizationRun.state == RunState.running.value
                )
                .values(heartbeat_at=func.now(), **progress)
            )

    def update_run(self, run_id: str, **fields: Any) -> None:
        """Update non-state fields of a run that is not terminal yet."""
        with self._session() as s, s.begin():
            s.execute(
                update(OptimizationRun)
                .where(
                    OptimizationRun.id == run_id,
                    OptimizationRun.state.not_in([st.value for st in TERMINAL_STATES]),
                )
                .values(**fields)
            )

    def finish_run(self, run_id: str, state: RunState, **fields: Any) -> bool:
        """Move a run to a terminal state once. False if it already was terminal."""
        if not state.terminal:
            raise ValueError(f"{state.value} is not a terminal state")
        with self._session() as s, s.begin():
            result = s.execute(
                update(OptimizationRun)
                .where(
                    OptimizationRun.id == run_id,
                    OptimizationRun.state.not_in([st.value for st in TERMINAL_STATES]),
                )
                .values(state=state.value, finished_at=func.now(), **fields)
            )
            return result.rowcount == 1

    def requeue_run(self, run_id: str) -> bool:
        """stale -> queued, for `dspyflow runs recover --requeue`."""
        with self._session() as s, s.begin():
            result = s.execute(
                update(OptimizationRun)
                .where(OptimizationRun.id == run_id, OptimizationRun.state == RunState.stale.value)
                .values(
                    state=RunState.queued.value,
                    attempt=OptimizationRun.attempt + 1,
                    finished_at=None,
                    error=None,
                )
            )
            return result.rowcount == 1

    def mark_stale(self, older_than_s: float) -> list[str]:
        """Running runs whose heartbeat is older than ``older_than_s`` become ``stale``."""
        with self._session() as s, s.begin():
            now = s.scalar(select(func.now()))
            assert now is not None
            cutoff = _naive_utc(now) - timedelta(seconds=older_than_s)
            candidates = s.execute(
                select(OptimizationRun.id, OptimizationRun.heartbeat_at).where(
                    OptimizationRun.state == RunState.running.value
                )
            ).all()
            stale = [rid for rid, hb in candidates if hb is None or _naive_utc(hb) < cutoff]
            if stale:
                s.execute(
                    update(OptimizationRun)
                    .where(
                        OptimizationRun.id.in_(stale),
                        OptimizationRun.state == RunState.running.value,
                    )
                    .values(
                        state=RunState.stale.value,
                        finished_at=func.now(),
                        error=f"heartbeat older than {older_than_s:g} s: the worker stopped",
                    )
                )
            return stale

    def run_exists(self, run_id: str) -> bool:
        with connect_checked(self.engine), self._session() as s:
            return s.get(OptimizationRun, run_id) is not None

    def get_run(self, run_id: str, *, with_details: bool = False) -> OptimizationRun:
        """A run by id or by a unique id prefix of at least 4 characters (as git does)."""
        with connect_checked(self.engine), self._session() as s:
            run_key = run_id
            if s.get(OptimizationRun, run_id) is None and len(run_id) >= 4:
                matches = s.scalars(
                    select(OptimizationRun.id).where(OptimizationRun.id.like(f"{run_id}%")).limit(2)
                ).all()
                if len(matches) == 1:
                    run_key = matches[0]
            stmt = select(OptimizationRun).where(OptimizationRun.id == run_key)
            if with_details:
                stmt = stmt.options(
                    selectinload(OptimizationRun.samples), selectinload(OptimizationRun.alerts)
                )
            run = s.scalar(stmt)
            if run is None:
                raise RunNotFoundError(f"no run with id {run_id!r}")
            return run

    def list_runs(
        self,
        *,
        state: str | None = None,
        task: str | None = None,
        optimizer: str | None = None,
        lm: str | None = None,
        batch_id: str | None = None,
        since: datetime | None = None,
        limit: int | None = 100,
    ) -> Sequence[OptimizationRun]:
        stmt: Select[tuple[OptimizationRun]] = select(OptimizationRun)
        for column, value in (
            (OptimizationRun.state, state),
            (OptimizationRun.task, task),
            (OptimizationRun.optimizer, optimizer),
            (OptimizationRun.lm, lm),
            (OptimizationRun.batch_id, batch_id),
        ):
            if value is not None:
                stmt = stmt.where(column == value)
        if since is not None:
            stmt = stmt.where(OptimizationRun.created_at >= since)
        stmt = stmt.order_by(OptimizationRun.created_at.desc(), OptimizationRun.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with connect_checked(self.engine), self._session() as s:
            return s.scalars(stmt).all()

    def count_runs_by_state(self, *, batch_id: str | None = None) -> dict[str, int]:
        stmt = select(OptimizationRun.state, func.count()).group_by(OptimizationRun.state)
        if batch_id is not None:
            stmt = stmt.where(OptimizationRun.batch_id == batch_id)
        with self._session() as s:
            return {state: n for state, n in s.execute(stmt).all()}

    # --- progress and alerts ------------------------------------------------------------

    def add_progress_sample(self, run_id: str, **fields: Any) -> None:
        with self._session() as s, s.begin():
            s.add(ProgressSample(run_id=run_id, **fields))

    def latest_progress_sample(self, run_id: str) -> ProgressSample | None:
        """The newest sample of a run (for live progress displays: one row, indexed)."""
        with self._session() as s:
            return s.scalar(
                select(ProgressSample)
                .where(ProgressSample.run_id == run_id)
                .order_by(ProgressSample.id.desc())
                .limit(1)
            )

    def add_alert(self, run_id: str, kind: str, message: str, elapsed_s: float | None) -> bool:
        """Record an alert once per (run, kind); False if it was already recorded."""
        with self._session() as s, s.begin():
            exists = s.scalar(
                select(func.count())
                .select_from(RunAlert)
                .where(RunAlert.run_id == run_id, RunAlert.kind == kind)
            )
            if exists:
                return False
            s.add(RunAlert(run_id=run_id, kind=kind, message=message, elapsed_s=elapsed_s))
            return True

    # --- benchmark results ----------------------------------------------------------------

    def add_benchmark_results(self, rows: Iterable[dict[str, Any]]) -> int:
        items = [BenchmarkResult(**row) for row in rows]
        with connect_checked(self.engine), self._session() as s, s.begin():
            s.add_all(items)
        return len(items)

    def list_benchmark_results(
        self,
        *,
        metric: str | None = None,
        suite: str | None = None,
        env_fingerprint: str | None = None,
        session_id: str | None = None,
        limit: int | None = None,
    ) -> Sequence[BenchmarkResult]:
        stmt = _benchmark_filter(metric, suite, env_fingerprint, session_id)
        stmt = stmt.order_by(BenchmarkResult.created_at, BenchmarkResult.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with connect_checked(self.engine), self._session() as s:
            return s.scalars(stmt).all()

    def recent_benchmark_results(
        self,
        *,
        metric: str | None = None,
        suite: str | None = None,
        env_fingerprint: str | None = None,
        session_id: str | None = None,
        exclude_session: str | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> Sequence[BenchmarkResult]:
        """Newest first: a metric's history (regression checks, trends) or the latest rows."""
        stmt = _benchmark_filter(metric, suite, env_fingerprint, session_id)
        if exclude_session is not None:
            stmt = stmt.where(BenchmarkResult.session_id != exclude_session)
        if since is not None:
            stmt = stmt.where(BenchmarkResult.created_at >= since)
        stmt = stmt.order_by(BenchmarkResult.created_at.desc(), BenchmarkResult.id.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        with connect_checked(self.engine), self._session() as s:
            return s.scalars(stmt).all()

    def benchmark_metrics(self, *, suite: str | None = None) -> list[dict[str, Any]]:
        """One row per (suite, metric, unit, environment): how many results, the newest."""
        stmt = select(
            BenchmarkResult.suite,
            BenchmarkResult.metric,
            BenchmarkResult.unit,
            BenchmarkResult.env_fingerprint,
            func.count(),
            func.max(BenchmarkResult.created_at),
        ).group_by(
            BenchmarkResult.suite,
            BenchmarkResult.metric,
            BenchmarkResult.unit,
            BenchmarkResult.env_fingerprint,
        )
        if suite is not None:
            stmt = stmt.where(BenchmarkResult.suite == suite)
        with connect_checked(self.engine), self._session() as s:
            return [
                {"suite": su, "metric": m, "unit": u, "env_fingerprint": e, "count": n, "last": t}
                for su, m, u, e, n, t in s.execute(stmt.order_by(BenchmarkResult.metric)).all()
            ]

    # --- load tests -------------------------------------------------------------------

    def create_load_test(self, **fields: Any) -> str:
        run = LoadTestRun(id=fields.pop("id", None) or new_id(), **fields)
        with connect_checked(self.engine), self._session() as s, s.begin():
            s.add(run)
        return run.id

    def finish_load_test(
        self, run_id: str, *, windows: Iterable[dict[str, Any]], **fields: Any
    ) -> None:
        """Write the windows and the summary in one transaction: all or nothing."""
        with self._session() as s, s.begin():
            s.add_all(LoadTestWindow(run_id=run_id, **w) for w in windows)
            s.execute(
                update(LoadTestRun)
                .where(LoadTestRun.id == run_id)
                .values(finished_at=func.now(), **fields)
            )

    def get_load_test(self, run_id: str) -> LoadTestRun:
        with connect_checked(self.engine), self._session() as s:
            run = s.scalar(
                select(LoadTestRun)
                .where(LoadTestRun.id == run_id)
                .options(selectinload(LoadTestRun.windows))
            )
            if run is None:
                raise RunNotFoundError(f"no load test with id {run_id!r}")
            return run

    def list_load_tests(self, *, limit: int | None = 100) -> Sequence[LoadTestRun]:
        stmt = select(LoadTestRun).order_by(LoadTestRun.started_at.desc())
        if limit is not None:
            stmt = stmt.limit(limit)
        with connect_checked(self.engine), self._session() as s:
            return s.scalars(stmt).all()


def _benchmark_filter(
    metric: str | None, suite: str | None, env_fingerprint: str | None, session_id: str | None
) -> Select[tuple[BenchmarkResult]]:
    stmt = select(BenchmarkResult)
    for column, value in (
        (BenchmarkResult.metric, metric),
        (BenchmarkResult.suite, suite),
        (BenchmarkResult.env_fingerprint, env_fingerprint),
        (BenchmarkResult.session_id, session_id),
    ):
        if value is not None:
            stmt = stmt.where(column == value)
    return stmt


def _naive_utc(value: datetime) -> datetime:
    """SQLite returns naive UTC, Postgres aware datetimes: compare them as naive UTC."""
    if value.tzinfo is not None:
        from datetime import UTC

        value = value.astimezone(UTC).replace(tzinfo=None)
    return value
