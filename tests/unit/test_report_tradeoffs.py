"""The Pareto front of a task's runs: what a user picks a budget from."""

from __future__ import annotations

from tasks.reports.runs import TradeoffPoint, mark_pareto


def _point(run_id: str, calls: int, score: float) -> TradeoffPoint:
    return TradeoffPoint(
        run_id=run_id, optimizer="mipro", lm="sim", simulated=True, lm_calls=calls,
        cost_usd=None, best_score=score,
    )  # fmt: skip


def test_a_run_is_on_the_front_unless_another_scores_as_high_for_fewer_calls() -> None:
    points = [
        _point("cheap", 5, 0.4),
        _point("best", 20, 0.6),
        _point("worse-same-cost", 20, 0.5),  # "best" scores higher for as many calls
        _point("dearer-and-worse", 40, 0.55),
        _point("twin-a", 10, 0.5),  # equal twins dominate neither each other
        _point("twin-b", 10, 0.5),
    ]
    mark_pareto(points)
    assert {p.run_id for p in points if p.pareto} == {"cheap", "best", "twin-a", "twin-b"}
