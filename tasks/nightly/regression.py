"""Benchmark regression detection, asv-style: a metric regressed only when it changed by
more than a ratio (default 1.1) in its worse direction AND a Mann-Whitney U test on the
raw samples says the change is not noise (p < 0.05 by default).

Each metric is compared with its own history on the same environment fingerprint (the
caller selects that history): the baseline is the last `lookback` runs, their samples
pooled. Plain functions and pydantic models only: no Prefect, no database.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, Field

Direction = Literal["lower", "higher"]  # which way is better
Status = Literal["regression", "improvement", "unchanged", "no_history", "insufficient_samples"]

# --- Mann-Whitney U ---------------------------------------------------------------------


class MannWhitneyResult(BaseModel):
    u: float  # the statistic of the first sample (two-sided: the larger of U1, U2)
    p_value: float
    method: Literal["exact", "asymptotic"]


def _ranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """Average ranks (1-based) and the sizes of the tie groups."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    ties: list[int] = []
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        ties.append(j - i + 1)
        i = j + 1
    return ranks, ties


@lru_cache(maxsize=256)
def _u_counts(n1: int, n2: int) -> tuple[int, ...]:
    """Number of arrangements giving each U in 0..n1*n2 (no ties): the exact null law.

    Recurrence f(n1, n2, u) = f(n1 - 1, n2, u - n2) + f(n1, n2 - 1, u).
    """
    if n1 == 0 or n2 == 0:
        return (1,)
    a = _u_counts(n1 - 1, n2)
    b = _u_counts(n1, n2 - 1)
    out = [0] * (n1 * n2 + 1)
    for u, c in enumerate(a):
        out[u + n2] += c
    for u, c in enumerate(b):
        out[u] += c
    return tuple(out)


def mann_whitney_u(
    x: Sequence[float],
    y: Sequence[float],
    alternative: Literal["two-sided", "greater", "less"] = "two-sided",
) -> MannWhitneyResult:
    """Mann-Whitney U test, as scipy.stats.mannwhitneyu(method="auto") computes it.

    Exact null distribution when either sample has at most 8 values and there are no
    ties; otherwise the normal approximation with tie correction and continuity
    correction. "greater": x tends to be larger than y.
    """
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        raise ValueError("mann_whitney_u needs at least one value in each sample")
    ranks, ties = _ranks([*x, *y])
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    u2 = n1 * n2 - u1
    u = {"two-sided": max(u1, u2), "greater": u1, "less": u2}[alternative]
    has_ties = any(t > 1 for t in ties)
    if (n1 > 8 and n2 > 8) or has_ties:
        n = n1 + n2
        tie_term = sum(t**3 - t for t in ties)
        var = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1)))
        if var <= 0:  # every value equal: no evidence of any difference
            return MannWhitneyResult(u=u, p_value=1.0, method="asymptotic")
        z = (u - n1 * n2 / 2 - 0.5) / math.sqrt(var)
        p = 0.5 * math.erfc(z / math.sqrt(2))
        method: Literal["exact", "asymptotic"] = "asymptotic"
    else:
        counts = _u_counts(min(n1, n2), max(n1, n2))
        total = sum(counts)
        p = sum(counts[math.ceil(u - 1e-9) :]) / total  # P(U >= u)
        method = "exact"
    if alternative == "two-sided":
        p *= 2
    return MannWhitneyResult(u=u, p_value=min(1.0, max(0.0, p)), method=method)


# --- direction ---------------------------------------------------------------------------

_HIGHER_SUFFIXES = (
    "speedup_vs_cpu",
    "achieved_rps",
    "rps",
    "throughput",
    "per_s",
    "score",
    "accuracy",
    "gbps",
    "tflops",
    "pct_peak",
    "gain",
)
_HIGHER_UNITS = {"GB/s", "TFLOP/s", "req/s", "calls/s", "it/s", "score", "%"}


def direction_for(metric: str, unit: str, params: dict[str, Any] | None = None) -> Direction:
    """Which way is better. An explicit `params["direction"]` wins; then the metric's last
    name part (`ratio_vs_torch` is ours/torch time: lower; `speedup_vs_cpu`: higher);
    then the unit (times, bytes, errors: lower; rates, scores, %: higher)."""
    explicit = (params or {}).get("direction")
    if explicit in ("lower", "higher"):
        return explicit
    last = metric.rsplit(".", 1)[-1]
    if last.endswith(_HIGHER_SUFFIXES) or metric.endswith(_HIGHER_SUFFIXES):
        return "higher"
    if unit in _HIGHER_UNITS or unit.endswith("/s"):
        return "higher"
    return "lower"


# --- comparison --------------------------------------------------------------------------


class RegressionSettings(BaseModel):
    ratio_threshold: float = Field(1.1, gt=1.0, description="Flag changes beyond this factor.")
    p_threshold: float = Field(0.05, gt=0.0, lt=1.0, description="U-test significance level.")
    min_samples: int = Field(3, ge=2, description="Per side, for the U test to be tried.")
    lookback: int = Field(5, ge=1, description="Earlier runs pooled as the baseline.")


class Measurement(BaseModel):
    """One run's figure of one metric (a BenchmarkResult row, or the current one)."""

    metric: str
    value: float
    unit: str = ""
    samples: list[float] | None = None
    params: dict[str, Any] | None = None
    session_id: str | None = None
    created_at: datetime | None = None

    def raw(self) -> list[float]:
        return [float(s) for s in self.samples] if self.samples else [self.value]

    @classmethod
    def from_row(cls, row: Any) -> Measurement:
        """From a stored `BenchmarkResult` row, or anything with the same fields."""
        return cls(
            metric=row.metric,
            value=row.value,
            unit=row.unit,
            samples=row.samples,
            params=row.params,
            session_id=row.session_id,
            created_at=getattr(row, "created_at", None),
        )


class MetricVerdict(BaseModel):
    metric: str
    unit: str
    direction: Direction
    status: Status
    current: float
    baseline: float | None = None  # median of the baseline runs' values
    ratio: float | None = None  # > 1: worse by that factor (direction-aware)
    change_pct: float | None = None  # signed raw change of the value, current vs baseline
    p_value: float | None = None
    test: str | None = None  # exact / asymptotic
    n_current: int = 0
    n_baseline: int = 0
    history_runs: int = 0
    message: str = ""

    @property
    def regression(self) -> bool:
        return self.status == "regression"


def _worse_ratio(current: float, baseline: float, direction: Direction) -> float:
    """current vs baseline as a factor > 1 when worse, < 1 when better."""
    worse, better = (current, baseline) if direction == "lower" else (baseline, current)
    if better == 0:
        return 1.0 if worse == 0 else math.inf
    ratio = worse / better
    return ratio if ratio > 0 else math.inf  # sign flip (a negative figure): call it worse


def compare(
    current: Measurement,
    history: Sequence[Measurement],
    settings: RegressionSettings | None = None,
    *,
    direction: Direction | None = None,
) -> MetricVerdict:
    """Compare one metric's current run with its history (newest first or any order; only
    the `lookback` newest by `created_at`, when given, are used)."""
    cfg = settings or RegressionSettings()
    way = direction or direction_for(current.metric, current.unit, current.params)
    verdict = MetricVerdict(
        metric=current.metric,
        unit=current.unit,
        direction=way,
        status="no_history",
        current=current.value,
        n_current=len(current.raw()),
    )
    if not history:
        verdict.message = "first run on this environment: nothing to compare with"
        return verdict
    ordered = sorted(history, key=_age_key, reverse=True)[: cfg.lookback]
    baseline = statistics.median(m.value for m in ordered)
    pooled = [s for m in ordered for s in m.raw()]
    ratio = _worse_ratio(current.value, baseline, way)
    verdict.baseline = baseline
    verdict.ratio = ratio
    verdict.change_pct = (
        (current.value / baseline - 1) * 100 if baseline else (0.0 if current.value == 0 else None)
    )
    verdict.n_baseline = len(pooled)
    verdict.history_runs = len(ordered)
    beyond = ratio > cfg.ratio_threshold or ratio < 1 / cfg.ratio_threshold
    cur = current.raw()
    if len(cur) < cfg.min_samples or len(pooled) < cfg.min_samples:
        # Only a possible regression is worth saying that it could not be tested.
        verdict.status = "insufficient_samples" if ratio > cfg.ratio_threshold else "unchanged"
        verdict.message = (
            f"{_fmt_ratio(ratio, way)} with {len(cur)} vs {len(pooled)} samples: too few for "
            f"a U test (need {cfg.min_samples} a side); not flagged"
        )
        return verdict
    test = mann_whitney_u(cur, pooled)
    verdict.p_value, verdict.test = test.p_value, test.method
    significant = test.p_value < cfg.p_threshold
    if beyond and significant:
        verdict.status = "regression" if ratio > 1 else "improvement"
    else:
        verdict.status = "unchanged"
    why = (
        "beyond the ratio threshold and significant"
        if beyond and significant
        else ("within the ratio threshold" if not beyond else "not significant (noise)")
    )
    verdict.message = f"{_fmt_ratio(ratio, way)}, U-test p={test.p_value:.3g}: {why}"
    return verdict


def _age_key(m: Measurement) -> float:
    """Newest last; SQLite gives naive UTC, Postgres aware times; undated counts as oldest."""
    t = m.created_at
    if t is None:
        return -math.inf
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()


def _fmt_ratio(ratio: float, way: Direction) -> str:
    if math.isinf(ratio):
        return "worse from a zero baseline"
    word = "worse" if ratio > 1 else "better"
    factor = ratio if ratio >= 1 else 1 / ratio
    return f"{factor:.3g}x {word} ({'lower' if way == 'lower' else 'higher'} is better)"


class RegressionReport(BaseModel):
    settings: RegressionSettings
    verdicts: list[MetricVerdict]

    @property
    def regressions(self) -> list[MetricVerdict]:
        return [v for v in self.verdicts if v.status == "regression"]

    @property
    def improvements(self) -> list[MetricVerdict]:
        return [v for v in self.verdicts if v.status == "improvement"]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in self.verdicts:
            out[v.status] = out.get(v.status, 0) + 1
        return out

    def to_markdown(self, *, title: str = "Benchmark regressions") -> str:
        s = self.settings
        lines = [
            f"## {title}",
            "",
            f"A regression is a change beyond {s.ratio_threshold:g}x in the worse direction "
            f"that a Mann-Whitney U test on the raw samples confirms (p < {s.p_threshold:g}), "
            f"against the last {s.lookback} runs on the same environment fingerprint.",
            "",
            ", ".join(f"{k}: {n}" for k, n in sorted(self.counts().items())) or "no metrics",
            "",
        ]
        tested = [v for v in self.verdicts if v.status in ("regression", "improvement")]
        shown = sorted(tested, key=lambda v: (v.status != "regression", v.metric))
        lines += [
            "| status | metric | current | baseline | ratio (>1 worse) | p | samples |",
            "|---|---|---|---|---|---|---|",
        ]
        for v in shown:
            mark = "**REGRESSION**" if v.regression else v.status.replace("_", " ")
            lines.append(
                f"| {mark} | `{v.metric}` | {_num(v.current)} {v.unit} | "
                f"{_num(v.baseline)} | {_num(v.ratio)} | {_num(v.p_value)} | "
                f"{v.n_current} vs {v.n_baseline} |"
            )
        if not shown:
            lines.append("| - | no significant change | | | | | |")
        untested = [v for v in self.verdicts if v.status == "insufficient_samples"]
        if untested:
            worse = ", ".join(f"`{v.metric}` {_num(v.ratio)}x" for v in untested)
            lines += ["", f"Worse beyond the ratio but too few raw samples to test: {worse}."]
        hidden = len(self.verdicts) - len(shown) - len(untested)
        if hidden:
            lines += ["", f"{hidden} other metric(s) unchanged or new."]
        return "\n".join(lines)


def _num(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.4g}"


def detect_regressions(
    current: Iterable[Measurement],
    history: Mapping[str, Sequence[Measurement]],
    settings: RegressionSettings | None = None,
) -> RegressionReport:
    """Verdicts for every current measurement against ``history[metric]``."""
    cfg = settings or RegressionSettings()
    verdicts = [compare(m, history.get(m.metric, ()), cfg) for m in current]
    return RegressionReport(settings=cfg, verdicts=verdicts)
