"""Scale-out: one batch's jobs/s on 1, 2 and 4 Dask worker processes against the
single-process thread runner, in one run, on one machine, with real processes.

    python benchmarks/scale_out.py                     # 200 jobs per configuration
    python benchmarks/scale_out.py --jobs 100 --long 1000

Started here, as an operator would (tasks.batch.local_cluster): `prefect server start` on its
own fresh PostgreSQL database, a `dask scheduler`, `dask worker` processes; the results
go to a fresh PostgreSQL database. This process submits every batch (the
`optimization-batch` flow, `PREFECT_API_URL` set to that server). Configurations, in
order, each on the same job list (a capacity workload, simulated LM: `capacity` cycles
of 10 LM calls, 20 ms median latency, 5 % transient 429/503 errors retried):

- `bare`: `tasks.batch.run.run_batch_job` on a thread pool in this process, no Prefect: the
  CPU of dspyflow's own code per job (DSPy, the sim LM, the results database);
- `threads`: the flow with the thread runner (`--slots` threads) in this process;
- `dask-1`, `dask-2`, `dask-4`: the flow with the Dask runner, `--slots` task slots
  split over 1, 2, 4 worker processes.

CPU per job, from the processes' own counters (psutil, user + system, children
included): `ours` is the bare run's; `prefect_client` is what this process and the
worker processes spent beyond it (flow and task engines, their API calls, Dask's
client and worker machinery); `prefect_server` is the server's process tree (its API,
the task-run recorder, the services), counted until it is idle again after the batch
(it records task runs seconds behind); `dask_scheduler` the scheduler's; `postgres`
every PostgreSQL process on the machine (Prefect's and the results database). Each Dask
configuration first runs a warm-up batch (imports in new worker processes) that is not
measured. `--long N` ends with one N-job batch on `dask-2` (lost jobs counted).

The LAST line printed is one JSON object with every figure (labelled `simulated`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
for _var in ("PREFECT_API_URL", "DSPYFLOW_DATABASE_URL"):
    os.environ.pop(_var, None)  # this benchmark starts its own server and database
_TMP = Path(tempfile.mkdtemp(prefix="dspyflow-scale-out-"))
os.environ["PREFECT_HOME"] = str(_TMP / "prefect-home")
os.environ.setdefault("DSPYFLOW_HOME", str(_TMP / "dspyflow-home"))

POSTGRES_ADMIN = os.environ.get(
    "DSPYFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TERMINAL = {"succeeded", "failed", "timed_out", "budget_exhausted", "cancelled", "stale"}


@contextlib.contextmanager
def fresh_database(prefix: str, driver: str) -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = make_url(POSTGRES_ADMIN).set(drivername=driver, database=name)
        yield url.render_as_string(hide_password=False)
    finally:
        from storage.db import dispose_engines

        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def own_cpu() -> float:
    import psutil

    t = psutil.Process().cpu_times()
    return t.user + t.system


class Meter:
    """CPU seconds of this process, the workers, the server and the scheduler."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster

    def read(self) -> dict[str, float]:
        from tasks.batch.local_cluster import CpuSeconds

        return {
            "self": own_cpu(),
            "workers": CpuSeconds.of(self.cluster.pids("dask-worker")).total,
            "server": CpuSeconds.of(self.cluster.pids("prefect-server")).total,
            "scheduler": CpuSeconds.of(self.cluster.pids("dask-scheduler")).total,
            "postgres": postgres_cpu(),
        }

    def settle(self, quiet_cpu_s: float = 0.1, max_wait_s: float = 90.0) -> float:
        """Wait until Prefect's server is idle: it records task runs from an event queue
        and lags the batch by seconds; that CPU belongs to the batch just run, not to the
        next one. Returns the seconds waited."""
        from tasks.batch.local_cluster import CpuSeconds

        started = time.monotonic()
        last = CpuSeconds.of(self.cluster.pids("prefect-server")).total
        while time.monotonic() - started < max_wait_s:
            time.sleep(1.0)
            now = CpuSeconds.of(self.cluster.pids("prefect-server")).total
            if now - last < quiet_cpu_s:
                break
            last = now
        return time.monotonic() - started


def postgres_cpu() -> float:
    """CPU seconds of every PostgreSQL process on this machine (both databases; other
    sessions' too, if any run)."""
    import psutil

    total = 0.0
    for proc in psutil.process_iter(["name"]):
        if (proc.info.get("name") or "").startswith("postgres"):
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
    return total


class ConnectionPeak:
    """The most connections to the results database at once (pg_stat_activity, sampled
    every 0.2 s while a batch runs), all processes together."""

    def __init__(self, url: str) -> None:
        import threading

        from sqlalchemy import create_engine
        from sqlalchemy.engine import make_url
        from sqlalchemy.pool import NullPool

        self.db = make_url(url).database
        self.engine = create_engine(POSTGRES_ADMIN, poolclass=NullPool)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            while not self._stop.wait(0.2):
                n = conn.execute(
                    text("select count(*) from pg_stat_activity where datname = :d"),
                    {"d": self.db},
                ).scalar_one()
                self.peak = max(self.peak, int(n))

    def __enter__(self) -> ConnectionPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.dispose()


def make_jobs(args: argparse.Namespace, count: int, seed: int) -> list[Any]:
    from tasks.batch.jobs import capacity_jobs

    return capacity_jobs(
        count,
        lm_calls=args.lm_calls,
        sim_latency_ms=args.latency_ms,
        sim_error_rate=args.error_rate,
        seed=seed,
    )


def run_bare(specs: list[Any], url: str, slots: int, meter: Meter) -> dict[str, Any]:
    from storage.repository import new_id
    from tasks.batch.run import _row, repository_for, run_batch_job

    repo = repository_for(url)
    batch_id = new_id()
    run_ids = [new_id() for _ in specs]
    repo.create_runs(_row(s, rid, batch_id) for s, rid in zip(specs, run_ids, strict=True))
    meter.settle()
    before = meter.read()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=slots) as pool:
        states = list(pool.map(lambda s, rid: run_batch_job(s, rid, url), specs, run_ids))
    wall = time.perf_counter() - started
    after = meter.read()
    counts = Counter(states)
    return {
        "jobs": len(specs),
        "jobs_per_s": round(len(specs) / wall, 2),
        "wall_s": round(wall, 2),
        "succeeded": counts.get("succeeded", 0),
        "cpu_ms_per_job": round((after["self"] - before["self"]) / len(specs) * 1000, 1),
        "postgres_cpu_ms_per_job": round(
            (after["postgres"] - before["postgres"]) / len(specs) * 1000, 1
        ),
    }


def run_flow(
    specs: list[Any], url: str, slots: int, meter: Meter, bare_ms: float, **options: Any
) -> dict[str, Any]:
    from flows.optimization import run_optimization_batch
    from storage.db import get_engine
    from storage.repository import Repository
    from tasks.batch.models import BatchOptions

    meter.settle()
    before = meter.read()
    started = time.perf_counter()
    with ConnectionPeak(url) as connections:
        summary = run_optimization_batch(specs, BatchOptions(workers=slots, **options))
    wall = time.perf_counter() - started
    server_lag = meter.settle()  # the server's recording of these task runs included
    after = meter.read()
    rows = Repository(get_engine(url)).list_runs(batch_id=summary.batch_id, limit=None)
    n = len(specs)

    def per_job(key: str) -> float:
        return (after[key] - before[key]) / n * 1000

    client_side = per_job("self") + per_job("workers")
    return {
        "jobs": n,
        "jobs_per_s": round(n / wall, 2),
        "wall_s": round(wall, 2),
        "succeeded": summary.succeeded,
        "lost": sum(1 for r in rows if r.state not in TERMINAL) + (n - len(rows)),
        "attempt_2": sum(1 for r in rows if r.attempt > 1),
        "server_busy_after_batch_s": round(server_lag, 1),
        "max_in_flight": summary.max_in_flight,
        "peak_results_db_connections": connections.peak,
        "cpu_ms_per_job": {
            "ours": round(bare_ms, 1),
            "prefect_client": round(client_side - bare_ms, 1),
            "prefect_server": round(per_job("server"), 1),
            "dask_scheduler": round(per_job("scheduler"), 1),
            "postgres": round(per_job("postgres"), 1),
            "submitting_process": round(per_job("self"), 1),
            "worker_processes": round(per_job("workers"), 1),
            "total": round(client_side + per_job("server") + per_job("scheduler"), 1),
        },
    }


PRELOAD = str(Path(__file__).with_name("worker_cpu_preload.py"))


def task_thread_split(directory: Path) -> dict[str, float]:
    """Mean CPU ms per task in the worker thread that ran it (worker_cpu_preload.py)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from worker_cpu_preload import read

    rows = read(directory)
    if not rows:
        return {}
    n = len(rows)
    hydrate = sum(r[0] for r in rows) / n * 1000
    engine = sum(r[1] for r in rows) / n * 1000
    job = sum(r[2] for r in rows) / n * 1000
    return {
        "tasks": n,
        "prefect_hydrate_context": round(hydrate, 1),
        "prefect_engine_other": round(engine - hydrate - job, 1),
        "run_batch_job": round(job, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per configuration")
    parser.add_argument("--processes", default="1,2,4", help="Dask worker processes to try")
    parser.add_argument("--slots", type=int, default=32, help="cycles in flight, in all")
    parser.add_argument("--lm-calls", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--error-rate", type=float, default=0.05)
    parser.add_argument("--long", type=int, default=0, help="then one N-job batch on dask-2")
    args = parser.parse_args()

    from flows.cli.runtime import prepare_runtime, quiet_libraries
    from tasks.batch.local_cluster import LocalCluster

    prepare_runtime()
    processes = [int(p) for p in args.processes.split(",") if p.strip()]
    result: dict[str, Any] = {
        "benchmark": "scale_out",
        "simulated": True,
        "cores": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "jobs": args.jobs,
        "slots": args.slots,
        "lm_calls": args.lm_calls,
        "latency_ms": args.latency_ms,
        "error_rate": args.error_rate,
        "configs": {},
    }
    with (
        fresh_database("prefect_scale", "postgresql+asyncpg") as prefect_db,
        fresh_database("dspyflow_scale", "postgresql+psycopg") as url,
        LocalCluster(_TMP, dict(os.environ)) as cluster,
    ):
        os.environ["DSPYFLOW_DATABASE_URL"] = url
        cluster.env["DSPYFLOW_DATABASE_URL"] = url
        api = cluster.start_prefect_server(prefect_db)
        os.environ["PREFECT_API_URL"] = api
        address = cluster.start_scheduler()
        meter = Meter(cluster)
        configs = result["configs"]

        import flows.optimization  # noqa: F401 - DSPy sets its loggers to INFO on import

        quiet_libraries()
        # Warm-up in this process (imports, first connections, the flow's first run).
        run_flow(make_jobs(args, 20, seed=10**6), url, args.slots, meter, 0.0)
        quiet_libraries()
        specs = make_jobs(args, args.jobs, seed=0)
        configs["bare"] = run_bare(specs, url, args.slots, meter)
        bare_ms = configs["bare"]["cpu_ms_per_job"]
        print(f"bare: {configs['bare']}", flush=True)
        configs["threads"] = run_flow(specs, url, args.slots, meter, bare_ms)
        print(f"threads: {configs['threads']}", flush=True)
        for n in processes:
            cpu_log = _TMP / f"worker-cpu-{n}"
            cpu_log.mkdir()
            cluster.env["DSPYFLOW_WORKER_CPU_LOG"] = str(cpu_log)
            cluster.stop_dask_workers()
            cluster.start_dask_workers(n, nthreads=max(1, args.slots // n), preload=PRELOAD)
            dask = {"task_runner": "dask", "dask_address": address}
            run_flow(make_jobs(args, 2 * args.slots, seed=2 * 10**6), url, args.slots, meter,
                     0.0, **dask)  # fmt: skip
            for warm in cpu_log.glob("*.log"):
                warm.unlink()
            configs[f"dask-{n}"] = run_flow(specs, url, args.slots, meter, bare_ms, **dask)
            configs[f"dask-{n}"]["worker_task_thread_ms_per_job"] = task_thread_split(cpu_log)
            print(f"dask-{n}: {configs[f'dask-{n}']}", flush=True)
        if args.long:
            cluster.stop_dask_workers()
            cluster.start_dask_workers(2, nthreads=max(1, args.slots // 2))
            long_specs = make_jobs(args, args.long, seed=3 * 10**6)
            result["long"] = {
                "config": "dask-2",
                **run_flow(
                    long_specs,
                    url,
                    args.slots,
                    meter,
                    bare_ms,
                    task_runner="dask",
                    dask_address=address,
                ),  # fmt: skip
            }
            print(f"long: {result['long']}", flush=True)
    result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    threads = result["configs"]["threads"]["jobs_per_s"]
    result["speedup_vs_threads"] = {
        k: round(v["jobs_per_s"] / threads, 2)
        for k, v in result["configs"].items()
        if k.startswith("dask")
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
