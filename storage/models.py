"""SQLAlchemy 2.0 models for dspyflow's results database.

Narrow tables, times set by the database, JSON columns for the parts users read back
whole (specs, program state, histograms). The schema changes only through Alembic
(`migrations/`); `storage.db.head_revision()` names the head these models match.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class RunState(enum.StrEnum):
    """Life cycle of an optimization run. All but `queued` and `running` are terminal
    (`stale` alone may go back to `queued`: see the transition table below)."""

    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    timed_out = "timed_out"
    cancelled = "cancelled"
    stale = "stale"  # heartbeat stopped: the worker died; `dspyflow runs recover` sets it
    # Stopped by its LM-call, token or USD budget (time: timed_out); best program kept.
    budget_exhausted = "budget_exhausted"

    @property
    def terminal(self) -> bool:
        return self not in (RunState.queued, RunState.running)


TERMINAL_STATES = frozenset(s for s in RunState if s.terminal)
FINAL_STATES = TERMINAL_STATES - {RunState.stale}  # nothing leaves these

# Every state change of a run, and who may make it. A worker changes only the run it
# claimed (its lease); an operator (recovery, a batch's dispatcher, `runs cancel`)
# changes only runs nobody holds: queued ones, or stale ones whose worker is gone.
# `storage.repository` refuses any write this table does not name.
WORKER_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    # queued -> running is the claim itself (`start_run`), which issues the lease.
    RunState.running: FINAL_STATES,
}
OPERATOR_TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.queued: frozenset({RunState.cancelled, RunState.failed, RunState.stale}),
    RunState.running: frozenset({RunState.stale}),  # heartbeat too old or worker gone
    RunState.stale: frozenset({RunState.queued, RunState.failed, RunState.cancelled}),
}


def can_transition(current: RunState, new: RunState, *, worker: bool) -> bool:
    table = WORKER_TRANSITIONS if worker else OPERATOR_TRANSITIONS
    return new in table.get(current, frozenset())


class OptimizationRun(Base):
    __tablename__ = "optimization_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    batch_id: Mapped[str | None] = mapped_column(String(32), index=True)
    task: Mapped[str] = mapped_column(String(200))
    optimizer: Mapped[str] = mapped_column(String(50))
    budget: Mapped[str] = mapped_column(String(50))
    lm: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default=RunState.queued.value)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    worker: Mapped[str | None] = mapped_column(String(200))  # host:pid of the claimant
    # The claim: issued by `start_run`; every later write of the worker must present it,
    # so a worker that lost the run (stale, re-queued, claimed again) cannot write it.
    lease: Mapped[str | None] = mapped_column(String(32))
    baseline_score: Mapped[float | None] = mapped_column(Float)
    best_score: Mapped[float | None] = mapped_column(Float)  # test score of the program
    val_score: Mapped[float | None] = mapped_column(Float)  # the optimizer's own best
    lm_calls: Mapped[int] = mapped_column(Integer, default=0)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    iterations: Mapped[int] = mapped_column(Integer, default=0)
    total_iterations: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    program_state: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    flow_run_id: Mapped[str | None] = mapped_column(String(64))
    # An operator's stop request for a running run (`runs cancel`: its reason). The worker
    # reads it with each heartbeat, so it reaches any process, with or without Prefect.
    cancel_request: Mapped[str | None] = mapped_column(Text)
    # Which simulated/real provider produced the figures: reports must say when `sim` was used.
    simulated: Mapped[bool] = mapped_column(Boolean, default=False)

    samples: Mapped[list[ProgressSample]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="ProgressSample.id"
    )
    alerts: Mapped[list[RunAlert]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="RunAlert.id"
    )

    @property
    def duration_s(self) -> float | None:
        """Seconds from the claim to the terminal state; None until both are set."""
        if self.finished_at is None or self.started_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()

    __table_args__ = (
        Index("ix_runs_state_priority", "state", "priority", "created_at"),
        Index("ix_runs_created_at", "created_at"),
    )


class ProgressSample(Base):
    __tablename__ = "progress_samples"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        ForeignKey("optimization_runs.id", ondelete="CASCADE"), index=True
    )
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    iteration: Mapped[int] = mapped_column(Integer)
    total_iterations: Mapped[int | None] = mapped_column(Integer)
    elapsed_s: Mapped[float] = mapped_column(Float)
    throughput: Mapped[float | None] = mapped_column(Float)  # iterations per second
    eta_s: Mapped[float | None] = mapped_column(Float)
    best_score: Mapped[float | None] = mapped_column(Float)
    # The latest iteration's candidate at sample time (None: the optimizer reports none).
    score: Mapped[float | None] = mapped_column(Float)
    lm_calls: Mapped[int | None] = mapped_column(Integer)

    run: Mapped[OptimizationRun] = relationship(back_populates="samples")


class RunAlert(Base):
    __tablename__ = "run_alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        ForeignKey("optimization_runs.id", ondelete="CASCADE"), index=True
    )
    recorded_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    kind: Mapped[str] = mapped_column(String(50))  # e.g. budget_warning, budget_exceeded
    message: Mapped[str] = mapped_column(Text)
    elapsed_s: Mapped[float | None] = mapped_column(Float)

    run: Mapped[OptimizationRun] = relationship(back_populates="alerts")

    __table_args__ = (UniqueConstraint("run_id", "kind", name="uq_run_alert_kind"),)


class BenchmarkResult(Base):
    """One measured metric of one benchmark session (GPU ops, cycle benchmark, nightly)."""

    __tablename__ = "benchmark_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(String(32), index=True)
    suite: Mapped[str] = mapped_column(String(50))  # gpu, cycle, concurrency, load, nightly
    metric: Mapped[str] = mapped_column(String(200))  # e.g. gpu.topk_cosine.fp16.1000000x384.ms
    value: Mapped[float] = mapped_column(Float)
    unit: Mapped[str] = mapped_column(String(20))
    samples: Mapped[list[Any] | None] = mapped_column(JSON)  # raw repetitions, for U tests
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    env_fingerprint: Mapped[str] = mapped_column(String(64), index=True)
    environment: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    commit: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())

    __table_args__ = (
        UniqueConstraint("session_id", "metric", name="uq_benchmark_session_metric"),
        Index("ix_benchmark_metric_env", "metric", "env_fingerprint", "created_at"),
    )


class LoadTestRun(Base):
    __tablename__ = "load_test_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    target: Mapped[str] = mapped_column(String(500))
    pattern: Mapped[str] = mapped_column(String(20))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    thresholds: Mapped[list[Any] | None] = mapped_column(JSON)
    passed: Mapped[bool | None] = mapped_column(Boolean)
    report_path: Mapped[str | None] = mapped_column(String(1000))
    flow_run_id: Mapped[str | None] = mapped_column(String(64))

    windows: Mapped[list[LoadTestWindow]] = relationship(
        back_populates="run", cascade="all, delete-orphan", order_by="LoadTestWindow.window_index"
    )


class LoadTestWindow(Base):
    """One one-second window of a load test, with its encoded HDR histograms."""

    __tablename__ = "load_test_windows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("load_test_runs.id", ondelete="CASCADE"))
    window_index: Mapped[int] = mapped_column(Integer)
    start_s: Mapped[float] = mapped_column(Float)
    phase: Mapped[str] = mapped_column(String(20))  # warmup, steady, cooldown
    target_rate: Mapped[float] = mapped_column(Float)
    achieved_rate: Mapped[float] = mapped_column(Float)
    requests: Mapped[int] = mapped_column(Integer)
    errors: Mapped[int] = mapped_column(Integer)
    dropped: Mapped[int] = mapped_column(Integer, default=0)
    max_in_flight: Mapped[int] = mapped_column(Integer, default=0)
    error_kinds: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    response_hist: Mapped[str | None] = mapped_column(Text)  # HdrHistogram base64 encoding
    service_hist: Mapped[str | None] = mapped_column(Text)
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    run: Mapped[LoadTestRun] = relationship(back_populates="windows")

    __table_args__ = (UniqueConstraint("run_id", "window_index", name="uq_load_window_index"),)
