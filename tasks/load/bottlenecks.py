"""Bottleneck detection: what limited a load test, how badly, and what to do about it.

The seed's rules (P95 above 500 ms, errors above 10 %, throughput under 80 % of the
target, concurrency limits) plus two that keep the figures honest: a saturated generator
(its own CPU near one full core, or its event loop waking late) and a saturated machine.
When the generator is saturated, the other findings may describe the generator rather
than the system under test, and their messages say so.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, Field

from tasks.load.results import LoadSummary


class Severity(StrEnum):
    low = "low"
    medium = "medium"
    high = "high"
    critical = "critical"


_RANK = {Severity.critical: 0, Severity.high: 1, Severity.medium: 2, Severity.low: 3}


class BottleneckSettings(BaseModel):
    """Where each finding starts: a figure past its limit names a bottleneck."""

    p95_ms: float = Field(500.0, description="Response time p95 (ms) above which it is slow.")
    error_rate: float = Field(0.10, description="Error rate above which errors are flagged.")
    throughput_ratio: float = Field(
        0.80, description="Achieved/target rate below which throughput is flagged."
    )
    generator_cpu_pct: float = Field(
        90.0, description="The generator's CPU (% of one core) above which it is the limit."
    )
    loop_lag_ms: float = Field(
        50.0, description="p99 event-loop lag (ms) at which the generator is the limit."
    )
    schedule_lag_p99_ms: float = Field(
        50.0, description="p99 lateness (ms) of request starts against their schedule."
    )
    system_cpu_pct: float = Field(90.0, description="Machine CPU (%) above which it is busy.")
    memory_pct: float = Field(90.0, description="Machine memory (%) above which it is full.")


class Bottleneck(BaseModel):
    component: str  # response_time, error_handling, throughput, concurrency, load_generator, ...
    severity: Severity
    metric: str
    observed: float
    limit: float
    message: str
    recommendation: str


_ERROR_ADVICE = {
    "timeout": "the target does not answer within the timeout: it is overloaded or stalled; "
    "check its worker count and slow paths",
    "connection": "connections are refused or reset: check that the target is up, its accept "
    "backlog and its file-descriptor limit",
    "http_429": "the target rate-limits this client: the test exceeds its configured limit",
    "exception": "the target raised: see the error samples in the report",
}


def _error_advice(kind: str) -> str:
    if kind in _ERROR_ADVICE:
        return _ERROR_ADVICE[kind]
    if kind.startswith("http_5"):
        return "the target answers with server errors: check its logs and its resources"
    if kind.startswith("http_4"):
        return "the target rejects the requests: check the URL, method, headers and body"
    return "review error handling and the target's resources"


def detect(summary: LoadSummary, settings: BottleneckSettings | None = None) -> list[Bottleneck]:
    cfg = settings or BottleneckSettings()
    stats = summary.steady
    res = summary.resources
    found: list[Bottleneck] = []

    # --- the generator first: it qualifies everything else -------------------------------
    generator_reasons: list[str] = []
    if res.proc_cpu_pct_mean is not None and res.proc_cpu_pct_mean >= cfg.generator_cpu_pct:
        generator_reasons.append(f"its process used {res.proc_cpu_pct_mean:.0f} % of a core")
    if res.loop_lag_ms_p99 is not None and res.loop_lag_ms_p99 >= cfg.loop_lag_ms:
        generator_reasons.append(f"its event loop woke {res.loop_lag_ms_p99:.0f} ms late (p99)")
    lag_p99 = stats.schedule_lag.p99_ms
    if lag_p99 is not None and lag_p99 >= cfg.schedule_lag_p99_ms and stats.waited == 0:
        generator_reasons.append(
            f"requests were sent {lag_p99:.0f} ms after their intended start (p99) with free slots"
        )
    generator_saturated = bool(generator_reasons)
    caveat = (
        " The load generator was saturated, so this may be the generator's limit, not the target's."
        if generator_saturated
        else ""
    )
    if generator_saturated:
        found.append(
            Bottleneck(
                component="load_generator",
                severity=Severity.high,
                metric="proc_cpu_pct_mean",
                observed=res.proc_cpu_pct_mean or 0.0,
                limit=cfg.generator_cpu_pct,
                message="The load generator is saturated: " + "; ".join(generator_reasons) + ".",
                recommendation="Results understate the target's capacity. Lower the rate per "
                "process, split the load over more generator processes or machines, or use the "
                "aiohttp client.",
            )
        )

    # --- response time --------------------------------------------------------------------
    p95 = stats.response.p95_ms
    if p95 is not None and p95 > cfg.p95_ms:
        service_p95 = stats.service.p95_ms or 0.0
        queued = service_p95 < 0.5 * p95
        detail = (
            f" Service time p95 is only {service_p95:.0f} ms: requests queued before they "
            "were sent (at the concurrency cap or in the generator)."
            if queued
            else ""
        )
        found.append(
            Bottleneck(
                component="response_time",
                severity=Severity.high if p95 > 2 * cfg.p95_ms else Severity.medium,
                metric="p95_ms",
                observed=p95,
                limit=cfg.p95_ms,
                message=f"P95 response time {p95:.0f} ms exceeds {cfg.p95_ms:.0f} ms."
                f"{detail}{caveat}",
                recommendation=(
                    "Raise the concurrency cap or the target's capacity; the target itself answers "
                    "in time."
                    if queued
                    else "Scale the target's workers, optimize its slow path (profile the P95 "
                    "requests), or add caching."
                ),
            )
        )

    # --- errors ---------------------------------------------------------------------------
    if stats.requests and stats.error_rate > cfg.error_rate:
        top = sorted(stats.error_kinds.items(), key=lambda kv: -kv[1])
        kinds = ", ".join(f"{k} {n}" for k, n in top[:4])
        found.append(
            Bottleneck(
                component="error_handling",
                severity=Severity.critical if stats.error_rate >= 0.5 else Severity.high,
                metric="error_rate",
                observed=stats.error_rate,
                limit=cfg.error_rate,
                message=f"{stats.error_rate:.1%} of requests failed ({kinds}).{caveat}",
                recommendation=f"Mostly {top[0][0]}: {_error_advice(top[0][0])}."
                if top
                else "Review error handling and the target's resources.",
            )
        )

    # --- throughput -----------------------------------------------------------------------
    if stats.target_rps > 0:
        ratio = stats.achieved_rps / stats.target_rps
        if ratio < cfg.throughput_ratio:
            found.append(
                Bottleneck(
                    component="throughput",
                    severity=Severity.high if ratio < 0.5 else Severity.medium,
                    metric="achieved_ratio",
                    observed=ratio,
                    limit=cfg.throughput_ratio,
                    message=f"Achieved {stats.achieved_rps:.1f} req/s of {stats.target_rps:.1f} "
                    f"targeted ({ratio:.0%}).{caveat}",
                    recommendation="Increase the target's workers or the concurrency cap, and look "
                    "at the response-time and concurrency findings for the cause.",
                )
            )

    # --- concurrency cap ------------------------------------------------------------------
    cap = summary.max_concurrency
    issued = stats.requests + stats.dropped
    blocked = stats.dropped + stats.waited
    if blocked or stats.max_in_flight >= cap:
        share = blocked / issued if issued else 0.0
        mean_s = (stats.service.mean_ms or 0.0) / 1000
        needed = stats.target_rps * mean_s
        what = (
            f"{stats.dropped} requests dropped"
            if summary.on_full == "drop"
            else f"{stats.waited} requests waited for a slot"
        )
        found.append(
            Bottleneck(
                component="concurrency",
                severity=(
                    Severity.high if share > 0.05 else Severity.medium if blocked else Severity.low
                ),
                metric="blocked_share",
                observed=share,
                limit=0.0,
                message=f"{stats.max_in_flight} requests in flight reached the cap of {cap}; "
                f"{what} ({share:.1%}).",
                recommendation=f"By Little's law this rate needs about {needed:.0f} requests in "
                "flight at the measured service time: raise --max-concurrency above that, or make "
                "the target faster.",
            )
        )

    # --- the machine ----------------------------------------------------------------------
    if (
        not generator_saturated
        and res.cpu_pct_mean is not None
        and res.cpu_pct_mean >= cfg.system_cpu_pct
    ):
        found.append(
            Bottleneck(
                component="system_resources",
                severity=Severity.medium,
                metric="cpu_pct_mean",
                observed=res.cpu_pct_mean,
                limit=cfg.system_cpu_pct,
                message=f"The machine's CPU was {res.cpu_pct_mean:.0f} % busy on average.",
                recommendation="The target (if it runs on this machine) is CPU-bound: give it more "
                "cores or run the generator elsewhere.",
            )
        )
    if res.mem_pct_max is not None and res.mem_pct_max >= cfg.memory_pct:
        found.append(
            Bottleneck(
                component="system_resources",
                severity=Severity.high,
                metric="mem_pct_max",
                observed=res.mem_pct_max,
                limit=cfg.memory_pct,
                message=f"Memory use peaked at {res.mem_pct_max:.0f} %.",
                recommendation="Look for a leak or unbounded queue in the target; add memory.",
            )
        )
    return sorted(found, key=lambda b: _RANK[b.severity])
