"""initial schema: runs, progress, alerts, benchmarks, load tests

Revision ID: 0001
Revises:
Create Date: 2026-11-27 20:34:55.652738
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "benchmark_results",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.String(length=32), nullable=False),
        sa.Column("suite", sa.String(length=50), nullable=False),
        sa.Column("metric", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("unit", sa.String(length=20), nullable=False),
        sa.Column("samples", sa.JSON(), nullable=True),
        sa.Column("params", sa.JSON(), nullable=True),
        sa.Column("env_fingerprint", sa.String(length=64), nullable=False),
        sa.Column("environment", sa.JSON(), nullable=True),
        sa.Column("commit", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("session_id", "metric", name="uq_benchmark_session_metric"),
    )
    with op.batch_alter_table("benchmark_results", schema=None) as batch_op:
        batch_op.create_index(
            "ix_benchmark_metric_env", ["metric", "env_fingerprint", "created_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_benchmark_results_env_fingerprint"), ["env_fingerprint"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_benchmark_results_session_id"), ["session_id"], unique=False
        )

    op.create_table(
        "load_test_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("target", sa.String(length=500), nullable=False),
        sa.Column("pattern", sa.String(length=20), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("thresholds", sa.JSON(), nullable=True),
        sa.Column("passed", sa.Boolean(), nullable=True),
        sa.Column("report_path", sa.String(length=1000), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "optimization_runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("batch_id", sa.String(length=32), nullable=True),
        sa.Column("task", sa.String(length=200), nullable=False),
        sa.Column("optimizer", sa.String(length=50), nullable=False),
        sa.Column("budget", sa.String(length=50), nullable=False),
        sa.Column("lm", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("baseline_score", sa.Float(), nullable=True),
        sa.Column("best_score", sa.Float(), nullable=True),
        sa.Column("lm_calls", sa.Integer(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cost_usd", sa.Float(), nullable=True),
        sa.Column("iterations", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("program_state", sa.JSON(), nullable=True),
        sa.Column("flow_run_id", sa.String(length=64), nullable=True),
        sa.Column("simulated", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("optimization_runs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_optimization_runs_batch_id"), ["batch_id"], unique=False
        )
        batch_op.create_index("ix_runs_created_at", ["created_at"], unique=False)
        batch_op.create_index(
            "ix_runs_state_priority", ["state", "priority", "created_at"], unique=False
        )

    op.create_table(
        "load_test_windows",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("window_index", sa.Integer(), nullable=False),
        sa.Column("start_s", sa.Float(), nullable=False),
        sa.Column("phase", sa.String(length=20), nullable=False),
        sa.Column("target_rate", sa.Float(), nullable=False),
        sa.Column("achieved_rate", sa.Float(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.Integer(), nullable=False),
        sa.Column("max_in_flight", sa.Integer(), nullable=False),
        sa.Column("error_kinds", sa.JSON(), nullable=True),
        sa.Column("response_hist", sa.Text(), nullable=True),
        sa.Column("service_hist", sa.Text(), nullable=True),
        sa.Column("resources", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["load_test_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "window_index", name="uq_load_window_index"),
    )
    op.create_table(
        "progress_samples",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("total_iterations", sa.Integer(), nullable=True),
        sa.Column("elapsed_s", sa.Float(), nullable=False),
        sa.Column("throughput", sa.Float(), nullable=True),
        sa.Column("eta_s", sa.Float(), nullable=True),
        sa.Column("best_score", sa.Float(), nullable=True),
        sa.Column("lm_calls", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["optimization_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("progress_samples", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_progress_samples_run_id"), ["run_id"], unique=False)

    op.create_table(
        "run_alerts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column(
            "recorded_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("kind", sa.String(length=50), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("elapsed_s", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(["run_id"], ["optimization_runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "kind", name="uq_run_alert_kind"),
    )
    with op.batch_alter_table("run_alerts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_run_alerts_run_id"), ["run_id"], unique=False)


def downgrade() -> None:

    with op.batch_alter_table("run_alerts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_run_alerts_run_id"))

    op.drop_table("run_alerts")
    with op.batch_alter_table("progress_samples", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_progress_samples_run_id"))

    op.drop_table("progress_samples")
    op.drop_table("load_test_windows")
    with op.batch_alter_table("optimization_runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_state_priority")
        batch_op.drop_index("ix_runs_created_at")
        batch_op.drop_index(batch_op.f("ix_optimization_runs_batch_id"))

    op.drop_table("optimization_runs")
    op.drop_table("load_test_runs")
    with op.batch_alter_table("benchmark_results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_benchmark_results_session_id"))
        batch_op.drop_index(batch_op.f("ix_benchmark_results_env_fingerprint"))
        batch_op.drop_index("ix_benchmark_metric_env")

    op.drop_table("benchmark_results")
