"""k6-style thresholds: ``p95<500ms``, ``p(99)<=1s``, ``error_rate<0.05``, ``rps>=95``.

Grammar: ``[response.|service.]METRIC OP VALUE[UNIT]``.

- latency metrics (response time unless prefixed ``service.``): ``pN`` / ``p(N)`` (any
  percentile, e.g. ``p99.9``), ``med``, ``avg``/``mean``, ``min``, ``max``; units ``us``,
  ``ms`` (the default), ``s``;
- rates (fractions, or with ``%``): ``error_rate`` (k6's ``rate``), ``drop_rate``;
- ``rps``/``throughput`` (completions per second), ``errors``, ``dropped``, ``requests``.

Thresholds are checked against the steady state (the whole run when the pattern has no
warm-up or cool-down). A breach fails the run.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Sequence
from typing import Literal

from hdrh.histogram import HdrHistogram
from pydantic import BaseModel

from tasks.load.histograms import value_at_ms
from tasks.load.results import PhaseStats


class ThresholdError(ValueError):
    """An expression that does not parse; the message says what is wrong."""


_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_PATTERN = re.compile(
    r"""^\s*(?:(?P<source>response|service)\.)?
    (?P<metric>p\(\s*[0-9.]+\s*\)|p[0-9.]+|[a-z_]+)
    \s*(?P<op><=|>=|==|!=|<|>)\s*
    (?P<value>[0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*
    (?P<unit>us|µs|ms|s|%)?\s*$""",
    re.VERBOSE | re.IGNORECASE,
)
_LATENCY = {"med": 50.0, "avg": None, "mean": None, "min": None, "max": None}
_RATES = {"error_rate": "error_rate", "rate": "error_rate", "drop_rate": "drop_rate"}
_COUNTS = {
    "rps": "achieved_rps",
    "throughput": "achieved_rps",
    "errors": "errors",
    "dropped": "dropped",
    "requests": "requests",
}
_UNIT_MS = {None: 1.0, "us": 0.001, "µs": 0.001, "ms": 1.0, "s": 1000.0}
EXAMPLE = "e.g. p95<500ms, p(99)<=1s, error_rate<0.05, rps>=95, max<2000"


class Threshold(BaseModel):
    expr: str
    kind: Literal["latency", "rate", "count"]
    metric: str  # normalized: p95, p99.9, mean, min, max, error_rate, achieved_rps, ...
    source: Literal["response", "service"] = "response"
    op: str
    value: float  # ms for latency, a fraction for rates

    def describe(self) -> str:
        unit = " ms" if self.kind == "latency" else ""
        prefix = "service " if self.source == "service" else ""
        return f"{prefix}{self.metric} {self.op} {self.value:g}{unit}"


class ThresholdResult(BaseModel):
    expr: str
    metric: str
    op: str
    limit: float
    observed: float | None
    passed: bool


def parse_threshold(expr: str) -> Threshold:
    m = _PATTERN.match(expr or "")
    if m is None:
        raise ThresholdError(
            f"cannot parse threshold {expr!r}: expected METRIC OP VALUE, {EXAMPLE}"
        )
    metric = re.sub(r"\s+", "", m["metric"].lower())
    unit = m["unit"].lower() if m["unit"] else None
    value = float(m["value"])
    source = (m["source"] or "response").lower()
    percentile = re.fullmatch(r"p\(?([0-9.]+)\)?", metric)
    if percentile or metric in _LATENCY:
        if percentile:
            try:
                q = float(percentile[1])
            except ValueError:
                raise ThresholdError(f"threshold {expr!r}: bad percentile {metric!r}") from None
            if not 0 < q <= 100:
                raise ThresholdError(f"threshold {expr!r}: a percentile must be in (0, 100]")
            metric = f"p{q:g}"
        elif metric == "med":
            metric = "p50"
        elif metric == "avg":
            metric = "mean"
        if unit == "%":
            raise ThresholdError(f"threshold {expr!r}: a latency takes us, ms or s, not %")
        return Threshold(
            expr=expr,
            kind="latency",
            metric=metric,
            source=source,
            op=m["op"],
            value=value * _UNIT_MS[unit],
        )
    if m["source"]:
        raise ThresholdError(f"threshold {expr!r}: '{source}.' applies to latencies only")
    if metric in _RATES:
        if unit not in (None, "%"):
            raise ThresholdError(f"threshold {expr!r}: {metric} is a fraction (or %), not {unit}")
        if unit == "%":
            value /= 100
        if not 0 <= value <= 1:
            raise ThresholdError(f"threshold {expr!r}: {metric} must be between 0 and 1 (or %)")
        return Threshold(expr=expr, kind="rate", metric=_RATES[metric], op=m["op"], value=value)
    if metric in _COUNTS:
        if unit is not None:
            raise ThresholdError(f"threshold {expr!r}: {metric} takes no unit")
        return Threshold(expr=expr, kind="count", metric=_COUNTS[metric], op=m["op"], value=value)
    known = "pN, p(N), med, avg, mean, min, max, " + ", ".join([*_RATES, *_COUNTS])
    raise ThresholdError(f"threshold {expr!r}: unknown metric {metric!r} (known: {known})")


def parse_thresholds(exprs: Sequence[str]) -> list[Threshold]:
    return [parse_threshold(e) for e in exprs]


def observe(
    threshold: Threshold, stats: PhaseStats, hists: dict[str, HdrHistogram]
) -> float | None:
    if threshold.kind == "latency":
        hist = hists.get(threshold.source)
        summary = stats.response if threshold.source == "response" else stats.service
        if threshold.metric == "mean":
            return summary.mean_ms
        if threshold.metric == "min":
            return summary.min_ms
        if threshold.metric == "max":
            return summary.max_ms
        return value_at_ms(hist, float(threshold.metric[1:]))
    return float(getattr(stats, threshold.metric))


def evaluate(
    thresholds: Sequence[Threshold], stats: PhaseStats, hists: dict[str, HdrHistogram]
) -> list[ThresholdResult]:
    """Check each threshold; a latency threshold with no samples at all is a breach."""
    results = []
    for t in thresholds:
        observed = observe(t, stats, hists)
        passed = observed is not None and _OPS[t.op](observed, t.value)
        results.append(
            ThresholdResult(
                expr=t.expr,
                metric=t.metric,
                op=t.op,
                limit=t.value,
                observed=observed,
                passed=passed,
            )
        )
    return results
