"""Remember machines that failed an instance, so later runs avoid them.

Revision ID: b71f0c4d2e85
Revises: 8d2e4b6a9c13
Create Date: 2026-12-04 17:00:00+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b71f0c4d2e85"
down_revision: str | None = "8d2e4b6a9c13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "failed_machines",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("account", sa.String(length=64), nullable=False),
        sa.Column("machine_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("instance_vast_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
    )
    op.create_index(
        "ix_failed_machines_account_at", "failed_machines", ["account", "at"]
    )


def downgrade() -> None:
    op.drop_index("ix_failed_machines_account_at", table_name="failed_machines")
    op.drop_table("failed_machines")
