"""The `dspyflow` command: the main job on the sim LM, queries, and bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flows.cli import app
from storage.repository import Repository

runner = CliRunner()


def invoke(*args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), catch_exceptions=False)


def _no_runs_written() -> bool:
    return Repository().list_runs() == []


def test_optimize_then_query(prefect_harness, use_database: str) -> None:
    result = invoke(
        "optimize",
        "--task",
        "intent",
        "--optimizer",
        "mipro",
        "--budget",
        "light",
        "--lm",
        "sim",
        "--max-train",
        "20",
        "--max-val",
        "20",
        "--max-test",
        "20",
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["state"] == "succeeded" and summary["simulated"] is True

    listed = invoke("runs", "list", "--format", "json")
    assert listed.exit_code == 0
    (row,) = json.loads(listed.stdout)
    for key in (
        "id",
        "state",
        "task",
        "optimizer",
        "lm",
        "baseline_score",
        "best_score",
        "duration_s",
        "lm_calls",
    ):
        assert key in row
    assert row["id"] == summary["run_id"] and row["lm"] == "sim" and row["lm_calls"] > 0
    assert row["duration_s"] > 0

    as_csv = invoke("runs", "list", "--format", "csv")
    (csv_row,) = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert csv_row["id"] == row["id"] and float(csv_row["best_score"]) == row["best_score"]

    table = invoke("runs", "list")
    assert row["id"][:12] in table.stdout

    shown = invoke("runs", "show", row["id"][:8], "--format", "json")
    detail = json.loads(shown.stdout)
    assert detail["id"] == row["id"] and isinstance(
        detail["program_state"]["classify"]["demos"], list
    )
    assert detail["spec"]["task"] == "intent"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "poetry"], "unknown task 'poetry'"),
        (["--optimizer", "sgd"], "unknown optimizer 'sgd'"),
        (["--lm", "gpt4"], "unknown LM 'gpt4'"),
        (["--budget", "huge"], "budget"),
        (["--time-budget", "0"], "time_budget_s"),
    ],
)
def test_bad_input_fails_clearly_and_writes_nothing(use_database, args, message) -> None:
    result = runner.invoke(app, ["optimize", "--lm", "sim", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output
    assert _no_runs_written()


def test_malformed_dataset_row_names_the_line(use_database, tmp_path: Path) -> None:
    program = tmp_path / "my_prog.py"
    program.write_text(
        "import dspy\n"
        "class Prog(dspy.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.predict = dspy.Predict('question -> answer')\n"
        "    def forward(self, question):\n"
        "        return self.predict(question=question)\n"
        "def metric(gold, pred, trace=None):\n"
        "    return float(gold.answer == pred.answer)\n"
    )
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "1+1", "answer": "2"}\n{"question": "2+2", "answer": "4"\n')
    result = runner.invoke(
        app,
        [
            "optimize",
            "--lm",
            "sim",
            "--program",
            f"{program}:Prog",
            "--metric",
            f"{program}:metric",
            "--dataset",
            str(data),
        ],
    )
    assert result.exit_code != 0
    assert "data.jsonl:2" in result.output
    assert _no_runs_written()


def test_unreachable_database_url(monkeypatch) -> None:
    monkeypatch.setenv(
        "DSPYFLOW_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:1/x?connect_timeout=2"
    )
    result = runner.invoke(app, ["runs", "list"])
    assert result.exit_code != 0
    assert "cannot reach the database" in result.output


def test_local_extra_missing_is_a_clear_error(use_database, monkeypatch) -> None:
    import tasks.lm.local

    real_find_spec = tasks.lm.local.importlib.util.find_spec
    monkeypatch.setattr(
        tasks.lm.local.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a),
    )
    result = runner.invoke(app, ["optimize", "--lm", "local"])
    assert result.exit_code != 0
    assert "pip install 'dspyflow[local]'" in result.output
    assert _no_runs_written()


def test_db_upgrade_command(monkeypatch, sqlite_url: str) -> None:
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", sqlite_url)
    result = invoke("db", "upgrade")
    assert result.exit_code == 0 and "empty -> " in result.output
    current = invoke("db", "current")
    from storage.db import head_revision

    assert current.stdout.count(head_revision()) == 2
