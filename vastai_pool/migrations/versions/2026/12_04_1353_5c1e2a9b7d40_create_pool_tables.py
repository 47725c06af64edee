"""Create the pool tables: runs, instances, leases, files and events.

Revision ID: 5c1e2a9b7d40
Revises:
Create Date: 2026-12-04 13:53:06.386304+00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5c1e2a9b7d40"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("account", sa.String(length=200), nullable=False),
        sa.Column("workdir", sa.Text(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("budget_usd", sa.Float(), nullable=True),
        sa.Column("linger_seconds", sa.Float(), nullable=False),
        sa.Column("idle_timeout_seconds", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "instances",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("vast_id", sa.Integer(), nullable=True),
        sa.Column("label", sa.String(length=120), nullable=False),
        sa.Column("account", sa.String(length=200), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("offer_id", sa.Integer(), nullable=True),
        sa.Column("machine_id", sa.Integer(), nullable=True),
        sa.Column("image", sa.Text(), nullable=False),
        sa.Column("extra_query", sa.Text(), nullable=False),
        sa.Column("num_gpus", sa.Integer(), nullable=False),
        sa.Column("gpu_name", sa.String(length=80), nullable=False),
        sa.Column("cpu_cores_effective", sa.Float(), nullable=False),
        sa.Column("cpu_ram_mb", sa.Float(), nullable=False),
        sa.Column("disk_gb", sa.Float(), nullable=False),
        sa.Column("dph_total", sa.Float(), nullable=False),
        sa.Column("reliability", sa.Float(), nullable=False),
        sa.Column("datacenter", sa.Boolean(), nullable=False),
        sa.Column("country", sa.String(length=8), nullable=True),
        sa.Column("ssh_host", sa.String(length=255), nullable=True),
        sa.Column("ssh_port", sa.Integer(), nullable=True),
        sa.Column("host_key", sa.Text(), nullable=True),
        sa.Column("rented_at", sa.Float(), nullable=False),
        sa.Column("ready_at", sa.Float(), nullable=True),
        sa.Column("last_busy_at", sa.Float(), nullable=True),
        sa.Column("idle_since", sa.Float(), nullable=True),
        sa.Column("destroyed_at", sa.Float(), nullable=True),
        sa.Column("destroy_reason", sa.String(length=32), nullable=True),
        sa.Column("keep", sa.Boolean(), nullable=False),
        sa.Column("linger_until", sa.Float(), nullable=True),
        sa.Column("sources", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
        ),
        sa.PrimaryKeyConstraint("pk"),
        sa.UniqueConstraint("label"),
    )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_instances_account"), ["account"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_instances_state"), ["state"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_instances_vast_id"), ["vast_id"], unique=False
        )

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=True),
        sa.Column("run_id", sa.String(length=32), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("from_state", sa.String(length=16), nullable=True),
        sa.Column("reason", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instances.pk"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_events_at"), ["at"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_events_instance_pk"), ["instance_pk"], unique=False
        )

    op.create_table(
        "files",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instances.pk"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.create_index(
            "ix_files_instance_path", ["instance_pk", "path"], unique=True
        )

    op.create_table(
        "leases",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("instance_pk", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("rule", sa.String(length=255), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("warm", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("ended_at", sa.Float(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["instance_pk"],
            ["instances.pk"],
        ),
        sa.ForeignKeyConstraint(
            ["run_id"],
            ["runs.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.create_index(
            "ix_leases_open", ["instance_pk", "ended_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("leases", schema=None) as batch_op:
        batch_op.drop_index("ix_leases_open")

    op.drop_table("leases")
    with op.batch_alter_table("files", schema=None) as batch_op:
        batch_op.drop_index("ix_files_instance_path")

    op.drop_table("files")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_events_instance_pk"))
        batch_op.drop_index(batch_op.f("ix_events_at"))

    op.drop_table("events")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_instances_vast_id"))
        batch_op.drop_index(batch_op.f("ix_instances_state"))
        batch_op.drop_index(batch_op.f("ix_instances_account"))

    op.drop_table("instances")
    op.drop_table("runs")
