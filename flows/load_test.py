"""Load-test flows: one load test (`load-test`) and the seed's performance tiers
(`load-tiers`). Thin composition over tasks/load."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from tasks.load import steps
from tasks.load.config import LoadTestConfig
from tasks.load.steps import LoadTestOutcome, ThresholdsBreachedError


@flow(name="load-test", persist_result=False, log_prints=True)
def load_test(config: LoadTestConfig, run_id: str | None = None) -> LoadTestOutcome:
    """Generate open-model load, record it, report it; fail the run on a breached threshold.

    The config is validated (by pydantic, as the flow's parameter) before any request is
    sent. The run, its windows and histograms are recorded before a breach is raised.

    Args:
        config: The load test: target, rate model (constant, ramp-up, spike, wave),
            duration, concurrency cap and thresholds.
        run_id: The load-test row to record into; a new one when empty.
    """
    if not config.has_target:
        raise ValueError("config: give a target: url, callable or program_run_id")
    run_id = steps.start(config, run_id, flow_run.get_id())
    try:
        result = steps.generate(config)
        verdict = steps.evaluate(result, config)
        steps.record(run_id, result, verdict)
    except BaseException as exc:
        steps.record_crash(run_id, exc, config)
        raise
    # After the record: a report that fails fails the flow run, never loses the data.
    html_path, md_path = steps.report(run_id, config, result, verdict)
    outcome = LoadTestOutcome(
        run_id=run_id,
        name=config.name,
        passed=verdict.passed,
        summary=result.summary,
        thresholds=verdict.thresholds,
        bottlenecks=verdict.bottlenecks,
        report_html=html_path,
        report_md=md_path,
    )
    print(
        f"load test {run_id}: {result.summary.steady.achieved_rps:.1f} req/s, "
        f"p99 {result.summary.steady.response.p99_ms} ms, "
        f"{'passed' if verdict.passed else 'FAILED'}; report {html_path}"
    )
    if not verdict.passed:
        raise ThresholdsBreachedError(outcome)
    return outcome


class Tier(BaseModel):
    name: str = Field(description="The tier's name; its metrics are load.<name>.*.")
    rps: float = Field(gt=0, description="Requests per second, constant.")
    max_concurrency: int = Field(ge=1, description="Requests in flight at most.")
    duration_s: float = Field(gt=0, description="How long the tier runs, in seconds.")


# The seed's performance tiers, and its sustained high load (100 RPS for 30 s).
DEFAULT_TIERS: tuple[Tier, ...] = (
    Tier(name="low", rps=10, max_concurrency=10, duration_s=2),
    Tier(name="medium", rps=50, max_concurrency=30, duration_s=5),
    Tier(name="high", rps=100, max_concurrency=60, duration_s=10),
    Tier(name="sustained", rps=100, max_concurrency=60, duration_s=30),
)


class TierOutcome(BaseModel):
    tier: str
    passed: bool
    run_id: str | None
    error: str | None = None
    outcome: LoadTestOutcome | None = None


@flow(name="load-tiers", persist_result=False, log_prints=True)
def load_tiers(
    url: str,
    tiers: list[Tier] | None = None,
    thresholds: list[str] | None = None,
    min_throughput_ratio: float = 0.8,
    max_error_rate: float = 0.10,
) -> list[TierOutcome]:
    """Run the tiers one after another (each a `load-test` subflow) against ``url``.

    Each tier must keep errors under ``max_error_rate`` and achieve ``min_throughput_ratio``
    of its rate (the seed's pass marks), plus any extra ``thresholds``. Every tier runs; the
    flow fails at the end if any tier failed.

    Args:
        url: The target URL.
        tiers: The tiers (name, rps, duration, concurrency); the default tiers when empty.
        thresholds: Extra k6-style thresholds every tier must meet (`p95<500ms`, ...).
        min_throughput_ratio: The share of its target rate each tier must achieve.
        max_error_rate: The error rate each tier must stay under.
    """
    configs = [
        LoadTestConfig(
            name=f"tier-{t.name}",
            url=url,
            rps=t.rps,
            duration_s=t.duration_s,
            max_concurrency=t.max_concurrency,
            thresholds=[
                f"error_rate<{max_error_rate:g}",
                f"rps>={t.rps * min_throughput_ratio:g}",
                *(thresholds or []),
            ],
        )
        for t in (tiers or list(DEFAULT_TIERS))
    ]  # all validated before the first request
    results: list[TierOutcome] = []
    for config in configs:
        state = load_test(config, return_state=True)
        value = state.result(raise_on_failure=False)
        tier = config.name.removeprefix("tier-")
        if isinstance(value, LoadTestOutcome):
            results.append(TierOutcome(tier=tier, passed=True, run_id=value.run_id, outcome=value))
        elif isinstance(value, ThresholdsBreachedError):
            results.append(
                TierOutcome(
                    tier=tier,
                    passed=False,
                    run_id=value.outcome.run_id,
                    error=str(value),
                    outcome=value.outcome,
                )
            )
        else:
            results.append(TierOutcome(tier=tier, passed=False, run_id=None, error=str(value)))
    for r in results:
        print(
            f"tier {r.tier}: {'PASS' if r.passed else 'FAIL'}"
            + (f" ({r.error})" if r.error else "")
        )
    failed = [r.tier for r in results if not r.passed]
    if failed:
        raise RuntimeError(f"load tiers failed: {', '.join(failed)}")
    return results
