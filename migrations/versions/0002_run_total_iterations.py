"""optimization_runs.total_iterations: the planned number of iterations, for progress/ETA

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 20:55:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("optimization_runs") as batch:
        batch.add_column(sa.Column("total_iterations", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("optimization_runs") as batch:
        batch.drop_column("total_iterations")
