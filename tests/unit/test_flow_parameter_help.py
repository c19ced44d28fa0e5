"""Every parameter of every flow has help in Prefect's UI (the run form of a deployment
shows each parameter's description from the flow's Google-style `Args:` section)."""

from __future__ import annotations

import pytest
from prefect import Flow
from prefect.utilities.callables import parameter_schema

from flows.gpu_benchmark import gpu_benchmark
from flows.load_test import load_test, load_tiers
from flows.nightly import nightly_benchmarks
from flows.optimization import optimization_batch, optimization_cycle

FLOWS = [
    optimization_cycle,
    optimization_batch,
    nightly_benchmarks,
    gpu_benchmark,
    load_test,
    load_tiers,
]


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_flow_parameter_has_a_description(flow: Flow) -> None:  # type: ignore[type-arg]
    properties = parameter_schema(flow.fn).model_dump()["properties"]
    assert properties, f"{flow.name} has no parameters?"
    missing = [name for name, prop in properties.items() if not prop.get("description")]
    assert not missing, f"{flow.name}: no help in the Prefect UI for {missing}"


@pytest.mark.parametrize("flow", FLOWS, ids=lambda f: f.name)
def test_every_field_of_a_flows_options_model_has_a_description(flow: Flow) -> None:  # type: ignore[type-arg]
    """A flow that takes a model (CycleSpec, BatchOptions, NightlyOptions, LoadTestConfig)
    gets a nested form in the UI: each field of it needs its own help."""
    definitions = parameter_schema(flow.fn).model_dump().get("definitions") or {}
    missing = [
        f"{model}.{name}"
        for model, schema in definitions.items()
        for name, prop in (schema.get("properties") or {}).items()
        if not prop.get("description")
    ]
    assert not missing, f"{flow.name}: no help in the Prefect UI for {missing}"
