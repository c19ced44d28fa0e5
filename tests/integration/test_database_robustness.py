"""The results database under contention and misuse (issue 11): readers that do not wait
for writers, many processes bootstrapping one empty PostgreSQL database, a bounded pool
per process, and one-line errors from the CLI for every database problem."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from flows.cli import app
from storage.db import (
    StorageSettings,
    dispose_engine,
    get_engine,
    head_revision,
    session_factory,
)
from storage.models import OptimizationRun
from storage.repository import Repository

runner = CliRunner()

RUN_FIELDS = dict(task="intent", optimizer="mipro", budget="light", lm="sim", spec={"task": "x"})


def _sqlite_path(url: str) -> str:
    database = make_url(url).database
    assert database is not None
    return database


# --- SQLite: readers take no write lock ---------------------------------------------------


def _finishes_within(fn: Callable[[], object], seconds: float) -> tuple[bool, list[object]]:
    out: list[object] = []
    thread = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive(), out


def test_a_reader_does_not_wait_for_an_open_write_transaction(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every transaction was BEGIN IMMEDIATE: `runs list` waited behind any writer."""
    repo = Repository(get_engine(sqlite_url))
    run_id = repo.create_run(**RUN_FIELDS)
    writer = sqlite3.connect(_sqlite_path(sqlite_url), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE optimization_runs SET priority = 7")
    try:
        done, out = _finishes_within(lambda: repo.list_runs(), 5.0)
        assert done, "list_runs waited for the writer's lock"
        (runs,) = out
        assert [r.id for r in runs] == [run_id]  # type: ignore[attr-defined]
        assert runs[0].priority == 0  # type: ignore[index]  # the committed snapshot
        done, _ = _finishes_within(lambda: repo.get_run(run_id), 5.0)
        assert done
        monkeypatch.setenv("DSPYFLOW_DATABASE_URL", sqlite_url)
        done, out = _finishes_within(lambda: runner.invoke(app, ["runs", "list"]), 10.0)
        assert done, "`dspyflow runs list` waited for the writer's lock"
        assert out[0].exit_code == 0 and run_id[:12] in out[0].output  # type: ignore[attr-defined]
    finally:
        writer.execute("ROLLBACK")
        writer.close()


def test_a_write_transaction_takes_the_lock_when_it_begins(sqlite_url: str) -> None:
    """Writers keep BEGIN IMMEDIATE (a read-then-write transaction must not lose its lock
    upgrade to another writer); a session's explicit begin() is such a writer."""
    engine = get_engine(sqlite_url)
    Repository(engine)
    sessions = session_factory(engine)

    def other_writer_gets_the_lock() -> bool:
        conn = sqlite3.connect(_sqlite_path(sqlite_url), timeout=0.2, isolation_level=None)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()

    with sessions() as s, s.begin():
        s.execute(select(func.count()).select_from(OptimizationRun))
        assert not other_writer_gets_the_lock()
    with sessions() as s:  # autobegin: a read
        s.execute(select(func.count()).select_from(OptimizationRun))
        assert other_writer_gets_the_lock()


# --- PostgreSQL: six processes bootstrapping one empty database ----------------------------


def _bootstrap_worker(url: str, barrier: object, results: object) -> None:
    try:
        from storage.db import get_engine as engine_for
        from storage.repository import Repository as Repo

        engine = engine_for(url)
        barrier.wait(60)  # type: ignore[attr-defined]
        repo = Repo(engine)
        repo.list_runs()
        results.put("ok")  # type: ignore[attr-defined]
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put(f"{type(exc).__name__}: {exc}"[:500])  # type: ignore[attr-defined]


def test_six_processes_bootstrap_one_empty_postgres_database(
    postgres_database_factory: Callable[[], str],
) -> None:
    """Check-then-create without a lock: 2 of 6 crashed with an IntegrityError on pg_type."""
    url = postgres_database_factory()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(6)
    results = ctx.Queue()
    procs = [ctx.Process(target=_bootstrap_worker, args=(url, barrier, results)) for _ in range(6)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    assert outcomes == ["ok"] * 6, outcomes
    from storage.db import current_revision

    assert current_revision(get_engine(url)) == head_revision()
    dispose_engine(url)


# --- PostgreSQL: two processes of 300 writer threads ----------------------------------------

THREADS, ROWS_PER_THREAD = 300, 3


def _writers_worker(url: str, barrier: object, results: object) -> None:
    try:
        from storage.db import get_engine as engine_for
        from storage.repository import Repository as Repo

        repo = Repo(engine_for(url))
        errors: list[str] = []
        start = threading.Event()

        def write() -> None:
            start.wait()
            for _ in range(ROWS_PER_THREAD):
                try:
                    repo.create_run(**RUN_FIELDS)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"{type(exc).__name__}: {exc}"[:300])

        threads = [threading.Thread(target=write) for _ in range(THREADS)]
        for t in threads:
            t.start()
        barrier.wait(60)  # type: ignore[attr-defined]
        start.set()
        for t in threads:
            t.join()
        results.put(errors)  # type: ignore[attr-defined]
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put([f"{type(exc).__name__}: {exc}"[:500]])  # type: ignore[attr-defined]


def test_two_processes_of_300_writers_on_postgres(
    postgres_database_factory: Callable[[], str],
) -> None:
    """60 connections a process ran the server out ("too many clients"); now each process
    keeps at most DSPYFLOW_DB_POOL_SIZE + DSPYFLOW_DB_MAX_OVERFLOW, and every row lands."""
    from tests.conftest import POSTGRES_ADMIN_URL

    url = postgres_database_factory()
    Repository(get_engine(url))  # the schema, before the writers start
    dispose_engine(url)
    settings = StorageSettings()
    per_process = settings.db_pool_size + settings.db_max_overflow
    database = make_url(url).database

    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    peak = 0
    stop = threading.Event()

    def sample_connections() -> None:
        nonlocal peak
        with admin.connect() as conn:
            while not stop.is_set():
                n = conn.execute(
                    text("SELECT count(*) FROM pg_stat_activity WHERE datname = :d"),
                    {"d": database},
                ).scalar_one()
                peak = max(peak, int(n))
                time.sleep(0.02)

    sampler = threading.Thread(target=sample_connections, daemon=True)
    sampler.start()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    results = ctx.Queue()
    procs = [ctx.Process(target=_writers_worker, args=(url, barrier, results)) for _ in range(2)]
    try:
        for p in procs:
            p.start()
        errors = [e for _ in procs for e in results.get(timeout=300)]
        for p in procs:
            p.join(30)
    finally:
        stop.set()
        sampler.join(5)
        admin.dispose()
    assert errors == [], errors[:5]
    with get_engine(url).connect() as conn:
        rows = conn.execute(select(func.count()).select_from(OptimizationRun)).scalar_one()
    assert rows == 2 * THREADS * ROWS_PER_THREAD
    assert 0 < peak <= 2 * per_process, f"peak {peak} connections, bound {2 * per_process}"
    dispose_engine(url)


def test_pool_settings_come_from_the_environment(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DSPYFLOW_DB_POOL_SIZE", "3")
    monkeypatch.setenv("DSPYFLOW_DB_MAX_OVERFLOW", "0")
    monkeypatch.setenv("DSPYFLOW_DB_POOL_TIMEOUT", "0.5")
    dispose_engine(postgres_url)
    engine = get_engine(postgres_url)
    Repository(engine)
    held = [engine.connect() for _ in range(3)]
    try:
        from storage.db import DatabaseBusyError

        with pytest.raises(DatabaseBusyError) as info:
            engine.connect()
        message = str(info.value)
        assert "DSPYFLOW_DB_POOL_SIZE=3" in message and "\n" not in message
    finally:
        for conn in held:
            conn.close()
        dispose_engine(postgres_url)


# --- one-line errors from the CLI ---------------------------------------------------------


def _one_line_error(result, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert result.exit_code not in (0, None), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    output = result.output.strip()
    assert "Traceback" not in output, output
    assert len(output.splitlines()) == 1, output
    assert output.startswith("error:"), output
    for needle in needles:
        assert needle in output, output


def test_corrupt_sqlite_file_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "dspyflow.db"
    path.write_bytes(b"this is not a database, just some text " * 200)
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", f"sqlite:///{path}")
    for args in (["runs", "list"], ["db", "upgrade"], ["db", "current"]):
        _one_line_error(runner.invoke(app, args), "not a usable database", "backup")
    dispose_engine(f"sqlite:///{path}")


def test_unknown_dialect_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", "mysqlx://root:pw@localhost/db")
    for args in (["runs", "list"], ["db", "upgrade"]):
        result = runner.invoke(app, args)
        _one_line_error(result, "mysqlx", "postgresql+psycopg")
        assert "pw@" not in result.output  # the password is redacted


def test_missing_postgres_database_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import POSTGRES_ADMIN_URL

    missing = make_url(POSTGRES_ADMIN_URL).set(database="dspyflow_no_such_db_3f9a")
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", missing.render_as_string(hide_password=False))
    _one_line_error(runner.invoke(app, ["runs", "list"]), "does not exist", "createdb")


def test_db_upgrade_on_a_newer_schema_is_one_line(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = get_engine(sqlite_url)
    Repository(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '9999_from_the_future'"))
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", sqlite_url)
    _one_line_error(runner.invoke(app, ["db", "upgrade"]), "9999_from_the_future", "newer")
    _one_line_error(runner.invoke(app, ["runs", "list"]), "newer dspyflow")


def test_locked_database_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'locked.db'}"
    Repository(get_engine(url))
    dispose_engine(url)
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", url)
    monkeypatch.setenv("DSPYFLOW_DB_BUSY_TIMEOUT", "0.3")
    writer = sqlite3.connect(_sqlite_path(url), isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    try:
        result = runner.invoke(app, ["runs", "recover", "--stale-after", "600"])
        _one_line_error(result, "database is locked", "PostgreSQL")
        assert runner.invoke(app, ["runs", "list"]).exit_code == 0  # reads still work
    finally:
        writer.execute("ROLLBACK")
        writer.close()
        dispose_engine(url)


# --- rich markup in user data -------------------------------------------------------------


def test_runs_show_prints_markup_in_user_text_as_text(use_database: str) -> None:
    """`[/x]` in an instruction crashed `runs show` (rich read it as a closing tag)."""
    repo = Repository()
    run_id = repo.create_run(**{**RUN_FIELDS, "task": "my [bold]task[/x]"})
    instructions = "Answer [/x] with [red]care[/red] and [link=http://x]no links[/]"
    with session_factory(repo.engine)() as s, s.begin():
        s.execute(
            update(OptimizationRun)
            .where(OptimizationRun.id == run_id)
            .values(
                error="boom [/]",
                program_state={
                    "predict": {"signature": {"instructions": instructions}, "demos": []}
                },
            )
        )
    result = runner.invoke(app, ["runs", "show", run_id])
    assert result.exit_code == 0, result.output
    assert instructions in result.output
    assert "boom [/]" in result.output and "my [bold]task[/x]" in result.output
    listed = runner.invoke(app, ["runs", "list"])
    assert listed.exit_code == 0 and "[bold]task" in listed.output
