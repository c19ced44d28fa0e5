"""Load tests (issue 11): every request failing is a failed run even without thresholds,
and credentials of the target never reach the database, the reports or the terminal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tasks.load.loopback import LoopbackServer

SECRETS = ("hunter22", "tok3n-abc", "Bearer s3cr3t-value")


def _with_credentials(url: str) -> str:
    scheme, rest = url.split("://", 1)
    return f"{scheme}://bob:hunter22@{rest}?page=1&token=tok3n-abc"


def _assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, f"{secret!r} leaked: {text[:2000]}"


@pytest.fixture
def database(prefect_harness: None, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("DSPYFLOW_DATABASE_URL", sqlite_url)
    return sqlite_url


def test_cli_all_errors_without_thresholds_fails_and_hides_the_password(
    database: str, tmp_path: Path
) -> None:
    from flows.cli import app
    from storage.repository import Repository

    runner = CliRunner()
    with LoopbackServer(error_rate=1.0) as server:
        url = _with_credentials(server.url)
        report = tmp_path / "report.html"
        result = runner.invoke(
            app,
            ["loadtest", "--url", url, "--rps", "20", "--duration", "1", "--report", str(report)],
        )
        assert server.stats().statuses[500] == 20
    assert result.exit_code == 1, result.output
    assert "error_rate<0.1" in result.output and "default" in result.output
    _assert_no_secret(result.output)
    (run,) = Repository().list_load_tests()
    assert run.passed is False and run.state == "completed"
    assert run.target.startswith("http://bob:***@")
    _assert_no_secret(json.dumps([run.target, run.config, run.summary, run.thresholds]))
    _assert_no_secret(report.read_text() + report.with_suffix(".md").read_text())
    shown = runner.invoke(app, ["loadtests", "show", run.id, "--format", "json"])
    assert shown.exit_code == 0
    _assert_no_secret(shown.output)


def test_flow_stores_headers_redacted(database: str) -> None:
    from flows.load_test import load_test
    from storage.repository import Repository
    from tasks.load.config import LoadTestConfig

    with LoopbackServer() as server:
        config = LoadTestConfig(
            # (aiohttp refuses URL credentials together with an Authorization header)
            url=f"{server.url}?token=tok3n-abc",
            headers={"Authorization": SECRETS[2], "X-Trace": "visible"},
            rps=20,
            duration_s=1,
        )
        outcome = load_test(config)
    assert outcome.passed  # no errors: the default threshold holds
    run = Repository().get_load_test(outcome.run_id)
    assert run.config["headers"] == {"Authorization": "***", "X-Trace": "visible"}
    assert run.thresholds and run.thresholds[0]["expr"] == "error_rate<0.1"
    _assert_no_secret(json.dumps([run.target, run.config, run.summary]))
    assert outcome.report_html and outcome.report_md
    _assert_no_secret(Path(outcome.report_html).read_text() + Path(outcome.report_md).read_text())
