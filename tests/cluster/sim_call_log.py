"""Dask worker preload (`dask worker --preload tests/cluster/sim_call_log.py`): every
call the simulated LM provider receives in this process is logged as a wall-clock time,
one line each, to `$DSPYFLOW_SIM_CALL_LOG/<pid>.log`, so a test can count the calls of
all worker processes per time window (the LM rate limit across processes)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

_DIR = os.environ.get("DSPYFLOW_SIM_CALL_LOG")

if _DIR:
    from tasks.lm.sim import SimulatedEngine

    def _patch(original: Any, path: Path) -> Any:
        def logged(self: SimulatedEngine, request: Any) -> Any:
            received = time.time()
            status = "ok"
            try:
                return original(self, request)
            except Exception as exc:
                status = type(exc).__name__
                raise
            finally:
                # One write(2) per line on an O_APPEND descriptor: lines never interleave.
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{received:.6f} {status}\n".encode())
                finally:
                    os.close(fd)

        logged.call_log = True  # type: ignore[attr-defined]
        return logged

    # Dask may run a preload more than once in a process: patch once.
    if not getattr(SimulatedEngine.complete, "call_log", False):
        SimulatedEngine.complete = _patch(  # type: ignore[method-assign]
            SimulatedEngine.complete, Path(_DIR) / f"{os.getpid()}.log"
        )


def read_calls(directory: Path) -> dict[int, list[float]]:
    """pid -> sorted times at which the provider received a call, from every log."""
    calls: dict[int, list[float]] = {}
    for pid, rows in read_outcomes(directory).items():
        if rows:
            calls[pid] = sorted(t for t, _ in rows)
    return calls


def read_outcomes(directory: Path) -> dict[int, list[tuple[float, str]]]:
    """pid -> (time received, `ok` or the error the provider raised) per call."""
    out: dict[int, list[tuple[float, str]]] = {}
    for path in directory.glob("*.log"):
        rows = []
        for line in path.read_text().splitlines():
            stamp, _, status = line.partition(" ")
            rows.append((float(stamp), status or "ok"))
        out[int(path.stem)] = rows
    return out
