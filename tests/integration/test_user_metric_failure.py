"""A user metric that fails ends its run with an error that names the metric (it was
recorded as DSPy's "Execution cancelled due to errors or interruption")."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from storage.db import get_engine
from storage.repository import Repository
from tasks.cycle.spec import CycleSpec
from tasks.cycle.steps import run_cycle

USER_MODULE = """
import dspy

class Program(dspy.Module):
    def __init__(self):
        super().__init__()
        self.predict = dspy.Predict("question -> answer")

    def forward(self, question):
        return self.predict(question=question)

def raises(gold, pred, trace=None):
    raise ZeroDivisionError("my metric divides by zero")

def returns_text(gold, pred, trace=None):
    return "yes"
"""


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("raises", "raised ZeroDivisionError: my metric divides by zero"),
        ("returns_text", "returned str 'yes'; a metric returns a number"),
    ],
)
def test_a_failing_metric_is_the_runs_error(
    tmp_path: Path, sqlite_url: str, metric: str, expected: str
) -> None:
    program = tmp_path / "bad_metric_prog.py"
    program.write_text(textwrap.dedent(USER_MODULE), encoding="utf-8")
    data = tmp_path / "qa.jsonl"
    data.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(10))
    )
    spec = CycleSpec(
        lm={"model": "sim"},  # type: ignore[arg-type]
        program=f"{program}:Program",
        metric=f"{program}:{metric}",
        dataset=data,
        optimizer="genetic",
    )
    repo = Repository(get_engine(sqlite_url))
    summary = run_cycle(spec, repo)
    assert summary.state == "failed"
    assert summary.error is not None
    assert "Execution cancelled" not in summary.error, summary.error
    assert f"metric '{program}:{metric}' {expected}" in summary.error, summary.error
    assert repo.get_run(summary.run_id).error == summary.error
