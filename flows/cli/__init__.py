"""The `dspyflow` command. Each module below registers its commands on the shared app.

Heavy imports (prefect, dspy, torch) happen inside the commands, so `--help` is fast.
"""

from __future__ import annotations

from flows.cli import batch as _batch  # noqa: F401
from flows.cli import benchmarks as _benchmarks  # noqa: F401
from flows.cli import db as _db  # noqa: F401
from flows.cli import gpu as _gpu  # noqa: F401
from flows.cli import loadtest as _loadtest  # noqa: F401
from flows.cli import optimize as _optimize  # noqa: F401
from flows.cli import report as _report  # noqa: F401
from flows.cli import runs as _runs  # noqa: F401
from flows.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
