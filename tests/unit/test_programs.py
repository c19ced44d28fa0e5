"""Built-in tasks, their datasets and metrics, JSONL validation and users' own tasks.

No real LM is called: end-to-end checks use DSPy's `DummyLM`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import random
import textwrap
import uuid
from collections import Counter
from pathlib import Path
from typing import get_args

import dspy
import pytest
from dspy.utils import DummyLM

from tasks.programs import (
    DATA_DIR,
    TaskDefinition,
    UnknownTaskError,
    extraction,
    get_task,
    intent,
    list_tasks,
)
from tasks.programs.dataset import (
    DatasetError,
    Splits,
    UserTaskError,
    load_jsonl,
    load_user_task,
)

# --- registry -----------------------------------------------------------------------------------


def test_list_tasks_names_the_builtin_tasks() -> None:
    assert list_tasks() == ["extraction", "intent"]


def test_get_task_unknown_lists_known_tasks() -> None:
    with pytest.raises(UnknownTaskError) as info:
        get_task("nope")
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'nope'" in message
    assert "extraction" in message and "intent" in message


@pytest.mark.parametrize(
    ("name", "inputs", "outputs"),
    [("intent", ("text",), ("intent",)), ("extraction", ("text",), ("product", "quantity"))],
)
def test_task_definition_fields(name: str, inputs: tuple, outputs: tuple) -> None:
    task = get_task(name)
    assert isinstance(task, TaskDefinition)
    assert task.name == name
    assert task.description
    assert task.input_fields == inputs
    assert task.output_fields == outputs
    assert task.dataset_path == DATA_DIR / f"{name}.jsonl"
    assert task.dataset_path.is_file()
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("name", ["intent", "extraction"])
def test_program_is_one_predict_matching_the_task_fields(name: str) -> None:
    task = get_task(name)
    program = task.build_program()
    assert isinstance(program, dspy.Module)
    predictors = program.predictors()
    assert len(predictors) == 1
    # Plain Predict: ChainOfThought would add a reasoning field the tiny model cannot use.
    assert type(predictors[0]) is dspy.Predict
    signature = predictors[0].signature
    assert tuple(signature.input_fields) == task.input_fields
    assert tuple(signature.output_fields) == task.output_fields
    # A fresh program per call: optimizers mutate demos in place.
    assert task.build_program() is not program


def test_intent_output_is_a_literal_of_the_labels() -> None:
    annotation = intent.ClassifyIntent.output_fields["intent"].annotation
    assert get_args(annotation) == intent.LABELS
    assert len(intent.LABELS) == 10
    assert set(intent.CONFUSABLE) == set(intent.LABELS)
    for label, neighbours in intent.CONFUSABLE.items():
        assert label not in neighbours
        assert set(neighbours) <= set(intent.LABELS)


def test_extraction_output_types() -> None:
    fields = extraction.ExtractOrder.output_fields
    assert fields["product"].annotation is str
    assert fields["quantity"].annotation is int


@pytest.mark.parametrize("name", ["intent", "extraction"])
def test_metrics_accept_gepa_five_argument_call(name: str) -> None:
    # GEPA rejects metrics that cannot be called as (gold, pred, trace, pred_name, pred_trace).
    inspect.signature(get_task(name).metric).bind(None, None, None, None, None)


def test_programs_run_end_to_end_with_a_dummy_lm() -> None:
    intent_task = get_task("intent")
    with dspy.context(lm=DummyLM([{"intent": "card_lost"}])):
        pred = intent_task.build_program()(text="I lost my card")
    assert pred.intent == "card_lost"
    assert intent_task.metric(dspy.Example(text="x", intent="card_lost"), pred) == 1.0

    extraction_task = get_task("extraction")
    with dspy.context(lm=DummyLM([{"product": "ceramic mugs", "quantity": "3"}])):
        pred = extraction_task.build_program()(text="I'd like 3 ceramic mugs.")
    assert pred.quantity == 3  # parsed to int by the signature's type
    gold = dspy.Example(text="x", product="ceramic mugs", quantity=3)
    assert extraction_task.metric(gold, pred) == 1.0


# --- built-in datasets ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def intent_splits() -> Splits:
    return get_task("intent").load_splits()


@pytest.fixture(scope="module")
def extraction_splits() -> Splits:
    return get_task("extraction").load_splits()


def _raw_rows(name: str) -> list[dict]:
    path = get_task(name).dataset_path
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("name", ["intent", "extraction"])
def test_dataset_files_have_explicit_fixed_splits(name: str) -> None:
    rows = _raw_rows(name)
    assert len(rows) >= 200
    assert all(row["split"] in {"train", "val", "test"} for row in rows)
    counts = Counter(row["split"] for row in rows)
    assert counts["train"] == 100
    assert counts["val"] == 50
    assert counts["test"] >= 50


@pytest.mark.parametrize("name", ["intent", "extraction"])
def test_dataset_loads_into_splits_with_inputs_marked(name: str) -> None:
    task = get_task(name)
    splits = task.load_splits()
    sizes = splits.sizes()
    assert sizes["train"] == 100 and sizes["val"] == 50 and sizes["test"] >= 50
    assert sum(sizes.values()) >= 200
    for example in splits.train + splits.val + splits.test:
        assert isinstance(example, dspy.Example)
        assert tuple(example.inputs().keys()) == task.input_fields
        assert set(example.labels().keys()) == set(task.output_fields)


@pytest.mark.parametrize("name", ["intent", "extraction"])
def test_dataset_has_no_duplicate_inputs(name: str) -> None:
    # A text in both train and test would inflate test scores of few-shot programs.
    texts = [" ".join(row["text"].lower().split()) for row in _raw_rows(name)]
    duplicates = [text for text, n in Counter(texts).items() if n > 1]
    assert duplicates == []


def test_intent_every_label_in_every_split_and_balanced(intent_splits: Splits) -> None:
    for split_name in ("train", "val", "test"):
        counts = Counter(ex.intent for ex in getattr(intent_splits, split_name))
        assert set(counts) == set(intent.LABELS), split_name
        # Balanced: every label has the same count within a split.
        assert len(set(counts.values())) == 1, (split_name, counts)


def test_intent_dataset_is_not_sorted_by_label() -> None:
    labels = [row["intent"] for row in _raw_rows("intent")]
    changes = sum(1 for a, b in zip(labels, labels[1:], strict=False) if a != b)
    assert changes > len(labels) // 2


def test_extraction_rows_are_spans_of_the_text(extraction_splits: Splits) -> None:
    examples = extraction_splits.train + extraction_splits.val + extraction_splits.test
    for ex in examples:
        assert isinstance(ex.product, str) and ex.product.strip()
        assert ex.product.lower() in ex.text.lower(), ex
        assert type(ex.quantity) is int and ex.quantity >= 1, ex
    # Varied: quantities written as words / implied, not only as the digits shown.
    implicit = [ex for ex in examples if str(ex.quantity) not in ex.text]
    assert len(implicit) >= 30
    assert len({ex.quantity for ex in examples}) >= 15


# --- metrics ------------------------------------------------------------------------------------


def test_intent_metric_exact_match() -> None:
    gold = dspy.Example(text="I lost my card", intent="card_lost").with_inputs("text")
    assert intent.metric(gold, dspy.Prediction(intent="card_lost")) == 1.0
    assert intent.metric(gold, dspy.Prediction(intent=" Card_Lost ")) == 1.0
    assert intent.metric(gold, dspy.Prediction(intent="dispute_charge")) == 0.0
    assert intent.metric(gold, dspy.Prediction(intent="card")) == 0.0
    assert intent.metric(gold, dspy.Prediction()) == 0.0
    assert intent.metric(gold, dspy.Prediction(intent=None)) == 0.0


def test_extraction_metric_per_field_mean() -> None:
    gold = dspy.Example(text="x", product="AA batteries", quantity=2).with_inputs("text")
    metric = extraction.metric
    assert metric(gold, dspy.Prediction(product="AA batteries", quantity=2)) == 1.0
    # Case, inner/outer whitespace and surrounding punctuation do not matter.
    assert metric(gold, dspy.Prediction(product="  aa   Batteries. ", quantity=2)) == 1.0
    # Numbers compare as ints whatever their type.
    assert metric(gold, dspy.Prediction(product="AA batteries", quantity="2")) == 1.0
    assert metric(gold, dspy.Prediction(product="AA batteries", quantity=2.0)) == 1.0
    assert metric(gold, dspy.Prediction(product="AA batteries", quantity="two")) == 0.5
    assert metric(gold, dspy.Prediction(product="AA batteries", quantity=3)) == 0.5
    assert metric(gold, dspy.Prediction(product="batteries", quantity=2)) == 0.5
    assert metric(gold, dspy.Prediction(product="batteries", quantity=1)) == 0.0
    assert metric(gold, dspy.Prediction(product="AA batteries", quantity=True)) == 0.5
    assert metric(gold, dspy.Prediction()) == 0.0


def test_extraction_to_int() -> None:
    assert extraction.to_int(5) == 5
    assert extraction.to_int(" 12 ") == 12
    assert extraction.to_int("1,000") == 1000
    assert extraction.to_int(2.5) is None
    assert extraction.to_int("a dozen") is None
    assert extraction.to_int(None) is None
    assert extraction.to_int(False) is None


def test_intent_wrong_answer_is_always_a_different_valid_label(intent_splits: Splits) -> None:
    rng = random.Random(0)
    examples = intent_splits.train + intent_splits.val + intent_splits.test
    chosen = Counter()
    for ex in examples:
        wrong = intent.wrong_answer({"intent": ex.intent}, rng)
        assert set(wrong) == {"intent"}
        assert wrong["intent"] in intent.LABELS
        assert intent.metric(ex, dspy.Prediction(**wrong)) == 0.0
        chosen[wrong["intent"]] += 1
    assert len(chosen) >= 8  # not always the same wrong label


def test_extraction_wrong_answer_is_always_wrong_somewhere(extraction_splits: Splits) -> None:
    rng = random.Random(0)
    examples = extraction_splits.train + extraction_splits.val + extraction_splits.test
    scores = Counter()
    for ex in examples:
        gold = {"product": ex.product, "quantity": ex.quantity}
        wrong = extraction.wrong_answer(gold, rng)
        assert set(wrong) == {"product", "quantity"}
        assert isinstance(wrong["quantity"], int) and wrong["quantity"] >= 1
        score = extraction.metric(ex, dspy.Prediction(**wrong))
        assert score < 1.0
        scores[score] += 1
    # Sometimes one field wrong (0.5), sometimes both (0.0).
    assert scores[0.5] > 0 and scores[0.0] > 0


@pytest.mark.parametrize("name", ["intent", "extraction"])
def test_wrong_answer_is_deterministic_for_a_seed(name: str) -> None:
    task = get_task(name)
    golds = [ex.labels().toDict() for ex in task.load_splits().val]
    first = [task.wrong_answer(g, random.Random(7)) for g in golds]
    second = [task.wrong_answer(g, random.Random(7)) for g in golds]
    assert first == second


# --- JSONL validation -----------------------------------------------------------------------------


def _write(tmp_path: Path, text: str, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _rows(n: int, split: str | None = None) -> str:
    lines = []
    for i in range(n):
        row: dict = {"question": f"q{i}", "answer": f"a{i}"}
        if split is not None:
            row["split"] = split
        lines.append(json.dumps(row))
    return "\n".join(lines) + "\n"


def _load(path: Path) -> Splits:
    return load_jsonl(path, ("question",), ("answer",))


GOOD = _rows(1, "train") + _rows(1, "val")  # lines 1-2; tests append a third line


@pytest.mark.parametrize(
    ("bad_line", "why"),
    [
        ('{"question": "q", "answer": ', "invalid JSON"),
        ('["question", "answer"]', "expected a JSON object, got list"),
        ('"just a string"', "expected a JSON object, got str"),
        ('{"question": "q", "split": "test"}', "missing field 'answer'"),
        ('{"split": "test"}', "missing fields 'question', 'answer'"),
        ('{"question": "q", "answer": null, "split": "test"}', "field 'answer' is null"),
        ('{"question": "q", "answer": "a", "split": "dev"}', "unknown split value 'dev'"),
    ],
)
def test_malformed_line_error_names_file_line_and_reason(
    tmp_path: Path, bad_line: str, why: str
) -> None:
    path = _write(tmp_path, GOOD + bad_line + "\n" + _rows(1, "test"))
    with pytest.raises(DatasetError) as info:
        _load(path)
    message = str(info.value)
    assert f"{path}:3:" in message
    assert why in message
    assert isinstance(info.value, ValueError)


def test_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path, GOOD + "\n\n" + "not json\n")
    with pytest.raises(DatasetError, match=r":5: invalid JSON"):
        _load(path)


def test_invalid_utf8_line_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(GOOD.encode() + b'{"question": "\xff", "answer": "a"}\n')
    with pytest.raises(DatasetError, match=r":3: not valid UTF-8"):
        _load(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(DatasetError, match="empty file") as info:
        _load(path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DatasetError, match="cannot read dataset") as info:
        _load(path)
    assert str(path) in str(info.value)


def test_split_that_ends_up_empty(tmp_path: Path) -> None:
    path = _write(tmp_path, _rows(3, "train") + _rows(2, "test"))
    with pytest.raises(DatasetError) as info:
        _load(path)
    message = str(info.value)
    assert str(path) in message
    assert "split 'val' is empty" in message
    assert "train=3" in message and "test=2" in message


def test_rows_without_split_get_a_deterministic_60_20_20_split(tmp_path: Path) -> None:
    path = _write(tmp_path, _rows(10))
    first, second = _load(path), _load(path)
    assert first.sizes() == {"train": 6, "val": 2, "test": 2}

    def questions(splits: Splits) -> list[list[str]]:
        return [[ex.question for ex in part] for part in (splits.train, splits.val, splits.test)]

    assert questions(first) == questions(second)
    all_questions = sorted(q for part in questions(first) for q in part)
    assert all_questions == sorted(f"q{i}" for i in range(10))
    # Shuffled, not simply the first six lines.
    assert questions(first)[0] != [f"q{i}" for i in range(6)]
    assert questions(load_jsonl(path, ("question",), ("answer",), seed=1)) != questions(first)


def test_rows_with_and_without_split_mix(tmp_path: Path) -> None:
    path = _write(tmp_path, _rows(2, "test") + _rows(5))
    sizes = _load(path).sizes()
    assert sizes == {"train": 3, "val": 1, "test": 3}


def test_examples_keep_only_declared_fields(tmp_path: Path) -> None:
    path = _write(tmp_path, '{"question": "q", "answer": "a", "note": "x", "split": "train"}\n')
    path.write_text(path.read_text() + _rows(1, "val") + _rows(1, "test"))
    example = _load(path).train[0]
    assert example.toDict() == {"question": "q", "answer": "a"}
    assert example.inputs().toDict() == {"question": "q"}


# --- users' own tasks -----------------------------------------------------------------------------

USER_MODULE = '''
import dspy


class QA(dspy.Signature):
    """Answer the question."""

    question: str = dspy.InputField()
    answer: str = dspy.OutputField()
    confidence: float = dspy.OutputField()


class Program(dspy.Module):
    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict(QA)

    def forward(self, question):
        return self.answer(question=question)


def make_program():
    return Program()


def needs_args(size):
    return Program()


def not_a_module():
    return 42


class NotAModule:
    pass


class NoPredictors(dspy.Module):
    def forward(self, question):
        return dspy.Prediction(answer="x")


INSTANCE = Program()


def exact(gold, pred, trace=None):
    return float(gold.answer == pred.answer)


def one_arg(gold):
    return 1.0


class Holder:
    @staticmethod
    def metric(gold, pred, trace=None):
        return 1.0


NOT_CALLABLE = 3
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A module on sys.path, uniquely named so no test sees another's cached import."""
    name = f"user_prog_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture
def user_data(tmp_path: Path) -> Path:
    lines = [
        json.dumps({"question": f"q{i}", "answer": f"a{i}", "confidence": 0.5}) for i in range(10)
    ]
    return _write(tmp_path, "\n".join(lines) + "\n", name="user.jsonl")


@pytest.mark.parametrize("attr", ["Program", "make_program", "INSTANCE"])
def test_load_user_task(user_module: str, user_data: Path, attr: str) -> None:
    task = load_user_task(f"{user_module}:{attr}", f"{user_module}:exact", user_data)
    assert isinstance(task, TaskDefinition)
    assert task.input_fields == ("question",)
    assert task.output_fields == ("answer", "confidence")
    assert task.dataset_path == user_data
    program = task.build_program()
    assert isinstance(program, dspy.Module)
    assert task.build_program() is not program
    splits = task.load_splits()
    assert splits.sizes() == {"train": 6, "val": 2, "test": 2}
    gold = splits.train[0]
    assert task.metric(gold, dspy.Prediction(answer=gold.answer)) == 1.0
    assert task.metric(gold, dspy.Prediction(answer="nope")) == 0.0
    wrong = task.wrong_answer({"answer": "a1", "confidence": 0.5}, random.Random(0))
    assert wrong == {"answer": "unknown", "confidence": 0.5}


def test_load_user_task_from_a_file_path(tmp_path: Path, user_data: Path) -> None:
    path = tmp_path / "my_prog_file.py"
    path.write_text(textwrap.dedent(USER_MODULE), encoding="utf-8")
    task = load_user_task(f"{path}:Program", f"{path}:Holder.metric", user_data)
    assert task.output_fields == ("answer", "confidence")
    assert task.metric(None, None) == 1.0


@pytest.mark.parametrize(
    ("program_attr", "metric_attr", "expected"),
    [
        ("Missing", "exact", "has no attribute 'Missing'"),
        ("Program", "missing_metric", "has no attribute 'missing_metric'"),
        ("Program", "NOT_CALLABLE", "is not callable"),
        ("Program", "one_arg", "must accept (gold, pred, trace=None)"),
        ("NotAModule", "exact", "not a dspy.Module subclass"),
        ("needs_args", "exact", "could not be built with no arguments"),
        ("not_a_module", "exact", "returned a int, not a dspy.Module"),
        ("NoPredictors", "exact", "has no dspy.Predict"),
    ],
)
def test_load_user_task_errors_name_the_reference(
    user_module: str, user_data: Path, program_attr: str, metric_attr: str, expected: str
) -> None:
    program_ref = f"{user_module}:{program_attr}"
    metric_ref = f"{user_module}:{metric_attr}"
    with pytest.raises(UserTaskError) as info:
        load_user_task(program_ref, metric_ref, user_data)
    message = str(info.value)
    assert expected in message
    assert program_ref in message or metric_ref in message
    assert isinstance(info.value, ValueError)


def test_load_user_task_unimportable_module(user_module: str, user_data: Path) -> None:
    with pytest.raises(UserTaskError, match="cannot import module 'no_such_module_xyz'") as info:
        load_user_task("no_such_module_xyz:Program", f"{user_module}:exact", user_data)
    assert "'no_such_module_xyz:Program'" in str(info.value)


def test_load_user_task_module_that_fails_on_import(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_data: Path
) -> None:
    name = f"broken_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def oops(:\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserTaskError, match="SyntaxError") as info:
        load_user_task(f"{name}:Program", f"{name}:exact", user_data)
    assert f"'{name}:Program'" in str(info.value)


@pytest.mark.parametrize("ref", ["no_colon", ":Program", "module:"])
def test_load_user_task_malformed_reference(user_data: Path, ref: str) -> None:
    with pytest.raises(UserTaskError, match="must look like 'module:attribute'"):
        load_user_task(ref, "x:y", user_data)


def test_load_user_task_validates_the_dataset(user_module: str, tmp_path: Path) -> None:
    path = _write(tmp_path, '{"question": "q", "answer": "a"}\n', name="bad.jsonl")
    with pytest.raises(DatasetError, match=r"bad\.jsonl:1: missing field 'confidence'"):
        load_user_task(f"{user_module}:Program", f"{user_module}:exact", path)
