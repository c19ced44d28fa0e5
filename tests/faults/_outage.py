"""Real database outages for the fault tests. Imported by worker subprocesses too, so it
must not import tests.conftest (that would give the child a dspyflow home of its own)."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tasks.cycle import steps as cycle

ADMIN_URL = os.environ.get(
    "DSPYFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


class PostgresOutage:
    """Make one PostgreSQL database refuse all connections, and take them back."""

    def __init__(self, url: str) -> None:
        self.database = make_url(url).database
        self.admin = create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")

    def start(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS false'))
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": self.database},
            )

    def end(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{self.database}" ALLOW_CONNECTIONS true'))


def break_at_record(start: Callable[[], None]) -> cycle.StepRunner:
    """Run the steps as they are, but start the outage just before `record`."""

    def run_step(name: str, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if name == "record":
            start()
        return step(*args, **kwargs)

    return run_step  # type: ignore[return-value]
