"""The results database goes away exactly when a finished run is recorded.

Before: the outcome write raised, the failure write raised too, the optimized program
existed only in memory and was lost; the row stayed `running` until recovery marked it
`stale`. Now the write is retried while the database is unreachable
(`DSPYFLOW_RECORD_RETRY_S`), then spooled to `$DSPYFLOW_HOME/outbox`, and the next
`dspyflow` command writes it (tasks.cycle.outcome).

The outages are real: PostgreSQL refuses every connection to the database
(`ALLOW_CONNECTIONS false`, its sessions terminated), or another SQLite connection holds
the write lock past the busy timeout.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from storage.db import dispose_engine, get_engine
from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.cycle.outcome import outbox_dir
from tests.faults._helpers import quiet, sim_spec
from tests.faults._outage import PostgresOutage, break_at_record

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def outage(postgres_url: str) -> Iterator[PostgresOutage]:
    broken = PostgresOutage(postgres_url)
    try:
        yield broken
    finally:
        broken.end()
        broken.admin.dispose()


def _assert_recorded(repo: Repository, run_id: str) -> None:
    run = repo.get_run(run_id)
    assert run.state == "succeeded", (run.state, run.error)
    assert run.program_state, "the optimized program reached its row"
    assert run.best_score is not None and run.baseline_score is not None
    assert run.finished_at is not None and run.lm_calls > 0


@pytest.mark.postgres
def test_a_short_postgres_outage_during_record_is_waited_out(
    postgres_url: str, outage: PostgresOutage, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPYFLOW_RECORD_RETRY_S", "60")
    repo = Repository(get_engine(postgres_url))

    def start_for_3_s() -> None:
        outage.start()
        threading.Timer(3.0, outage.end).start()

    began = time.monotonic()
    with quiet():
        summary = cycle.run_cycle(
            sim_spec(optimizer="genetic"), repo, run_step=break_at_record(start_for_3_s)
        )
    assert summary.state == "succeeded"
    assert time.monotonic() - began > 3.0, "the record really waited for the database"
    _assert_recorded(repo, summary.run_id)
    assert not list(outbox_dir().glob("*.json"))


def test_a_held_sqlite_write_lock_during_record_is_waited_out(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite's write lock held by another connection for 3 s, past a 0.2 s busy timeout:
    the first write fails "database is locked", the retry gets through."""
    monkeypatch.setenv("DSPYFLOW_RECORD_RETRY_S", "60")
    monkeypatch.setenv("DSPYFLOW_DB_BUSY_TIMEOUT", "0.2")
    dispose_engine(sqlite_url)
    repo = Repository(get_engine(sqlite_url))
    held = threading.Event()

    def hold_lock_for_3_s() -> None:
        def hold() -> None:
            conn = sqlite3.connect(make_url(sqlite_url).database, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            held.set()
            time.sleep(3.0)
            conn.execute("ROLLBACK")
            conn.close()

        threading.Thread(target=hold, daemon=True).start()
        assert held.wait(10)

    with quiet():
        summary = cycle.run_cycle(
            sim_spec(optimizer="genetic"), repo, run_step=break_at_record(hold_lock_for_3_s)
        )
    assert summary.state == "succeeded"
    _assert_recorded(repo, summary.run_id)
    dispose_engine(sqlite_url)


_WORKER = """
import sys
from storage.db import get_engine
from storage.repository import Repository
from tasks.cycle import steps as cycle
from tasks.cycle.outcome import OutcomeSpooledError
from tests.faults._helpers import sim_spec
from tests.faults._outage import PostgresOutage, break_at_record

url = sys.argv[1]
try:
    cycle.run_cycle(
        sim_spec(optimizer="genetic"),
        Repository(get_engine(url)),
        run_id=sys.argv[2],
        run_step=break_at_record(PostgresOutage(url).start),
    )
except OutcomeSpooledError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
sys.exit(0)
"""


@pytest.mark.postgres
@pytest.mark.slow
def test_a_long_outage_spools_the_outcome_and_the_next_command_writes_it(
    postgres_url: str, outage: PostgresOutage, tmp_path: Path
) -> None:
    """A worker process finishes a run while PostgreSQL refuses connections for longer
    than its retry window: it spools the outcome, says so, and exits. Once the database is
    back, the next command (`dspyflow runs show`) writes the run's real end: `succeeded`
    with its program, not `stale` for its dead worker."""
    env = {
        **os.environ,
        "DSPYFLOW_RECORD_RETRY_S": "2",
        "DSPYFLOW_DATABASE_URL": postgres_url,
        "PYTHONPATH": str(ROOT),
    }
    run_id = "outagespooled0001"
    worker = subprocess.run(
        [sys.executable, "-c", _WORKER, postgres_url, run_id],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert worker.returncode == 3, worker.stderr[-3000:]
    spooled = outbox_dir() / f"{run_id}.json"
    assert spooled.exists(), worker.stderr[-3000:]
    assert str(spooled) in worker.stderr and "next dspyflow command" in worker.stderr

    outage.end()
    repo = Repository(get_engine(postgres_url))
    assert repo.get_run(run_id).state == "running", "nothing was written during the outage"
    shown = subprocess.run(
        [str(BIN / "dspyflow"), "runs", "show", run_id, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert json.loads(shown.stdout)["state"] == "succeeded"
    _assert_recorded(repo, run_id)
    assert not spooled.exists()


def test_an_outcome_for_a_run_another_worker_holds_is_dropped_not_forced(
    repo: Repository,
) -> None:
    """A spooled outcome goes through the same compare-and-set as a live write: if the
    run was re-queued and claimed by another worker meanwhile, the old lease writes
    nothing, and the file is removed (logged, not retried forever)."""
    from storage.models import RunState
    from tasks.cycle.outcome import RunOutcome, deliver_spooled_outcomes, spool

    run_id = repo.create_run(task="intent", optimizer="genetic", budget="light", lm="sim", spec={})
    lease_a = repo.start_run(run_id, worker="host:1")
    assert lease_a
    assert repo.mark_worker_gone(run_id, worker="host:1", reason="worker process 1 is gone")
    assert repo.requeue_run(run_id)
    lease_b = repo.start_run(run_id, worker="host:2")
    assert lease_b
    path = spool(
        RunOutcome(
            run_id=run_id,
            lease=lease_a,
            state=RunState.succeeded,
            fields={"best_score": 0.9, "program_state": {"x": 1}},
            kept="its best program",
        )
    )
    assert deliver_spooled_outcomes(repo) == []
    run = repo.get_run(run_id)
    assert run.state == "running" and run.lease == lease_b and run.best_score is None
    assert not path.exists()
