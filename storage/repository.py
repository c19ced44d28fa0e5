"""The repository: the only module that reads or writes dspyflow's tables.

Modelled on Optuna's RDB storage: short transactions, compare-and-set state changes
(a run leaves a terminal state never), times from the database clock.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, Result, Select, case, func, select, update
from sqlalchemy.orm import Session, selectinload

from storage.db import check_schema, connect_checked, get_engine, session_factory
from storage.models import (
    BenchmarkResult,
    LoadTestRun,
    LoadTestWindow,
    OptimizationRun,
    ProgressSample,
    RunAlert,
    RunState,
    can_transition,
)


def new_id() -> str:
    return uuid.uuid4().hex


class RunNotFoundError(LookupError):
    pass


class RunClaimError(RuntimeError):
    """A worker could not claim a run: another worker holds it, or it is not queued."""


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
    ) -> str | None:
        """queued -> running (compare-and-set): the claim. Returns the lease that every
        later write of this worker must present, or None if the run was not queued (another
        worker claimed it, it ended, or recovery marked it stale)."""
        lease = new_id()
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
                    lease=lease,
                )
            )
            return lease if _rowcount(result) == 1 else None

    def heartbeat(self, run_id: str, lease: str, **progress: Any) -> Heartbeat:
        """Refresh the claim (and progress fields). False: the lease is gone (the run was
        marked stale, re-queued, claimed by another worker or ended): stop spending. Its
        `cancel_request` is an operator's request to stop (`request_cancel`)."""
        stmt = _claimed(run_id, lease).values(heartbeat_at=func.now(), **progress)
        with self._session() as s, s.begin():
            row = s.execute(stmt.returning(OptimizationRun.cancel_request)).first()
        return Heartbeat(held=row is not None, cancel_request=row[0] if row else None)

    def request_cancel(self, run_id: str, reason: str) -> bool:
        """An operator asks the worker holding a running run to stop; the worker reads it
        with its next heartbeat and ends the run `cancelled` with its best program. False
        if the run is not running (then nobody holds it: `finish_run` it instead)."""
        stmt = (
            update(OptimizationRun)
            .where(OptimizationRun.id == run_id, OptimizationRun.state == RunState.running.value)
            .values(cancel_request=reason)
        )
        with self._session() as s, s.begin():
            return _rowcount(s.execute(stmt)) == 1

    def cancel(self, run_id: str, reason: str, *, unclaimed_note: str = "") -> CancelOutcome | None:
        """Cancel a run whoever holds it, in one place for `runs cancel` and a stopped batch.

        Running: the request goes on the row for its holder's next heartbeat (`requested`).
        Queued or stale (nobody holds it): `cancelled` at once, with `reason` plus
        `unclaimed_note`; its worker's claim then finds no queued row and runs nothing.
        A row can move between the two compare-and-sets (a worker claims it), so the pair
        is tried again. None: the run has ended; there is nothing to cancel."""
        for _ in range(3):
            if self.request_cancel(run_id, reason):
                return CancelOutcome.requested
            if self.finish_run(run_id, RunState.cancelled, error=reason + unclaimed_note):
                return CancelOutcome.cancelled
        return None

    def update_run(self, run_id: str, lease: str, **fields: Any) -> bool:
        """Update non-state fields of the run this worker holds. False: lease lost."""
        if "state" in fields or "lease" in fields:
            raise ValueError("update_run changes no state; use finish_run")
        with self._session() as s, s.begin():
            return _rowcount(s.execute(_claimed(run_id, lease).values(**fields))) == 1

    def finish_run(
        self, run_id: str, state: RunState, *, lease: str | None = None, **fields: Any
    ) -> bool:
        """Move a run to a terminal state once (compare-and-set on the claimant).

        With `lease`: the worker that holds the run finishes it (running -> terminal).
        Without: an operator finishes a run nobody holds (queued or stale -> failed or
        cancelled; `storage.models.OPERATOR_TRANSITIONS`). False if the table or the
        claim refuses it.

        A worker's `succeeded` honours a cancel request its heartbeats have not read yet:
        the run ends `cancelled` with the request as its error (program and scores kept),
        in the same statement, so `runs cancel` saying "cancel requested" always holds."""
        if not state.terminal:
            raise ValueError(f"{state.value} is not a terminal state")
        if lease is not None and state is RunState.succeeded:
            requested = OptimizationRun.cancel_request.is_not(None)
            fields["error"] = case(
                (requested, OptimizationRun.cancel_request), else_=fields.get("error")
            )
            return self._transition(
                run_id,
                state,
                claim=lease,
                finished=True,
                state_value=case((requested, RunState.cancelled.value), else_=state.value),
                **fields,
            )
        return self._transition(run_id, state, claim=lease, finished=True, **fields)

    def _transition(
        self,
        run_id: str,
        new: RunState,
        *,
        claim: str | None,
        finished: bool = False,
        expect_worker: str | None = None,
        state_value: Any = None,
        **fields: Any,
    ) -> bool:
        """One state change, allowed by the transition table for who makes it: the
        claimant (`claim`, its lease) or an operator (None). Compare-and-set.
        `state_value`: a SQL expression for the new state (`finish_run`'s cancel case)."""
        by_worker = claim is not None
        sources = [st.value for st in RunState if can_transition(st, new, worker=by_worker)]
        if not sources:
            who = "a worker" if by_worker else "an operator"
            raise ValueError(f"{who} cannot move a run to {new.value}")
        stmt = update(OptimizationRun).where(
            OptimizationRun.id == run_id, OptimizationRun.state.in_(sources)
        )
        if by_worker:
            stmt = stmt.where(OptimizationRun.lease == claim)
        if expect_worker is not None:
            stmt = stmt.where(OptimizationRun.worker == expect_worker)
        values: dict[str, Any] = {
            "state": new.value if state_value is None else state_value,
            **fields,
        }
        if finished:
            values.setdefault("finished_at", func.now())  # a spooled outcome brings its own
        with self._session() as s, s.begin():
            return _rowcount(s.execute(stmt.values(**values))) == 1

    def salvage_run(self, run_id: str, lease: str, **fields: Any) -> bool:
        """A live worker whose run was marked stale under it (`runs recover` while it was
        only slow) keeps its result on the row: program, scores, usage. The state stays
        `stale` (re-queue still works); a run re-queued or claimed again is left alone."""
        if "state" in fields or "lease" in fields:
            raise ValueError("salvage_run changes no state")
        with self._session() as s, s.begin():
            result = s.execute(
                update(OptimizationRun)
                .where(
                    OptimizationRun.id == run_id,
                    OptimizationRun.lease == lease,
                    OptimizationRun.state == RunState.stale.value,
                )
                .values(**fields)
            )
            return _rowcount(result) == 1

    def requeue_run(self, run_id: str) -> bool:
        """stale -> queued, for `dspyflow runs recover --requeue`: the old claim is void."""
        return self._transition(
            run_id,
            RunState.queued,
            claim=None,
            attempt=OptimizationRun.attempt + 1,
            finished_at=None,
            error=None,
            lease=None,
            worker=None,
            heartbeat_at=func.now(),  # nothing claims it within stale_after: stale again
        )

    def mark_stale(self, older_than_s: float) -> list[str]:
        """`mark_stale_reasons`, the ids only."""
        return list(self.mark_stale_reasons(older_than_s))

    def mark_stale_reasons(self, older_than_s: float) -> dict[str, str]:
        """Runs nobody is working on become ``stale``, each with its reason: running ones
        whose heartbeat is older than ``older_than_s``, and queued ones that nothing
        claimed for that long (their batch process refreshes them while it lives)."""
        with self._session() as s, s.begin():
            now = s.scalar(select(func.now()))
            assert now is not None
            cutoff = _naive_utc(now) - timedelta(seconds=older_than_s)
            candidates = s.execute(
                select(
                    OptimizationRun.id,
                    OptimizationRun.state,
                    OptimizationRun.heartbeat_at,
                    OptimizationRun.created_at,
                ).where(OptimizationRun.state.in_([RunState.running.value, RunState.queued.value]))
            ).all()
            reasons = {
                RunState.running.value: (
                    f"heartbeat older than {older_than_s:g} s: the worker stopped"
                ),
                RunState.queued.value: (
                    f"queued for over {older_than_s:g} s and nothing claimed it: "
                    "the batch process that owned it is gone"
                ),
            }
            stale: dict[str, str] = {}
            for state in (RunState.running.value, RunState.queued.value):
                ids = [
                    rid
                    for rid, st, hb, created in candidates
                    if st == state and _naive_utc(hb or created) < cutoff
                ]
                if not ids:
                    continue
                # Only rows still in that state: one claimed meanwhile is alive.
                done = s.scalars(
                    update(OptimizationRun)
                    .where(OptimizationRun.id.in_(ids), OptimizationRun.state == state)
                    .values(
                        state=RunState.stale.value, finished_at=func.now(), error=reasons[state]
                    )
                    .returning(OptimizationRun.id)
                ).all()
                stale.update({rid: reasons[state] for rid in done})
            return stale

    def mark_worker_gone(self, run_id: str, *, worker: str, reason: str) -> bool:
        """queued/running -> stale for a run whose claimant `worker` is known dead; a run
        claimed meanwhile by another worker is left alone."""
        return self._transition(
            run_id, RunState.stale, claim=None, finished=True, expect_worker=worker, error=reason
        )

    def claims_on_host(self, host: str) -> list[tuple[str, str, str, datetime | None]]:
        """(id, state, worker, claimed at) of queued/running runs held by `host:*` workers:
        the cheap input of the dead-pid check (the state index narrows it)."""
        with self._session() as s:
            rows = s.execute(
                select(
                    OptimizationRun.id,
                    OptimizationRun.state,
                    OptimizationRun.worker,
                    func.coalesce(OptimizationRun.started_at, OptimizationRun.created_at),
                ).where(
                    OptimizationRun.state.in_([RunState.running.value, RunState.queued.value]),
                    OptimizationRun.worker.like(f"{host}:%"),
                )
            ).all()
            return [(rid, st, w or "", at) for rid, st, w, at in rows]

    def touch_queued(self, batch_id: str) -> int:
        """A live batch process vouches for its queued runs (one statement per interval),
        so recovery tells them from the queued runs of a dead batch."""
        with self._session() as s, s.begin():
            result = s.execute(
                update(OptimizationRun)
                .where(
                    OptimizationRun.batch_id == batch_id,
                    OptimizationRun.state == RunState.queued.value,
                )
                .values(heartbeat_at=func.now())
            )
            return _rowcount(result)

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
        stmt: Select[OptimizationRun] = select(OptimizationRun)
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


class CancelOutcome(StrEnum):
    requested = "requested"  # its holder stops at its next heartbeat
    cancelled = "cancelled"  # nobody held it: ended at once


@dataclass(frozen=True)
class Heartbeat:
    """A heartbeat's answer: whether this worker still holds the run (its truth value),
    and an operator's request to stop it, if one was made."""

    held: bool
    cancel_request: str | None = None

    def __bool__(self) -> bool:
        return self.held


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE matched (a DML statement's result is a `CursorResult`)."""
    return cast(CursorResult[Any], result).rowcount


def _claimed(run_id: str, lease: str) -> Any:
    """UPDATE of the run this lease holds, while it is running: a worker's only writes."""
    return update(OptimizationRun).where(
        OptimizationRun.id == run_id,
        OptimizationRun.lease == lease,
        OptimizationRun.state == RunState.running.value,
    )


def _benchmark_filter(
    metric: str | None, suite: str | None, env_fingerprint: str | None, session_id: str | None
) -> Select[BenchmarkResult]:
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
