"""The sim LM rewards demos only when they help this input. Before: its chance of a right
answer rose by `sim_demo_bonus` per demo whatever the demo showed, so any optimizer that
added demos beat one that tuned instructions by construction."""

from __future__ import annotations

from typing import Any

import dspy
import pytest

from tasks.cycle.spec import LMSpec
from tasks.lm.providers import build_lm
from tasks.lm.sim import SimulatedEngine, _word_overlap
from tasks.programs import get_task
from tasks.programs.extraction import ExtractOrder
from tasks.programs.intent import ClassifyIntent


def _messages(signature: type[dspy.Signature], demos: list[Any], inputs: dict[str, Any]) -> Any:
    """The prompt DSPy sends with the JSON adapter (the one the sim and local LMs use)."""
    return dspy.JSONAdapter().format(signature, demos, inputs)


@pytest.fixture(scope="module")
def intent_engine() -> SimulatedEngine:
    return SimulatedEngine(LMSpec(model="sim"), get_task("intent"))


def _unlike(examples: list[Any], text: str, label: str) -> list[Any]:
    """Examples with another label whose words barely overlap `text`."""
    return [e for e in examples if e.intent != label and _word_overlap(e.text, text) <= 0.2]


def test_demos_that_show_nothing_about_the_input_add_nothing(
    intent_engine: SimulatedEngine,
) -> None:
    splits = get_task("intent").load_splits()
    example = splits.test[0]
    bare = intent_engine.correct_probability(_messages(ClassifyIntent, [], example.inputs()))
    others = _unlike(splits.train, example.text, example.intent)[:8]
    assert len(others) == 8
    padded = intent_engine.correct_probability(_messages(ClassifyIntent, others, example.inputs()))
    assert bare is not None and padded == pytest.approx(bare)


def test_a_demo_with_the_inputs_gold_label_helps(intent_engine: SimulatedEngine) -> None:
    splits = get_task("intent").load_splits()
    example = splits.test[0]
    bonus = intent_engine.spec.sim_demo_bonus
    bare = intent_engine.correct_probability(_messages(ClassifyIntent, [], example.inputs()))
    same = [e for e in splits.train if e.intent == example.intent][:2]
    one = intent_engine.correct_probability(_messages(ClassifyIntent, same[:1], example.inputs()))
    two = intent_engine.correct_probability(_messages(ClassifyIntent, same, example.inputs()))
    assert bare is not None and one is not None and two is not None
    assert one >= bare + bonus - 1e-9 and two >= one + bonus - 1e-9


def test_an_extraction_demo_counts_by_the_fields_it_shows() -> None:
    task = get_task("extraction")
    engine = SimulatedEngine(LMSpec(model="sim"), task)
    splits = task.load_splits()
    example = splits.test[0]
    others = [
        e
        for e in splits.train
        if e.product != example.product and _word_overlap(e.text, example.text) <= 0.2
    ]
    same_qty = next(e for e in others if e.quantity == example.quantity)
    other_qty = next(e for e in others if e.quantity != example.quantity)
    p = {
        name: engine.correct_probability(_messages(ExtractOrder, demos, example.inputs()))
        for name, demos in (("none", []), ("qty", [same_qty]), ("other", [other_qty]))
    }
    half = 0.5 * engine.spec.sim_demo_bonus
    assert p["other"] == pytest.approx(p["none"])
    assert p["qty"] == pytest.approx(min(engine.spec.sim_max_accuracy, p["none"] + half))


def test_same_prompt_same_answer_and_the_right_demos_score_higher() -> None:
    """Through DSPy: deterministic per prompt, and per-input demos of the right label beat
    as many demos of other labels on the whole test split (n = 70)."""
    task = get_task("intent")
    splits = task.load_splits()
    cycle_lm = build_lm(LMSpec(model="sim"), task)
    program = task.build_program()
    (predictor,) = program.predictors()
    right, wrong = 0.0, 0.0
    with cycle_lm.context():
        first = program(text=splits.test[0].text).intent
        assert program(text=splits.test[0].text).intent == first
        for example in splits.test:
            predictor.demos = [e for e in splits.train if e.intent == example.intent][:3]
            right += task.metric(example, program(**example.inputs()))
            predictor.demos = _unlike(splits.train, example.text, example.intent)[:3]
            wrong += task.metric(example, program(**example.inputs()))
    n = len(splits.test)
    assert right / n >= wrong / n + 0.2, (right / n, wrong / n)
