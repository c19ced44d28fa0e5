"""A spec maps to its run row once (`CycleSpec.run_fields`), for single runs, batches and
the nightly suite alike: runs list, compare and the report read these columns."""

from __future__ import annotations

from storage.repository import Repository
from tasks.cycle.spec import CycleSpec, LMSpec


def test_a_builtin_task_on_the_sim_lm(repo: Repository) -> None:
    spec = CycleSpec(task="intent", optimizer="genetic", lm=LMSpec(model="sim"), priority=3)
    run = repo.get_run(repo.create_run(**spec.run_fields()))
    assert (run.task, run.optimizer, run.budget, run.lm) == ("intent", "genetic", "light", "sim")
    assert (run.priority, run.simulated, run.state) == (3, True, "queued")
    assert CycleSpec.model_validate(run.spec) == spec


def test_a_user_program_is_named_by_its_reference() -> None:
    spec = CycleSpec(
        program="my_pkg.programs:qa",
        metric="my_pkg.metrics:exact",
        dataset="data/qa.jsonl",
        lm=LMSpec(model="openai/gpt-4o-mini"),
    )
    fields = spec.run_fields()
    assert fields["task"] == "my_pkg.programs:qa"
    assert fields["simulated"] is False
