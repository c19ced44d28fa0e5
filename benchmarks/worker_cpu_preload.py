"""Dask worker preload for benchmarks/scale_out.py: where a worker's CPU goes per task.

`dask worker --preload benchmarks/worker_cpu_preload.py`, with `DSPYFLOW_WORKER_CPU_LOG`
set to a directory. For every Prefect task the worker runs, one line is appended to
`<dir>/<pid>.log` with the CPU seconds of the task's own thread (`time.thread_time`):

    hydrate engine job

- `hydrate`: entering `prefect.context.hydrated_context` (Prefect rebuilds the
  submitter's settings, flow-run and task-run contexts from their serialized form);
- `engine`: all of `run_task_sync` (the task engine: states, events, the task itself);
- `job`: `tasks.batch.run.run_batch_job`, dspyflow's cycle, in that thread only (the DSPy
  evaluation threads and the cycle monitor run elsewhere: see the whole-process CPU).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_DIR = os.environ.get("DSPYFLOW_WORKER_CPU_LOG")
_local = threading.local()


def _add(key: str, value: float) -> None:
    setattr(_local, key, getattr(_local, key, 0.0) + value)


if _DIR:
    import prefect.task_engine as engine

    import tasks.batch.run as batch

    if not getattr(engine.run_task_sync, "cpu_log", False):
        path = Path(_DIR) / f"{os.getpid()}.log"
        run_task_sync = engine.run_task_sync
        hydrated_context = engine.hydrated_context
        run_batch_job = batch.run_batch_job

        @contextlib.contextmanager
        def timed_context(*args: Any, **kwargs: Any) -> Iterator[None]:
            started = time.thread_time()
            with hydrated_context(*args, **kwargs):
                _add("hydrate", time.thread_time() - started)
                yield

        def timed_job(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return run_batch_job(*args, **kwargs)
            finally:
                _add("job", time.thread_time() - started)

        def timed_run(*args: Any, **kwargs: Any) -> Any:
            _local.hydrate = _local.job = 0.0
            started = time.thread_time()
            try:
                return run_task_sync(*args, **kwargs)
            finally:
                total = time.thread_time() - started
                line = f"{_local.hydrate:.6f} {total:.6f} {_local.job:.6f}\n"
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, line.encode())
                finally:
                    os.close(fd)

        timed_run.cpu_log = True  # type: ignore[attr-defined]
        engine.run_task_sync = timed_run  # type: ignore[assignment]
        engine.hydrated_context = timed_context  # type: ignore[assignment]
        batch.run_batch_job = timed_job  # type: ignore[assignment]


def read(directory: Path) -> list[tuple[float, float, float]]:
    rows: list[tuple[float, float, float]] = []
    for log in directory.glob("*.log"):
        for line in log.read_text().splitlines():
            h, e, j = (float(x) for x in line.split())
            rows.append((h, e, j))
    return rows
