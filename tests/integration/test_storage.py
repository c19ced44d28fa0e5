"""The results database on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from storage.db import (
    DatabaseUnavailableError,
    SchemaOutdatedError,
    check_schema,
    current_revision,
    get_engine,
    head_revision,
    upgrade,
)
from storage.models import Base, RunState
from storage.repository import Repository, RunNotFoundError


def _new_run(repo: Repository, **overrides) -> str:  # type: ignore[no-untyped-def]
    fields = dict(task="intent", optimizer="mipro", budget="light", lm="sim", spec={"task": "x"})
    fields.update(overrides)
    return repo.create_run(**fields)


def test_migrations_from_empty_database_reach_head_and_match_models(db_url: str) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = get_engine(db_url)
    assert current_revision(engine) is None
    check_schema(engine)  # an empty database is new: it is created at head
    assert current_revision(engine) == head_revision()
    tables = set(inspect(engine).get_table_names())
    assert {
        "optimization_runs",
        "progress_samples",
        "run_alerts",
        "benchmark_results",
        "load_test_runs",
        "load_test_windows",
    } <= tables
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"


def test_older_schema_is_refused_until_upgraded(db_url: str) -> None:
    engine = get_engine(db_url)
    upgrade(engine, "0001")
    with pytest.raises(SchemaOutdatedError, match="dspyflow db upgrade"):
        Repository(engine)
    upgrade(engine)
    repo = Repository(engine)
    assert repo.list_runs() == []


def test_tables_without_a_version_are_refused(db_url: str) -> None:
    engine = get_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE somebody_elses (id INTEGER PRIMARY KEY)"))
    with pytest.raises(SchemaOutdatedError, match="no dspyflow schema version"):
        Repository(engine)


def test_unreachable_database_gives_one_clear_line() -> None:
    engine = get_engine("postgresql+psycopg://nobody:secret@127.0.0.1:1/none?connect_timeout=2")
    with pytest.raises(DatabaseUnavailableError) as info:
        Repository(engine)
    message = str(info.value)
    assert "cannot reach the database" in message and "127.0.0.1:1" in message
    assert "secret" not in message  # the password is redacted


def test_run_state_changes_are_compare_and_set(repo: Repository) -> None:
    run_id = _new_run(repo, priority=3)
    assert repo.get_run(run_id).state == RunState.queued
    lease = repo.start_run(run_id, flow_run_id="fr-1", worker="w")
    assert lease
    assert not repo.start_run(run_id), "a running run cannot be started twice"
    assert not repo.finish_run(run_id, RunState.failed), "only the claimant finishes it"
    assert repo.finish_run(run_id, RunState.succeeded, lease=lease, best_score=0.75, lm_calls=12)
    assert not repo.finish_run(run_id, RunState.failed, lease=lease, error="late"), "final"
    run = repo.get_run(run_id)
    assert (run.state, run.best_score, run.lm_calls, run.error) == ("succeeded", 0.75, 12, None)
    assert run.started_at is not None and run.finished_at is not None
    assert run.finished_at >= run.started_at
    with pytest.raises(ValueError, match="not a terminal state"):
        repo.finish_run(run_id, RunState.running)


def test_get_run_by_prefix_and_missing(repo: Repository) -> None:
    run_id = _new_run(repo)
    assert repo.get_run(run_id[:8]).id == run_id
    with pytest.raises(RunNotFoundError, match="no run with id"):
        repo.get_run("ffffffffffff")


def test_list_runs_filters(repo: Repository) -> None:
    a = _new_run(repo, task="intent", lm="sim")
    b = _new_run(repo, task="extraction", lm="local")
    repo.finish_run(b, RunState.failed, lease=repo.start_run(b), error="boom")
    assert {r.id for r in repo.list_runs()} == {a, b}
    assert [r.id for r in repo.list_runs(task="extraction")] == [b]
    assert [r.id for r in repo.list_runs(state="queued")] == [a]
    assert [r.id for r in repo.list_runs(lm="local", state="failed")] == [b]
    assert repo.count_runs_by_state() == {"queued": 1, "failed": 1}


def test_stale_heartbeats_are_marked_and_can_be_requeued(repo: Repository) -> None:
    alive = _new_run(repo)
    dead = _new_run(repo)
    repo.start_run(alive)
    repo.start_run(dead)
    with repo.engine.begin() as conn:  # a worker that stopped beating an hour ago
        conn.execute(
            text("UPDATE optimization_runs SET heartbeat_at = :t WHERE id = :id"),
            {"t": "2000-01-01 00:00:00", "id": dead},
        )
    assert repo.mark_stale(older_than_s=300) == [dead]
    stale = repo.get_run(dead)
    assert stale.state == "stale" and "heartbeat" in (stale.error or "")
    assert repo.get_run(alive).state == "running"
    assert repo.requeue_run(dead)
    requeued = repo.get_run(dead)
    assert (requeued.state, requeued.attempt, requeued.error) == ("queued", 2, None)


def test_progress_samples_and_alerts(repo: Repository) -> None:
    run_id = _new_run(repo)
    repo.add_progress_sample(run_id, iteration=1, total_iterations=10, elapsed_s=1.5)
    repo.add_progress_sample(run_id, iteration=2, total_iterations=10, elapsed_s=3.0)
    assert repo.add_alert(run_id, "budget_warning", "80 % of the time budget used", 5760.0)
    assert not repo.add_alert(run_id, "budget_warning", "again", 5800.0), "one alert per kind"
    run = repo.get_run(run_id, with_details=True)
    assert [s.iteration for s in run.samples] == [1, 2]
    assert [a.kind for a in run.alerts] == ["budget_warning"]
