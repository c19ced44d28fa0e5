"""A batch across processes and machines: refuse a setup that cannot work, up front.

`dspyflow batch --task-runner dask --dask-address tcp://HOST:PORT` (and the `batch`
deployment with `task_runner=dask`) runs every cycle in a Dask worker process. Each of
those processes reports its task runs to Prefect and writes its run to the results
database itself, so three things must hold before the first row is written:

- the results database is a server (PostgreSQL), not a SQLite file on this machine;
- `PREFECT_API_URL` names a running Prefect server that this process *and every Dask
  worker* reach (without it, a command uses a temporary server in its own process: the
  workers cannot report to it, and issue 12's 200-job batch lost 94 jobs that way);
- the LM rate limit is one that crosses processes (a Prefect rate limit), never an
  in-process bucket that each worker process would get a copy of
  (`tasks.batch.run.BatchOptions` refuses that on its own).

`check_cluster_setup` checks all of it in this order, cheapest first, and raises
`ClusterSetupError` with one line: what is wrong, then the fix. It asks the workers
themselves (`Client.run`): the API and the database as they see them, and that dspyflow
imports there.

A second execution of a job is how Dask recovers a worker that died mid-task: the row is
then `running` under the dead process. `reclaim_orphaned_run` marks it stale (the reason
names the dead worker) and re-queues it, so the new execution claims it (`attempt` 2).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pydantic import BaseModel

if TYPE_CHECKING:
    from storage.repository import Repository
    from tasks.batch.models import BatchOptions

logger = logging.getLogger("dspyflow.cluster")

RUNBOOK = "docs/operations.md, 'A cluster'"
_CONNECT_TIMEOUT_S = 10.0


class ClusterSetupError(ValueError):
    """A batch setup that cannot work across processes: one line, the reason and the fix."""


class ClusterInfo(BaseModel):
    """What the Dask scheduler reported when the batch was checked."""

    address: str
    workers: int
    threads: int
    api_url: str


def is_sqlite(database_url: str) -> bool:
    from sqlalchemy.engine import make_url

    try:
        return make_url(database_url).get_backend_name() == "sqlite"
    except Exception:  # noqa: BLE001 - an unparsable URL is storage.db's to report
        return False


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api_health(api_url: str, timeout_s: float = 5.0) -> str | None:
    """None when the Prefect API answers /health, else why not (one line)."""
    import httpx

    try:
        response = httpx.get(api_url.rstrip("/") + "/health", timeout=timeout_s)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {str(exc).strip() or 'no answer'}"
    if response.status_code != 200:
        return f"HTTP {response.status_code}"
    return None


def probe_worker(api_url: str, database_url: str) -> str | None:
    """Runs in each Dask worker process: None when it can run cycles, else why not.
    Prefect's Dask runner hands the workers the submitter's settings, so the API they
    report to is this process's `PREFECT_API_URL`, whatever their own environment says."""
    problems: list[str] = []
    try:
        import tasks.batch.run  # noqa: F401 - dspyflow and its dependencies import here
    except Exception as exc:  # noqa: BLE001 - reported to the submitter
        problems.append(f"cannot import dspyflow ({type(exc).__name__}: {exc})")
    why = api_health(api_url)
    if why is not None:
        problems.append(f"cannot reach the Prefect API at {api_url} ({why})")
    try:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(database_url, poolclass=NullPool)
        try:
            with engine.connect() as conn:
                conn.execute(text("select 1"))
        finally:
            engine.dispose()
    except Exception as exc:  # noqa: BLE001 - reported to the submitter
        from storage.db import redact

        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        problems.append(f"cannot reach the results database {redact(database_url)} ({first})")
    return "; ".join(problems) or None


def check_cluster_setup(options: BatchOptions, database_url: str) -> ClusterInfo | None:
    """Refuse (`ClusterSetupError`) a batch whose cycles would run in other processes
    that cannot report to Prefect or write their results. None for the thread runner
    and for Dask without an address (a local in-process cluster: one process)."""
    if options.task_runner != "dask" or not options.dask_address:
        return None
    address = options.dask_address
    if is_sqlite(database_url):
        raise ClusterSetupError(
            f"--dask-address {address}: the results database is SQLite ({database_url}), a "
            "file Dask workers in other processes or machines cannot share; set "
            "DSPYFLOW_DATABASE_URL=postgresql+psycopg://USER@HOST:5432/dspyflow here and "
            f"on every worker ({RUNBOOK})"
        )
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    if not api_url:
        raise ClusterSetupError(
            f"--dask-address {address}: PREFECT_API_URL is unset, so this command would "
            "use a temporary Prefect server in its own process that the Dask workers "
            "cannot report to; run `prefect server start --host 0.0.0.0` and export "
            f"PREFECT_API_URL=http://HOST:4200/api here and on every worker ({RUNBOOK})"
        )
    api_host = urlsplit(api_url).hostname
    scheduler_host = urlsplit(address).hostname
    if _is_loopback(api_host) and not _is_loopback(scheduler_host):
        raise ClusterSetupError(
            f"--dask-address {address}: PREFECT_API_URL={api_url} is a loopback address "
            "that Dask workers on other machines cannot reach; start the server with "
            "`--host 0.0.0.0` and use this machine's name in PREFECT_API_URL"
        )
    why = api_health(api_url)
    if why is not None:
        raise ClusterSetupError(
            f"the Prefect API at {api_url} does not answer ({why}); start it with "
            "`prefect server start --host 0.0.0.0` or fix PREFECT_API_URL"
        )
    return _check_workers(address, api_url, database_url)


def _check_workers(address: str, api_url: str, database_url: str) -> ClusterInfo:
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - depends on the extra
        raise ClusterSetupError(
            "--task-runner dask needs the `dask` extra: pip install 'dspyflow[dask]'"
        ) from None
    try:
        client = Client(address, timeout=_CONNECT_TIMEOUT_S, set_as_default=False)
    except Exception as exc:  # noqa: BLE001 - OSError, TimeoutError, ValueError (address)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ClusterSetupError(
            f"no Dask scheduler answers at {address} ({first}); start `dask scheduler` "
            "there or fix --dask-address"
        ) from None
    try:
        nthreads = client.nthreads()
        if not nthreads:
            raise ClusterSetupError(
                f"the Dask scheduler at {address} has no workers; start `dask worker "
                f"{address}` on each machine, with dspyflow installed ({RUNBOOK})"
            )
        answers = client.run(probe_worker, api_url, database_url, on_error="return")
    finally:
        client.close()
    bad = {
        worker: answer if isinstance(answer, str) else f"{type(answer).__name__}: {answer}"
        for worker, answer in answers.items()
        if answer is not None
    }
    if bad:
        worker, problem = sorted(bad.items())[0]
        more = f" (and {len(bad) - 1} more worker(s))" if len(bad) > 1 else ""
        raise ClusterSetupError(
            f"Dask worker {worker}{more}: {problem}; start every worker with dspyflow "
            "installed and able to reach this process's PREFECT_API_URL and "
            f"DSPYFLOW_DATABASE_URL ({RUNBOOK})"
        )
    return ClusterInfo(
        address=address,
        workers=len(nthreads),
        threads=sum(nthreads.values()),
        api_url=api_url,
    )


# --- a job run again after its worker died ------------------------------------------------


def _holder_gone(repo: Repository, run_id: str, worker: str, wait_s: float) -> str | None:
    """Why the process `worker` (host:pid) that holds `run_id` is dead, or None if it
    is alive. On this host: its pid. Elsewhere: its heartbeat, given up to `wait_s` to
    go stale (three heartbeat intervals without one)."""
    from sqlalchemy import func, select

    from storage.models import RunState
    from tasks.cycle.recovery import local_worker_gone
    from tasks.cycle.timer import HEARTBEAT_INTERVAL_S

    host, _, pid_text = worker.rpartition(":")
    if host == socket.gethostname() and pid_text.isdigit():
        run = repo.get_run(run_id)
        if local_worker_gone(int(pid_text), run.started_at):
            return f"worker process {pid_text} on {host} is gone"
        return None
    stale_after = 3 * HEARTBEAT_INTERVAL_S
    deadline = time.monotonic() + wait_s
    while True:
        run = repo.get_run(run_id)
        if run.state != RunState.running.value or run.worker != worker:
            return None  # it moved on: not ours to take
        with repo.engine.connect() as conn:
            now = conn.scalar(select(func.now()))
        beat = run.heartbeat_at or run.started_at
        if now is not None and beat is not None:
            age = (_naive(now) - _naive(beat)).total_seconds()
            if age > stale_after:
                return f"worker {worker} stopped: no heartbeat for {age:.0f} s"
        if time.monotonic() >= deadline:
            return None
        time.sleep(min(HEARTBEAT_INTERVAL_S, max(0.1, deadline - time.monotonic())))


def _naive(value):
    from datetime import UTC

    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo else value


def reclaim_orphaned_run(repo: Repository, run_id: str, me: str) -> bool:
    """Before a batch job runs: if its row is `running` under another, dead process (the
    task runner re-ran the job after losing that process), mark it stale with the reason
    and re-queue it, so this execution claims it. True if it was reclaimed."""
    from storage.models import RunState
    from storage.repository import RunNotFoundError
    from tasks.cycle.timer import HEARTBEAT_INTERVAL_S

    try:
        run = repo.get_run(run_id)
    except RunNotFoundError:
        return False
    if run.state != RunState.running.value or not run.worker or run.worker == me:
        return False
    holder = run.worker
    reason = _holder_gone(repo, run_id, holder, wait_s=4 * HEARTBEAT_INTERVAL_S)
    if reason is None:
        logger.warning("run %s is running in %s, which is alive: not taken over", run_id, holder)
        return False
    reason = f"{reason}; run again by {me}"
    if not repo.mark_worker_gone(run_id, worker=holder, reason=reason):
        return False
    if not repo.requeue_run(run_id):
        return False
    # The re-queue clears the error; the alert keeps why this is attempt 2.
    repo.add_alert(run_id, "worker_lost", reason, None)
    logger.warning("run %s: %s (re-queued, attempt %d)", run_id, reason, run.attempt + 1)
    return True
