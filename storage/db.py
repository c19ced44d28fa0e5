"""Engine, sessions, the database URL, and the schema-version check.

One URL setting, ``DSPYFLOW_DATABASE_URL``. The embedded default is a SQLite file at
``$DSPYFLOW_HOME/dspyflow.db`` (``~/.dspyflow/dspyflow.db``), in WAL mode; production
uses ``postgresql+psycopg://user@host/db``.

Transactions: a session's explicit ``begin()`` is a write transaction (on SQLite it takes
the write lock up front, ``BEGIN IMMEDIATE``); everything else reads (a deferred ``BEGIN``,
which under WAL never waits for a writer). Core callers use ``write_transaction``.

Connections: each process keeps at most ``DSPYFLOW_DB_POOL_SIZE`` +
``DSPYFLOW_DB_MAX_OVERFLOW`` connections per database (see docs/operations.md for the
formula against the server's ``max_connections``).
"""

from __future__ import annotations

import logging
import re
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import URL, Connection, Engine, create_engine, event, inspect, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection, QueuePool

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

logger = logging.getLogger("dspyflow.storage")
T = TypeVar("T")


class StorageError(RuntimeError):
    """Base class for database problems users can act on."""


class DatabaseUnavailableError(StorageError):
    pass


class SchemaOutdatedError(StorageError):
    pass


class DatabaseBusyError(StorageError):
    """Contention: SQLite's write lock or this process's connection pool stayed busy."""


class DatabaseCorruptError(StorageError):
    pass


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSPYFLOW_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".dspyflow")
    database_url: str | None = None
    # Per process and database (PostgreSQL): at most pool_size + max_overflow connections.
    # processes x (pool_size + max_overflow) must stay below the server's max_connections
    # minus its reserved slots; docs/operations.md has the formula and PgBouncer.
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(5, ge=0)
    db_pool_timeout: float = Field(30.0, gt=0, allow_inf_nan=False)
    # SQLite: how long a writer waits for the write lock before "database is locked".
    db_busy_timeout: float = Field(60.0, gt=0, allow_inf_nan=False)
    # How long a finished run's outcome write is retried while the database is unreachable
    # or busy; after that it is spooled to $DSPYFLOW_HOME/outbox (tasks.cycle.outcome).
    record_retry_s: float = Field(60.0, ge=0, allow_inf_nan=False)

    def resolved_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home.expanduser() / 'dspyflow.db'}"


def database_url() -> str:
    return StorageSettings().resolved_url()


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:  # unparseable: still hide what looks like user:password@
        return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()

# Execution option that marks a write transaction (see the module docstring).
WRITE = "dspyflow_write"


class _Session(Session):
    """A session whose explicit ``begin()`` is a write transaction.

    The repository opens every write with ``with session.begin():`` and reads with
    autobegin, so the write lock is taken only by writers. The connection is procured here,
    with the option set, because the option must be on it before its BEGIN is emitted."""

    def begin(self, nested: bool = False) -> SessionTransaction:
        transaction = super().begin(nested=nested)
        if not nested:
            self.connection(execution_options={WRITE: True})
        return transaction


def write_transaction(engine: Engine) -> Any:
    """``engine.begin()`` for a Core write (BEGIN IMMEDIATE on SQLite)."""
    return engine.execution_options(**{WRITE: True}).begin()


class _BoundedPool(QueuePool):
    """A QueuePool whose timeout says, in one line, which setting to change."""

    def connect(self) -> PoolProxiedConnection:
        try:
            return super().connect()
        except sa_exc.TimeoutError:
            size, overflow = self.size(), self._max_overflow
            raise DatabaseBusyError(
                f"all {size + overflow} database connections of this process stayed busy for "
                f"{self._timeout:g} s (DSPYFLOW_DB_POOL_SIZE={size} + "
                f"DSPYFLOW_DB_MAX_OVERFLOW={overflow}): run fewer threads, or raise "
                "DSPYFLOW_DB_POOL_SIZE or DSPYFLOW_DB_POOL_TIMEOUT within the server's "
                "max_connections (docs/operations.md)"
            ) from None


def _configure_sqlite(engine: Engine, busy_timeout_s: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:
        # Let SQLAlchemy, not pysqlite, open transactions (see the begin hook below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (IMMEDIATE), so they wait on busy_timeout
        # instead of failing with "database is locked" when a read lock upgrades. Readers
        # use a deferred BEGIN: under WAL they read a snapshot and never wait for a writer.
        if conn.get_execution_options().get(WRITE):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the configured URL)."""
    url = url or database_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        try:
            parsed = make_url(url)
        except sa_exc.ArgumentError as exc:
            raise StorageError(
                f"invalid database URL {redact(url)!r}: {exc}; use sqlite:///PATH or "
                "postgresql+psycopg://USER@HOST/DB"
            ) from None
        try:
            engine = _create_engine(parsed)
        except (sa_exc.ArgumentError, ImportError) as exc:
            # NoSuchModuleError (an ArgumentError): unknown dialect; ImportError: no driver.
            raise StorageError(
                f"cannot use database URL {redact(url)!r}: {_first_line(exc)}; dspyflow "
                "supports sqlite:///PATH and postgresql+psycopg://USER@HOST/DB"
            ) from None
        _engines[url] = engine
        return engine


def _create_engine(url: URL) -> Engine:
    settings = StorageSettings()
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        timeout = settings.db_busy_timeout
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout})
        _configure_sqlite(engine, timeout)
        return engine
    return create_engine(
        url,
        poolclass=_BoundedPool,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout,
        pool_pre_ping=True,
    )


def dispose_engine(url: str) -> None:
    """Close the pooled connections of one URL's engine (a test database, say)."""
    with _engines_lock:
        engine = _engines.pop(url, None)
    if engine is not None:
        engine.dispose()


def dispose_engines() -> None:
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, class_=_Session, expire_on_commit=False)


def _first_line(exc: BaseException) -> str:
    text_ = str(getattr(exc, "orig", None) or exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


# Words of driver messages that mean the server could not be reached or went away.
_UNREACHABLE = (
    "connection",
    "connect",
    "refused",
    "timeout",
    "timed out",
    "could not translate host",
    "name or service not known",
    "server closed",
    "no route to host",
)


def describe_error(exc: BaseException, url: str | URL | None = None) -> StorageError | None:
    """A database error as a StorageError whose one-line message names the problem and
    the fix; None for errors that are not about the database itself (a constraint, a bug)."""
    if isinstance(exc, StorageError):
        return exc
    where = f" at {redact(str(url))}" if url is not None else ""
    if isinstance(exc, sa_exc.DBAPIError):
        reason = _first_line(exc)
        low = reason.lower()
        if "database is locked" in low or "database table is locked" in low:
            return DatabaseBusyError(
                f"the SQLite database{where} is locked (database is locked): another process "
                "held its write lock for longer than DSPYFLOW_DB_BUSY_TIMEOUT (default 60 s); "
                "retry when that writer is done, or use PostgreSQL for many concurrent "
                "writers (docs/operations.md)"
            )
        if "file is not a database" in low or "malformed" in low:
            return DatabaseCorruptError(
                f"the SQLite file{where} is not a usable database ({reason}): restore it from "
                "a backup, or move it away and dspyflow creates a new, empty one"
            )
        if "unable to open database file" in low:
            return DatabaseUnavailableError(
                f"cannot open the SQLite file{where} ({reason}): check that its directory "
                "exists and is writable, or set DSPYFLOW_DATABASE_URL"
            )
        if "too many clients" in low or "remaining connection slots" in low:
            return DatabaseBusyError(
                f"the database server{where} refused a connection ({reason}): keep processes "
                "x (DSPYFLOW_DB_POOL_SIZE + DSPYFLOW_DB_MAX_OVERFLOW) below its "
                "max_connections, or put PgBouncer in front (docs/operations.md)"
            )
        if "no such column" in low or ("column" in low and "does not exist" in low):
            return SchemaOutdatedError(
                f"the database schema{where} does not match this dspyflow ({reason}): run "
                "`dspyflow db upgrade`"
            )
        if "no such table" in low or ("relation" in low and "does not exist" in low):
            return SchemaOutdatedError(
                f"the database{where} has no dspyflow schema ({reason}): run `dspyflow db upgrade`"
            )
        if "database" in low and "does not exist" in low:
            return DatabaseUnavailableError(
                f"the database{where} does not exist ({reason}): create it (`createdb`) or fix "
                "DSPYFLOW_DATABASE_URL"
            )
        if "authentication failed" in low:
            return DatabaseUnavailableError(
                f"the database server{where} refused the login ({reason}): check the user and "
                "password in DSPYFLOW_DATABASE_URL"
            )
        if isinstance(exc, sa_exc.OperationalError):
            if exc.connection_invalidated or any(w in low for w in _UNREACHABLE):
                return DatabaseUnavailableError(f"cannot reach the database{where}: {reason}")
            # A deadlock, a cancelled statement...: the database answered, with an error.
            return StorageError(f"the database{where} failed: {reason}")
        return None
    if isinstance(exc, sa_exc.TimeoutError):  # a pool other than ours
        return DatabaseBusyError(
            f"no free database connection{where} ({_first_line(exc)}): raise "
            "DSPYFLOW_DB_POOL_SIZE or DSPYFLOW_DB_POOL_TIMEOUT (docs/operations.md)"
        )
    return None


@contextmanager
def connect_checked(engine: Engine) -> Iterator[None]:
    """Turn database failures into one clear line naming the (redacted) URL and the fix."""
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        error = describe_error(exc, engine.url)
        if error is None:
            raise
        raise error from None


def retry_while_unreachable(call: Callable[[], T], *, within_s: float, what: str) -> T:
    """`call()`, tried again while the database is unreachable or busy (a server restart,
    a cut network, SQLite's write lock held past its busy timeout), with backoff, for at
    most `within_s`; then that error, as its one-line StorageError. Other errors (a
    constraint, a bug) are raised at once. `call` must be safe to repeat: one transaction."""
    deadline = time.monotonic() + within_s
    delay = 0.25
    while True:
        try:
            return call()
        except (sa_exc.SQLAlchemyError, StorageError) as exc:
            error = describe_error(exc)
            if not isinstance(error, DatabaseUnavailableError | DatabaseBusyError):
                raise
            if time.monotonic() + delay > deadline:
                raise error from exc
            logger.warning("%s: %s; retrying in %.2g s", what, error, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


# --- schema version -------------------------------------------------------------------


def _alembic_config(engine: Engine):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    assert head is not None, "migrations/versions holds no revision"
    return head


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {rev.revision for rev in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}


def _revision_on(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current_revision(engine: Engine) -> str | None:
    with connect_checked(engine), engine.connect() as conn:
        return _revision_on(conn)


# One lock for every process that changes the schema (a pg_advisory_xact_lock key).
_SCHEMA_LOCK_KEY = zlib.crc32(b"dspyflow schema")


@contextmanager
def schema_lock(engine: Engine) -> Iterator[Connection]:
    """A write transaction that holds the schema lock until it ends.

    Many processes may start on one empty database at once: without a lock, each sees no
    tables and creates them, and all but one crash (on PostgreSQL an IntegrityError on
    pg_type). Callers re-check the schema inside. PostgreSQL: a transaction-level advisory
    lock; SQLite: BEGIN IMMEDIATE (the database's one write lock)."""
    with write_transaction(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
        yield conn


def _upgrade_on(engine: Engine, conn: Connection, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError

    cfg = _alembic_config(engine)
    cfg.attributes["connection"] = conn
    try:
        command.upgrade(cfg, revision)
    except CommandError as exc:
        raise StorageError(
            f"cannot upgrade to revision {revision!r}: {_first_line(exc)}; `dspyflow db "
            "current` shows the database's revision and the one this dspyflow needs"
        ) from None


def _newer_schema(current: str, url: URL) -> SchemaOutdatedError:
    return SchemaOutdatedError(
        f"the database schema revision {current} at {redact(str(url))} is unknown to this "
        f"dspyflow (head {head_revision()}); it was written by a newer dspyflow: upgrade "
        "dspyflow (pip install -U dspyflow) or point DSPYFLOW_DATABASE_URL elsewhere"
    )


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Apply migrations up to ``revision``; returns the revision the database is at."""
    with connect_checked(engine), schema_lock(engine) as conn:
        current = _revision_on(conn)
        if current is not None and current not in known_revisions():
            # Alembic would say only "Can't locate revision": name the cause and the fix.
            raise _newer_schema(current, engine.url)
        _upgrade_on(engine, conn, revision)
    return current_revision(engine) or ""


def _bootstrap(engine: Engine) -> str | None:
    """Bring an empty database to head under the schema lock; re-checked inside it, so
    the processes that lose the race find the schema the winner created. Returns the
    revision then, or None when the database holds tables but no dspyflow version."""
    with connect_checked(engine), schema_lock(engine) as conn:
        current = _revision_on(conn)
        if current is not None:
            return current
        if inspect(conn).get_table_names():
            return None
        _upgrade_on(engine, conn, "head")
        return _revision_on(conn)


def check_schema(engine: Engine, *, create_if_empty: bool = True) -> None:
    """Refuse to run against an older (or unknown) schema.

    A database with no tables at all is new: it is brought to the head revision, so the
    embedded default works on a fresh machine. Anything else must already be at head.
    """
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        if create_if_empty:
            current = _bootstrap(engine)
            if current == head:
                return
        else:
            with connect_checked(engine):
                tables = inspect(engine).get_table_names()
            if not tables:
                raise SchemaOutdatedError(
                    f"the database at {redact(str(engine.url))} is empty: run `dspyflow db upgrade`"
                )
    if current is None:
        raise SchemaOutdatedError(
            f"the database at {redact(str(engine.url))} has tables but no dspyflow schema "
            "version; run `dspyflow db upgrade` against an empty database"
        )
    if current in known_revisions():
        raise SchemaOutdatedError(
            f"the database schema is at revision {current}, this dspyflow needs {head}: "
            "run `dspyflow db upgrade`"
        )
    raise _newer_schema(current, engine.url)
