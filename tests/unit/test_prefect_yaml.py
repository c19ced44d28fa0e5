"""prefect.yaml stays consistent with the flows (fast; the real deploy is in
tests/integration/test_deployments.py)."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {
    # deployment name: (flow name, work pool)
    "cycle": ("optimization-cycle", "cpu"),
    "batch": ("optimization-batch", "cpu"),
    "gpu": ("gpu-benchmark", "gpu"),
    "http": ("load-test", "cpu"),
    "tiers": ("load-tiers", "cpu"),
    "nightly": ("nightly-benchmarks", "gpu"),
}


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "prefect.yaml").read_text())


def _flow(entrypoint: str) -> Any:
    path, _, attr = entrypoint.partition(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    return getattr(module, attr)


def test_every_deployment_names_a_flow_and_a_pool(config: dict[str, Any]) -> None:
    from prefect import Flow

    deployments = {d["name"]: d for d in config["deployments"]}
    assert set(deployments) == set(EXPECTED)
    for name, (flow_name, pool) in EXPECTED.items():
        d = deployments[name]
        flow = _flow(d["entrypoint"])
        assert isinstance(flow, Flow) and flow.name == flow_name, name
        assert d["work_pool"]["name"] == pool, name
        assert "dspyflow" in d["tags"], name
        # Deployment defaults must be parameters the flow takes, valid for its models.
        params = d.get("parameters") or {}
        assert set(params) <= set(flow.parameters.properties), name


def test_pull_step_and_nightly_schedule(config: dict[str, Any]) -> None:
    (step,) = config["pull"]
    assert step == {
        "prefect.deployments.steps.set_working_directory": {
            "directory": "{{ $DSPYFLOW_PROJECT_DIR }}"
        }
    }
    nightly = next(d for d in config["deployments"] if d["name"] == "nightly")
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert nightly["concurrency_limit"]["limit"] == 1


def test_cycle_default_spec_validates(config: dict[str, Any]) -> None:
    from tasks.cycle.spec import CycleSpec

    cycle = next(d for d in config["deployments"] if d["name"] == "cycle")
    spec = CycleSpec.model_validate(cycle["parameters"]["spec"])
    assert spec.lm.model == "local" and spec.optimizer == "mipro"


def test_nightly_parameters_all_have_defaults() -> None:
    """A schedule passes no parameters: every one needs a default."""
    from flows.nightly import nightly_benchmarks

    assert nightly_benchmarks.parameters.required == []
