"""Record the parts of an instance's price and when it started running.

Revision ID: 3f6a11101370
Revises: 5c1e2a9b7d40
Create Date: 2026-12-04 14:37:12.518204+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3f6a11101370"
down_revision: str | None = "5c1e2a9b7d40"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dph_base", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("storage_dph", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("running_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("running_at")
        batch_op.drop_column("storage_dph")
        batch_op.drop_column("dph_base")
