"""Engine, sessions, the database URL, and the schema-version check.

One URL setting, ``DSPYFLOW_DATABASE_URL``. The embedded default is a SQLite file at
``$DSPYFLOW_HOME/dspyflow.db`` (``~/.dspyflow/dspyflow.db``), in WAL mode; production
uses ``postgresql+psycopg://user@host/db``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


class StorageError(RuntimeError):
    """Base class for database problems users can act on."""


class DatabaseUnavailableError(StorageError):
    pass


class SchemaOutdatedError(StorageError):
    pass


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DSPYFLOW_", extra="ignore")

    home: Path = Field(default_factory=lambda: Path.home() / ".dspyflow")
    database_url: str | None = None

    def resolved_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.home.expanduser() / 'dspyflow.db'}"


def database_url() -> str:
    return StorageSettings().resolved_url()


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
        # Let SQLAlchemy, not pysqlite, open transactions (see the begin hook below).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
        # IMMEDIATE takes the write lock up front, so concurrent writers wait on
        # busy_timeout instead of failing with "database is locked" on lock upgrade.
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine(url: str | None = None) -> Engine:
    """The process-wide engine for ``url`` (default: the configured URL)."""
    url = url or database_url()
    with _engines_lock:
        engine = _engines.get(url)
        if engine is not None:
            return engine
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise StorageError(f"invalid database URL {url!r}: {exc}") from None
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})
            _configure_sqlite(engine)
        else:
            engine = create_engine(
                url, pool_size=20, max_overflow=40, pool_pre_ping=True, pool_timeout=120
            )
        _engines[url] = engine
        return engine


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
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def connect_checked(engine: Engine) -> Iterator[None]:
    """Turn connection failures into one clear line naming the (redacted) URL."""
    try:
        yield
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        if "locked" in reason:  # contention, not reachability: let callers see it as is
            raise
        raise DatabaseUnavailableError(
            f"cannot reach the database at {redact(str(engine.url))}: {reason}"
        ) from None


# --- schema version -------------------------------------------------------------------


def _alembic_config(engine: Engine):  # type: ignore[no-untyped-def]
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


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with connect_checked(engine), engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Apply migrations up to ``revision``; returns the revision the database is at."""
    from alembic import command

    with connect_checked(engine), engine.begin() as conn:
        cfg = _alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return current_revision(engine) or ""


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
        with connect_checked(engine):
            tables = inspect(engine).get_table_names()
        if not tables and create_if_empty:
            upgrade(engine)
            return
        raise SchemaOutdatedError(
            f"the database at {redact(str(engine.url))} has tables but no dspyflow schema "
            "version; run `dspyflow db upgrade` against an empty database"
        )
    from alembic.script import ScriptDirectory

    known = {rev.revision for rev in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}
    if current in known:
        raise SchemaOutdatedError(
            f"the database schema is at revision {current}, this dspyflow needs {head}: "
            "run `dspyflow db upgrade`"
        )
    raise SchemaOutdatedError(
        f"the database schema revision {current} is unknown to this dspyflow (head {head}); "
        "it was written by a newer dspyflow: upgrade dspyflow"
    )
