"""No Prefect server outlives the `dspyflow` command that started it.

Without `PREFECT_API_URL`, each command runs a temporary Prefect server (a uvicorn child
of ~230 MB). Prefect stops it at exit, which a process killed by `kill -9` or a segfault
never reaches: before the fix every such crash left one running with no parent. The
test kills a real `dspyflow optimize` with SIGKILL while its server is up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal"),
]


def _prefect_servers(root: psutil.Process) -> list[psutil.Process]:
    found = []
    for child in root.children(recursive=True):
        try:
            if "prefect.server.api.server:create_app" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSEGV])
def test_killed_cli_leaves_no_prefect_server(tmp_path: Path, sig: signal.Signals) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")},
        "DSPYFLOW_HOME": str(tmp_path / "home"),
        "DSPYFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'results.db'}",
        "PREFECT_HOME": str(tmp_path / "prefect"),
    }
    cli = subprocess.Popen(
        [str(Path(sys.executable).parent / "dspyflow"), "optimize", "--lm", "sim"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        root = psutil.Process(cli.pid)
        deadline = time.monotonic() + 120
        servers: list[psutil.Process] = []
        while not servers:
            assert cli.poll() is None, "the command ended before its Prefect server started"
            assert time.monotonic() < deadline, "no Prefect server started within 120 s"
            time.sleep(0.2)
            servers = _prefect_servers(root)
        os.kill(cli.pid, sig)  # no atexit, no finally: as a crash
        cli.wait(timeout=30)
        gone, alive = psutil.wait_procs(servers, timeout=20)
        assert not alive, f"orphaned Prefect server(s): {[p.pid for p in alive]}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(cli.pid, signal.SIGKILL)  # whatever of this test's group is left
