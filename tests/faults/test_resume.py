"""Resume, not restart: an interrupted run continues from where it was.

- The genetic optimizer checkpoints each generation: a compile that dies mid-search and is
  run again with the same inputs ends with the same program as one that never died, and
  pays only for the generations it had not done.
- `kill -9` of a real `dspyflow optimize --optimizer genetic`, then `dspyflow runs recover
  --resume`: the run ends `succeeded` with its program, its earlier LM calls and baseline
  kept, and the resumed attempt spends fewer LM calls than the whole run would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.cycle.spec import LMSpec
from tasks.lm.providers import build_lm
from tasks.optimizers.genetic import GeneticTeleprompter
from tasks.programs import get_task
from tests.faults._helpers import quiet, wait_for
from tests.faults.test_process_kills import BIN, Cli, cli  # noqa: F401 - the fixture

GA_OPTIONS = {"population_size": 5, "generations": 5, "minibatch_size": 6, "patience": 10}


class Killed(Exception):
    """Stands for the worker dying right after a generation was reported."""


def _compile(checkpoint: Path, die_after: int | None = None):  # type: ignore[no-untyped-def]
    task = get_task("intent")
    splits = task.load_splits()
    cycle_lm = build_lm(LMSpec(model="sim"), task)

    def on_generation(generation) -> None:  # type: ignore[no-untyped-def]
        if generation.index == die_after:
            raise Killed

    ga = GeneticTeleprompter(
        task.metric, seed=5, checkpoint_path=checkpoint, on_generation=on_generation, **GA_OPTIONS
    )
    with cycle_lm.context(), quiet():
        try:
            program = ga.compile(
                task.build_program(), trainset=splits.train[:20], valset=splits.val[:16]
            )
        except Killed:
            program = None
    return ga, program, cycle_lm.usage.calls


def test_a_resumed_genetic_search_ends_as_one_that_never_died(tmp_path: Path) -> None:
    whole, whole_program, whole_calls = _compile(tmp_path / "whole.pkl")
    assert len(whole.history) == 5

    checkpoint = tmp_path / "run.pkl"
    _, died, first_calls = _compile(checkpoint, die_after=3)
    assert died is None and checkpoint.exists()
    resumed, program, resumed_calls = _compile(checkpoint)

    assert program is not None and program.dump_state() == whole_program.dump_state()
    assert [g.population for g in resumed.history] == [g.population for g in whole.history]
    assert resumed.metric_calls == whole.metric_calls
    # Generations 1-2 (checkpointed) were not paid again; generation 3 was (it died
    # before its checkpoint), so the two attempts cost a bit more than one clean run.
    assert resumed_calls < whole_calls
    assert whole_calls < first_calls + resumed_calls < whole_calls + first_calls


def test_a_checkpoint_for_other_inputs_is_not_resumed(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run.pkl"
    _compile(checkpoint, die_after=2)
    task = get_task("intent")
    splits = task.load_splits()
    other = GeneticTeleprompter(task.metric, seed=6, checkpoint_path=checkpoint, **GA_OPTIONS)
    with build_lm(LMSpec(model="sim"), task).context(), quiet():
        other.compile(task.build_program(), trainset=splits.train[:20], valset=splits.val[:16])
    assert len(other.history) == 5  # started afresh: all five generations ran here


GENETIC = (
    "optimize", "--task", "intent", "--lm", "sim", "--optimizer", "genetic", "--budget",
    "heavy", "--max-train", "40", "--max-val", "40", "--max-test", "20", "--format", "json",
)  # fmt: skip


@pytest.mark.slow
def test_kill_9_then_recover_resume_finishes_the_run(cli: Cli) -> None:  # noqa: F811
    # The same run, uninterrupted, for the LM calls a whole run costs.
    whole = cli.run(*GENETIC, timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    whole_calls = json.loads(whole.stdout)["lm_calls"]

    proc = cli.start(*GENETIC)
    home = Path(cli.env["DSPYFLOW_HOME"])

    def checkpointed() -> bool:
        assert proc.poll() is None, f"dspyflow exited early:\n{proc.communicate()}"
        return any((home / "genetic").glob("*/checkpoint.pkl"))

    wait_for(checkpointed, timeout=240, what="the first generation's checkpoint")
    run_id = next((home / "genetic").glob("*/checkpoint.pkl")).parent.name
    wait_for(lambda: cli.repo.get_run(run_id).iterations >= 3, timeout=120, what="generation 3")
    proc.kill()
    proc.wait(timeout=30)
    killed = cli.repo.get_run(run_id)
    assert killed.state == "running" and killed.baseline_score is not None

    result = cli.run("runs", "recover", "--stale-after", "3600", "--resume", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["resumed"] == {run_id: "succeeded"}
    run = cli.repo.get_run(run_id)
    assert run.state == "succeeded" and run.attempt == 2
    assert run.program_state and run.best_score is not None
    assert run.baseline_score == killed.baseline_score  # not re-measured
    assert run.lm_calls >= killed.lm_calls  # the dead attempt's calls still count
    resumed_calls = run.lm_calls - killed.lm_calls
    assert 0 < resumed_calls < whole_calls
    assert not (home / "genetic" / run_id).exists()  # recorded: the checkpoint goes


# --- MIPROv2: resume by replaying the run's LM journal ----------------------------------


class WorkerDied(BaseException):
    """Stands for the worker process dying mid-search (nothing catches it)."""


MIPRO_CAPS = {"max_train": 20, "max_val": 20, "max_test": 10}


def _mipro_spec():  # type: ignore[no-untyped-def]
    from tests.faults._helpers import sim_spec

    return sim_spec(optimizer="mipro", budget="light", **MIPRO_CAPS)


def test_a_resumed_mipro_search_ends_as_one_that_never_died(repo) -> None:  # type: ignore[no-untyped-def]
    """MIPROv2 dies after 80 optimizer LM calls (bootstrap and proposal done, trials under
    way); the run is re-queued and resumed. It ends with the same program and scores as a
    run that never died, and the two attempts together pay what one clean run pays."""
    from tasks.cycle import steps as cycle
    from tasks.cycle.recovery import resume_runs
    from tasks.cycle.steps import CycleContext, optimizer_state_dir, worker_name

    with quiet():
        whole = cycle.run_cycle(_mipro_spec(), repo)
    clean = repo.get_run(whole.run_id)
    assert clean.state == "succeeded"

    run_id = "miproresume000001"
    with quiet():
        ctx: CycleContext = cycle.prepare_cycle(_mipro_spec(), repo, run_id=run_id)
        cycle.run_baseline(ctx)
        inner, start = ctx.lm.engine.inner, ctx.usage_fields()["lm_calls"]

        class Dies:
            def complete(self, request):  # type: ignore[no-untyped-def]
                if ctx.usage_fields()["lm_calls"] - start >= 80:
                    raise WorkerDied
                return inner.complete(request)

        ctx.lm.engine.inner = Dies()
        with pytest.raises(WorkerDied):
            cycle.run_optimizer(ctx)
    ctx.monitor.close()  # the dead process's threads are gone too
    # What recovery finds after a kill -9: the row `running`, its worker gone.
    died = repo.get_run(run_id)
    journal = optimizer_state_dir(run_id, "mipro") / "lm-journal.jsonl"
    assert journal.exists() and len(journal.read_text().splitlines()) >= 60
    repo.mark_worker_gone(run_id, worker=worker_name(), reason="worker process gone (test)")
    assert repo.requeue_run(run_id)

    with quiet():
        assert resume_runs(repo, [run_id]) == {run_id: "succeeded"}
    run = repo.get_run(run_id)
    assert run.attempt == 2
    assert run.program_state == clean.program_state
    assert (run.val_score, run.best_score, run.baseline_score) == (
        clean.val_score,
        clean.best_score,
        clean.baseline_score,
    )
    # The resumed attempt paid only for what the dead one had not done.
    assert run.lm_calls == clean.lm_calls, (died.lm_calls, run.lm_calls, clean.lm_calls)
    assert not journal.parent.exists()  # recorded: the journal goes


MIPRO = (
    "optimize", "--task", "intent", "--lm", "sim", "--optimizer", "mipro", "--budget",
    "medium", "--max-train", "40", "--max-val", "40", "--max-test", "20", "--format", "json",
)  # fmt: skip


@pytest.mark.slow
def test_kill_9_of_mipro_then_recover_resume_replays_and_finishes(cli: Cli) -> None:  # noqa: F811
    """A real `dspyflow optimize --optimizer mipro` is killed mid-search; `runs recover
    --resume` replays its journal and finishes: `succeeded`, attempt 2, the same test
    score as an uninterrupted run, and the resumed attempt pays fewer LM calls."""
    whole = cli.run(*MIPRO, timeout=300)
    assert whole.returncode == 0, whole.stdout + whole.stderr
    whole_summary = json.loads(whole.stdout)

    proc = cli.start(*MIPRO)
    home = Path(cli.env["DSPYFLOW_HOME"])

    def journal_lines() -> int:
        assert proc.poll() is None, f"dspyflow exited early:\n{proc.communicate()}"
        journals = list((home / "mipro").glob("*/lm-journal.jsonl"))
        return len(journals[0].read_text().splitlines()) if journals else 0

    wait_for(lambda: journal_lines() >= 150, timeout=240, what="150 journaled LM answers")
    proc.kill()
    proc.wait(timeout=30)
    journal = next((home / "mipro").glob("*/lm-journal.jsonl"))
    journal_lines_at_kill = len(journal.read_text().splitlines())
    run_id = journal.parent.name
    killed = cli.repo.get_run(run_id)
    assert killed.state == "running"

    result = cli.run("runs", "recover", "--stale-after", "3600", "--resume", "--format", "json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout)["resumed"] == {run_id: "succeeded"}
    run = cli.repo.get_run(run_id)
    assert run.state == "succeeded" and run.attempt == 2 and run.program_state
    assert run.best_score == whole_summary["best_score"]  # the search that died, continued
    resumed_calls = run.lm_calls - killed.lm_calls
    print(
        f"whole run {whole_summary['lm_calls']} LM calls; killed after {killed.lm_calls} "
        f"(last heartbeat); resumed attempt {resumed_calls}; journal {journal_lines_at_kill}"
    )
    assert 0 < resumed_calls <= whole_summary["lm_calls"] - 150
    assert not journal.parent.exists()  # recorded: the journal goes
