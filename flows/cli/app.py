"""The shared typer app and output helpers every command module uses."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup


class _Group(TyperGroup):
    """The root command: a database error escaping any command is one line, not a traceback
    (a locked SQLite file, a corrupt one, a full connection pool, a server that went away)."""

    # typer 0.29 vendors its own click: its Context is not `click.Context`.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            message = _database_error(exc)
            if message is None:
                raise
            fail(message)


def _database_error(exc: BaseException) -> str | None:
    if "sqlalchemy" not in sys.modules and "storage.db" not in sys.modules:
        return None  # no database was touched: keep the import-light --help path
    from storage.db import database_url, describe_error

    try:
        url: str | None = database_url()
    except Exception:  # noqa: BLE001 - the message stays useful without the URL
        url = None
    error = describe_error(exc, url)
    return None if error is None else str(error)


app = typer.Typer(
    name="dspyflow",
    cls=_Group,
    help="Run DSPy prompt optimization as Prefect flows and query the results.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


def fail(message: str, code: int = 2) -> NoReturn:
    """One clear line on stderr and a non-zero exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def user_errors(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn expected errors (bad input, unreachable database, ...) into `fail`."""
    from pydantic import ValidationError

    from storage.db import StorageError

    expected: tuple[type[BaseException], ...] = (StorageError, LookupError, ValueError, *kinds)

    try:
        yield
    except ValidationError as exc:
        fail("; ".join(_format_validation_error(e) for e in exc.errors()))
    except expected as exc:
        fail(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    except Exception as exc:
        message = _database_error(exc)
        if message is None:
            raise
        fail(message)


def _format_validation_error(err: Any) -> str:
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid")
    return f"{loc}: {msg}" if loc else msg


def emit_rows(
    rows: Sequence[dict[str, Any]],
    fmt: OutputFormat,
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
    formatters: dict[str, Callable[[Any], str]] | None = None,
) -> None:
    """Print rows as a rich table, a JSON array or CSV (machines get full precision)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(list(rows), default=str, indent=2) + "\n")
        return
    if fmt is OutputFormat.csv:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row.get(k) is None else row.get(k) for k in columns})
        sys.stdout.write(buf.getvalue())
        return
    formatters = formatters or {}
    table = Table(title=escape(title) if title else None)
    for col in columns:
        table.add_column(col, no_wrap=col == "id")
    for row in rows:
        table.add_row(*(_cell(row.get(c), formatters.get(c)) for c in columns))
    # Piped output has no terminal width: don't squeeze tables into 80 columns.
    out = Console() if sys.stdout.isatty() else Console(width=200)
    out.print(table)


def _cell(value: Any, formatter: Callable[[Any], str] | None) -> Text:
    # Text, not str: a cell is data (an instruction, an error), never rich markup.
    if value is None:
        return Text("-")
    if formatter is not None:
        return Text(formatter(value))
    if isinstance(value, float):
        return Text(f"{value:.4g}")
    return Text(str(value))


def open_repository():
    """The results repository, after writing outcomes spooled during a database outage
    and marking runs of dead processes on this host `stale` (a crashed `dspyflow` left
    them `running`): the next command tells the truth. Spooled outcomes go first, so a
    run whose worker ended during the outage gets its real end, not `stale`."""
    from storage.repository import Repository
    from tasks.cycle.outcome import deliver_spooled_outcomes
    from tasks.cycle.recovery import reap_dead_local_workers

    repo = Repository()
    try:
        deliver_spooled_outcomes(repo)
        reap_dead_local_workers(repo)
    except Exception as exc:  # noqa: BLE001 - a read-only or busy database still answers
        err_console.print(f"[yellow]warning:[/] could not check for dead runs: {escape(str(exc))}")
    return repo
