"""Crash recovery: runs whose worker died become `stale`, with the reason.

Two ways to know a worker is gone:
- on this host, at once: every claim records `worker = host:pid` (a batch process puts its
  own name on the queued rows it owns), so a run held by a pid that no longer exists (or
  exists as a zombie, or as a younger process that reused the number) is dead for sure.
  `reap_dead_local_workers` checks that; CLI commands call it first, so the next command
  after a segfault or `kill -9` reports the dead run instead of leaving it `running`.
- anywhere, after `stale_after_s`: a running cycle heartbeats its row every ~10 s from a
  background thread (and on every progress sample), and a live batch process refreshes
  its queued rows as often, so an older heartbeat means the process is gone (killed, OOM,
  machine lost), not that the LM is slow.

A run marked stale under a worker that is in fact alive (a stale_after_s too short) is not
lost: its next heartbeat finds its lease gone, it stops spending LM calls and keeps its
best program on the stale row (tasks.cycle.steps.record_success).

With `requeue` every stale run goes back to `queued` (attempt + 1) for a job queue to run
again; `resume_runs` (`dspyflow runs recover --resume`) runs them here. A re-run GEPA
cycle resumes from `$DSPYFLOW_HOME/gepa/<run_id>`, a genetic one from its last generation's
checkpoint in `$DSPYFLOW_HOME/genetic/<run_id>`, a MIPROv2 one by replaying the LM answers
journaled in `$DSPYFLOW_HOME/mipro/<run_id>` (tasks.lm.journal; local and sim LMs).

`dspyflow runs recover` calls `recover_stale_runs`; so does a batch flow at its start. Both
first write outcomes spooled while the database was down (tasks.cycle.outcome).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime

from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, Field

from storage.models import RunState
from storage.repository import Repository
from tasks.cycle.outcome import deliver_spooled_outcomes
from tasks.cycle.timer import HEARTBEAT_INTERVAL_S

logger = logging.getLogger("dspyflow.recovery")

DEFAULT_STALE_AFTER_S = 60.0  # six missed heartbeats
# A process that started this long after the run was claimed cannot be its worker: the
# pid was reused. Generous, since the claim time is the database's clock.
_PID_REUSE_SLACK_S = 120.0


class RecoveryReport(BaseModel):
    stale_after_s: float
    marked_stale: list[str] = Field(description="Runs whose worker is gone, now stale.")
    requeued: list[str] = Field(description="Stale runs put back in the queue.")
    reasons: dict[str, str] = Field(default_factory=dict, description="Why each went stale.")


def local_worker_gone(pid: int, claimed_at: datetime | None = None) -> bool:
    """Whether the process `pid` of this host is not (any more) the one that claimed a run
    at `claimed_at`: it does not exist, is a zombie, or started after the claim."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        created = proc.create_time()
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # no permission to look: it exists, so assume it is the worker
        return False
    if claimed_at is None:
        return False
    claimed = claimed_at if claimed_at.tzinfo else claimed_at.replace(tzinfo=UTC)
    return created > claimed.timestamp() + _PID_REUSE_SLACK_S


def reap_dead_local_workers(repo: Repository) -> list[str]:
    """Mark `stale` every queued or running run held by a process of this host that is
    gone ("worker process N on HOST is gone"). Cheap (one indexed query, a /proc look-up
    per run held here): CLI commands call it before they start."""
    host = socket.gethostname()
    reaped: list[str] = []
    for run_id, state, worker, claimed_at in repo.claims_on_host(host):
        pid_text = worker.rpartition(":")[2]
        if not pid_text.isdigit() or int(pid_text) == os.getpid():
            continue
        pid = int(pid_text)
        if not local_worker_gone(pid, claimed_at):
            continue
        role = "worker process" if state == RunState.running.value else "batch process"
        reason = f"{role} {pid} on {host} is gone"
        if state == RunState.queued.value:
            reason += "; the run never started"
        if repo.mark_worker_gone(run_id, worker=worker, reason=reason):
            logger.warning("run %s: %s: marked stale", run_id, reason)
            reaped.append(run_id)
    return reaped


def recover_stale_runs(
    repo: Repository, *, stale_after_s: float = DEFAULT_STALE_AFTER_S, requeue: bool = False
) -> RecoveryReport:
    """Mark stale the runs of dead local workers at once and every run with a heartbeat
    older than `stale_after_s` (queued runs nothing claimed included); optionally re-queue
    all stale runs (these and earlier ones)."""
    if stale_after_s <= 0:
        raise ValueError(f"stale_after_s must be > 0, got {stale_after_s:g}")
    if stale_after_s < 3 * HEARTBEAT_INTERVAL_S:
        logger.warning(
            "stale_after_s=%g is under three heartbeat intervals (%g s): live runs may be "
            "marked stale (they then stop and keep their best program on the stale row)",
            stale_after_s,
            HEARTBEAT_INTERVAL_S,
        )
    deliver_spooled_outcomes(repo)  # before the reaping: a spooled run has ended for real
    reasons: dict[str, str] = {}
    for run_id in reap_dead_local_workers(repo):
        reasons[run_id] = repo.get_run(run_id).error or "worker gone"
    reasons.update(repo.mark_stale_reasons(stale_after_s))
    requeued: list[str] = []
    if requeue:
        for run in repo.list_runs(state=RunState.stale.value, limit=None):
            if repo.requeue_run(run.id):
                requeued.append(run.id)
    if reasons or requeued:
        logger.warning(
            "recovery: %d run(s) marked stale, %d re-queued", len(reasons), len(requeued)
        )
    return RecoveryReport(
        stale_after_s=stale_after_s,
        marked_stale=list(reasons),
        requeued=requeued,
        reasons=reasons,
    )


def resume_runs(repo: Repository, run_ids: list[str]) -> dict[str, str]:
    """Run re-queued runs again in this process, one after another, each under its own id
    and spec: GEPA and the genetic optimizer continue from their saved state, MIPROv2
    replays its journaled LM answers; earlier attempts' LM usage and baseline carry over
    (tasks.cycle.steps.prepare_cycle). Returns each run's terminal state."""
    from tasks.cycle.spec import CycleSpec
    from tasks.cycle.steps import record_failure, run_cycle

    states: dict[str, str] = {}
    for run_id in run_ids:
        run = repo.get_run(run_id)
        if run.state != RunState.queued.value:
            continue  # claimed by someone else since: theirs to finish
        try:
            spec = CycleSpec.model_validate(run.spec)
        except ValueError as exc:  # a spec this version no longer accepts
            record_failure(repo, run_id, exc, None)
            states[run_id] = repo.get_run(run_id).state
            continue
        logger.warning("resuming run %s (attempt %d)", run_id, run.attempt)
        states[run_id] = run_cycle(spec, repo, run_id=run_id).state
    return states


@task(name="recover-stale-runs", cache_policy=NONE, persist_result=False)
def recover_stale(
    repo: Repository, stale_after_s: float = DEFAULT_STALE_AFTER_S, requeue: bool = False
) -> RecoveryReport:
    """The Prefect task a batch flow runs first."""
    return recover_stale_runs(repo, stale_after_s=stale_after_s, requeue=requeue)
