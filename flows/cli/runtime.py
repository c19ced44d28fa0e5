"""Process settings for CLI-started flows: quiet libraries, a patient ephemeral server."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any


def prepare_runtime(verbose: bool = False) -> None:
    """Call before importing prefect/dspy in a command."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # LiteLLM's bundled price map, not a download at import (8 s of retries offline).
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # On 2 busy cores Prefect's ephemeral server can take longer than its 20 s default.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("PREFECT_LOGGING_LOGGERS_ROOT_LEVEL", "WARNING")
        os.environ.setdefault("LITELLM_LOG", "ERROR")
    quiet_libraries(verbose)


def quiet_libraries(verbose: bool = False) -> None:
    """Library log levels. DSPy sets its logger to INFO when it is imported, so commands
    call this again once DSPy is loaded."""
    for name in ("dspy", "optuna", "httpx", "LiteLLM", "litellm"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)


def freeze_startup_heap() -> None:
    """Move what imports and the Prefect server start left alive (~350k objects) into
    the permanent generation, so the cyclic GC's full collections during the run scan only
    the run's own objects: one took 0.21-0.33 s with that heap, 0.02-0.05 s frozen
    (`benchmarks/cycle_overhead.py` reports GC time per arm). Free (no collection). Only
    for a process that runs one command: cyclic garbage among frozen objects stays."""
    import gc

    gc.freeze()


def _die_with_parent(parent_pid: int) -> None:
    """In the forked child, before exec: the kernel sends SIGTERM when the parent dies,
    even by SIGKILL or a segfault (Linux `PR_SET_PDEATHSIG`, kept across exec)."""
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[None]:
    """A temporary Prefect server for one command that cannot outlive it.

    Prefect's ephemeral server is a uvicorn child that Prefect stops at exit; a CLI killed
    by `kill -9` or a segfault never gets there and leaves it running (~230 MB each). We
    start the same server from the main thread with the parent-death signal set, so the
    kernel ends it with us. With `PREFECT_API_URL` set (a real server) or off Linux this
    does nothing and Prefect behaves as usual.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        yield
        return
    import subprocess
    import types

    import prefect.server.api.server as server_module

    parent = os.getpid()

    def in_own_group_dying_with_parent() -> None:
        # A terminal's Ctrl-C goes to its whole foreground process group; the command
        # stops gracefully on it and still needs its server, so the server is not there.
        os.setpgrp()
        _die_with_parent(parent)

    def popen(args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(args, preexec_fn=in_own_group_dying_with_parent, **kwargs)

    class _BoundServer(server_module.SubprocessASGIServer):
        _instances = {}  # not Prefect's registry: its own ephemeral server stays separate

        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            # Prefect builds the uvicorn command; only its module's Popen gains the
            # parent-death signal (a shim for that one module, not the process).
            shim = types.SimpleNamespace(**{**vars(subprocess), "Popen": popen})
            # A namespace standing in for the `subprocess` module, in that module only.
            server_module.subprocess = shim  # type: ignore[assignment]
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = subprocess

    server = _BoundServer()
    server.start()
    try:
        # Flow-run heartbeats feed crash-detection automations on a lasting server; this
        # one dies with the command, so nothing reads them, and the engine's join of the
        # heartbeat thread costs up to 1 s at the end of every flow run (our own run
        # heartbeat and dead-pid reaping cover crashes: tasks.cycle.recovery).
        updates = {PREFECT_API_URL: server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
        with temporary_settings(updates=updates):
            yield
    finally:
        server.stop()
