"""Optimization flows: one cycle (`optimization_cycle`)."""

from __future__ import annotations

from prefect import flow
from prefect.runtime import flow_run

from storage.repository import Repository
from tasks import cycle
from tasks.cycle import CycleSummary, summarize
from tasks.spec import CycleSpec


@flow(name="optimization-cycle", persist_result=False, log_prints=True)
def optimization_cycle(spec: CycleSpec, run_id: str | None = None) -> CycleSummary:
    """Optimize one DSPy program: baseline, optimize, evaluate on the test split, record.

    Every run ends in the database in a terminal state with its reason; a failure is
    recorded first and then re-raised, so the Prefect flow run fails too.
    """
    repo = Repository()
    ctx = None
    try:
        ctx = cycle.prepare(spec, repo, run_id=run_id, flow_run_id=flow_run.get_id())
        baseline_score = cycle.baseline(ctx)
        # Prefect's timeout is the outer guard; the budget itself is enforced inside.
        optimize = cycle.optimize.with_options(timeout_seconds=spec.time_budget_s * 1.25 + 60)
        result = optimize(ctx)
        test_score = cycle.evaluate(ctx, result.program)
        cycle.record(ctx, baseline_score, result, test_score)
    except BaseException as exc:
        failed_run = ctx.run_id if ctx is not None else run_id
        if failed_run is not None:
            cycle.record_failure(repo, failed_run, exc, ctx)
        raise
    return summarize(repo, ctx.run_id)
