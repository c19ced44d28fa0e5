"""The cycle timer, the budget guard and usage accounting, on a fake clock and the sim LM."""

from __future__ import annotations

import threading

import dspy
import pytest

from tasks.cycle.budget import (
    BudgetTooSmallError,
    CycleGuard,
    CycleStopped,
    StopReason,
    cancel_run,
    check_budgets,
    control_for,
    release_control,
)
from tasks.cycle.spec import CycleSpec, LMSpec
from tasks.cycle.timer import CycleTimer
from tasks.lm.providers import build_lm
from tasks.lm.usage import CycleUsage
from tasks.optimizers.base import IterationEvent, five_arg_metric
from tasks.programs import get_task


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- CycleTimer ---------------------------------------------------------------------------


def test_timer_defaults_match_the_seed() -> None:
    timer = CycleTimer()
    assert timer.target_s == 7200.0 and timer.warning_at == 0.8


def test_elapsed_throughput_eta_and_remaining_from_iterations() -> None:
    clock = FakeClock()
    timer = CycleTimer(target_s=7200, clock=clock)
    timer.start()
    clock.advance(10)  # prepare + baseline
    timer.begin_iterations(total=100)
    clock.advance(50)
    timer.update(25)
    stats = timer.stats()
    assert stats.elapsed_s == pytest.approx(60)
    assert stats.iterations == 25 and stats.total_iterations == 100
    assert stats.throughput == pytest.approx(0.5)  # 25 iterations in the 50 s since they began
    assert stats.progress == pytest.approx(0.25)
    assert stats.eta_s == pytest.approx(150)  # 75 left at 0.5/s
    assert stats.time_remaining_s == pytest.approx(7140)
    assert stats.expected_finish_s == pytest.approx(150)
    assert stats.budget_fraction == pytest.approx(60 / 7200)
    assert not stats.approaching_limit and not stats.exceeded


def test_pace_excludes_setup_before_the_first_iteration() -> None:
    """MIPROv2 bootstraps and proposes before its first trial: that is not the pace."""
    clock = FakeClock()
    timer = CycleTimer(target_s=7200, clock=clock)
    timer.start()
    timer.begin_iterations(total=21)
    clock.advance(100)  # setup, then the first trial ends
    timer.update(1)
    assert timer.stats().eta_s == pytest.approx(2000)  # one point: 100 s per iteration
    clock.advance(20)
    timer.update(11)  # 10 iterations in 20 s
    stats = timer.stats()
    assert stats.throughput == pytest.approx(0.5)
    assert stats.eta_s == pytest.approx(20)


def test_eta_from_budget_progress_and_extrapolated_total() -> None:
    """GEPA reports progress as metric calls used, not a planned iteration count."""
    clock = FakeClock()
    timer = CycleTimer(target_s=100, clock=clock)
    timer.start()
    timer.begin_iterations(total=None)
    clock.advance(20)
    timer.record(IterationEvent(8, None, best_score=0.6, progress=0.4))
    stats = timer.stats()
    assert stats.eta_s == pytest.approx(30)  # 20 s for 40 %: 30 s for the other 60 %
    assert stats.total_iterations == 20  # 8 iterations per 40 %
    assert stats.best_score == 0.6
    assert stats.expected_finish_s == pytest.approx(30)  # budget leaves 80 s


def test_expected_finish_is_capped_by_the_budget() -> None:
    clock = FakeClock()
    timer = CycleTimer(target_s=100, clock=clock)
    timer.start()
    timer.begin_iterations(total=1000)
    clock.advance(50)
    timer.update(10)
    stats = timer.stats()
    assert stats.eta_s == pytest.approx(4950)
    assert stats.expected_finish_s == pytest.approx(50)


def test_approaching_and_exceeded_detection() -> None:
    clock = FakeClock()
    timer = CycleTimer(target_s=10, warning_at=0.8, clock=clock)
    timer.start()
    clock.advance(7.9)
    assert not timer.is_approaching_limit() and not timer.is_exceeded()
    clock.advance(0.1)
    assert timer.is_approaching_limit() and not timer.is_exceeded()
    clock.advance(2.0)
    assert timer.is_approaching_limit() and timer.is_exceeded()
    assert timer.time_remaining() == 0.0
    assert timer.stats().exceeded and timer.stats().budget_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("target, warning", [(0, 0.8), (-1, 0.8), (10, 0), (10, 1.0)])
def test_timer_rejects_bad_settings(target: float, warning: float) -> None:
    with pytest.raises(ValueError):
        CycleTimer(target_s=target, warning_at=warning)


# --- CycleGuard ---------------------------------------------------------------------------


def test_guard_trips_on_time_with_the_final_eval_reserve() -> None:
    clock = FakeClock()
    stops: list[StopReason] = []
    guard = CycleGuard(time_budget_s=10, clock=clock)
    guard.add_listener(lambda reason, message: stops.append(reason))
    guard.set_reserve(2.0)
    clock.advance(7.9)
    assert guard.poll() is None
    assert guard.usage_fractions()["time"] == pytest.approx(7.9 / 8)
    clock.advance(0.1)
    assert guard.poll() is StopReason.time and stops == [StopReason.time]
    assert "8.0 s (2.0 s kept for the final test evaluation)" in guard.message
    with pytest.raises(CycleStopped) as stopped:
        guard.check()
    assert stopped.value.reason is StopReason.time
    assert not isinstance(stopped.value, Exception), "must pass DSPy's `except Exception`"
    guard.poll()
    assert stops == [StopReason.time], "listeners hear a stop once"


def test_guard_reserve_is_at_most_half_the_budget() -> None:
    guard = CycleGuard(time_budget_s=10)
    guard.set_reserve(30)
    assert guard.reserve_s == 5


def test_guard_usage_budgets() -> None:
    usage = {"lm_calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": None}
    calls = CycleGuard(time_budget_s=None, usage=lambda: usage, lm_call_budget=10)
    tokens = CycleGuard(time_budget_s=None, usage=lambda: usage, token_budget=1000)
    cost = CycleGuard(time_budget_s=None, usage=lambda: usage, cost_budget_usd=0.5)
    assert not any(g.should_stop() for g in (calls, tokens, cost))
    usage.update(lm_calls=10, input_tokens=900, output_tokens=99, cost_usd=0.49)
    assert calls.poll() is StopReason.lm_calls
    assert tokens.poll() is None and cost.poll() is None
    usage.update(output_tokens=100, cost_usd=0.5)
    assert tokens.poll() is StopReason.tokens and cost.poll() is StopReason.cost


def test_disarmed_guard_starts_no_new_stop_but_keeps_an_old_one() -> None:
    clock = FakeClock()
    guard = CycleGuard(time_budget_s=1, clock=clock)
    guard.disarm()
    clock.advance(5)
    assert guard.poll() is None
    guard.check()  # the final evaluation runs
    tripped = CycleGuard(time_budget_s=1, clock=clock)
    clock.advance(5)
    tripped.poll()
    tripped.disarm()
    with pytest.raises(CycleStopped):
        tripped.check()  # stray workers of the stopped optimizer still end


def test_cancel_by_run_id() -> None:
    guard = CycleGuard(time_budget_s=100, control=control_for("run-x"))
    assert guard.poll() is None
    cancel_run("run-x", "user asked")
    assert guard.poll() is StopReason.cancelled and guard.message == "user asked"
    release_control("run-x")
    assert not control_for("run-x").cancelled
    release_control("run-x")


def test_guard_stops_dspy_lm_calls_and_evaluate_across_worker_threads() -> None:
    """The real mechanism: the guard in dspy.context raises from on_lm_start, through
    dspy.Evaluate's per-example `except Exception` and its thread pool."""
    task = get_task("intent")
    splits = task.load_splits()
    cycle_lm = build_lm(LMSpec(model="sim"), task)
    guard = CycleGuard(time_budget_s=None, usage=cycle_lm.usage.snapshot, lm_call_budget=15)
    evaluate = dspy.Evaluate(
        devset=splits.train[:60], metric=task.metric, num_threads=4, display_progress=False
    )
    with cycle_lm.context(callbacks=[guard]), pytest.raises(CycleStopped) as stopped:
        evaluate(task.build_program())
    assert stopped.value.reason is StopReason.lm_calls
    # Threads in flight when the budget was reached may each finish one call.
    assert 15 <= cycle_lm.usage.calls <= 15 + 4


# --- usage under DSPy worker threads ------------------------------------------------------


class CountingEngine:
    """Counts calls and tokens at the engine, under a lock: the ground truth."""

    def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
        self.inner = inner
        self.lock = threading.Lock()
        self.calls = self.input_tokens = self.output_tokens = 0

    def complete(self, request):  # type: ignore[no-untyped-def]
        response = self.inner.complete(request)
        with self.lock:
            self.calls += 1
            self.input_tokens += response.usage.input_tokens
            self.output_tokens += response.usage.output_tokens
        return response


@pytest.mark.parametrize("num_threads", [1, 8])
def test_usage_is_exact_under_dspy_worker_threads(num_threads: int) -> None:
    task = get_task("intent")
    splits = task.load_splits()
    cycle_lm = build_lm(LMSpec(model="sim", sim_latency_ms=2), task)
    assert cycle_lm.engine is not None
    counting = CountingEngine(cycle_lm.engine.inner)
    cycle_lm.engine.inner = counting
    examples = splits.train[:80]
    with cycle_lm.context():
        dspy.Evaluate(
            devset=examples, metric=task.metric, num_threads=num_threads, display_progress=False
        )(task.build_program())
    usage = cycle_lm.usage.snapshot()
    assert counting.calls == len(examples)
    assert usage["lm_calls"] == counting.calls
    assert usage["input_tokens"] == counting.input_tokens > 0
    assert usage["output_tokens"] == counting.output_tokens > 0
    assert usage["cost_usd"] is None  # sim has no price unless configured


def test_cost_from_configured_price_per_model() -> None:
    usage = CycleUsage()
    usage.set_price("sim/oracle", 1.0, 2.0)
    usage.add_usage("sim/oracle", {"prompt_tokens": 1000, "completion_tokens": 500})
    usage.add_usage("other/model", {"prompt_tokens": 1000, "completion_tokens": 500})
    snap = usage.snapshot()
    assert snap["cost_usd"] == pytest.approx(2.0)  # the unpriced model adds nothing
    assert snap["lm_calls"] == 2 and usage.by_lm["other/model"]["calls"] == 1


def test_reflection_lm_shares_the_cycle_usage_and_its_price() -> None:
    task = get_task("intent")
    main = build_lm(LMSpec(model="sim"), task)
    reflection = build_lm(LMSpec(model="sim", price_per_1k_input_usd=0.5), task, usage=main.usage)
    assert reflection.usage is main.usage
    with main.context():
        reflection.lm("hello")
    assert main.usage.snapshot()["cost_usd"] > 0


# --- checks before anything runs ------------------------------------------------------------


def test_time_budget_shorter_than_one_evaluation_is_refused_with_the_arithmetic() -> None:
    spec = CycleSpec(lm=LMSpec(model="local"), time_budget_s=2)
    with pytest.raises(BudgetTooSmallError) as err:
        check_budgets(spec, n_val=100)
    message = str(err.value)
    assert "time_budget_s" in message and "100 examples" in message
    assert "0.15 s" in message and "at least 15 s" in message and "max_val" in message
    check_budgets(spec.model_copy(update={"time_budget_s": 15}), n_val=100)
    # The sim at zero latency can evaluate anything in any budget.
    check_budgets(CycleSpec(lm=LMSpec(model="sim"), time_budget_s=0.01), n_val=100)


def test_sim_latency_and_threads_enter_the_estimate() -> None:
    spec = CycleSpec(lm=LMSpec(model="sim", sim_latency_ms=100, sim_latency_sigma=0), num_threads=4)
    check_budgets(spec.model_copy(update={"time_budget_s": 0.5}), n_val=20)  # 5 rounds x 0.1
    with pytest.raises(BudgetTooSmallError, match="4 threads"):
        check_budgets(spec.model_copy(update={"time_budget_s": 0.4}), n_val=20)


def test_lm_call_budget_smaller_than_one_evaluation_is_refused() -> None:
    with pytest.raises(BudgetTooSmallError, match="lm_call_budget"):
        check_budgets(CycleSpec(lm=LMSpec(model="sim"), lm_call_budget=5), n_val=20)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"time_budget_s": 0}, "time_budget_s"),
        ({"time_budget_s": -5}, "time_budget_s"),
        ({"budget": "huge"}, "unknown budget preset 'huge'"),
        ({"lm_call_budget": 0}, "lm_call_budget"),
        ({"token_budget": -1}, "token_budget"),
        ({"cost_budget_usd": 0}, "cost_budget_usd"),
        ({"cost_budget_usd": 1.0}, "needs a price"),
        ({"budget_warning_at": 1.5}, "budget_warning_at"),
    ],
)
def test_bad_budgets_fail_in_the_spec(fields: dict, message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        CycleSpec(lm=LMSpec(model="sim"), **fields)


def test_five_arg_metric_wraps_short_metrics_only() -> None:
    def two(gold, pred):  # type: ignore[no-untyped-def]
        return 1.0

    def three(gold, pred, trace=None):  # type: ignore[no-untyped-def]
        return 0.5 if trace is None else 0.25

    intent = get_task("intent").metric
    assert five_arg_metric(intent) is intent
    assert five_arg_metric(two)(None, None, None, "p", []) == 1.0
    assert five_arg_metric(three)(None, None, "t", "p", []) == 0.25
