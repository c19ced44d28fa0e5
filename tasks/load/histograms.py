"""HDR histograms: one layout everywhere, exact merging, compact encodings, percentiles.

Latencies are recorded in integer microseconds, 1 us .. 1 h, 3 significant digits
(0.1 % relative error). Totals are always made by merging histograms (``add``), never by
averaging per-window percentiles, which is meaningless for tails.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from hdrh.histogram import HdrHistogram
from pydantic import BaseModel

LOWEST_US = 1
HIGHEST_US = 3_600_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES: tuple[float, ...] = (50.0, 90.0, 95.0, 99.0, 99.9)


def new_histogram() -> HdrHistogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)


def record_seconds(hist: HdrHistogram, seconds: float) -> None:
    """Record a duration; values outside the range are clamped, never lost."""
    hist.record_value(min(max(round(seconds * 1e6), LOWEST_US), HIGHEST_US))


def merge(histograms: Iterable[HdrHistogram | None]) -> HdrHistogram:
    total = new_histogram()
    for h in histograms:
        if h is not None and h.get_total_count():
            total.add(h)
    return total


def encode(hist: HdrHistogram) -> str:
    """HdrHistogram's compressed base64 form (what the database stores)."""
    return hist.encode().decode("ascii")


def decode(encoded: str | bytes | None) -> HdrHistogram | None:
    if not encoded:
        return None
    data = encoded.encode("ascii") if isinstance(encoded, str) else encoded
    # Decode into our own layout so merges of decoded histograms stay exact.
    hist = new_histogram()
    hist.decode_and_add(data)
    return hist


class Percentiles(BaseModel):
    """Latency distribution in milliseconds. Empty histograms give ``count == 0`` and Nones."""

    count: int = 0
    min_ms: float | None = None
    mean_ms: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None

    def value(self, q: float) -> float | None:
        """The percentile ``q`` if it is one of the stored ones."""
        key = {50.0: "p50_ms", 90.0: "p90_ms", 95.0: "p95_ms", 99.0: "p99_ms", 99.9: "p999_ms"}
        return getattr(self, key[q]) if q in key else None


def _nonzero(hist: HdrHistogram) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lowest value, equivalent-range size, count) of each recorded bucket, vectorized.

    Mirrors hdrh's ``get_value_from_index``; the library walks all 23,552 buckets in pure
    Python for every percentile, mean or max query (tens of ms each), this does not.
    """
    counts = np.ctypeslib.as_array(hist.counts)[: hist.counts_len]
    idx = np.flatnonzero(counts).astype(np.int64)
    half, magnitude = hist.sub_bucket_half_count, hist.sub_bucket_half_count_magnitude
    bucket = (idx >> magnitude) - 1
    sub = (idx & (half - 1)) + half
    low = bucket < 0
    sub[low] -= half
    bucket[low] = 0
    shift = bucket + hist.unit_magnitude
    return sub << shift, np.left_shift(1, shift), counts[idx].astype(np.int64)


def _values_at(hist: HdrHistogram, qs: list[float]) -> dict[float, int]:
    """hdrh's ``get_value_at_percentile``: the highest equivalent value of the first bucket
    whose cumulative count reaches ``round(q% of total)`` (at least 1)."""
    values, sizes, counts = _nonzero(hist)
    cum = np.cumsum(counts)
    total = int(cum[-1])
    out = {}
    for q in qs:
        target = max(int(min(q, 100.0) * total / 100 + 0.5), 1)
        pos = min(int(np.searchsorted(cum, target)), len(values) - 1)
        out[q] = int(values[pos] + sizes[pos] - 1)
    return out


def _mean(hist: HdrHistogram) -> float:
    """hdrh's mean: each bucket counted at its median equivalent value."""
    values, sizes, counts = _nonzero(hist)
    return float(np.dot((values + (sizes >> 1)).astype(np.float64), counts) / counts.sum())


def percentiles(hist: HdrHistogram | None) -> Percentiles:
    if hist is None or hist.get_total_count() == 0:
        return Percentiles()
    ms = {q: v / 1000.0 for q, v in _values_at(hist, list(PERCENTILES)).items()}
    return Percentiles(
        count=hist.get_total_count(),
        min_ms=hist.get_min_value() / 1000.0,
        mean_ms=_mean(hist) / 1000.0,
        p50_ms=ms[50.0],
        p90_ms=ms[90.0],
        p95_ms=ms[95.0],
        p99_ms=ms[99.0],
        p999_ms=ms[99.9],
        max_ms=hist.get_max_value() / 1000.0,
    )


def value_at_ms(hist: HdrHistogram | None, q: float) -> float | None:
    """Any percentile ``q`` in milliseconds (for thresholds like ``p(99.99)``)."""
    if hist is None or hist.get_total_count() == 0:
        return None
    return _values_at(hist, [q])[q] / 1000.0
