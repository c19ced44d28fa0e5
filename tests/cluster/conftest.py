"""Real processes on this machine: a Prefect server (its own fresh PostgreSQL database),
a Dask scheduler and worker processes, the results database on the PostgreSQL server.
Select these tests with `-m cluster`; every process is stopped when its fixture ends."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CALL_LOG_PRELOAD = str(Path(__file__).with_name("sim_call_log.py"))


def base_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DSPYFLOW_"))}
    env.update(
        {
            "PREFECT_HOME": str(tmp / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            "DSPYFLOW_HOME": str(tmp / "dspyflow-home"),
            "DSPYFLOW_PROJECT_DIR": str(ROOT),
            "TQDM_DISABLE": "1",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        }
    )
    return env


@pytest.fixture(scope="module")
def prefect_database() -> Iterator[str]:
    """A fresh PostgreSQL database for the Prefect server's own tables (asyncpg URL)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from tests.conftest import POSTGRES_ADMIN_URL

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"prefect_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+asyncpg", database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def results_url(postgres_database_factory: Callable[[], str]) -> Iterator[str]:
    url = postgres_database_factory()
    yield url
    from storage.db import dispose_engine

    dispose_engine(url)
