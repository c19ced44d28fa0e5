"""Shared fixtures: an isolated dspyflow home, one Prefect test harness per session, and
real databases: a SQLite file per test and a fresh PostgreSQL database on the server at
DSPYFLOW_TEST_POSTGRES_URL (default: the local server, trust auth)."""

from __future__ import annotations

import gc
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

# Process-wide settings that must be in place before prefect/dspy are imported.
_HOME = Path(tempfile.mkdtemp(prefix="dspyflow-test-home-"))
os.environ["DSPYFLOW_HOME"] = str(_HOME)
os.environ.pop("DSPYFLOW_DATABASE_URL", None)
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DSPY_CACHEDIR", str(_HOME / "dspy-cache"))
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(_HOME / "prefect-storage")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

POSTGRES_ADMIN_URL = os.environ.get(
    "DSPYFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@pytest.fixture(scope="module", autouse=True)
def frozen_heap_of_earlier_modules() -> Iterator[None]:
    """Collect, then freeze what earlier test modules left alive, so the cyclic GC of a
    later test scans only that test's own objects. One pytest process accumulates the
    whole suite's heap (~1M objects after three modules; a full collection then takes
    ~1 s), and such a pause once made a cycle's `record` step take 2.4 s on CI, failing a
    2 s budget test. A user's process runs one cycle or one batch, not 600 tests.
    Frozen objects are still freed by reference counting; only their cycles stay."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One Prefect test server for the whole session (entering one costs 6-8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'dspyflow.db'}"


def _admin_engine():  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")


@pytest.fixture(scope="session")
def postgres_database_factory() -> Iterator[Callable[[], str]]:
    """Creates empty PostgreSQL databases on the real server; drops them at the end.

    Fails (does not skip) when the server is unreachable: these tests are the proof
    that the production database works."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    admin = _admin_engine()
    created: list[str] = []
    try:
        with admin.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # pragma: no cover - environment problem
        pytest.fail(f"PostgreSQL at {POSTGRES_ADMIN_URL} is unreachable: {exc}")

    def create() -> str:
        name = f"dspyflow_test_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        created.append(name)
        return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield create
    from storage.db import dispose_engines

    dispose_engines()
    with admin.connect() as conn:
        for name in created:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def postgres_url(postgres_database_factory: Callable[[], str]) -> Iterator[str]:
    url = postgres_database_factory()
    yield url
    # Each engine pools up to 60 connections: close them, or the server runs out.
    from storage.db import dispose_engine

    dispose_engine(url)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """Runs the test once on SQLite and once on the real PostgreSQL server."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def repo(db_url: str):  # type: ignore[no-untyped-def]
    from storage.db import get_engine
    from storage.repository import Repository

    return Repository(get_engine(db_url))


@pytest.fixture
def use_database(db_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point DSPYFLOW_DATABASE_URL (CLI, flows) at this test's database."""
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", db_url)
    return db_url
