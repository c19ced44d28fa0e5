"""Fair A/B timing for the benchmarks: a discarded warm-up of every arm, then rounds that
run the arms in alternating order (A B, B A, A B, ...), so neither arm always runs first
(cold caches) or last (a machine that got busier). Figures are medians with min-max and n.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Samples:
    """The measured (not warm-up) runs of one arm: seconds and what each run returned."""

    seconds: list[float] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)


def round_order(names: Sequence[str], round_no: int) -> list[str]:
    """Round 0: A B C, round 1: C B A, round 2: A B C, ... (ABBA for two arms)."""
    return list(names) if round_no % 2 == 0 else list(reversed(names))


def interleaved(
    arms: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup_rounds: int = 1,
    on_run: Callable[[str, int, float, Any], None] | None = None,
    before_each: Callable[[], None] | None = None,
) -> dict[str, Samples]:
    """Run every arm `warmup_rounds + rounds` times in alternating order; keep the last
    `rounds`. `on_run(name, round_no, seconds, result)` sees every run (round_no < 0 for
    warm-ups), so a long benchmark can print as it goes. `before_each()` runs untimed
    before every run of every arm (the same start for each, e.g. a collected heap)."""
    if rounds < 1:
        raise ValueError("rounds must be >= 1")
    names = list(arms)
    samples = {name: Samples() for name in names}
    for i in range(warmup_rounds + rounds):
        round_no = i - warmup_rounds
        # Warm-ups alternate too, so the last warm-up does not always favour one arm.
        for name in round_order(names, i):
            if before_each is not None:
                before_each()
            t0 = time.perf_counter()
            result = arms[name]()
            seconds = time.perf_counter() - t0
            if on_run is not None:
                on_run(name, round_no, seconds, result)
            if round_no >= 0:
                samples[name].seconds.append(seconds)
                samples[name].results.append(result)
    return samples


def spread(values: Sequence[float], digits: int = 4) -> dict[str, float | int]:
    """Median with min, max and n."""
    if not values:
        raise ValueError("no values")
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def paired_ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """b_i / a_i for the runs of one round each (the same machine state, as near as can be)."""
    return [y / x for x, y in zip(a, b, strict=True)]


def fmt(s: Mapping[str, float | int], unit: str = "", digits: int = 3) -> str:
    return (
        f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}-{s['max']:.{digits}f}, n={s['n']})"
    )


def bootstrap_mean_diff(
    a: Sequence[float], b: Sequence[float], *, iterations: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of b - a over paired items with a 95 % percentile-bootstrap interval."""
    if len(a) != len(b) or not a:
        raise ValueError("paired samples of equal, non-zero length needed")
    diffs = [y - x for x, y in zip(a, b, strict=True)]
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(iterations))
    lo = means[int(0.025 * iterations)]
    hi = means[int(0.975 * iterations) - 1]
    return statistics.fmean(diffs), lo, hi
