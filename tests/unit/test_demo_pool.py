"""The cycle's embedding-based demo pool (`CycleSpec.demo_selection`)."""

from __future__ import annotations

from collections import Counter

import pytest

from tasks.cycle.data import load_cycle_data
from tasks.cycle.spec import CycleSpec, LMSpec
from tasks.cycle.steps import select_demo_pool


def _pool(mode: str, k: int = 16):  # type: ignore[no-untyped-def]
    spec = CycleSpec(task="intent", lm=LMSpec(model="sim"), demo_selection=mode, demo_pool_size=k)
    task, splits = load_cycle_data(spec)
    return splits, select_demo_pool(spec, task, splits)


def test_no_selection_keeps_the_whole_trainset() -> None:
    splits, pool = _pool("none")
    assert pool == splits.train


@pytest.mark.parametrize("mode", ["diverse", "nearest"])
def test_selected_pool_is_a_subset_of_the_requested_size(mode: str) -> None:
    splits, pool = _pool(mode, k=12)
    assert len(pool) == 12
    train_ids = {id(ex) for ex in splits.train}
    assert all(id(ex) in train_ids for ex in pool)
    assert len({id(ex) for ex in pool}) == 12, "no duplicates"


def test_diverse_pool_covers_most_labels() -> None:
    _, pool = _pool("diverse", k=16)
    # 10 intents; a spread-out pool of 16 must not be a handful of near-duplicates.
    assert len(Counter(ex.intent for ex in pool)) >= 8


def test_nearest_pool_matches_the_validation_labels() -> None:
    splits, pool = _pool("nearest", k=16)
    val_labels = Counter(ex.intent for ex in splits.val)
    pool_labels = Counter(ex.intent for ex in pool)
    assert set(pool_labels) <= set(val_labels)
    assert len(pool_labels) >= 8


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="demo_selection"):
        CycleSpec(task="intent", lm=LMSpec(model="sim"), demo_selection="random")  # type: ignore[arg-type]
