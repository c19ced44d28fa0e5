"""Regression detection on recorded series: ratio AND Mann-Whitney U, direction-aware."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from tasks.nightly.regression import (
    Measurement,
    RegressionSettings,
    compare,
    detect_regressions,
    direction_for,
    mann_whitney_u,
)

T0 = datetime(2026, 1, 1, 2, 0, tzinfo=UTC)


def _series(
    metric: str,
    center: float,
    *,
    runs: int,
    reps: int = 7,
    noise: float = 0.05,
    seed: int = 0,
    unit: str = "ms",
) -> list[Measurement]:
    """`runs` nightly results, each `reps` noisy repetitions (log-normal-ish noise)."""
    rng = random.Random(seed)
    out = []
    for i in range(runs):
        samples = [center * (1 + rng.gauss(0, noise)) for _ in range(reps)]
        out.append(
            Measurement(
                metric=metric,
                value=sorted(samples)[reps // 2],
                unit=unit,
                samples=samples,
                session_id=f"s{i}",
                created_at=T0 + timedelta(days=i),
            )
        )
    return out


def test_a_real_20_percent_slowdown_is_flagged() -> None:
    history = _series("cycle.sim.wall_s", 10.0, runs=5, seed=1)
    (current,) = _series("cycle.sim.wall_s", 12.0, runs=1, seed=2)
    verdict = compare(current, history)
    assert verdict.status == "regression", verdict.message
    assert verdict.direction == "lower"
    assert 1.1 < verdict.ratio < 1.35
    assert verdict.p_value is not None and verdict.p_value < 0.05
    assert verdict.n_current == 7 and verdict.n_baseline == 35 and verdict.history_runs == 5


def test_noise_alone_is_not_flagged() -> None:
    history = _series("gpu.matmul.ms", 5.0, runs=5, seed=3, noise=0.08)
    for seed in range(10, 30):
        (current,) = _series("gpu.matmul.ms", 5.0, runs=1, seed=seed, noise=0.08)
        verdict = compare(current, history)
        assert verdict.status == "unchanged", (seed, verdict.message)


def test_a_big_but_insignificant_change_is_not_flagged() -> None:
    """Beyond the ratio but inside very wide noise: the U test says it may be chance."""
    history = _series("load.high.p99_ms", 10.0, runs=1, reps=4, noise=0.6, seed=5)
    current = Measurement(
        metric="load.high.p99_ms", value=12.0, unit="ms", samples=[4.0, 19.0, 12.0, 8.0]
    )
    verdict = compare(current, history)
    assert verdict.ratio is not None and verdict.ratio > 1.1
    assert verdict.status == "unchanged" and "not significant" in verdict.message


def test_a_significant_change_within_the_ratio_is_not_flagged() -> None:
    """A tiny, consistent 3 % slowdown: significant, but below the 1.1 threshold."""
    history = _series("gpu.normalize.ms", 1.0, runs=5, noise=0.002, seed=6)
    (current,) = _series("gpu.normalize.ms", 1.03, runs=1, noise=0.002, seed=7)
    verdict = compare(current, history)
    assert verdict.p_value is not None and verdict.p_value < 0.05
    assert verdict.status == "unchanged" and "within the ratio" in verdict.message


def test_a_speedup_is_not_a_regression() -> None:
    history = _series("cycle.sim.wall_s", 10.0, runs=5, seed=8)
    (current,) = _series("cycle.sim.wall_s", 7.0, runs=1, seed=9)
    verdict = compare(current, history)
    assert verdict.status == "improvement" and not verdict.regression
    assert verdict.ratio is not None and verdict.ratio < 1


def test_direction_higher_is_better_for_throughput_and_scores() -> None:
    history = _series("load.high.achieved_rps", 100.0, runs=5, seed=10, unit="req/s")
    (slower,) = _series("load.high.achieved_rps", 75.0, runs=1, seed=11, unit="req/s")
    (faster,) = _series("load.high.achieved_rps", 130.0, runs=1, seed=12, unit="req/s")
    assert compare(slower, history).status == "regression"
    assert compare(faster, history).status == "improvement"
    scores = _series("cycle.sim.intent.mipro.best_score", 0.8, runs=5, seed=13, unit="score")
    (worse,) = _series("cycle.sim.intent.mipro.best_score", 0.6, runs=1, seed=14, unit="score")
    assert compare(worse, scores).status == "regression"


@pytest.mark.parametrize(
    ("metric", "unit", "expected"),
    [
        ("gpu.topk_cosine.fp16.64x10000x384.cpu.ms", "ms", "lower"),
        ("gpu.topk_cosine.fp16.64x10000x384.cpu.ratio_vs_torch", "x", "lower"),
        ("gpu.topk_cosine.fp16.64x10000x384.cuda.speedup_vs_cpu", "x", "higher"),
        ("gpu.peak.copy_gbps.cpu", "GB/s", "higher"),
        ("gpu.matmul.fp32.1024x1024x1024.cpu.pct_peak", "%", "higher"),
        ("gpu.matmul.fp32.1024x1024x1024.cpu.extra_bytes", "bytes", "lower"),
        ("gpu.matmul.fp32.1024x1024x1024.cpu.max_abs_err", "abs", "lower"),
        ("load.low.error_rate", "ratio", "lower"),
        ("cycle.sim.intent.mipro.lm_calls_per_s", "calls/s", "higher"),
    ],
)
def test_direction_for(metric: str, unit: str, expected: str) -> None:
    assert direction_for(metric, unit) == expected


def test_explicit_direction_wins() -> None:
    assert direction_for("custom.thing", "ms", {"direction": "higher"}) == "higher"


def test_too_few_samples_is_reported_not_flagged() -> None:
    """One value a run (no raw samples) cannot be U-tested: a big change is reported as
    `insufficient_samples`, never as a regression; a small one is `unchanged`."""
    history = [
        Measurement(metric="gpu.x.gbps", value=v, unit="GB/s", created_at=T0 + timedelta(days=i))
        for i, v in enumerate([10.0, 10.2])
    ]
    dropped = Measurement(metric="gpu.x.gbps", value=5.0, unit="GB/s")
    verdict = compare(dropped, history)
    assert verdict.status == "insufficient_samples" and not verdict.regression
    assert "too few" in verdict.message and verdict.p_value is None
    steady = Measurement(metric="gpu.x.gbps", value=10.1, unit="GB/s")
    assert compare(steady, history).status == "unchanged"
    faster = Measurement(metric="gpu.x.gbps", value=20.0, unit="GB/s")
    assert compare(faster, history).status == "unchanged"  # untestable, and not worse


def test_no_history() -> None:
    (current,) = _series("cycle.sim.wall_s", 10.0, runs=1)
    verdict = compare(current, [])
    assert verdict.status == "no_history" and verdict.baseline is None


def test_lookback_uses_only_the_newest_runs() -> None:
    """A slow period long ago is outside the lookback window: today's figure is compared
    with the recent fast runs, and today's slowdown is found."""
    old = _series("m.ms", 20.0, runs=5, seed=20)
    recent = _series("m.ms", 10.0, runs=3, seed=21)
    for i, m in enumerate(recent):
        m.created_at = T0 + timedelta(days=30 + i)
    (current,) = _series("m.ms", 13.0, runs=1, seed=22)
    verdict = compare(current, old + recent, RegressionSettings(lookback=3))
    assert verdict.history_runs == 3 and verdict.status == "regression"
    assert verdict.baseline == pytest.approx(10.0, rel=0.1)


def test_thresholds_are_configurable() -> None:
    history = _series("m.ms", 10.0, runs=5, seed=30)
    (current,) = _series("m.ms", 12.0, runs=1, seed=31)
    assert compare(current, history, RegressionSettings(ratio_threshold=1.5)).status == "unchanged"
    strict = compare(current, history, RegressionSettings(p_threshold=1e-12))
    assert strict.status == "unchanged"


def test_zero_baseline() -> None:
    history = [
        Measurement(metric="load.low.error_rate", value=0.0, unit="ratio", samples=[0.0] * 5)
    ]
    errors = Measurement(
        metric="load.low.error_rate", value=0.5, unit="ratio", samples=[0.4, 0.5, 0.6, 0.5, 0.5]
    )
    verdict = compare(errors, history)
    assert verdict.status == "regression" and verdict.ratio == float("inf")
    clean = Measurement(metric="load.low.error_rate", value=0.0, unit="ratio", samples=[0.0] * 5)
    assert compare(clean, history).status == "unchanged"


def test_detect_regressions_report_and_markdown() -> None:
    slow_hist = _series("a.wall_s", 10.0, runs=5, seed=40, unit="s")
    ok_hist = _series("b.wall_s", 10.0, runs=5, seed=41, unit="s")
    (slow,) = _series("a.wall_s", 13.0, runs=1, seed=42, unit="s")
    (ok,) = _series("b.wall_s", 10.0, runs=1, seed=43, unit="s")
    report = detect_regressions([slow, ok], {"a.wall_s": slow_hist, "b.wall_s": ok_hist})
    assert [v.metric for v in report.regressions] == ["a.wall_s"]
    assert report.counts() == {"regression": 1, "unchanged": 1}
    md = report.to_markdown()
    assert (
        "**REGRESSION**" in md and "`a.wall_s`" in md and "1 other metric(s) unchanged or new" in md
    )


# --- the U test itself ------------------------------------------------------------------------


def test_mann_whitney_exact_small_samples() -> None:
    # Complete separation of 4 vs 4: P(U >= 16) = 1 / C(8, 4) = 1/70, two-sided 2/70.
    result = mann_whitney_u([5, 6, 7, 8], [1, 2, 3, 4])
    assert result.method == "exact" and result.u == 16
    assert result.p_value == pytest.approx(2 / 70)
    assert mann_whitney_u([5, 6, 7, 8], [1, 2, 3, 4], "greater").p_value == pytest.approx(1 / 70)
    assert mann_whitney_u([5, 6, 7, 8], [1, 2, 3, 4], "less").p_value == pytest.approx(1.0)


def test_mann_whitney_all_ties() -> None:
    result = mann_whitney_u([1.0] * 5, [1.0] * 6)
    assert result.p_value == 1.0 and result.method == "asymptotic"


def test_mann_whitney_matches_scipy() -> None:
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(7)
    for _ in range(300):
        n1, n2 = rng.randint(1, 15), rng.randint(1, 15)
        rounded = rng.random() < 0.5  # ties
        x = [round(rng.gauss(0.7, 1), 1 if rounded else 6) for _ in range(n1)]
        y = [round(rng.gauss(0, 1), 1 if rounded else 6) for _ in range(n2)]
        for alternative in ("two-sided", "greater", "less"):
            ref = scipy_stats.mannwhitneyu(x, y, alternative=alternative)
            ours = mann_whitney_u(x, y, alternative)
            expected = 1.0 if ref.pvalue != ref.pvalue else ref.pvalue  # all-tie NaN
            assert ours.p_value == pytest.approx(expected, abs=1e-9)
