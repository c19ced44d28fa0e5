"""The batch's boundary models: `BatchOptions` in (flow parameter, CLI, Python) and
`BatchSummary` out (CLI output, flow return value, Prefect artifact)."""

from __future__ import annotations

import collections
from collections.abc import Iterable
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.batch.jobs import RejectedLine
from tasks.batch.queue import DEFAULT_CAPACITY, DEFAULT_MAX_CONCURRENT, Backpressure, QueueMetrics
from tasks.lm.rate_limit import LimiterMetrics

_DASK_SCHEMES = {"tcp", "tls", "ucx", "ws", "wss"}


def top_errors(runs: Iterable[Any], n: int = 5) -> dict[str, int]:
    """The commonest reasons the unsucceeded runs give (first clause, 120 characters)."""
    errors = collections.Counter(
        (r.error or "").split(";")[0][:120] for r in runs if r.state != "succeeded" and r.error
    )
    return dict(errors.most_common(n))


class TaskRunnerKind(StrEnum):
    """Where a batch's cycles run."""

    threads = "threads"  # a thread pool in the flow's process
    dask = "dask"  # the processes of a Dask cluster


class BatchOptions(BaseModel):
    """How a batch runs: validated at the boundary (flow parameters, CLI, Python)."""

    model_config = ConfigDict(extra="forbid")

    workers: int = Field(
        64, gt=0, le=4096, description="Task-runner threads, or Dask task slots in all."
    )
    max_concurrent: int = Field(
        DEFAULT_MAX_CONCURRENT, gt=0, description="Cap on cycles in flight at once."
    )
    capacity: int = Field(DEFAULT_CAPACITY, gt=0, description="Queue capacity.")
    backpressure: Backpressure = Field(
        Backpressure.refuse,
        description="At >= 90 % of capacity: `refuse` (job cancelled with the reason) or "
        "`defer` (held and admitted as the queue drains).",
    )
    lm_rps: float | None = Field(None, gt=0, description="LM requests/s for the whole batch.")
    lm_tokens_per_min: float | None = Field(None, gt=0, description="LM prompt tokens/min.")
    prefect_rate_limit: str | None = Field(
        None,
        description="Name of a Prefect global rate limit shared across processes; created "
        "or updated with `lm_rps` when that is given.",
    )
    task_tags: list[str] | None = Field(
        None,
        description="Tags of the cycle tasks. None: `optimization` when a Prefect "
        "concurrency limit on that tag exists at batch start (it then caps cycles across "
        "flows), else none: Prefect checks the limits of every tag of every task run, two "
        "API calls each, about a third of a capacity batch's throughput on 2 cores.",
    )
    task_runner: TaskRunnerKind = Field(
        TaskRunnerKind.threads,
        description="`threads` (this process) or `dask` (the cluster at `dask_address`).",
    )
    dask_address: str | None = Field(None, description="Dask scheduler, e.g. tcp://host:8786.")
    batch_id: str | None = Field(
        None, max_length=32, description="The batch's id in the results database; new when empty."
    )
    skip_invalid: bool = Field(
        False, description="Run the valid lines of a jobs file and report the bad ones."
    )

    @model_validator(mode="after")
    def _dask_needs_shared_limits(self) -> BatchOptions:
        if self.dask_address is not None:
            if self.task_runner != "dask":
                raise ValueError(
                    "dask_address is for task_runner=dask: add --task-runner dask, or drop "
                    "--dask-address to run in this process"
                )
            parts = urlsplit(self.dask_address)
            try:
                port = parts.port
            except ValueError:
                port = None
            if parts.scheme not in _DASK_SCHEMES or not parts.hostname or port is None:
                raise ValueError(
                    f"dask_address {self.dask_address!r} is not a scheduler address: "
                    "use tcp://HOST:PORT (e.g. tcp://scheduler:8786)"
                )
        if self.task_runner != "dask":
            return self
        if self.lm_rps and not self.prefect_rate_limit:
            raise ValueError(
                "task_runner=dask runs cycles in other processes, each of which would get "
                "its own copy of the in-process LM rate limit (N processes, N x lm_rps); "
                "add prefect_rate_limit (--prefect-rate-limit NAME) to share lm_rps "
                "through the Prefect server, or use task_runner=threads"
            )
        if self.lm_tokens_per_min:
            raise ValueError(
                "lm_tokens_per_min (--lm-tpm) is enforced in one process only and cannot "
                "be shared across Dask workers; drop it and limit requests/s with "
                "--lm-rps and --prefect-rate-limit, or use task_runner=threads"
            )
        return self

    @property
    def in_flight_cap(self) -> int:
        # More in flight than slots would queue jobs inside the runner, where dspyflow's
        # priorities no longer apply.
        return min(self.workers, self.max_concurrent)


class BatchSummary(BaseModel):
    """What a batch reports (CLI output, flow return value, Prefect artifact)."""

    batch_id: str
    jobs: int
    states: dict[str, int]
    succeeded: int
    failed: int
    refused: int
    deferred: int
    success_rate: float
    wall_s: float
    jobs_per_s: float = Field(description="Jobs run (refused ones excluded) per second.")
    queue_wait_p50_s: float | None
    queue_wait_p95_s: float | None
    run_p50_s: float | None
    run_p95_s: float | None
    max_in_flight: int
    workers: int
    max_concurrent: int
    capacity: int
    lm_calls: int
    lm_rps_limit: float | None
    simulated: bool
    top_errors: dict[str, int] = Field(default_factory=dict)
    rejected_lines: list[RejectedLine] = Field(default_factory=list)
    queue: QueueMetrics
    limiter: LimiterMetrics | None = None

    def to_markdown(self) -> str:
        sim = " (simulated LM: capacity figures, not model quality)" if self.simulated else ""
        rows = [
            ("jobs", self.jobs),
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("refused (backpressure)", self.refused),
            ("success rate", f"{self.success_rate:.2%}"),
            ("wall time", f"{self.wall_s:.2f} s"),
            ("throughput", f"{self.jobs_per_s:.1f} jobs/s"),
            (
                "queue wait p50 / p95",
                f"{_ms(self.queue_wait_p50_s)} / {_ms(self.queue_wait_p95_s)}",
            ),
            ("run time p50 / p95", f"{_ms(self.run_p50_s)} / {_ms(self.run_p95_s)}"),
            ("max in flight", f"{self.max_in_flight} (workers {self.workers})"),
            ("LM calls", self.lm_calls),
        ]
        lines = [f"# Optimization batch `{self.batch_id}`{sim}", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows]
        lines += ["", "| state | runs |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(self.states.items())]
        if self.top_errors:
            lines += ["", "| error | runs |", "|---|---|"]
            lines += [f"| {k.replace('|', '/')} | {v} |" for k, v in self.top_errors.items()]
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"
