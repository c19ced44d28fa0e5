"""Load patterns as rate functions r(t) and the open model's intended start times.

Each pattern gives the request rate r(t) in requests per second, its integral
N(t) = ∫₀ᵗ r, and the phase of a moment (warm-up, steady, cool-down). Request i is
intended to start at tᵢ = N⁻¹(i): the schedule is fixed before the first request is
sent, so a slow system under test cannot slow the generator down (no coordinated
omission). Poisson arrivals use the same inverse on a unit-rate Poisson process
(time rescaling), so every pattern gets them for free.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum


class Phase(StrEnum):
    warmup = "warmup"
    steady = "steady"
    cooldown = "cooldown"


class LoadPattern(ABC):
    """A rate function over ``[0, duration)`` seconds, with warm-up and cool-down edges."""

    duration: float
    warmup_s: float
    cooldown_s: float

    @abstractmethod
    def rate(self, t: float) -> float:
        """Intended requests per second at ``t``."""

    @abstractmethod
    def cumulative(self, t: float) -> float:
        """N(t): requests intended to start in ``[0, t)``."""

    @property
    def name(self) -> str:
        return type(self).__name__.removesuffix("Pattern").lower()

    @property
    def total(self) -> float:
        return self.cumulative(self.duration)

    def phase(self, t: float) -> Phase:
        if t < self.warmup_s:
            return Phase.warmup
        if t >= self.duration - self.cooldown_s:
            return Phase.cooldown
        return Phase.steady

    def inverse(self, n: float, lo: float = 0.0) -> float:
        """The smallest t >= lo with N(t) >= n (bisection; N is non-decreasing)."""
        if self.cumulative(self.duration) < n:
            return math.inf
        have = self.cumulative(lo)
        if have >= n:
            return lo
        # Bracket from the local rate (doubling the step), then bisect to 1 us, which is far
        # below the event loop's timer resolution: ~15 steps a request instead of ~25.
        r = self.rate(lo)
        step = 2.0 * (n - have) / r if r > 0 else 0.01
        hi = min(lo + step, self.duration)
        while self.cumulative(hi) < n:
            lo, step = hi, step * 2
            hi = min(hi + step, self.duration)
        while hi - lo > 1e-6:
            mid = 0.5 * (lo + hi)
            if self.cumulative(mid) >= n:
                hi = mid
            else:
                lo = mid
        return hi

    def intended_times(
        self, *, arrivals: str = "uniform", seed: int | None = None
    ) -> Iterator[float]:
        """Intended start offsets in seconds, in order, lazily (long runs stay small)."""
        rng = random.Random(seed)
        total = self.total
        n = 0.0
        t = 0.0
        while n < total:  # request i exists iff i < N(duration)
            t = self.inverse(n, t)
            if t >= self.duration:
                return
            yield t
            # uniform: tᵢ = N⁻¹(i); poisson: unit-rate exponential gaps in N-space.
            n += rng.expovariate(1.0) if arrivals == "poisson" else 1.0


@dataclass(frozen=True)
class ConstantPattern(LoadPattern):
    rps: float
    duration: float
    warmup_s: float = 0.0
    cooldown_s: float = 0.0

    def rate(self, t: float) -> float:
        return self.rps if 0 <= t < self.duration else 0.0

    def cumulative(self, t: float) -> float:
        return self.rps * min(max(t, 0.0), self.duration)

    def inverse(self, n: float, lo: float = 0.0) -> float:
        t = max(n / self.rps, lo)  # closed form: the hot path at high rates
        return t if t < self.duration else math.inf


@dataclass(frozen=True)
class RampPattern(LoadPattern):
    """Warm-up at ``start_rps``, a linear ramp to ``rps``, a hold, a linear cool-down.

    The warm-up and the ramp count as warm-up: the steady state is the hold at peak.
    """

    rps: float
    duration: float
    warmup_s: float
    ramp_s: float
    cooldown_s: float
    start_rps: float = 0.0
    _segs: tuple[tuple[float, float, float, float], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        w, r, c, d = self.warmup_s, self.ramp_s, self.cooldown_s, self.duration
        lo, hi = self.start_rps, self.rps
        # (t0, t1, r0, r1) pieces of a piecewise-linear rate, computed once.
        segments = (
            (0.0, w, lo, lo),
            (w, w + r, lo, hi),
            (w + r, d - c, hi, hi),
            (d - c, d, hi, lo),
        )
        object.__setattr__(self, "_segs", segments)

    def _segments(self) -> tuple[tuple[float, float, float, float], ...]:
        return self._segs

    def rate(self, t: float) -> float:
        for t0, t1, r0, r1 in self._segments():
            if t0 <= t < t1:
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
        return 0.0

    def cumulative(self, t: float) -> float:
        total = 0.0
        for t0, t1, r0, r1 in self._segments():
            if t <= t0 or t1 <= t0:
                continue
            end = min(t, t1)
            r_end = r0 + (r1 - r0) * (end - t0) / (t1 - t0)
            total += 0.5 * (r0 + r_end) * (end - t0)
        return total

    def inverse(self, n: float, lo: float = 0.0) -> float:
        # Closed form: within a linear piece, N is quadratic in the time since its start.
        done = 0.0
        for t0, t1, r0, r1 in self._segments():
            if t1 <= t0:
                continue
            area = 0.5 * (r0 + r1) * (t1 - t0)
            if done + area >= n:
                rem, slope = n - done, (r1 - r0) / (t1 - t0)
                if abs(slope) < 1e-12:
                    x = rem / r0 if r0 > 0 else 0.0
                else:  # 0.5·slope·x² + r0·x = rem
                    x = (-r0 + math.sqrt(max(r0 * r0 + 2 * slope * rem, 0.0))) / slope
                return max(t0 + x, lo)
            done += area
        return math.inf

    def phase(self, t: float) -> Phase:
        if t < self.warmup_s + self.ramp_s:
            return Phase.warmup
        return super().phase(t)


@dataclass(frozen=True)
class SpikePattern(LoadPattern):
    """A base rate with a sudden step to ``spike_rps`` for ``spike_s`` seconds."""

    rps: float
    duration: float
    spike_rps: float
    spike_start_s: float
    spike_s: float
    warmup_s: float = 0.0
    cooldown_s: float = 0.0

    def rate(self, t: float) -> float:
        if not 0 <= t < self.duration:
            return 0.0
        in_spike = self.spike_start_s <= t < self.spike_start_s + self.spike_s
        return self.spike_rps if in_spike else self.rps

    def cumulative(self, t: float) -> float:
        t = min(max(t, 0.0), self.duration)
        spike = max(0.0, min(t, self.spike_start_s + self.spike_s) - self.spike_start_s)
        return self.rps * (t - spike) + self.spike_rps * spike


@dataclass(frozen=True)
class WavePattern(LoadPattern):
    """r(t) = rps · (1 + amplitude · sin(2πt / period)): the mean rate is ``rps``."""

    rps: float
    duration: float
    period_s: float
    amplitude: float = 0.5
    warmup_s: float = 0.0
    cooldown_s: float = 0.0

    def rate(self, t: float) -> float:
        if not 0 <= t < self.duration:
            return 0.0
        return self.rps * (1 + self.amplitude * math.sin(2 * math.pi * t / self.period_s))

    def cumulative(self, t: float) -> float:
        t = min(max(t, 0.0), self.duration)
        w = 2 * math.pi / self.period_s
        return self.rps * (t + self.amplitude / w * (1 - math.cos(w * t)))
