"""The load-test specification: one pydantic model for the CLI, the flow and Python callers.

Everything is validated before a request is sent; errors name the field.
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from tasks.load.bottlenecks import BottleneckSettings
from tasks.load.patterns import (
    ConstantPattern,
    LoadPattern,
    RampPattern,
    SpikePattern,
    WavePattern,
)
from tasks.load.redact import redact_headers, redact_url, secrets_of
from tasks.load.thresholds import parse_threshold

PatternName = Literal["constant", "ramp", "spike", "wave"]

# With no thresholds of the user's, a run fails when a tenth or more of its requests fail:
# without it a load test in which every request failed (a wrong URL, a dead service)
# "passed" with exit 0. A tenth is the pass mark of the load-tiers flow; failing on any
# error would fail every stress test, and on 100 % only would pass a 99 %-broken run.
# Any -t replaces it (`-t error_rate<=1` accepts every error rate).
DEFAULT_THRESHOLDS: tuple[str, ...] = ("error_rate<0.1",)


class LoadTestConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # rps=inf never ends

    name: str = Field("load-test", min_length=1, max_length=200, description="The test's name.")

    # --- the target: an HTTP endpoint, an in-process callable ("package.module:function",
    # called with no arguments; sync ones run in a thread pool), or an optimized DSPy
    # program from the database. Python callers may pass a live target object instead.
    url: str | None = Field(None, description="The HTTP(S) endpoint under test.")
    callable: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="Or an in-process `package.module:function`, called with no arguments.",
    )
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"] = Field(
        "GET", description="HTTP method."
    )
    headers: dict[str, str] = Field(default_factory=dict, description="HTTP request headers.")
    json_body: Any = Field(None, description="JSON body of each request.")
    ok_statuses: list[int] | None = Field(
        None, description="HTTP statuses that count as success; default: any below 400."
    )
    http_client: Literal["aiohttp", "httpx"] = Field("aiohttp", description="HTTP client.")
    program_run_id: str | None = Field(
        None, description="Or the optimized program of this run (from the results database)."
    )
    program_inputs: list[dict[str, Any]] = Field(
        default_factory=list, description="Inputs the program is called with, in turn."
    )
    lm: str | dict[str, Any] | None = Field(
        None, description="The program's LM: an LMSpec or its model string (default: the run's)."
    )

    # --- the load ----------------------------------------------------------------------------
    pattern: PatternName = Field(
        "constant",
        description="constant, ramp (ramp-up), spike or wave: the arrival rate over time.",
    )
    rps: float = Field(gt=0, description="steady (peak for ramp, mean for wave) requests/s")
    duration_s: float = Field(gt=0, le=86_400, description="Seconds of load, warm-up included.")
    max_concurrency: int = Field(100, ge=1, le=100_000, description="Requests in flight at most.")
    on_full: Literal["wait", "drop"] = Field(
        "wait", description="At max_concurrency: `wait` (late start, counted) or `drop` (counted)."
    )
    timeout_s: float = Field(30.0, gt=0, description="Per-request timeout.")
    arrivals: Literal["uniform", "poisson"] = Field(
        "uniform", description="Request starts evenly spaced, or a Poisson process (open model)."
    )
    seed: int | None = Field(None, description="Seed of Poisson arrivals.")
    warmup_s: float | None = Field(None, ge=0, description="Warm-up, left out of the figures.")
    cooldown_s: float | None = Field(None, ge=0, description="Cool-down, left out too.")
    # ramp: warm-up at start_rps, ramp_s to rps, hold, cool-down back to start_rps
    ramp_s: float | None = Field(None, ge=0, description="ramp: seconds from start_rps to rps.")
    start_rps: float | None = Field(None, ge=0, description="ramp: the starting rate.")
    # spike: rps, then spike_rps (default rps x spike_multiplier) for spike_s from spike_start_s
    spike_rps: float | None = Field(None, gt=0, description="spike: the spike's rate.")
    spike_multiplier: float = Field(
        5.0, ge=1, description="spike: spike_rps = rps x this, when spike_rps is not given."
    )
    spike_start_s: float | None = Field(None, ge=0, description="spike: when it starts.")
    spike_s: float | None = Field(None, gt=0, description="spike: how long it lasts.")
    # wave: rps x (1 + wave_amplitude x sin(2 pi t / wave_period_s))
    wave_period_s: float | None = Field(None, gt=0, description="wave: the period in seconds.")
    wave_amplitude: float = Field(
        0.5, ge=0, le=1, description="wave: rps x (1 + amplitude x sin(2 pi t / period))."
    )

    # --- measuring and judging ------------------------------------------------------------------
    window_s: float = Field(1.0, gt=0, le=60, description="Length of one measured window.")
    monitor_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often CPU, memory and loop lag are sampled."
    )
    thresholds: list[str] = Field(
        default_factory=list,
        description="Pass marks, k6-style: `p95<500ms`, `error_rate<0.01`, `rps>=45`.",
    )
    bottlenecks: BottleneckSettings = Field(
        default_factory=BottleneckSettings, description="Where bottleneck findings start."
    )
    report_path: str | None = Field(
        None, description="Write the HTML report here; the Markdown report goes next to it."
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL with a host")
        try:
            _ = parts.port
        except ValueError as exc:
            raise ValueError(f"{value!r} has a bad port: {exc}") from None
        return value.strip()

    @field_validator("thresholds")
    @classmethod
    def _check_thresholds(cls, value: list[str]) -> list[str]:
        for expr in value:
            parse_threshold(expr)  # raises ThresholdError (a ValueError) with the reason
        return value

    # JSON is what leaves the process: our database, the reports, and Prefect's record of
    # the flow's parameters (Prefect serializes them with model_dump(mode="json")). The
    # object itself keeps the real values for the generator.
    @field_serializer("url", when_used="json")
    def _url_without_credentials(self, value: str | None) -> str | None:
        return redact_url(value) if value else value

    @field_serializer("headers", when_used="json")
    def _headers_without_secrets(self, value: dict[str, str]) -> dict[str, str]:
        return redact_headers(value)

    @model_validator(mode="after")
    def _check_shape(self) -> LoadTestConfig:
        given = [f for f in ("url", "callable", "program_run_id") if getattr(self, f) is not None]
        if len(given) > 1:
            raise ValueError(f"give one target, not {' and '.join(given)}")
        if self.program_run_id is not None and not self.program_inputs:
            raise ValueError("program_inputs: a program target needs at least one input dict")
        p = self.build_pattern()
        edges = p.warmup_s + p.cooldown_s + (p.ramp_s if isinstance(p, RampPattern) else 0.0)
        if edges >= self.duration_s:
            raise ValueError(
                f"warmup_s + cooldown_s{' + ramp_s' if self.pattern == 'ramp' else ''} "
                f"({edges:g} s) must be shorter than duration_s ({self.duration_s:g} s)"
            )
        if isinstance(p, SpikePattern) and p.spike_start_s + p.spike_s > self.duration_s:
            raise ValueError("spike_start_s + spike_s must not pass duration_s")
        return self

    @property
    def has_target(self) -> bool:
        return any(getattr(self, f) is not None for f in ("url", "callable", "program_run_id"))

    @property
    def effective_thresholds(self) -> list[str]:
        """The user's thresholds, or DEFAULT_THRESHOLDS when there are none."""
        return list(self.thresholds) or list(DEFAULT_THRESHOLDS)

    def secrets(self) -> list[str]:
        """Literal credentials of the target (URL password, secret headers)."""
        return secrets_of(self.url, self.headers)

    def redacted_dump(self) -> dict[str, Any]:
        """The config as JSON for the database and reports: credentials masked (as in any
        JSON dump of it, see the serializers above)."""
        return self.model_dump(mode="json")

    @property
    def target_label(self) -> str:
        if self.url:
            return redact_url(self.url)
        if self.callable:
            return f"callable:{self.callable}"
        return f"program:{self.program_run_id}" if self.program_run_id else "in-process"

    def build_pattern(self) -> LoadPattern:
        d = self.duration_s
        if self.pattern == "ramp":
            # Defaults: 10 % warm-up at 10 % of the rate, 30 % ramp, hold, 10 % cool-down.
            return RampPattern(
                rps=self.rps,
                duration=d,
                warmup_s=d * 0.1 if self.warmup_s is None else self.warmup_s,
                ramp_s=d * 0.3 if self.ramp_s is None else self.ramp_s,
                cooldown_s=d * 0.1 if self.cooldown_s is None else self.cooldown_s,
                start_rps=self.rps * 0.1 if self.start_rps is None else self.start_rps,
            )
        edges = {"warmup_s": self.warmup_s or 0.0, "cooldown_s": self.cooldown_s or 0.0}
        if self.pattern == "spike":
            return SpikePattern(
                rps=self.rps,
                duration=d,
                spike_rps=self.spike_rps or self.rps * self.spike_multiplier,
                spike_start_s=d * 0.4 if self.spike_start_s is None else self.spike_start_s,
                spike_s=self.spike_s or d * 0.2,
                **edges,
            )
        if self.pattern == "wave":
            return WavePattern(
                rps=self.rps,
                duration=d,
                period_s=self.wave_period_s or d / 2,
                amplitude=self.wave_amplitude,
                **edges,
            )
        return ConstantPattern(rps=self.rps, duration=d, **edges)
