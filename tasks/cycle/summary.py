"""What a finished cycle returns to its caller (CLI, flow, batch): its row, read back."""

from __future__ import annotations

from pydantic import BaseModel

from storage.repository import Repository


class CycleSummary(BaseModel):
    """What a finished cycle returns to its caller (CLI, flow, batch)."""

    run_id: str
    state: str
    task: str
    optimizer: str
    lm: str
    baseline_score: float | None
    best_score: float | None
    duration_s: float | None
    lm_calls: int
    simulated: bool
    error: str | None = None  # why it failed, or why it stopped early
    iterations: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float | None = None


def summarize(repo: Repository, run_id: str) -> CycleSummary:
    run = repo.get_run(run_id)
    duration = run.duration_s
    return CycleSummary(
        run_id=run.id,
        state=run.state,
        task=run.task,
        optimizer=run.optimizer,
        lm=run.lm,
        baseline_score=run.baseline_score,
        best_score=run.best_score,
        duration_s=duration,
        lm_calls=run.lm_calls,
        simulated=run.simulated,
        error=run.error,
        iterations=run.iterations,
        input_tokens=run.input_tokens,
        output_tokens=run.output_tokens,
        cost_usd=run.cost_usd,
    )
