"""The `gpu-benchmark` flow: run gpu.benchmark's suite on one device, record it, show it.

Thin: the work is `gpu.benchmark.run_suite`. The suite runs in a task tagged `gpu` (so a
`gpu` work pool and tag limits see it) while holding one slot of the global concurrency
limit `gpu` (limit 1): two benchmarks on one GPU would time each other.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Literal

from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NONE
from prefect.concurrency.sync import concurrency

from gpu.benchmark import BenchmarkConfig, SuiteResult, format_table, run_suite

GPU_LIMIT = "gpu"
log = logging.getLogger("dspyflow.flows.gpu_benchmark")


def ensure_gpu_limit(name: str = GPU_LIMIT, limit: int = 1) -> None:
    """Create the global concurrency limit if it is missing (an existing one is kept)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return
        except ObjectNotFound:
            pass
        # Another flow may create it between our read and our create: that is fine.
        with contextlib.suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=limit)
            )


@task(name="gpu-benchmark-suite", tags=["gpu"], cache_policy=NONE, persist_result=False)
def run_gpu_suite(device: str, sizes: Literal["small", "full"]) -> SuiteResult:
    ensure_gpu_limit()
    # Leases are renewed while held; a crashed holder's slot returns when its lease lapses.
    with concurrency(GPU_LIMIT, occupy=1, lease_duration=300, strict=True):
        return run_suite(BenchmarkConfig(device=device, sizes=sizes))


@task(name="store-gpu-benchmark", cache_policy=NONE, persist_result=False)
def store_results(result: SuiteResult) -> int:
    from storage.repository import Repository

    return Repository().add_benchmark_results(result.to_rows())


@task(name="publish-gpu-benchmark", cache_policy=NONE, persist_result=False)
def publish(result: SuiteResult) -> None:
    create_table_artifact(
        key="gpu-benchmark",
        table=[{k: _short(v) for k, v in row.items()} for row in result.table_rows()],
        description=(
            f"GPU ops on {result.device} ({result.device_info.name}), sizes {result.sizes}; "
            f"session {result.session_id}, fingerprint {result.env_fingerprint}. "
            "ratio = ours / plain torch (median); %peak of the measured copy/matmul ceiling."
        ),
    )


def _short(v: Any) -> Any:
    return float(f"{v:.4g}") if isinstance(v, float) else v


@flow(name="gpu-benchmark", persist_result=False, log_prints=True)
def gpu_benchmark(
    device: str = "auto",
    sizes: Literal["small", "full"] = "small",
    store: bool = True,
) -> dict[str, Any]:
    """Benchmark the GPU ops (ours vs plain torch, vs the CPU, vs measured peaks).

    Returns the summary (the same figures `benchmarks/gpu_ops.py` prints last).

    Args:
        device: auto, cuda, cuda:N, mps or cpu.
        sizes: small (a quick check) or full (the targets' sizes).
        store: Store the results in the results database.
    """
    result = run_gpu_suite(device, sizes)
    if store:
        stored = store_results(result)
        print(f"stored {stored} benchmark rows (session {result.session_id})")
    publish(result)
    print(format_table(result))
    return result.summary()
