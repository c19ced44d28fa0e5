"""A cycle's program and data: the task resolved (built-in or the user's files) and its
splits capped, with the budgets checked against them. Every input error surfaces here,
before a run row is written or Prefect starts."""

from __future__ import annotations

import dspy

from tasks.cycle.budget import check_budgets
from tasks.cycle.spec import CycleSpec
from tasks.programs import TaskDefinition, get_task
from tasks.programs.dataset import Splits, load_user_task


def resolve_task(spec: CycleSpec) -> TaskDefinition:
    if spec.program is not None:
        assert spec.metric is not None and spec.dataset is not None  # checked by CycleSpec
        return load_user_task(spec.program, spec.metric, spec.dataset)
    return get_task(spec.task)


def _cap(examples: list[dspy.Example], limit: int | None) -> list[dspy.Example]:
    return examples if limit is None else examples[:limit]


def load_cycle_data(spec: CycleSpec) -> tuple[TaskDefinition, Splits]:
    """Task and capped splits, with the budgets checked against them: every input error
    surfaces here, before a run row is written or Prefect starts."""
    task_def = resolve_task(spec)
    splits = task_def.load_splits()
    splits = Splits(
        train=_cap(splits.train, spec.max_train),
        val=_cap(splits.val, spec.max_val),
        test=_cap(splits.test, spec.max_test),
    )
    check_budgets(spec, len(splits.val) or len(splits.train))
    return task_def, splits
