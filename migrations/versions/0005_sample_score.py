"""progress_samples.score: the latest iteration's candidate score at each sample

The results report draws each run's history from its samples: the best so far was
stored already; this adds the score of the iteration just finished (None where the
optimizer reports none, as GEPA does), so the page shows how candidates scattered
around the best.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 20:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("progress_samples") as batch:
        batch.add_column(sa.Column("score", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("progress_samples") as batch:
        batch.drop_column("score")
