"""Crash recovery: runs whose worker died are found by their stale heartbeat.

A running cycle heartbeats its row every ~10 s from a background thread (and on every
progress sample), so a heartbeat older than `stale_after_s` means the process is gone
(killed, OOM, machine lost), not that the LM is slow. Such runs become `stale`; with
`requeue` every stale run goes back to `queued` (attempt + 1) for the job queue to run
again, and a re-run GEPA cycle resumes from `$DSPYFLOW_HOME/gepa/<run_id>`.

`dspyflow runs recover` calls this; so can a batch flow at its start.
"""

from __future__ import annotations

import logging

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from storage.models import RunState
from storage.repository import Repository
from tasks.cycle_timer import HEARTBEAT_INTERVAL_S

logger = logging.getLogger("dspyflow.recovery")

DEFAULT_STALE_AFTER_S = 60.0  # six missed heartbeats


class RecoveryReport(BaseModel):
    stale_after_s: float
    marked_stale: list[str] = Field(description="Runs found running with an old heartbeat.")
    requeued: list[str] = Field(description="Stale runs put back in the queue.")


def recover_stale_runs(
    repo: Repository, *, stale_after_s: float = DEFAULT_STALE_AFTER_S, requeue: bool = False
) -> RecoveryReport:
    """Mark runs with a heartbeat older than `stale_after_s` stale; optionally re-queue all
    stale runs (these and earlier ones)."""
    if stale_after_s <= 0:
        raise ValueError(f"stale_after_s must be > 0, got {stale_after_s:g}")
    if stale_after_s < 3 * HEARTBEAT_INTERVAL_S:
        logger.warning(
            "stale_after_s=%g is under three heartbeat intervals (%g s): live runs may be "
            "marked stale",
            stale_after_s,
            HEARTBEAT_INTERVAL_S,
        )
    marked = repo.mark_stale(stale_after_s)
    requeued: list[str] = []
    if requeue:
        for run in repo.list_runs(state=RunState.stale.value, limit=None):
            if repo.requeue_run(run.id):
                requeued.append(run.id)
    if marked or requeued:
        logger.warning("recovery: %d run(s) marked stale, %d re-queued", len(marked), len(requeued))
    return RecoveryReport(stale_after_s=stale_after_s, marked_stale=marked, requeued=requeued)


@task(name="recover-stale-runs", cache_policy=NONE, persist_result=False)
def recover_stale(
    repo: Repository, stale_after_s: float = DEFAULT_STALE_AFTER_S, requeue: bool = False
) -> RecoveryReport:
    """The Prefect task a batch flow runs first."""
    return recover_stale_runs(repo, stale_after_s=stale_after_s, requeue=requeue)
