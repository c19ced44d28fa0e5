"""The `nightly-benchmarks` flow: cycle, GPU-ops and load-tier benchmarks, stored as one
benchmark session and compared with each metric's history (asv-style regressions).

Thin composition over tasks/nightly.py and tasks/regression.py. Scheduled by prefect.yaml
at 02:00 UTC; every parameter has a default, so the schedule and the UI's quick run work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from flows.load_test import Tier, load_test
from storage.repository import new_id
from tasks.load.config import LoadTestConfig
from tasks.load.steps import LoadTestOutcome, ThresholdsBreachedError
from tasks.nightly import (
    BenchmarkRow,
    CycleBenchmark,
    NightlyReport,
    PartOutcome,
    detect,
    environment_task,
    local_lm_available,
    loopback_server,
    publish,
    read_load_tier,
    run_cycle_benchmark,
    run_gpu_benchmark,
    store_rows,
)
from tasks.regression import RegressionSettings

# Short tiers: a nightly measures trends, the seed's full tiers are the `load-tiers` flow's.
NIGHTLY_TIERS: tuple[Tier, ...] = (
    Tier(name="low", rps=10, max_concurrency=10, duration_s=4),
    Tier(name="medium", rps=50, max_concurrency=30, duration_s=4),
    Tier(name="high", rps=100, max_concurrency=60, duration_s=4),
)


class NightlyOptions(BaseModel):
    """The flow's parameters, validated together (bad values fail before any work)."""

    sim_repeats: int = Field(3, ge=1, le=100)
    sim_optimizer: str = "mipro"
    local_lm: bool = True
    local_repeats: int = Field(3, ge=1, le=100)
    gpu: bool = True
    gpu_device: str = "auto"
    gpu_reps: int = Field(5, ge=2, le=1000)
    load: bool = True
    tiers: list[Tier] = Field(default_factory=lambda: list(NIGHTLY_TIERS))
    window_s: float = Field(0.5, gt=0, le=60, description="Load windows: one sample each.")
    regression: RegressionSettings = Field(default_factory=RegressionSettings)
    fail_on_regression: bool = False


Rows = list[BenchmarkRow]


def _part(name: str, fn: Callable[[], Rows | tuple[Rows, str]], rows: Rows) -> PartOutcome:
    """Run one part; a failure is reported, and the other parts still run. ``fn`` returns
    its rows, or its rows and a note for the report."""
    started = time.perf_counter()
    detail = None
    try:
        got = fn()
        if isinstance(got, tuple):
            got, detail = got
    except Exception as exc:  # noqa: BLE001 - recorded in the report, re-raised at the end
        return PartOutcome(
            name=name,
            status="failed",
            seconds=time.perf_counter() - started,
            detail=f"{type(exc).__name__}: {exc}",
        )
    rows.extend(got)
    return PartOutcome(
        name=name,
        status="ok",
        rows=len(got),
        seconds=time.perf_counter() - started,
        detail=detail,
    )


@flow(name="nightly-benchmarks", persist_result=False, log_prints=True)
def nightly_benchmarks(
    sim_repeats: int = 3,
    sim_optimizer: str = "mipro",
    local_lm: bool = True,
    local_repeats: int = 3,
    gpu: bool = True,
    gpu_device: str = "auto",
    gpu_reps: int = 5,
    load: bool = True,
    tiers: list[Tier] | None = None,
    ratio_threshold: float = 1.1,
    p_threshold: float = 0.05,
    lookback: int = 5,
    fail_on_regression: bool = False,
) -> NightlyReport:
    """Benchmark cycles (sim LM; the local LM too when installed), the GPU ops (small sizes;
    the CPU without a GPU) and load tiers against a loopback server; store one session;
    flag regressions (ratio beyond `ratio_threshold` AND Mann-Whitney p < `p_threshold`
    against the last `lookback` runs on this environment); publish a report artifact and
    a `dspyflow.benchmark.regression` event per regressed metric.
    """
    options = NightlyOptions(
        sim_repeats=sim_repeats,
        sim_optimizer=sim_optimizer,
        local_lm=local_lm,
        local_repeats=local_repeats,
        gpu=gpu,
        gpu_device=gpu_device,
        gpu_reps=gpu_reps,
        load=load,
        regression=RegressionSettings(
            ratio_threshold=ratio_threshold, p_threshold=p_threshold, lookback=lookback
        ),
        fail_on_regression=fail_on_regression,
        **({"tiers": tiers} if tiers is not None else {}),
    )
    env = environment_task(new_id(), options.gpu_device)
    print(f"nightly session {env.session_id} on {env.device}, fingerprint {env.env_fingerprint}")
    rows: list[BenchmarkRow] = []
    parts: list[PartOutcome] = []

    sim = CycleBenchmark(lm="sim", optimizer=options.sim_optimizer, repeats=options.sim_repeats)
    parts.append(_part(f"cycle-sim-{sim.optimizer}", lambda: run_cycle_benchmark(env, sim), rows))
    if not options.local_lm:
        parts.append(PartOutcome(name="cycle-local", status="skipped", detail="local_lm=false"))
    elif not local_lm_available():
        parts.append(
            PartOutcome(name="cycle-local", status="skipped", detail="`local` extra not installed")
        )
    else:
        # The fixed-call-count workload: 2 x (val + test) LM calls, so the figure is the LM.
        local = CycleBenchmark(
            lm="local",
            optimizer="capacity",
            repeats=options.local_repeats,
            max_train=4,
            max_val=2,
            max_test=2,
        )
        parts.append(_part("cycle-local", lambda: run_cycle_benchmark(env, local), rows))

    if options.gpu:
        parts.append(_part("gpu-ops", lambda: _gpu_rows(env, options.gpu_reps), rows))
    else:
        parts.append(PartOutcome(name="gpu-ops", status="skipped", detail="gpu=false"))

    if options.load:
        try:
            with loopback_server() as url:
                for tier in options.tiers:
                    parts.append(_part(f"load-{tier.name}", _tier(env, tier, url, options), rows))
        except Exception as exc:  # noqa: BLE001 - the server did not start
            parts.append(PartOutcome(name="load", status="failed", detail=str(exc)))
    else:
        parts.append(PartOutcome(name="load", status="skipped", detail="load=false"))

    stored = store_rows(rows) if rows else 0
    report = detect(rows, options.regression)
    result = publish(env, parts, report, stored)
    print(result.markdown)
    failed = result.failed_parts
    if failed:
        raise RuntimeError(
            "nightly parts failed: " + "; ".join(f"{p.name}: {p.detail}" for p in failed)
        )
    if options.fail_on_regression and result.regressions:
        raise RuntimeError(
            "benchmark regressions: " + ", ".join(v.metric for v in result.regressions)
        )
    return result


def _gpu_rows(env: Any, reps: int) -> list[BenchmarkRow]:
    """The GPU ops; on a GPU, holding the `gpu` limit the gpu-benchmark flow uses (two
    benchmarks on one GPU would time each other)."""
    hold: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if not env.device.startswith("cpu"):
        from prefect.concurrency.sync import concurrency

        from flows.gpu_benchmark import GPU_LIMIT, ensure_gpu_limit

        ensure_gpu_limit()
        hold = concurrency(GPU_LIMIT, occupy=1, lease_duration=300, strict=True)
    with hold:
        return run_gpu_benchmark(env, reps)


def _tier(
    env: Any, tier: Tier, url: str, options: NightlyOptions
) -> Callable[[], tuple[Rows, str]]:
    def run() -> tuple[Rows, str]:
        config = LoadTestConfig(
            name=f"nightly-{tier.name}",
            url=url,
            rps=tier.rps,
            duration_s=tier.duration_s,
            max_concurrency=tier.max_concurrency,
            window_s=options.window_s,
            thresholds=["error_rate<0.1", f"rps>={tier.rps * 0.8:g}"],
        )
        state = load_test(config, return_state=True)
        value = state.result(raise_on_failure=False)
        if isinstance(value, LoadTestOutcome):
            run_id, note = value.run_id, f"load test {value.run_id}: thresholds passed"
        elif isinstance(value, ThresholdsBreachedError):
            # Recorded and measured: its figures still go into the trend (and the report).
            run_id, note = value.outcome.run_id, str(value)
        else:
            raise RuntimeError(f"load test of tier {tier.name} crashed: {value}")
        return read_load_tier(env, tier.name, run_id), note

    return run
