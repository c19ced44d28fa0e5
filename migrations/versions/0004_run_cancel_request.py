"""optimization_runs.cancel_request: an operator's request to stop a running run

`dspyflow runs cancel` writes it; the worker reads it back with its next heartbeat,
whatever Prefect server (or none) the run's process uses.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 03:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("optimization_runs") as batch:
        batch.add_column(sa.Column("cancel_request", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("optimization_runs") as batch:
        batch.drop_column("cancel_request")
