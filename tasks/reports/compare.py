"""Two optimization runs side by side: figures, spec differences, and what the optimizer
changed in each predictor (instructions, demos). Plain functions over stored rows."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

# The figures compared, in display order; the delta is B - A where both are numbers.
FIGURES = (
    "state",
    "task",
    "optimizer",
    "budget",
    "lm",
    "simulated",
    "baseline_score",
    "best_score",
    "gain",
    "duration_s",
    "lm_calls",
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "cost_usd",
    "iterations",
    "created_at",
    "error",
)


class FieldComparison(BaseModel):
    field: str
    a: Any = None
    b: Any = None
    delta: float | None = None
    differs: bool = False


class PredictorComparison(BaseModel):
    predictor: str
    instructions_a: str | None = None
    instructions_b: str | None = None
    same_instructions: bool
    demos_a: int = 0
    demos_b: int = 0
    demos_only_in_a: list[dict[str, Any]] = []
    demos_only_in_b: list[dict[str, Any]] = []


class RunComparison(BaseModel):
    a: str
    b: str
    figures: list[FieldComparison]
    spec_differences: list[FieldComparison]
    predictors: list[PredictorComparison]
    simulated: bool  # either run used the simulated LM


def _figures(run: Any) -> dict[str, Any]:
    duration = run.duration_s
    gain = (
        run.best_score - run.baseline_score
        if run.best_score is not None and run.baseline_score is not None
        else None
    )
    return {
        "state": run.state,
        "task": run.task,
        "optimizer": run.optimizer,
        "budget": run.budget,
        "lm": run.lm,
        "simulated": run.simulated,
        "baseline_score": run.baseline_score,
        "best_score": run.best_score,
        "gain": gain,
        "duration_s": duration,
        "lm_calls": run.lm_calls,
        "input_tokens": run.input_tokens,
        "output_tokens": run.output_tokens,
        "total_tokens": (run.input_tokens or 0) + (run.output_tokens or 0),
        "cost_usd": run.cost_usd,
        "iterations": run.iterations,
        "created_at": run.created_at.isoformat() if run.created_at else None,
        "error": run.error,
    }


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def compare_values(name: str, a: Any, b: Any) -> FieldComparison:
    delta = b - a if _number(a) and _number(b) else None
    return FieldComparison(field=name, a=a, b=b, delta=delta, differs=a != b)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys: {"lm": {"model": "sim"}} -> {"lm.model": "sim"}."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}


def spec_differences(a: dict[str, Any] | None, b: dict[str, Any] | None) -> list[FieldComparison]:
    fa, fb = flatten(a or {}), flatten(b or {})
    return [
        compare_values(k, fa.get(k), fb.get(k))
        for k in sorted(fa.keys() | fb.keys())
        if fa.get(k) != fb.get(k)
    ]


def _predictors(state: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {
        name: p
        for name, p in (state or {}).items()
        if isinstance(p, dict) and ("signature" in p or "demos" in p)
    }


def _demo_key(demo: Any) -> str:
    return json.dumps(demo, sort_keys=True, default=str)


def program_differences(
    a: dict[str, Any] | None, b: dict[str, Any] | None
) -> list[PredictorComparison]:
    pa, pb = _predictors(a), _predictors(b)
    out = []
    for name in sorted(pa.keys() | pb.keys()):
        x, y = pa.get(name, {}), pb.get(name, {})
        ia = (x.get("signature") or {}).get("instructions")
        ib = (y.get("signature") or {}).get("instructions")
        da, db = list(x.get("demos") or []), list(y.get("demos") or [])
        ka, kb = {_demo_key(d) for d in da}, {_demo_key(d) for d in db}
        out.append(
            PredictorComparison(
                predictor=name,
                instructions_a=ia,
                instructions_b=ib,
                same_instructions=ia == ib,
                demos_a=len(da),
                demos_b=len(db),
                demos_only_in_a=[d for d in da if _demo_key(d) not in kb],
                demos_only_in_b=[d for d in db if _demo_key(d) not in ka],
            )
        )
    return out


def compare_runs(run_a: Any, run_b: Any) -> RunComparison:
    """`run_a`, `run_b`: OptimizationRun rows."""
    fa, fb = _figures(run_a), _figures(run_b)
    return RunComparison(
        a=run_a.id,
        b=run_b.id,
        figures=[compare_values(k, fa[k], fb[k]) for k in FIGURES],
        spec_differences=spec_differences(run_a.spec, run_b.spec),
        predictors=program_differences(run_a.program_state, run_b.program_state),
        simulated=bool(run_a.simulated or run_b.simulated),
    )
