"""A thousand concurrent optimizations on Prefect, against the same job on a bare executor.

    python benchmarks/concurrency.py                        # 1000 jobs, SQLite and Postgres
    python benchmarks/concurrency.py --jobs 200 --databases sqlite

Workload (a capacity workload, simulated LM): `capacity` cycles making 10 LM calls each,
20 ms median latency (log-normal), 5 % transient 429/503 errors retried by the engine.
For each results database it runs, in one process:

1. a warm-up batch of each arm (imports, Prefect's server, first connections: discarded);
2. `--rounds` rounds, each running the same jobs both ways in alternating order (bare,
   Prefect; Prefect, bare; ...):
   - bare: `tasks.batch.run.run_batch_job`, the exact function the Prefect task wraps, on a
     `ThreadPoolExecutor(workers)` over rows pre-created as the batch does;
   - Prefect: the `optimization-batch` flow over the same jobs (new rows, same seeds).

Reports, as median with min-max and n over the rounds: success rate, jobs/s, wall time
against the bare executor of the same round, 'database is locked'
errors (logged or recorded on a run), RSS growth over the Prefect batch, and CPU per job
of this process and of Prefect's server. The LAST line is one JSON object with the
figures. Prefect's server is a temporary one (SQLite under a temp PREFECT_HOME, or
PostgreSQL with `--prefect-db postgres`), kept apart from dspyflow's results database.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
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
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="dspyflow-bench-prefect-"))
os.environ.setdefault("DSPYFLOW_HOME", tempfile.mkdtemp(prefix="dspyflow-bench-home-"))

POSTGRES_ADMIN = os.environ.get(
    "DSPYFLOW_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
TARGETS = {
    "success_rate_min": 0.999,
    "jobs_per_s_min": 100.0,
    "wall_vs_bare_max": 1.5,
    "db_locked_errors_max": 0,
    "rss_growth_mb_max": 200.0,
}


class LockedCounter(logging.Handler):
    """Counts log records that mention SQLite's 'database is locked'."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += str(record.exc_info[1])
        if "database is locked" in text:
            self.count += 1


def rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def cpu_s() -> tuple[float, float]:
    """(this process, its children: Prefect's server) CPU seconds."""
    import psutil

    me = psutil.Process()
    own = me.cpu_times()
    children = 0.0
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            t = child.cpu_times()
            children += t.user + t.system
    return own.user + own.system, children


@contextlib.contextmanager
def results_database(kind: str) -> Iterator[str]:
    """A fresh, empty dspyflow database: a SQLite file or a PostgreSQL database."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory(prefix="dspyflow-bench-") as tmp:
            yield f"sqlite:///{tmp}/dspyflow.db"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    from storage.db import dispose_engines

    name = f"dspyflow_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN).set(database=name).render_as_string(hide_password=False)
    finally:
        dispose_engines()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def prefect_server(kind: str) -> Iterator[None]:
    """A temporary Prefect server: the test harness (SQLite), or ephemeral on PostgreSQL."""
    if kind == "sqlite":
        from prefect.testing.utilities import prefect_test_harness

        with prefect_test_harness(server_startup_timeout=180):
            yield
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"prefect_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN).set(drivername="postgresql+asyncpg", database=name)
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import (
        PREFECT_API_DATABASE_CONNECTION_URL,
        PREFECT_API_URL,
        temporary_settings,
    )

    os.environ["PREFECT_API_DATABASE_CONNECTION_URL"] = url.render_as_string(False)
    server = SubprocessASGIServer()
    try:
        with temporary_settings({PREFECT_API_DATABASE_CONNECTION_URL: url.render_as_string(False)}):
            server.start(timeout=180)
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield
    finally:
        server.stop()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def make_jobs(args: argparse.Namespace, count: int, seed: int = 0) -> list[Any]:
    from tasks.batch.jobs import capacity_jobs

    return capacity_jobs(
        count,
        lm_calls=args.lm_calls,
        sim_latency_ms=args.latency_ms,
        sim_error_rate=args.error_rate,
        seed=seed,
    )


def run_bare(specs: list[Any], url: str, workers: int) -> dict[str, Any]:
    """The same job function on a plain thread pool: no Prefect at all."""
    from storage.repository import new_id
    from tasks.batch.run import _row, repository_for, run_batch_job

    repo = repository_for(url)
    batch_id = new_id()
    run_ids = [new_id() for _ in specs]
    repo.create_runs(_row(s, rid, batch_id) for s, rid in zip(specs, run_ids, strict=True))
    cpu0 = cpu_s()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        states = list(pool.map(lambda s, rid: run_batch_job(s, rid, url), specs, run_ids))
    wall = time.perf_counter() - started
    cpu1 = cpu_s()
    counts = Counter(states)
    return {
        "wall_s": wall,
        "cpu_ms_per_job": (cpu1[0] - cpu0[0]) / len(specs) * 1000,
        "jobs_per_s": len(specs) / wall,
        "success_rate": counts.get("succeeded", 0) / len(specs),
        "states": dict(counts),
    }


def run_prefect(specs: list[Any], url: str, workers: int) -> dict[str, Any]:
    from flows.optimization import run_optimization_batch
    from tasks.batch.models import BatchOptions

    os.environ["DSPYFLOW_DATABASE_URL"] = url
    rss0 = rss_mb()
    cpu0 = cpu_s()
    started = time.perf_counter()
    summary = run_optimization_batch(specs, BatchOptions(workers=workers))
    flow_wall = time.perf_counter() - started
    cpu1 = cpu_s()
    rss1 = rss_mb()
    return {
        "summary": summary,
        "flow_wall_s": flow_wall,
        "rss_growth_mb": rss1 - rss0,
        "rss_mb": rss1,
        "cpu_ms_per_job": (cpu1[0] - cpu0[0]) / len(specs) * 1000,
        "server_cpu_ms_per_job": (cpu1[1] - cpu0[1]) / len(specs) * 1000,
    }


def locked_in_runs(url: str) -> int:
    from storage.repository import Repository
    from tasks.batch.run import repository_for

    repo: Repository = repository_for(url)
    return sum(1 for r in repo.list_runs(limit=None) if "locked" in (r.error or ""))


def bench_database(kind: str, args: argparse.Namespace, locked: LockedCounter) -> dict[str, Any]:
    """Warm-up of both arms (small batches, discarded), then `args.rounds` rounds of the
    same jobs on the bare executor and through Prefect, in alternating order."""
    from benchmarks._ab import paired_ratios, round_order, spread

    with results_database(kind) as url:
        os.environ["DSPYFLOW_DATABASE_URL"] = url
        locked_before = locked.count
        warm = make_jobs(args, args.warmup, seed=10**6)
        run_prefect(warm, url, args.workers)
        run_bare(make_jobs(args, args.warmup, seed=2 * 10**6), url, args.workers)
        bare_runs: list[dict[str, Any]] = []
        flow_runs: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            specs = make_jobs(args, args.jobs, seed=round_no * 10**5)
            for arm in round_order(["bare", "prefect"], round_no):
                if arm == "bare":
                    bare_runs.append(run_bare(specs, url, args.workers))
                else:
                    flow_runs.append(run_prefect(specs, url, args.workers))
                print(
                    f"  {kind} round {round_no} {arm:>7}: "
                    + (
                        f"{bare_runs[-1]['jobs_per_s']:.1f} jobs/s"
                        if arm == "bare"
                        else f"{flow_runs[-1]['summary'].jobs_per_s:.1f} jobs/s"
                    ),
                    flush=True,
                )
        summaries = [m["summary"] for m in flow_runs]
        walls = [sm.wall_s for sm in summaries]
        bare_walls = [b["wall_s"] for b in bare_runs]
        mid = sorted(range(len(summaries)), key=lambda i: walls[i])[len(summaries) // 2]
        s = summaries[mid]  # the median Prefect run's latency figures
        jobs_total = sum(sm.jobs for sm in summaries)
        result = {
            "jobs": s.jobs,
            "rounds": args.rounds,
            "success_rate": sum(sm.succeeded for sm in summaries) / jobs_total,
            "states": s.states,
            "jobs_per_s": spread([sm.jobs_per_s for sm in summaries], 2),
            "wall_s": spread(walls, 2),
            "flow_wall_s": spread([m["flow_wall_s"] for m in flow_runs], 2),
            "bare_wall_s": spread(bare_walls, 2),
            "bare_jobs_per_s": spread([b["jobs_per_s"] for b in bare_runs], 2),
            "bare_success_rate": sum(b["success_rate"] for b in bare_runs) / len(bare_runs),
            "bare_cpu_ms_per_job": spread([b["cpu_ms_per_job"] for b in bare_runs], 1),
            "wall_vs_bare": spread(paired_ratios(bare_walls, walls), 3),
            "queue_wait_p50_s": s.queue_wait_p50_s,
            "queue_wait_p95_s": s.queue_wait_p95_s,
            "run_p50_s": s.run_p50_s,
            "run_p95_s": s.run_p95_s,
            "lm_calls": s.lm_calls,
            "db_locked_errors": locked.count - locked_before + locked_in_runs(url),
            "rss_growth_mb": spread([m["rss_growth_mb"] for m in flow_runs], 1),
            "rss_mb": flow_runs[-1]["rss_mb"],
            "cpu_ms_per_job": spread([m["cpu_ms_per_job"] for m in flow_runs], 1),
            "prefect_server_cpu_ms_per_job": spread(
                [m["server_cpu_ms_per_job"] for m in flow_runs], 1
            ),
        }
        from tasks.batch import run as batch

        with batch._repos_lock:
            batch._repos.clear()
        return result


def verdict(result: dict[str, Any]) -> dict[str, bool]:
    """Judged on the medians."""
    return {
        "success_rate": result["success_rate"] >= TARGETS["success_rate_min"],
        "jobs_per_s": result["jobs_per_s"]["median"] >= TARGETS["jobs_per_s_min"],
        "wall_vs_bare": result["wall_vs_bare"]["median"] <= TARGETS["wall_vs_bare_max"],
        "db_locked_errors": result["db_locked_errors"] <= TARGETS["db_locked_errors_max"],
        "rss_growth_mb": result["rss_growth_mb"]["max"] < TARGETS["rss_growth_mb_max"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--lm-calls", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--error-rate", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=20, help="jobs per warm-up batch")
    parser.add_argument(
        "--rounds", type=int, default=2, help="measured rounds of (bare, Prefect), alternating"
    )
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--prefect-db", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args()
    from benchmarks._ab import fmt

    for name in ("dspy", "optuna", "httpx", "LiteLLM", "litellm"):
        logging.getLogger(name).setLevel(logging.WARNING)
    locked = LockedCounter()
    logging.getLogger().addHandler(locked)
    logging.getLogger("sqlalchemy").addHandler(locked)

    results: dict[str, Any] = {}
    with prefect_server(args.prefect_db):
        for kind in [k.strip() for k in args.databases.split(",") if k.strip()]:
            result = bench_database(kind, args, locked)
            results[kind] = {**result, "passed": verdict(result)}
            r = results[kind]
            print(
                f"{kind:8s} {r['jobs']} jobs x {r['rounds']} rounds: success "
                f"{r['success_rate']:.2%}, jobs/s {fmt(r['jobs_per_s'], '', 1)} (bare "
                f"{fmt(r['bare_jobs_per_s'], '', 1)}), wall vs bare "
                f"{fmt(r['wall_vs_bare'], 'x', 2)}, locked errors {r['db_locked_errors']}, "
                f"RSS growth max +{r['rss_growth_mb']['max']:.0f} MB, CPU "
                f"{r['cpu_ms_per_job']['median']:.0f} ms/job (bare "
                f"{r['bare_cpu_ms_per_job']['median']:.0f}) + Prefect server "
                f"{r['prefect_server_cpu_ms_per_job']['median']:.0f} ms/job",
                flush=True,
            )
    print(
        json.dumps(
            {
                "benchmark": "concurrency",
                "workload": "capacity cycles on the simulated LM (sim)",
                "jobs": args.jobs,
                "lm_calls_per_job": args.lm_calls,
                "latency_ms": args.latency_ms,
                "transient_error_rate": args.error_rate,
                "workers": args.workers,
                "prefect_server_db": args.prefect_db,
                "cpus": os.cpu_count(),
                "load_avg_1m": os.getloadavg()[0],
                "targets": TARGETS,
                "results": results,
            },
            default=str,
        )
    )


if __name__ == "__main__":
    main()
