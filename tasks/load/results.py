"""What a load test measured: per-window records and the summaries made from them.

Two clocks place a request in a window. Its *intended* start decides the window of its
latencies, errors and drops (a slow period's requests belong to the load that caused
it); the *actual* send and completion times count ``sent`` and ``completed`` (the
achieved rate). Phase totals are merges of their windows' histograms.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram
from pydantic import BaseModel, Field

from tasks.load.histograms import Percentiles, merge, new_histogram, percentiles, record_seconds
from tasks.load.patterns import LoadPattern, Phase


@dataclass
class Window:
    index: int
    start_s: float
    length_s: float
    phase: Phase
    target: float  # requests the pattern intends to start in this window
    requests: int = 0  # issued (intended start in this window), completed or not
    errors: int = 0
    dropped: int = 0  # cap full in drop mode: never sent (k6's dropped_iterations)
    waited: int = 0  # cap full in wait mode: sent late, the wait is in the response time
    error_kinds: Counter[str] = field(default_factory=Counter)
    sent: int = 0  # by actual send time
    completed: int = 0  # by completion time
    max_in_flight: int = 0  # by wall time
    response: HdrHistogram = field(default_factory=new_histogram)  # done - intended
    service: HdrHistogram = field(default_factory=new_histogram)  # done - actual send
    lag: HdrHistogram = field(default_factory=new_histogram)  # actual send - intended
    resources: dict[str, Any] = field(default_factory=dict)

    @property
    def target_rate(self) -> float:
        return self.target / self.length_s

    @property
    def achieved_rate(self) -> float:
        return self.completed / self.length_s


class WindowRecorder:
    """Windows of ``window_s`` seconds, created on first use (completions may run late)."""

    def __init__(self, pattern: LoadPattern, window_s: float = 1.0) -> None:
        self.pattern = pattern
        self.window_s = window_s
        self.windows: list[Window] = []

    def at(self, offset_s: float) -> Window:
        index = max(0, int(offset_s // self.window_s))
        while len(self.windows) <= index:
            self._append()
        return self.windows[index]

    def _append(self) -> None:
        i = len(self.windows)
        start = i * self.window_s
        end = start + self.window_s
        p = self.pattern
        inside = max(0.0, min(end, p.duration) - start)
        # A window's phase is its midpoint's (tail windows after the end are cool-down), so
        # phase totals are exact merges of whole windows.
        phase = p.phase(start + inside / 2) if inside > 0 else Phase.cooldown
        target = p.cumulative(min(end, p.duration)) - p.cumulative(min(start, p.duration))
        self.windows.append(Window(i, start, self.window_s, phase, target))

    def cover(self, duration_s: float) -> list[Window]:
        """Make sure every window up to ``duration_s`` exists; return them all."""
        if duration_s > 0:
            self.at(max(duration_s - 1e-9, 0.0))
        return self.windows

    def record(
        self, *, t0: float, intended: float, sent: float, done: float, error: str | None
    ) -> None:
        w = self.at(intended - t0)
        w.requests += 1
        record_seconds(w.response, done - intended)
        record_seconds(w.service, done - sent)
        record_seconds(w.lag, max(sent - intended, 0.0))
        if error is not None:
            w.errors += 1
            w.error_kinds[error] += 1
        self.at(sent - t0).sent += 1
        self.at(done - t0).completed += 1


class PhaseStats(BaseModel):
    """Totals of a phase (or of the whole run): merged histograms, summed counts."""

    phase: str
    windows: int = 0
    duration_s: float = 0.0
    requests: int = 0
    errors: int = 0
    dropped: int = 0
    waited: int = 0
    error_rate: float = 0.0  # errors / requests issued
    drop_rate: float = 0.0  # dropped / (requests + dropped)
    target_rps: float = 0.0
    achieved_rps: float = 0.0  # completions per second
    sent_rps: float = 0.0
    max_in_flight: int = 0
    error_kinds: dict[str, int] = Field(default_factory=dict)
    response: Percentiles = Field(default_factory=Percentiles)
    service: Percentiles = Field(default_factory=Percentiles)
    schedule_lag: Percentiles = Field(default_factory=Percentiles)


def phase_stats(phase: str, windows: list[Window]) -> tuple[PhaseStats, dict[str, HdrHistogram]]:
    """Stats of ``windows`` and their merged histograms (for thresholds on any percentile)."""
    hists = {
        "response": merge(w.response for w in windows),
        "service": merge(w.service for w in windows),
        "lag": merge(w.lag for w in windows),
    }
    duration = sum(w.length_s for w in windows)
    requests = sum(w.requests for w in windows)
    errors = sum(w.errors for w in windows)
    dropped = sum(w.dropped for w in windows)
    kinds: Counter[str] = Counter()
    for w in windows:
        kinds.update(w.error_kinds)
    stats = PhaseStats(
        phase=phase,
        windows=len(windows),
        duration_s=duration,
        requests=requests,
        errors=errors,
        dropped=dropped,
        waited=sum(w.waited for w in windows),
        error_rate=errors / requests if requests else 0.0,
        drop_rate=dropped / (requests + dropped) if requests + dropped else 0.0,
        target_rps=sum(w.target for w in windows) / duration if duration else 0.0,
        achieved_rps=sum(w.completed for w in windows) / duration if duration else 0.0,
        sent_rps=sum(w.sent for w in windows) / duration if duration else 0.0,
        max_in_flight=max((w.max_in_flight for w in windows), default=0),
        error_kinds=dict(kinds),
        response=percentiles(hists["response"]),
        service=percentiles(hists["service"]),
        schedule_lag=percentiles(hists["lag"]),
    )
    return stats, hists


class ResourceSample(BaseModel):
    """One monitor sample; ``t_s`` is seconds since the load test's start."""

    t_s: float
    cpu_pct: float  # the whole machine, 0..100
    mem_pct: float
    mem_used_mb: float
    proc_cpu_pct: float  # the generator process; 100 = one full core
    proc_rss_mb: float
    loop_lag_ms: float | None = None  # worst event-loop lag since the previous sample
    gpu_util_pct: float | None = None  # busiest GPU
    gpu_mem_used_mb: float | None = None  # all GPUs together
    gpu_mem_total_mb: float | None = None


class ResourceSummary(BaseModel):
    samples: int = 0
    cpu_pct_mean: float | None = None
    cpu_pct_max: float | None = None
    mem_pct_max: float | None = None
    proc_cpu_pct_mean: float | None = None
    proc_cpu_pct_max: float | None = None
    proc_rss_mb_max: float | None = None
    loop_lag_ms_max: float | None = None
    loop_lag_ms_p99: float | None = None
    gpu: str | None = None  # "n x model", or why there is no GPU data
    gpu_util_pct_max: float | None = None
    gpu_mem_used_mb_max: float | None = None


class LoadSummary(BaseModel):
    """The boundary form of a finished load test (what the database and reports hold)."""

    name: str
    target: str
    pattern: str
    planned_requests: int
    duration_s: float  # wall time from the first intended start to the last completion
    max_concurrency: int
    on_full: str
    overall: PhaseStats
    phases: dict[str, PhaseStats] = Field(default_factory=dict)
    resources: ResourceSummary = Field(default_factory=ResourceSummary)
    error_samples: dict[str, str] = Field(default_factory=dict)  # first message per kind

    @property
    def steady(self) -> PhaseStats:
        """The steady state, or the whole run when the pattern has no steady phase."""
        return self.phases.get(Phase.steady.value) or self.overall


@dataclass
class LoadTestResult:
    """Everything one run measured, in memory (histograms included)."""

    summary: LoadSummary
    windows: list[Window]
    resources: list[ResourceSample]
    histograms: dict[str, dict[str, HdrHistogram]]  # phase or "overall" -> kind -> hist
