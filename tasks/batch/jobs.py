"""A batch's jobs: read from a JSONL file (one `CycleSpec` per line), or generated for
capacity tests.

A jobs file is checked whole before anything is written: every bad line is reported with
its line number, and by default the file is rejected (`JobsFileError`), so a typo on line
517 neither half-runs a batch nor loses the valid jobs around it (fix the file and run it
again). With ``skip_invalid=True`` the valid jobs run and the bad lines come back in
`JobsFile.rejected`, to be reported with the batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ValidationError

from tasks.cycle.spec import CycleSpec, LMSpec

_MAX_LISTED = 20  # bad lines named in the exception message; all are in `.rejected`


class RejectedLine(BaseModel):
    line: int
    error: str


class JobsFile(BaseModel):
    path: str
    jobs: list[CycleSpec]
    lines: list[int]  # the file line of each job
    rejected: list[RejectedLine]


class JobsFileError(ValueError):
    """A jobs file with bad lines (or none good); `rejected` lists every bad line."""

    def __init__(self, path: str, rejected: list[RejectedLine], summary: str | None = None):
        self.path = path
        self.rejected = rejected
        shown = "; ".join(f"line {r.line}: {r.error}" for r in rejected[:_MAX_LISTED])
        more = f"; and {len(rejected) - _MAX_LISTED} more" if len(rejected) > _MAX_LISTED else ""
        head = summary or f"{path}: {len(rejected)} invalid job line(s), nothing was run"
        super().__init__(f"{head}: {shown}{more}" if rejected else head)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def load_jobs(path: str | os.PathLike[str], *, skip_invalid: bool = False) -> JobsFile:
    """Parse and validate every line of a JSONL jobs file (blank lines are skipped)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise JobsFileError(
            str(path), [], f"{path}: cannot read jobs file: {exc.strerror}"
        ) from None
    jobs: list[CycleSpec] = []
    lines: list[int] = []
    rejected: list[RejectedLine] = []
    for lineno, line_bytes in enumerate(raw.splitlines(), start=1):
        try:
            line = line_bytes.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            rejected.append(RejectedLine(line=lineno, error=f"not valid UTF-8 ({exc.reason})"))
            continue
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            rejected.append(
                RejectedLine(line=lineno, error=f"invalid JSON: {exc.msg} (column {exc.colno})")
            )
            continue
        if not isinstance(row, dict):
            rejected.append(
                RejectedLine(line=lineno, error=f"expected a JSON object, got {type(row).__name__}")
            )
            continue
        try:
            jobs.append(CycleSpec.model_validate(row))
            lines.append(lineno)
        except ValidationError as exc:
            rejected.append(RejectedLine(line=lineno, error=_validation_message(exc)))
    if not jobs and not rejected:
        raise JobsFileError(str(path), [], f"{path}: no jobs (the file is empty)")
    if rejected and (not skip_invalid or not jobs):
        raise JobsFileError(str(path), rejected)
    return JobsFile(path=str(path), jobs=jobs, lines=lines, rejected=rejected)


def write_jobs(specs: Iterable[CycleSpec], path: str | os.PathLike[str]) -> Path:
    """Write specs as a jobs file (non-default fields only), e.g. to hand a big batch to
    the flow by path: Prefect refuses flow-run parameters over 512 KB (~700 specs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for spec in specs:
            out.write(spec.model_dump_json(exclude_defaults=True) + "\n")
    return path


def batch_jobs_path(batch_id: str) -> Path:
    """Where a batch's jobs file is kept: `$DSPYFLOW_HOME/batches/<batch_id>.jsonl`."""
    from storage.db import StorageSettings

    return StorageSettings().home.expanduser() / "batches" / f"{batch_id}.jsonl"


def capacity_jobs(
    count: int,
    *,
    lm: str = "sim",
    lm_calls: int = 10,
    sim_latency_ms: float = 20.0,
    sim_error_rate: float = 0.0,
    sim_permanent_error_rate: float = 0.0,
    priorities: tuple[int, ...] = (0,),
    task: str = "intent",
    seed: int = 0,
) -> list[CycleSpec]:
    """`count` capacity-test cycles (optimizer `capacity`) making exactly `lm_calls` LM calls
    each when no call fails (a retried transient error costs one more attempt): baseline on
    T test examples, two candidates on V validation examples, the final test: 2T + 2V.

    Job i gets seed `seed + i` (its own fault and latency sequence) and priority
    `priorities[i % len(priorities)]`. A capacity workload, not an optimization study."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    if lm_calls < 4 or lm_calls % 2:
        raise ValueError(f"lm_calls must be even and >= 4 (2 x test + 2 x val), got {lm_calls}")
    if not priorities:
        raise ValueError("priorities must not be empty")
    n_test = max(1, lm_calls // 4)
    n_val = lm_calls // 2 - n_test
    jobs = []
    for i in range(count):
        lm_spec = LMSpec(
            model=lm,
            seed=seed + i,
            sim_latency_ms=sim_latency_ms,
            sim_error_rate=sim_error_rate,
            sim_permanent_error_rate=sim_permanent_error_rate,
        )
        jobs.append(
            CycleSpec(
                task=task,
                optimizer="capacity",
                lm=lm_spec,
                priority=priorities[i % len(priorities)],
                seed=seed + i,
                max_train=4,
                max_val=n_val,
                max_test=n_test,
            )
        )
    return jobs
