"""The `nightly-benchmarks` flow: cycle, GPU-ops and load-tier benchmarks, stored as one
benchmark session and compared with each metric's history (asv-style regressions).

Thin composition over tasks/nightly/suite.py and tasks/nightly/regression.py. Scheduled by
prefect.yaml at 02:00 UTC; every parameter has a default, so the schedule and the UI's
quick run work.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from prefect import flow
from pydantic import BaseModel, ConfigDict, Field, field_validator

from flows.load_test import Tier, load_test
from storage.repository import new_id
from tasks.cycle.spec import KNOWN_OPTIMIZERS
from tasks.load.config import LoadTestConfig
from tasks.load.steps import LoadTestOutcome, ThresholdsBreachedError
from tasks.nightly.regression import RegressionSettings
from tasks.nightly.suite import (
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

# Short tiers: a nightly measures trends, the seed's full tiers are the `load-tiers` flow's.
NIGHTLY_TIERS: tuple[Tier, ...] = (
    Tier(name="low", rps=10, max_concurrency=10, duration_s=4),
    Tier(name="medium", rps=50, max_concurrency=30, duration_s=4),
    Tier(name="high", rps=100, max_concurrency=60, duration_s=4),
)


class NightlyOptions(BaseModel):
    """The nightly flow's one parameter, validated together: bad values fail before any
    work. Every field's description is its help in the Prefect UI's run form."""

    model_config = ConfigDict(extra="forbid")

    sim_repeats: int = Field(3, ge=1, le=100, description="Cycles on the simulated LM.")
    sim_optimizer: str = Field(
        "mipro", description="The optimizer of those cycles: mipro, gepa or genetic."
    )
    local_lm: bool = Field(
        True, description="Also benchmark cycles on the embedded local LM, when installed."
    )
    local_repeats: int = Field(3, ge=1, le=100, description="Cycles on the local LM.")
    gpu: bool = Field(True, description="Benchmark the GPU ops (the CPU when no GPU is present).")
    gpu_device: str = Field("auto", description="auto, cuda, cuda:N, mps or cpu.")
    gpu_reps: int = Field(5, ge=2, le=1000, description="Timed repetitions per GPU case.")
    load: bool = Field(True, description="Run the load tiers against a loopback server.")
    tiers: list[Tier] = Field(
        default_factory=lambda: list(NIGHTLY_TIERS),
        description="The load tiers: name, rps, max_concurrency, duration_s.",
    )
    window_s: float = Field(0.5, gt=0, le=60, description="Load windows: one sample each.")
    regression: RegressionSettings = Field(
        default_factory=RegressionSettings,
        description="When a metric regressed: its ratio to the recent median is beyond "
        "ratio_threshold AND the Mann-Whitney p-value is below p_threshold, against the "
        "last `lookback` runs on this environment.",
    )
    fail_on_regression: bool = Field(
        False, description="Fail the flow run when any metric regressed."
    )

    @field_validator("sim_optimizer")
    @classmethod
    def _real_optimizer(cls, value: str) -> str:
        real = [name for name in KNOWN_OPTIMIZERS if name != "capacity"]
        if value not in real:
            raise ValueError(f"unknown optimizer {value!r}; known: {', '.join(real)}")
        return value


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
def nightly_benchmarks(options: NightlyOptions | None = None) -> NightlyReport:
    """Benchmark cycles (sim LM; the local LM too when installed), the GPU ops (small sizes;
    the CPU without a GPU) and load tiers against a loopback server; store one session;
    flag regressions (ratio AND Mann-Whitney U against this environment's history);
    publish a report artifact and a `dspyflow.benchmark.regression` event per regressed
    metric.

    Args:
        options: What to benchmark and how regressions are judged (each field has its own
            help); every field has a default, so the schedule and the UI's quick run work.
    """
    options = options or NightlyOptions()
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
