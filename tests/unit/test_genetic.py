"""The genetic optimizer: reproducible with a seed, elitism, operators, stopping."""

from __future__ import annotations

import dspy
import pytest

from tasks.cycle.spec import LMSpec
from tasks.lm.providers import build_lm
from tasks.optimizers import CompileRequest, get_optimizer
from tasks.optimizers.genetic import Gene, GeneticTeleprompter
from tasks.programs import get_task


@pytest.fixture(scope="module")
def intent():  # type: ignore[no-untyped-def]
    task = get_task("intent")
    splits = task.load_splits()
    return task, splits.train[:20], splits.val[:16]


def _compile(intent, seed: int = 0, **options):  # type: ignore[no-untyped-def]
    task, train, val = intent
    cycle_lm = build_lm(LMSpec(model="sim"), task)
    ga = GeneticTeleprompter(
        task.metric,
        population_size=5,
        generations=4,
        minibatch_size=6,
        patience=10,
        seed=seed,
        **options,
    )
    with cycle_lm.context():
        program = ga.compile(task.build_program(), trainset=train, valset=val)
    return ga, program, cycle_lm


def test_same_seed_same_result(intent) -> None:  # type: ignore[no-untyped-def]
    first, program_a, _ = _compile(intent, seed=7)
    second, program_b, _ = _compile(intent, seed=7)
    assert [g.population for g in first.history] == [g.population for g in second.history]
    assert [g.best_fitness for g in first.history] == [g.best_fitness for g in second.history]
    assert program_a.dump_state() == program_b.dump_state()
    assert first.metric_calls == second.metric_calls


def test_another_seed_explores_differently(intent) -> None:  # type: ignore[no-untyped-def]
    first, _, _ = _compile(intent, seed=1)
    second, _, _ = _compile(intent, seed=2)
    assert [g.population for g in first.history] != [g.population for g in second.history]


def test_elitism_keeps_the_best_individual(intent) -> None:  # type: ignore[no-untyped-def]
    ga, _, _ = _compile(intent, seed=3, elite_count=2)
    assert len(ga.history) >= 3
    for before, after in zip(ga.history, ga.history[1:], strict=False):
        assert before.ranked[0] == before.best
        assert after.population[:2] == before.ranked[:2], "the two best survive, unchanged"


def test_returned_program_is_the_best_on_the_full_valset(intent) -> None:  # type: ignore[no-untyped-def]
    task, _, val = intent
    ga, program, cycle_lm = _compile(intent, seed=4)
    assert ga.best_genome is not None and ga.best_score is not None
    # The sim answers deterministically per prompt: re-scoring reproduces the score.
    with cycle_lm.context():
        result = dspy.Evaluate(devset=val, metric=task.metric, display_progress=False)(program)
    assert result.score / 100 == pytest.approx(ga.best_score)
    assert program.score == ga.best_score
    finalists_scores = [s.fitness for g, s in ga._scores.items() if len(s.by_example) == len(val)]
    assert ga.best_score == max(finalists_scores)


def test_search_improves_on_the_seed_program(intent) -> None:  # type: ignore[no-untyped-def]
    task, _, val = intent
    ga, program, cycle_lm = _compile(intent, seed=0)
    with cycle_lm.context():
        baseline = dspy.Evaluate(devset=val, metric=task.metric, display_progress=False)(
            task.build_program()
        )
    assert ga.best_score > baseline.score / 100
    assert ga.proposals > 0, "LM-proposed rewrites are part of the search"
    predictor = program.named_predictors()[0][1]
    assert predictor.demos, "the sim rewards demos that show the label: the best has some"


def test_operators_produce_valid_genomes(intent) -> None:  # type: ignore[no-untyped-def]
    import random

    ga, _, _ = _compile(intent, seed=5)
    rng = random.Random(0)
    name = ga._names[0]
    pool_i, pool_d = len(ga._instructions[name]), len(ga._demos[name])
    a, b = (Gene(0, (0, 1, 2)),), (Gene(pool_i - 1, (3, 4)),)
    for _ in range(200):
        child = ga._crossover(a, b, rng)
        (gene,) = child
        assert gene.instruction in (0, pool_i - 1)
        assert set(gene.demos) <= {0, 1, 2, 3, 4} and len(gene.demos) <= ga.max_demos
        demos = ga._mutate_demos(name, gene.demos, rng)
        assert len(set(demos)) == len(demos) <= ga.max_demos
        assert all(0 <= i < pool_d for i in demos)


def test_stops_on_should_stop_and_on_metric_call_budget(intent) -> None:  # type: ignore[no-untyped-def]
    calls = {"n": 0}

    def stop_after_two_checks() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    ga, program, _ = _compile(intent, should_stop=stop_after_two_checks)
    assert ga.stopped and program is not None and len(ga.history) <= 1
    budget, _, _ = _compile(intent, max_metric_calls=40)
    assert budget.stopped and budget.metric_calls <= 40


def test_patience_stops_a_stalled_search(intent) -> None:  # type: ignore[no-untyped-def]
    task, train, val = intent
    cycle_lm = build_lm(LMSpec(model="sim"), task)
    ga = GeneticTeleprompter(
        task.metric, population_size=4, generations=30, minibatch_size=len(val), patience=2
    )
    with cycle_lm.context():
        ga.compile(task.build_program(), trainset=train, valset=val)
    assert len(ga.history) < 30


def test_interface_reports_generations_and_honours_presets(intent) -> None:  # type: ignore[no-untyped-def]
    task, train, val = intent
    optimizer = get_optimizer("genetic")
    events = []
    request = CompileRequest(
        program=task.build_program(),
        trainset=train,
        valset=val,
        metric=task.metric,
        on_iteration=events.append,
    )
    assert optimizer.total_iterations(request) == 4
    cycle_lm = build_lm(LMSpec(model="sim"), task)
    with cycle_lm.context():
        result = optimizer.compile(request)
    # One event per generation, then the final selection's full-valset score.
    assert [e.iteration for e in events[:-1]] == list(range(1, len(events)))
    assert events[-1].iteration == events[-2].iteration == result.iterations
    assert events[-1].best_score == result.val_score and events[-1].progress == 1.0
    assert events[-1].total == 4
    assert result.val_score is not None and not result.stopped_early
    with pytest.raises(ValueError, match="unknown budget preset"):
        optimizer.compile(CompileRequest(**{**request.__dict__, "budget": "extreme"}))


def test_a_stopped_search_returns_its_best_so_far(intent) -> None:  # type: ignore[no-untyped-def]
    """Stopped after two generations: the program is the best individual seen, not the
    seed and not a half-evaluated newcomer."""
    ga_ref: list[GeneticTeleprompter] = []

    def stop_after_two_generations() -> bool:
        return bool(ga_ref) and len(ga_ref[0].history) >= 2

    task, train, val = intent
    cycle_lm = build_lm(LMSpec(model="sim"), task)
    ga = GeneticTeleprompter(
        task.metric,
        population_size=5,
        generations=6,
        minibatch_size=6,
        patience=10,
        should_stop=stop_after_two_generations,
    )
    ga_ref.append(ga)
    with cycle_lm.context():
        program = ga.compile(task.build_program(), trainset=train, valset=val)
    assert ga.stopped and len(ga.history) == 2
    scored = {g: s for g, s in ga._scores.items() if len(s.by_example) >= 6}
    best = max(scored, key=ga._rank_key)
    assert ga.best_genome == best
    assert program.dump_state() == ga.build(best).dump_state()
