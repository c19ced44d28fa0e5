"""Importing dspyflow's modules changes nothing in the process (no environment variables,
no patched libraries); what a batch needs is installed by the batch job that needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, tmp_path: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "DSPYFLOW_HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_importing_the_packages_changes_no_environment_and_patches_nothing(
    tmp_path: Path,
) -> None:
    code = """
import os, tqdm
before, registry = dict(os.environ), type(tqdm.tqdm._instances)
import flows.optimization, flows.nightly, flows.load_test, tasks.batch.run, tasks.cycle.steps
import tasks.lm.providers, tasks.reports.results, storage.repository
print(sorted(set(os.environ) - set(before)))
print(type(tqdm.tqdm._instances) is registry)
"""
    added, same_registry = _python(code, tmp_path).strip().splitlines()[-2:]
    assert added == "[]"
    assert same_registry == "True"


def test_a_batch_job_guards_tqdms_registry_for_concurrent_cycles(tmp_path: Path) -> None:
    code = f"""
import tqdm
from tasks.batch.run import run_batch_job
from tests.faults._helpers import sim_spec
state = run_batch_job(sim_spec(optimizer="capacity", sim_latency_ms=0), "r" * 32,
                      "sqlite:///{tmp_path / "runs.db"}")
print(state, type(tqdm.tqdm._instances).__name__)
"""
    assert _python(code, tmp_path).split()[-2:] == ["succeeded", "_Registry"]
