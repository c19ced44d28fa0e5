"""Small defects of issue 11 that need no database: the splits cache key, budgets that are
not finite, a failing user metric, load-test credentials and the default threshold."""

from __future__ import annotations

import inspect
import json
import math
import pickle
import textwrap
import uuid
from pathlib import Path

import dspy
import pytest
from pydantic import ValidationError

from tasks.cycle.spec import CycleSpec
from tasks.programs import TaskDefinition
from tasks.programs.dataset import UserMetricError, load_user_task

# --- the splits cache (item 7) ---------------------------------------------------------------


def _task(path: Path, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> TaskDefinition:
    return TaskDefinition(
        name=f"t-{'-'.join(outputs)}",
        description="",
        build_program=dspy.Module,
        metric=lambda gold, pred, trace=None: 1.0,
        input_fields=inputs,
        output_fields=outputs,
        dataset_path=path,
        wrong_answer=lambda gold, rng: gold,
    )


def test_two_tasks_on_one_file_get_their_own_fields(tmp_path: Path) -> None:
    """The cache key left out the output fields: the second task got the first's examples."""
    data = tmp_path / "shared.jsonl"
    rows = [{"text": f"t{i}", "label": f"l{i}", "topic": f"p{i}"} for i in range(10)]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    by_label = _task(data, ("text",), ("label",)).load_splits()
    by_topic = _task(data, ("text",), ("topic",)).load_splits()
    assert set(by_label.train[0].keys()) == {"text", "label"}
    assert set(by_topic.train[0].keys()) == {"text", "topic"}
    # and the cache still serves a repeat of the same task
    again = _task(data, ("text",), ("topic",)).load_splits()
    assert again.train[0] is by_topic.train[0]


# --- budgets that are not numbers one can count down (item 6) -----------------------------


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, "inf", "nan", -5.0, 0.0])
def test_time_budget_must_be_a_finite_positive_number(value: object) -> None:
    with pytest.raises(ValidationError) as info:
        CycleSpec(lm={"model": "sim"}, time_budget_s=value)  # type: ignore[arg-type]
    (error,) = info.value.errors()
    assert error["loc"] == ("time_budget_s",)
    assert "finite" in error["msg"] or "greater than 0" in error["msg"]


def test_cost_budget_must_be_finite() -> None:
    with pytest.raises(ValidationError, match="finite"):
        CycleSpec(
            lm={"model": "sim", "price_per_1k_input_usd": 0.1},  # type: ignore[arg-type]
            cost_budget_usd=math.inf,
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("budget_warning_at", math.nan),
        ("lm.sim_latency_ms", math.inf),
        ("lm.price_per_1k_input_usd", math.inf),
        ("lm.temperature", math.nan),
    ],
)
def test_no_spec_field_takes_inf_or_nan(field: str, value: float) -> None:
    lm: dict[str, object] = {"model": "sim"}
    fields: dict[str, object] = {"lm": lm}
    if field.startswith("lm."):
        lm[field.removeprefix("lm.")] = value
    else:
        fields[field] = value
    with pytest.raises(ValidationError) as info:
        CycleSpec(**fields)  # type: ignore[arg-type]
    (error,) = info.value.errors()
    assert ".".join(map(str, error["loc"])) == field
    assert "finite" in error["msg"]


def test_cli_refuses_an_infinite_time_budget(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from flows.cli import app
    from storage.repository import Repository

    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", sqlite_url)
    result = CliRunner().invoke(app, ["optimize", "--lm", "sim", "--time-budget", "inf"])
    assert result.exit_code == 2, result.output
    assert "time_budget_s" in result.output and "finite" in result.output
    assert "Traceback" not in result.output
    assert Repository().list_runs() == []


# --- a user metric that fails (item 8) -----------------------------------------------------

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

def returns_none(gold, pred, trace=None):
    return None

def good(gold, pred, trace=None):
    return float(gold.answer == pred.answer)
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = f"user_metric_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE), encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture
def user_data(tmp_path: Path) -> Path:
    path = tmp_path / "qa.jsonl"
    path.write_text(
        "".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(10))
    )
    return path


def test_a_raising_metric_is_named_in_the_error(user_module: str, user_data: Path) -> None:
    task = load_user_task(f"{user_module}:Program", f"{user_module}:raises", user_data)
    gold = task.load_splits().train[0]
    with pytest.raises(UserMetricError) as info:
        task.metric(gold, dspy.Prediction(answer="x"))
    message = str(info.value)
    assert f"{user_module}:raises" in message
    assert "ZeroDivisionError: my metric divides by zero" in message


def test_a_metric_returning_no_number_is_named(user_module: str, user_data: Path) -> None:
    task = load_user_task(f"{user_module}:Program", f"{user_module}:returns_none", user_data)
    gold = task.load_splits().train[0]
    with pytest.raises(UserMetricError, match="returned NoneType"):
        task.metric(gold, dspy.Prediction(answer="x"))


def test_the_wrapped_metric_keeps_its_signature_and_pickles(
    user_module: str, user_data: Path
) -> None:
    from tasks.optimizers.base import five_arg_metric

    task = load_user_task(f"{user_module}:Program", f"{user_module}:good", user_data)
    assert str(inspect.signature(task.metric)) == "(gold, pred, trace=None)"
    gold = task.load_splits().train[0]
    assert five_arg_metric(task.metric)(gold, dspy.Prediction(answer=gold.answer), None, "p", None)
    assert pickle.loads(pickle.dumps(task.metric))(gold, dspy.Prediction(answer="x")) == 0.0


# --- load-test credentials and the default threshold (item 9) -----------------------------


def test_urls_and_headers_are_redacted() -> None:
    from tasks.load.redact import redact_headers, redact_url, scrub, secrets_of

    assert redact_url("https://alice:s3cret@api.example.com:8443/v1?q=1&api_key=K123&x=") == (
        "https://alice:***@api.example.com:8443/v1?q=1&api_key=***&x="
    )
    assert redact_url("https://ghp_TOKEN123@example.com/") == "https://***@example.com/"
    assert redact_url("http://example.com/plain?page=2") == "http://example.com/plain?page=2"
    headers = {"Authorization": "Bearer abcdefgh12345", "X-API-Key": "k", "Accept": "json"}
    assert redact_headers(headers) == {
        "Authorization": "***",
        "X-API-Key": "***",
        "Accept": "json",
    }
    secrets = secrets_of("http://u:pw123@h/", headers)
    text = "401 for http://u:pw123@h/ with token abcdefgh12345"
    assert scrub(text, secrets) == "401 for http://u:***@h/ with token ***"


def test_load_test_config_is_stored_without_credentials() -> None:
    from tasks.load.config import LoadTestConfig

    config = LoadTestConfig(
        url="http://bob:hunter22@127.0.0.1:9/path?token=abc123",
        headers={"Authorization": "Basic Ym9iOmh1bnRlcjIy", "Accept": "text/plain"},
        rps=1,
        duration_s=1,
    )
    from flows.load_test import load_test

    # what we store, and what Prefect records as the flow run's parameters
    dumped = json.dumps(config.redacted_dump()) + config.model_dump_json()
    dumped += json.dumps(load_test.serialize_parameters({"config": config}))
    for secret in ("hunter22", "abc123", "Ym9iOmh1bnRlcjIy"):
        assert secret not in dumped and secret not in config.target_label
    assert "text/plain" in dumped and "bob" in config.target_label
    assert config.url and "hunter22" in config.url  # the generator still gets the real URL


def test_all_errors_and_no_thresholds_fails() -> None:
    """A load test in which every request failed passed with exit 0 when no -t was given."""
    from tasks.load.config import DEFAULT_THRESHOLDS, LoadTestConfig
    from tasks.load.runner import judge, run_load_test

    def broken() -> None:
        raise ConnectionError("refused")

    def fine() -> None:
        return None

    config = LoadTestConfig(rps=40, duration_s=0.5)
    failed = judge(run_load_test(config, target=broken), config)
    assert not failed.passed
    assert [t.expr for t in failed.breached] == list(DEFAULT_THRESHOLDS)
    assert judge(run_load_test(config, target=fine), config).passed
    # the user's own thresholds replace the default: accepting every error rate is allowed
    lenient = LoadTestConfig(rps=40, duration_s=0.5, thresholds=["error_rate<=1"])
    assert judge(run_load_test(lenient, target=broken), lenient).passed


@pytest.mark.parametrize("field", ["rps", "timeout_s", "spike_multiplier"])
def test_load_test_config_refuses_inf(field: str) -> None:
    from tasks.load.config import LoadTestConfig

    fields: dict[str, object] = {"url": "http://x", "rps": 1, "duration_s": 1, field: math.inf}
    with pytest.raises(ValidationError, match=f"{field}\n.*finite"):
        LoadTestConfig(**fields)  # type: ignore[arg-type]
