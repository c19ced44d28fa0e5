"""Setups that cannot work across processes are refused before any run row is written,
with the reason and the fix in one line (tasks.batch.cluster, `dspyflow batch`).

The refusals that need a scheduler use an in-process Dask cluster (a real scheduler and
worker, threads); the real processes are in tests/cluster/."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.batch.cluster import ClusterSetupError, check_cluster_setup
from tasks.batch.local_cluster import free_port
from tasks.batch.models import BatchOptions

PG = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


@contextlib.contextmanager
def api_url(url: str | None) -> Iterator[None]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if url is None:
        with temporary_settings(restore_defaults={PREFECT_API_URL}):
            yield
    else:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield


def dask(address: str = "tcp://127.0.0.1:8786", **kw: object) -> BatchOptions:
    return BatchOptions(task_runner="dask", dask_address=address, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"dask_address": "tcp://h:8786"}, "add --task-runner dask"),
        ({"task_runner": "dask", "dask_address": "h:8786"}, "use tcp://HOST:PORT"),
        ({"task_runner": "dask", "dask_address": "tcp://h"}, "use tcp://HOST:PORT"),
        ({"task_runner": "dask", "lm_rps": 5}, "add prefect_rate_limit"),
        (
            {"task_runner": "dask", "lm_tokens_per_min": 9000, "prefect_rate_limit": "x"},
            "cannot be shared across Dask workers",
        ),
    ],
)
def test_static_refusals_name_the_fix(options: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        BatchOptions(**options)  # type: ignore[arg-type]
    message = info.value.errors()[0]["msg"]
    assert needle in message and "\n" not in message


def test_threads_and_local_dask_are_not_checked() -> None:
    assert check_cluster_setup(BatchOptions(lm_rps=5), "sqlite:///x.db") is None
    assert check_cluster_setup(BatchOptions(task_runner="dask"), "sqlite:///x.db") is None
    ok = BatchOptions(task_runner="dask", lm_rps=5, prefect_rate_limit="lm")
    assert ok.dask_address is None


def test_sqlite_results_with_remote_workers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ClusterSetupError, match="SQLite.*DSPYFLOW_DATABASE_URL=postgresql"):
        check_cluster_setup(dask(), f"sqlite:///{tmp_path / 'r.db'}")
    assert not (tmp_path / "r.db").exists()


def test_no_prefect_api_url_is_refused() -> None:
    with api_url(None), pytest.raises(ClusterSetupError) as info:
        check_cluster_setup(dask(), PG)
    assert "PREFECT_API_URL is unset" in str(info.value)
    assert "export PREFECT_API_URL=http://HOST:4200/api" in str(info.value)


def test_loopback_api_with_a_remote_scheduler_is_refused() -> None:
    with api_url("http://127.0.0.1:4200/api"), pytest.raises(ClusterSetupError, match="loopback"):
        check_cluster_setup(dask("tcp://10.1.2.3:8786"), PG)


def test_an_api_that_does_not_answer_is_refused() -> None:
    dead = f"http://127.0.0.1:{free_port()}/api"
    with api_url(dead), pytest.raises(ClusterSetupError, match="does not answer"):
        check_cluster_setup(dask(), PG)


@pytest.fixture
def live_api(prefect_harness: None) -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    assert url
    return url


def test_no_scheduler_is_refused(live_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.batch.cluster

    monkeypatch.setattr(tasks.batch.cluster, "_CONNECT_TIMEOUT_S", 2.0)
    with pytest.raises(ClusterSetupError, match="no Dask scheduler answers.*dask scheduler"):
        check_cluster_setup(dask(f"tcp://127.0.0.1:{free_port()}"), PG)


def test_a_scheduler_without_workers_is_refused(live_api: str) -> None:
    from distributed import LocalCluster

    with (
        LocalCluster(
            n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None
        ) as lc,
        pytest.raises(ClusterSetupError, match="has no workers; start `dask worker"),
    ):
        check_cluster_setup(dask(lc.scheduler_address), PG)


def test_workers_that_cannot_reach_the_results_database_are_refused(live_api: str) -> None:
    from distributed import LocalCluster

    missing = PG.rsplit("/", 1)[0] + "/no_such_database_here"
    with LocalCluster(
        n_workers=1,
        threads_per_worker=1,
        processes=False,
        protocol="tcp",
        host="127.0.0.1",
        dashboard_address=None,
    ) as lc:
        info = check_cluster_setup(dask(lc.scheduler_address), PG)
        assert info is not None and info.workers == 1 and info.threads == 1
        with pytest.raises(ClusterSetupError) as refused:
            check_cluster_setup(dask(lc.scheduler_address), missing)
    message = str(refused.value)
    assert "cannot reach the results database" in message and "no_such_database_here" in message
    assert "start every worker with dspyflow installed" in message


def test_cli_refuses_before_any_row(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """`dspyflow batch --task-runner dask`: exit 2, one `error:` line, no rows."""
    from typer.testing import CliRunner

    from flows.cli import app
    from storage.db import get_engine
    from storage.repository import Repository

    runner = CliRunner()
    address = f"tcp://127.0.0.1:{free_port()}"
    base = ["batch", "--generate", "5", "--lm", "sim", "--task-runner", "dask"]
    cases = [
        (postgres_url, [*base, "--dask-address", address], "PREFECT_API_URL is unset"),
        (postgres_url, [*base, "--dask-address", address, "--lm-rps", "5"], "prefect_rate_limit"),
        (postgres_url, [*base, "--dask-address", address, "--lm-tpm", "900"], "--lm-tpm"),
        (postgres_url, ["batch", "--generate", "5", "--dask-address", address], "dask_address"),
        (f"sqlite:///{tmp_path / 'r.db'}", [*base, "--dask-address", address], "SQLite"),
    ]
    with api_url(None):
        for url, args, needle in cases:
            monkeypatch.setenv("DSPYFLOW_DATABASE_URL", url)
            result = runner.invoke(app, args, catch_exceptions=False)
            assert result.exit_code == 2, (args, result.output)
            assert needle in result.stderr, (args, result.stderr)
            assert result.stderr.strip().startswith("error:"), result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert Repository(get_engine(postgres_url)).list_runs(limit=None) == []
    assert not (tmp_path / "r.db").exists()
