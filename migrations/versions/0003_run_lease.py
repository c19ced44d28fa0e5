"""optimization_runs.lease (the claimant's token) and val_score (the optimizer's best)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("optimization_runs") as batch:
        batch.add_column(sa.Column("lease", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("val_score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("optimization_runs") as batch:
        batch.drop_column("val_score")
        batch.drop_column("lease")
