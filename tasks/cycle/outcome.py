"""Writing a finished run's outcome: once, as its claimant, through a database outage.

A cycle ends with one write: the terminal state, the program, scores and usage
(`record_success` and `record_failure` in tasks.cycle.steps). That write is a compare-and-set on
the worker's lease (`Repository.finish_run`), or, when the run was marked stale under a
live worker, `salvage_run` on the stale row. Anything else is logged loudly, never silent.

The database may be down exactly then (a PostgreSQL restart, a cut network, SQLite's
write lock held past its busy timeout). The write is retried for
`DSPYFLOW_RECORD_RETRY_S` (default 60 s); if the database is still unreachable, the
outcome is spooled to `$DSPYFLOW_HOME/outbox/<run_id>.json` (atomic replace) and
`OutcomeSpooledError` says where. Every `dspyflow` command delivers spooled outcomes
before it reads the database (`deliver_spooled_outcomes`), with the same lease checks,
so the result reaches its row with the next command, even after the worker is gone.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from storage.db import StorageError, StorageSettings, retry_while_unreachable
from storage.models import RunState
from storage.repository import Repository

logger = logging.getLogger("dspyflow.outcome")


class OutcomeSpooledError(StorageError):
    """The database stayed unreachable: the outcome waits on disk for the next command."""


class RunOutcome(BaseModel):
    """One run's end, as its worker would write it (and as the outbox keeps it)."""

    run_id: str
    lease: str
    state: RunState
    fields: dict[str, Any] = Field(description="Columns to write: error, program, scores, usage.")
    kept: str = Field(description='What the run keeps, for messages: "its best program".')
    stopped_for_lost_lease: bool = False
    finished_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


def outbox_dir() -> Path:
    return StorageSettings().home.expanduser() / "outbox"


def write_outcome(repo: Repository, outcome: RunOutcome, *, late: bool = False) -> bool:
    """One attempt: finish the run as its claimant; if it was marked stale under this live
    worker, keep the result on the stale row; if another worker holds it, log and drop.
    Database errors propagate (the caller retries or spools). A `late` (spooled) outcome
    carries its own end time; otherwise the database's clock stamps it, as it did the
    start."""
    fields = dict(outcome.fields)
    if late:
        fields["finished_at"] = outcome.finished_at
    run_id, lease = outcome.run_id, outcome.lease
    if outcome.state is not RunState.stale and repo.finish_run(
        run_id, outcome.state, lease=lease, **fields
    ):
        return True
    current = repo.get_run(run_id)
    if current.state == RunState.stale.value and current.lease == lease:
        if outcome.stopped_for_lost_lease or not fields.get("error"):
            detail = "it stopped when its heartbeat found the lease gone"
        else:
            detail = f"it ended: {fields['error']}"
        note = (
            f"{current.error or 'marked stale'}; but the worker was alive: {detail}; "
            f"{outcome.kept} kept"
        )
        fields.pop("finished_at", None)  # the row's own end (the stale mark) stays
        if repo.salvage_run(run_id, lease, **{**fields, "error": note[:2000]}):
            logger.warning("run %s was marked stale under a live worker: %s", run_id, note)
            return True
        current = repo.get_run(run_id)
    logger.error(
        "run %s: NOT recorded as %s: the run is %s and held by %s (another worker claimed "
        "it, or it was re-queued); this worker's result (%s) is dropped",
        run_id,
        outcome.state.value,
        current.state,
        current.worker or "nobody",
        outcome.kept,
    )
    return False


def record_outcome(repo: Repository, outcome: RunOutcome) -> bool:
    """`write_outcome`, retried while the database is unreachable; spooled to the outbox
    (then `OutcomeSpooledError`) if it stays so for `DSPYFLOW_RECORD_RETRY_S`."""
    try:
        return retry_while_unreachable(
            lambda: write_outcome(repo, outcome),
            within_s=StorageSettings().record_retry_s,
            what=f"recording run {outcome.run_id}",
        )
    except StorageError as exc:
        path = spool(outcome)
        logger.error("run %s: %s; its outcome is spooled to %s", outcome.run_id, exc, path)
        raise OutcomeSpooledError(
            f"run {outcome.run_id} ended {outcome.state.value} but the database stayed "
            f"unreachable ({exc}); its outcome ({outcome.kept}) is saved in {path} and the "
            "next dspyflow command writes it"
        ) from exc


def spool(outcome: RunOutcome) -> Path:
    folder = outbox_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{outcome.run_id}.json"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(outcome.model_dump_json())
    tmp.replace(path)
    return path


def deliver_spooled_outcomes(repo: Repository) -> list[str]:
    """Write every spooled outcome the database now takes; returns their run ids. A file
    is removed once written or refused for good (another worker holds the run); it stays
    while the database is still unreachable. An unreadable file is renamed `.bad`."""
    folder = outbox_dir()
    if not folder.is_dir():
        return []
    delivered: list[str] = []
    for path in sorted(folder.glob("*.json")):
        try:
            outcome = RunOutcome.model_validate(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            logger.error("outbox file %s is unreadable (%s); moved aside", path, exc)
            path.replace(path.with_suffix(".bad"))
            continue
        if not repo.run_exists(outcome.run_id):
            continue  # another results database's run: not ours to judge
        if write_outcome(repo, outcome, late=True):
            delivered.append(outcome.run_id)
            logger.warning("run %s: spooled outcome written (%s)", outcome.run_id, outcome.kept)
        path.unlink(missing_ok=True)
    return delivered
