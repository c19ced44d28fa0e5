"""The machine a benchmark row was measured on: its facts and a stable fingerprint.

Every benchmark row (GPU ops, cycles, load tiers) carries the fingerprint, and
regressions compare only rows with the same one. Host facts are read here; the device
facts (GPU name, driver, runtime) come from the caller, so this module needs no torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

# Drift between runs on the same stack: the commit (a regression is about it) and the
# kernel release.
_UNSTABLE = ("git_commit", "os")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown cpu"


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: Mapping[str, Any]) -> dict[str, Any]:
    """The device facts given, plus this host's software and hardware."""
    return {
        "torch_version": _version("torch"),
        "numpy_version": _version("numpy"),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "git_commit": git_commit(),
        **device,  # the device's own torch build wins over the installed package's
    }


def fingerprint(env: Mapping[str, Any]) -> str:
    """A short stable hash of the hardware and software stack.

    The commit is recorded in the environment but left out of the hash: figures from
    different commits on the same stack must compare (that is what regressions are);
    the kernel release is left out too (it drifts between runs).
    """
    stable = {k: v for k, v in env.items() if k not in _UNSTABLE}
    blob = json.dumps(stable, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
