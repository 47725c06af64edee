"""Alembic environment of the pool database.

``vastai_pool.db`` runs the migrations on its own connection, passed in
``config.attributes["connection"]``. Without one (a developer running the
``alembic`` command with ``-c vastai_pool/migrations/alembic.ini``), the
``sqlalchemy.url`` of the config is opened instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from vastai_pool.models import Base

config = context.config
target_metadata = Base.metadata


def run_on(connection: object) -> None:
    # Batch mode, because SQLite alters most columns only by copying the table.
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.begin() as connection:
        run_on(connection)
    engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        render_as_batch=True,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations()
