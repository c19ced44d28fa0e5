"""`dspyflow db ...`: schema management."""

from __future__ import annotations

import typer

from flows.cli.app import app, console, user_errors

db_app = typer.Typer(help="Manage the results database schema.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(
    revision: str = typer.Option("head", help="Alembic revision to upgrade to."),
) -> None:
    """Apply Alembic migrations to DSPYFLOW_DATABASE_URL (default: the embedded SQLite)."""
    from storage.db import current_revision, get_engine, redact, upgrade

    with user_errors():
        engine = get_engine()
        before = current_revision(engine)
        after = upgrade(engine, revision)
    console.print(f"{redact(str(engine.url))}: {before or 'empty'} -> {after}")


@db_app.command("current")
def db_current() -> None:
    """Print the schema revision of the database and the one this dspyflow needs."""
    from storage.db import current_revision, get_engine, head_revision

    with user_errors():
        console.print(f"database: {current_revision(get_engine()) or 'empty'}")
    console.print(f"required: {head_revision()}")
