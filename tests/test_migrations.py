"""Alembic migrations of the pool database."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

from vastai_pool import db
from vastai_pool.errors import PoolDatabaseError
from vastai_pool.models import Base
from vastai_pool.store import Store


def table_names(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
        return {name for (name,) in rows}


def test_upgrade_matches_models(tmp_path: Path) -> None:
    store = Store(tmp_path / "pool.sqlite")
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, Base.metadata)
        tables = set(inspect(connection).get_table_names())
    store.close()

    assert differences == []
    assert tables == set(Base.metadata.tables) | {"alembic_version"}


def test_every_revision_upgrades_and_downgrades(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite"
    engine = db.create_pool_engine(path)
    scripts = ScriptDirectory.from_config(db.alembic_config())
    revisions = list(reversed(list(scripts.walk_revisions())))
    assert revisions, "no migration scripts found"

    with engine.begin() as connection:
        config = db.alembic_config(connection)
        for revision in revisions:
            command.upgrade(config, revision.revision)
            assert MigrationContext.configure(connection).get_current_heads() == (
                revision.revision,
            )
        for revision in reversed(revisions):
            command.downgrade(config, revision.down_revision or "base")
    engine.dispose()

    assert table_names(path) == {"alembic_version"}


def test_migrations_found_from_any_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alembic.ini").write_text("[alembic]\nscript_location = nowhere\n")

    Store(tmp_path / "pool.sqlite").close()

    assert "instances" in table_names(tmp_path / "pool.sqlite")


def test_reopen_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO runs (id, account, workdir, host, pid, started_at,"
            " heartbeat_at, linger_seconds) VALUES ('r1', 'a', '/w', 'h', 1, 0, 0, 0)"
        )

    Store(path).close()

    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT id FROM runs").fetchall() == [("r1",)]


def test_newer_schema_revision_rejected(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'f00dfeedf00d'")
    before = path.read_bytes()

    with pytest.raises(PoolDatabaseError, match="f00dfeedf00d") as caught:
        Store(path)

    assert "newer release" in str(caught.value)
    assert str(path) in str(caught.value)
    assert path.read_bytes() == before


def _open_concurrently(path: str, barrier: object, results: object) -> None:
    barrier.wait()
    try:
        Store(Path(path)).close()
    except Exception as exc:  # reported to the parent, which fails the test
        results.put(repr(exc))
    else:
        results.put("ok")


def test_concurrent_first_open_upgrades_once(tmp_path: Path) -> None:
    path = tmp_path / "pool.sqlite"
    context = multiprocessing.get_context("fork")
    openers = 4
    barrier = context.Barrier(openers)
    results = context.Queue()
    processes = [
        context.Process(target=_open_concurrently, args=(str(path), barrier, results))
        for _ in range(openers)
    ]
    for process in processes:
        process.start()
    outcomes = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)

    assert outcomes == ["ok"] * openers
    with sqlite3.connect(path) as conn:
        versions = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert len(versions) == 1
