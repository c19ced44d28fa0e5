"""`dspyflow gpu-bench`: run the GPU ops benchmark as the `gpu-benchmark` flow."""

from __future__ import annotations

import json
import sys
from enum import StrEnum

import typer

from flows.cli.app import OutputFormat, app, emit_rows, fail, user_errors


class DeviceChoice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


class SizeChoice(StrEnum):
    small = "small"
    full = "full"


@app.command("gpu-bench")
def gpu_bench(
    device: DeviceChoice = typer.Option(DeviceChoice.auto, help="auto, cpu, cuda or mps."),
    sizes: SizeChoice = typer.Option(
        SizeChoice.small, help="small (seconds on a CPU) or full (the H100/H200 targets)."
    ),
    fmt: OutputFormat = typer.Option(OutputFormat.table, "--format", help="table or json."),
    store: bool = typer.Option(True, "--store/--no-store", help="Record results in the database."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show Prefect logs."),
) -> None:
    """Time matmul, distances, normalization and cosine top-k: ours vs plain torch."""
    from flows.cli.runtime import prepare_runtime, temporary_prefect_server

    prepare_runtime(verbose)
    if fmt is OutputFormat.csv:
        fail("--format: gpu-bench prints table or json")
    from gpu.device import DeviceUnavailableError, resolve_device

    with user_errors(DeviceUnavailableError):
        resolve_device(device.value)  # an absent device fails here, before Prefect starts
        if store:
            from storage.repository import Repository

            Repository()  # the database answers (and has the right schema) before the run

    from flows.gpu_benchmark import gpu_benchmark

    with temporary_prefect_server():
        state = gpu_benchmark(
            device=device.value, sizes=sizes.value, store=store, return_state=True
        )
    if not state.is_completed():
        with user_errors(DeviceUnavailableError):
            state.result()  # re-raises the flow's error: one clear line
        fail(f"gpu-benchmark did not complete: {state.message}", code=1)
    summary = state.result()
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(summary, default=str) + "\n")
        return
    rows = [
        {"op": key, **{k: v for k, v in fig.items() if k != "meets_target"}}
        for key, fig in summary["ops"].items()
    ]
    emit_rows(
        rows,
        fmt,
        columns=[
            "op",
            "shape",
            "ours_ms",
            "torch_ms",
            "ratio",
            "gbps",
            "tflops",
            "pct_peak",
            "max_err",
            "extra_mb",
            "speedup_vs_cpu",
        ],
        title=(
            f"gpu-bench on {summary['device']} ({summary['device_name']}), "
            f"sizes {summary['sizes']}, session {summary['session_id']}"
        ),
    )
