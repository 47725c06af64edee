"""Give each pool database a random identity for its instance labels.

Revision ID: 8d2e4b6a9c13
Revises: 3f6a11101370
Create Date: 2026-12-04 15:20:00+00:00
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8d2e4b6a9c13"
down_revision: str | None = "3f6a11101370"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "pool_meta",
        sa.Column("key", sa.String(length=64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.bulk_insert(table, [{"key": "pool_id", "value": uuid.uuid4().hex[:8]}])


def downgrade() -> None:
    op.drop_table("pool_meta")
