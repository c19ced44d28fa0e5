"""Registry of the built-in tasks: a DSPy program, its metric and its dataset, by name.

Built-in tasks (`intent`, `extraction`) are chosen so that SmolLM2-135M has a weak baseline that
instruction and few-shot optimization can visibly improve. Users' own tasks are built by
`tasks.programs.dataset.load_user_task` into the same `TaskDefinition` shape.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from tasks.programs import extraction, intent

if TYPE_CHECKING:  # dataset.py imports this module; import it lazily to avoid a cycle
    from tasks.programs.dataset import Splits

DATA_DIR = Path(__file__).resolve().parent / "data"

Metric = Callable[..., float]
"""A DSPy metric: `(gold: dspy.Example, pred: dspy.Prediction, trace=None) -> float`."""

WrongAnswer = Callable[[dict[str, Any], random.Random], dict[str, Any]]
"""`(gold_outputs, rng) -> outputs`: a plausible wrong answer, for a simulated LM."""


@dataclass(frozen=True)
class TaskDefinition:
    """Everything a flow needs to optimize and evaluate one task."""

    name: str
    description: str
    # A factory rather than an instance: every optimization run must start from a fresh,
    # unoptimized program (optimizers mutate demos and instructions in place).
    build_program: Callable[[], dspy.Module]
    metric: Metric
    input_fields: tuple[str, ...]
    output_fields: tuple[str, ...]
    dataset_path: Path
    wrong_answer: WrongAnswer

    def load_splits(self) -> Splits:
        """Load this task's dataset as train/val/test `dspy.Example` lists.

        Parsed once per file version: a batch of a thousand cycles would otherwise parse
        the same file two thousand times (~6 ms each). Callers get fresh lists; the
        examples are shared and treated as read-only, as DSPy does."""
        from tasks.programs.dataset import Splits, load_jsonl

        try:
            stat = self.dataset_path.stat()
        except OSError:  # let load_jsonl raise its DatasetError naming the file
            return load_jsonl(self.dataset_path, self.input_fields, self.output_fields)
        # Every argument of load_jsonl is in the key: two tasks on one file with other
        # fields must not share examples.
        key = (
            self.dataset_path.resolve(),
            stat.st_mtime_ns,
            stat.st_size,
            self.input_fields,
            self.output_fields,
        )
        cached = _SPLITS_CACHE.get(key)
        if cached is None:
            cached = load_jsonl(self.dataset_path, self.input_fields, self.output_fields)
            _SPLITS_CACHE[key] = cached
        return Splits(train=list(cached.train), val=list(cached.val), test=list(cached.test))


_SPLITS_CACHE: dict[tuple[Any, ...], Splits] = {}


class UnknownTaskError(ValueError):
    """`get_task` was asked for a name that is not registered."""


_TASKS: dict[str, TaskDefinition] = {
    "intent": TaskDefinition(
        name="intent",
        description=(
            "Banking customer-support intent classification: a message -> one of "
            f"{len(intent.LABELS)} intents. Metric: exact label match."
        ),
        build_program=intent.build_program,
        metric=intent.metric,
        input_fields=("text",),
        output_fields=("intent",),
        dataset_path=DATA_DIR / "intent.jsonl",
        wrong_answer=intent.wrong_answer,
    ),
    "extraction": TaskDefinition(
        name="extraction",
        description=(
            "Order extraction: a customer order message -> product and quantity. "
            "Metric: mean of per-field normalized exact match."
        ),
        build_program=extraction.build_program,
        metric=extraction.metric,
        input_fields=("text",),
        output_fields=extraction.OUTPUT_FIELDS,
        dataset_path=DATA_DIR / "extraction.jsonl",
        wrong_answer=extraction.wrong_answer,
    ),
}


def list_tasks() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(_TASKS)


def get_task(name: str) -> TaskDefinition:
    """The built-in task called `name`; `UnknownTaskError` lists the known names otherwise."""
    try:
        return _TASKS[name]
    except KeyError:
        known = ", ".join(list_tasks())
        raise UnknownTaskError(f"unknown task {name!r}; known tasks: {known}") from None


__all__ = [
    "DATA_DIR",
    "Metric",
    "TaskDefinition",
    "UnknownTaskError",
    "WrongAnswer",
    "get_task",
    "list_tasks",
]
