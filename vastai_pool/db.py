"""Engine and sessions of the pool database, and its upgrade on open.

SQLite in WAL mode, foreign keys on, and a busy timeout so that two
processes sharing the file wait for each other's write lock instead of
failing. pysqlite begins transactions lazily and on its own terms, so its
transaction handling is switched off and every transaction is begun here.
Writes begin ``IMMEDIATE``: they take the write lock before their first
read, so a read-then-write transaction cannot lose a race halfway. Reads
begin ``DEFERRED``.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from vastai_pool.errors import PoolDatabaseError

logger = logging.getLogger(__name__)

# Alembic logs "Context impl SQLiteImpl" and each applied revision at INFO
# every time a store opens; the pool logs its own upgrade line instead.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# Seconds a connection waits for another process's write lock.
BUSY_TIMEOUT_SECONDS = 30.0

_SQLITE_HEADER = b"SQLite format 3\x00"
_BEGIN_OPTION = "vastai_pool_begin"


def alembic_config(connection: Any | None = None) -> Config:
    """Build an Alembic config for the package's migrations, without an ini file.

    With ``connection``, the migrations run on it (inside its transaction).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("version_locations", str(MIGRATIONS_DIR / "versions"))
    # Revisions live in per-year folders, versions/<year>/MM_DD_HHMM_<rev>_<slug>.py.
    config.set_main_option("recursive_version_locations", "true")
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def database_error(path: Path, problem: str) -> PoolDatabaseError:
    return PoolDatabaseError(
        f"Pool database {path} {problem}. Move the file aside (it is left "
        "unchanged) or use another one with --vastai-pool-db (plugin) or "
        "--db (vastai-pool)."
    )


def check_file(path: Path) -> None:
    """Raise ``PoolDatabaseError`` unless ``path`` is missing, empty or a sound
    SQLite database. Reads only, so a bad file is never modified."""
    if not path.exists():
        return
    if path.is_dir():
        raise database_error(path, "is a directory, not a SQLite database")
    try:
        with path.open("rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise database_error(path, f"cannot be read ({exc})") from exc
    if not header:
        return
    if header != _SQLITE_HEADER:
        raise database_error(path, "is not a SQLite database")
    try:
        uri = f"{path.resolve().as_uri()}?mode=ro"
        with closing(
            sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_SECONDS)
        ) as conn:
            result = conn.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as exc:
        raise database_error(path, f"is corrupt ({exc})") from exc
    if result != [("ok",)]:
        detail = "; ".join(str(row[0]) for row in result[:3])
        raise database_error(path, f"is corrupt ({detail})")


def create_pool_engine(path: Path) -> Engine:
    engine = create_engine(
        f"sqlite:///{path}",
        connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
        # None stops pysqlite from emitting its own BEGIN; see _begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_SECONDS * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        _retry_while_locked(lambda: cursor.execute("PRAGMA journal_mode=WAL"))
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        mode = connection.get_execution_options().get(_BEGIN_OPTION, "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _retry_while_locked(statement: Callable[[], object]) -> None:
    """Run ``statement``, retrying for up to the busy timeout while locked.

    SQLite does not call its busy handler when switching a database to WAL
    while another connection does the same, so two processes opening a new
    pool file at once would otherwise fail at once with "database is locked".
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    delay = 0.01
    while True:
        try:
            statement()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.5)


def upgrade(engine: Engine, path: Path) -> None:
    """Bring the schema to the newest revision, in one write transaction.

    Raises ``PoolDatabaseError`` when the database carries a revision this
    code does not know (written by a newer release).
    """
    scripts = ScriptDirectory.from_config(alembic_config())
    with writing(engine).connect() as connection, connection.begin():
        current = MigrationContext.configure(connection).get_current_heads()
        for revision in current:
            if not _known(scripts, revision):
                raise PoolDatabaseError(
                    f"Pool database {path} has schema revision {revision}, which "
                    "this version of snakemake-executor-plugin-vastai does not "
                    "know: a newer release wrote it. Upgrade the plugin, or use "
                    "another file with --vastai-pool-db (plugin) or --db "
                    "(vastai-pool)."
                )
        if set(current) != set(scripts.get_heads()):
            logger.info("Upgrading pool database %s from %s", path, current or "empty")
            command.upgrade(alembic_config(connection), "head")


def _known(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except (RevisionError, CommandError):
        return False


def writing(engine: Engine) -> Engine:
    """Return a view of ``engine`` whose transactions begin ``IMMEDIATE``."""
    return engine.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})


def open_engine(path: Path) -> Engine:
    """Create parent directories, check the file, open it and upgrade it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise database_error(path, f"cannot be created ({exc})") from exc
    check_file(path)
    engine = create_pool_engine(path)
    try:
        upgrade(engine, path)
    except DBAPIError as exc:
        engine.dispose()
        raise database_error(path, f"could not be opened ({exc.orig})") from exc
    except PoolDatabaseError:
        engine.dispose()
        raise
    return engine


class Sessions:
    """Session factories over one engine: ``write()`` holds the write lock.

    A SQLite operational error (a lock held past the busy timeout, a full
    disk, a file removed underneath) is raised as ``PoolDatabaseError``.
    """

    def __init__(self, engine: Engine, path: Path) -> None:
        self.path = path
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        self._write = sessionmaker(bind=writing(engine), expire_on_commit=False)

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._translate_errors(), self._read() as session, session.begin():
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._translate_errors(), self._write() as session, session.begin():
            # Sessions connect lazily; connecting now emits BEGIN IMMEDIATE,
            # so the write lock is held from here on.
            session.connection()
            yield session

    @contextmanager
    def _translate_errors(self) -> Iterator[None]:
        try:
            yield
        except OperationalError as exc:
            raise PoolDatabaseError(
                f"Pool database {self.path} failed: {exc.orig}. If it is locked, "
                f"another process held its write lock for over "
                f"{BUSY_TIMEOUT_SECONDS:g} s: retry, or stop that process."
            ) from exc
