"""A genetic-algorithm prompt optimizer, written for dspyflow as a DSPy teleprompter.

An individual is one instruction and one ordered demo subset per predictor (indices into
per-predictor pools). Fitness is the mean metric over the validation examples it has been
scored on; each generation scores every individual on a fresh validation minibatch (scores
are cached per individual and example, so elites gather evidence instead of repeating
calls). Parents are picked by tournament; crossover mixes instructions and demo sets across
predictors and parents; mutation rewrites an instruction with the LM (shown the task's
examples and the parent's mistakes), picks another pooled instruction, or swaps, adds or
drops a demo. The best individuals survive unchanged (elitism). It stops on its generation
budget, a metric-call budget, a time limit, no improvement for `patience` generations, or
`should_stop()`. The finalists are scored on the full valset and the best one is returned.
Seeded: the same seed, data and (deterministic) LM give the same result.

See docs/genetic-optimizer.md for the design and its costs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dspy
from dspy.teleprompt.teleprompt import Teleprompter
from dspy.utils.parallelizer import ParallelExecutor

from tasks.optimizers.base import (
    CompileRequest,
    CycleStopped,
    IterationEvent,
    Metric,
    OptimizeResult,
    check_preset,
)

logger = logging.getLogger("dspyflow.genetic")


@dataclass(frozen=True)
class Gene:
    """One predictor's prompt: an instruction and an ordered demo subset (pool indices)."""

    instruction: int
    demos: tuple[int, ...] = ()


Genome = tuple[Gene, ...]  # one gene per predictor, in named_predictors() order


@dataclass
class Generation:
    index: int
    population: list[Genome]
    ranked: list[Genome]  # best first, by fitness at the end of this generation
    best: Genome
    best_fitness: float
    mean_fitness: float
    metric_calls: int


@dataclass
class _Scores:
    by_example: dict[int, float] = field(default_factory=dict)
    mistakes: list[tuple[dspy.Example, Any]] = field(default_factory=list)

    @property
    def fitness(self) -> float:
        return sum(self.by_example.values()) / len(self.by_example) if self.by_example else 0.0


class ProposeInstruction(dspy.Signature):
    """You improve the instruction of one step of a language-model program. Read the current
    instruction, examples of the task, and mistakes made with the current instruction; then
    write a better instruction: specific, short, true to the task, with the same inputs and
    outputs. Answer with the new instruction only."""

    current_instruction: str = dspy.InputField()
    task_examples: str = dspy.InputField(desc="inputs with their correct outputs")
    mistakes: str = dspy.InputField(desc="inputs it got wrong: wrong and right outputs")
    tip: str = dspy.InputField(desc="a direction for the rewrite")
    new_instruction: str = dspy.OutputField(desc="the improved instruction")


TIPS = (
    "Be concise and direct.",
    "Name the possible outputs and say when to choose each.",
    "Add one rule that prevents the mistakes shown.",
    "Describe what to look for in the input before giving the output.",
    "Write it as a short checklist.",
    "Mention the edge case the examples reveal.",
    "Say what the output must not contain.",
    "Explain the task as to a new colleague.",
)


class GeneticTeleprompter(Teleprompter):
    """Genetic-algorithm search over instructions and demo subsets (see module docstring)."""

    def __init__(
        self,
        metric: Metric,
        *,
        population_size: int = 8,
        generations: int = 6,
        minibatch_size: int = 12,
        tournament_size: int = 3,
        crossover_rate: float = 0.7,
        mutation_rate: float = 0.5,
        rewrite_rate: float = 0.4,
        elite_count: int = 1,
        max_demos: int = 4,
        demo_pool_size: int = 16,
        initial_proposals: int = 3,
        patience: int = 3,
        finalists: int = 3,
        metric_threshold: float | None = 1.0,
        num_threads: int = 1,
        seed: int = 0,
        prompt_model: dspy.LM | None = None,
        max_metric_calls: int | None = None,
        max_seconds: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_generation: Callable[[Generation], None] | None = None,
        checkpoint_path: Path | None = None,
    ) -> None:
        super().__init__()
        if population_size < 2:
            raise ValueError("population_size must be >= 2")
        if not 0 <= elite_count < population_size:
            raise ValueError("elite_count must be in [0, population_size)")
        if generations < 1 or minibatch_size < 1 or tournament_size < 1:
            raise ValueError("generations, minibatch_size and tournament_size must be >= 1")
        self.metric = metric
        self.population_size = population_size
        self.generations = generations
        self.minibatch_size = minibatch_size
        self.tournament_size = tournament_size
        self.crossover_rate = crossover_rate
        self.mutation_rate = mutation_rate
        self.rewrite_rate = rewrite_rate
        self.elite_count = elite_count
        self.max_demos = max_demos
        self.demo_pool_size = demo_pool_size
        self.initial_proposals = initial_proposals
        self.patience = patience
        self.finalists = finalists
        self.metric_threshold = metric_threshold
        self.num_threads = num_threads
        self.seed = seed
        self.prompt_model = prompt_model
        self.max_metric_calls = max_metric_calls
        self.max_seconds = max_seconds
        self.should_stop = should_stop
        self.on_generation = on_generation
        # Written after each generation; a compile that finds one for the same inputs
        # resumes from it (a dead worker's run continues, its finished generations unpaid).
        self.checkpoint_path = checkpoint_path
        self._reset()

    def _reset(self) -> None:
        self.history: list[Generation] = []
        self.metric_calls = 0
        self.proposals = 0
        self.stopped = False
        self.best_genome: Genome | None = None
        self.best_score: float | None = None
        self._scores: dict[Genome, _Scores] = {}
        self._names: list[str] = []
        self._instructions: dict[str, list[str]] = {}
        self._demos: dict[str, list[dspy.Example]] = {}
        self._student: dspy.Module | None = None

    # --- public -------------------------------------------------------------------------

    @property
    def best_program(self) -> dspy.Module | None:
        """The best program found so far (also after an interrupted compile)."""
        if self._student is None:
            return None
        if self.best_genome is None:
            return self._student.deepcopy()
        return self.build(self.best_genome)

    def build(self, genome: Genome) -> dspy.Module:
        assert self._student is not None
        program = self._student.deepcopy()
        for (name, predictor), gene in zip(program.named_predictors(), genome, strict=True):
            instruction = self._instructions[name][gene.instruction]
            predictor.signature = predictor.signature.with_instructions(instruction)
            predictor.demos = [self._demos[name][i] for i in gene.demos]
        return program

    def compile(
        self,
        student: dspy.Module,
        *,
        trainset: list[dspy.Example],
        teacher: dspy.Module | None = None,
        valset: list[dspy.Example] | None = None,
        **kwargs: Any,
    ) -> dspy.Module:
        if not trainset:
            raise ValueError("the genetic optimizer needs a non-empty trainset")
        self._reset()
        valset = list(valset or trainset)
        rng = random.Random(self.seed)
        started = time.monotonic()
        self._student = student.deepcopy()
        self._names = [name for name, _ in self._student.named_predictors()]
        if not self._names:
            raise ValueError("the program has no predictors to optimize")
        inputs = self._fingerprint(trainset, valset)
        resumed = self._load_checkpoint(inputs, rng)
        if resumed is not None:
            first_index, population, since_improvement, record = resumed
            ranked: list[Genome] = population
        else:
            for name, predictor in self._student.named_predictors():
                self._instructions[name] = [predictor.signature.instructions]
            self._demos = self._demo_pools(trainset, rng)
            seed_genome: Genome = tuple(Gene(0) for _ in self._names)
            self.best_genome = seed_genome
            population = self._initial_population(seed_genome, rng, started)
            first_index, since_improvement = 0, 0
            record = float("-inf")  # best leader fitness so far, for `patience`
            ranked = population
        for index in range(first_index, self.generations):
            if self._must_stop(started):
                break
            batch = rng.sample(range(len(valset)), min(self.minibatch_size, len(valset)))
            self._evaluate(population, batch, valset, started)
            if self.stopped:
                break
            ranked = sorted(population, key=self._rank_key, reverse=True)
            leader = ranked[0]
            leader_fitness = self._scores[leader].fitness
            self._update_best(min_evidence=len(batch))
            improved = leader_fitness > record
            record = max(record, leader_fitness)
            since_improvement = 0 if improved else since_improvement + 1
            generation = Generation(
                index=index + 1,
                population=list(population),
                ranked=list(ranked),
                best=leader,
                best_fitness=leader_fitness,
                mean_fitness=sum(self._scores[g].fitness for g in population) / len(population),
                metric_calls=self.metric_calls,
            )
            self.history.append(generation)
            if self.on_generation is not None:
                self.on_generation(generation)
            if since_improvement >= self.patience or index == self.generations - 1:
                break
            population = self._next_generation(ranked, rng, started)
            if not self.stopped:
                self._save_checkpoint(inputs, index + 1, population, rng, since_improvement, record)

        if not self.stopped:
            self._select_final(ranked, valset, started)
        program = self.best_program
        assert program is not None
        program.score = self.best_score
        return program

    # --- checkpoints ---------------------------------------------------------------------

    def _fingerprint(self, trainset: Sequence[dspy.Example], valset: Sequence[dspy.Example]) -> str:
        """What a checkpoint must match to be resumed: the program, the data, the seed and
        the search settings (a changed input starts afresh)."""
        assert self._student is not None
        parts = [
            repr(self._names),
            repr([p.signature.instructions for _, p in self._student.named_predictors()]),
            repr([dict(e) for e in trainset]),
            repr([dict(e) for e in valset]),
            repr((self.seed, self.population_size, self.generations, self.minibatch_size)),
            repr((self.max_demos, self.demo_pool_size, self.initial_proposals, self.elite_count)),
        ]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def _save_checkpoint(
        self,
        inputs: str,
        next_index: int,
        population: list[Genome],
        rng: random.Random,
        since_improvement: int,
        record: float,
    ) -> None:
        if self.checkpoint_path is None:
            return
        state = {
            "version": 1,
            "inputs": inputs,
            "next_index": next_index,
            "population": population,
            "rng": rng.getstate(),
            "since_improvement": since_improvement,
            "record": record,
            "history": self.history,
            "metric_calls": self.metric_calls,
            "proposals": self.proposals,
            "best_genome": self.best_genome,
            "best_score": self.best_score,
            "scores": {
                genome: (
                    dict(scores.by_example),
                    [(_example_state(ex), _prediction_state(p)) for ex, p in scores.mistakes],
                )
                for genome, scores in self._scores.items()
            },
            "instructions": self._instructions,
            "demos": {
                name: [_example_state(ex) for ex in pool] for name, pool in self._demos.items()
            },
        }
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint_path.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(state))
        os.replace(partial, self.checkpoint_path)  # a kill mid-write leaves the old one

    def _load_checkpoint(
        self, inputs: str, rng: random.Random
    ) -> tuple[int, list[Genome], int, float] | None:
        path = self.checkpoint_path
        if path is None or not path.exists():
            return None
        try:
            state = pickle.loads(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - a bad checkpoint costs a restart, not the run
            logger.warning("genetic checkpoint %s unreadable (%s): starting afresh", path, exc)
            return None
        if state.get("version") != 1 or state.get("inputs") != inputs:
            logger.warning("genetic checkpoint %s is for other inputs: starting afresh", path)
            return None
        rng.setstate(state["rng"])
        self.history = state["history"]
        self.metric_calls = state["metric_calls"]
        self.proposals = state["proposals"]
        self.best_genome = state["best_genome"]
        self.best_score = state["best_score"]
        self._scores = {
            genome: _Scores(
                by_example=dict(by_example),
                mistakes=[(_example(ex), _prediction(p)) for ex, p in mistakes],
            )
            for genome, (by_example, mistakes) in state["scores"].items()
        }
        self._instructions = state["instructions"]
        self._demos = {name: [_example(ex) for ex in pool] for name, pool in state["demos"].items()}
        logger.info("genetic: resuming from generation %d (%s)", state["next_index"] + 1, path)
        return (
            state["next_index"],
            state["population"],
            state["since_improvement"],
            state["record"],
        )

    # --- pools and population -----------------------------------------------------------

    def _demo_pools(
        self, trainset: Sequence[dspy.Example], rng: random.Random
    ) -> dict[str, list[dspy.Example]]:
        """Labeled demos where the predictor's fields are in the data (free); bootstrapped
        demos (the program's own traces on train examples scoring >= metric_threshold)
        for predictors whose fields are not (intermediate steps)."""
        assert self._student is not None
        pools: dict[str, list[dspy.Example]] = {}
        need_bootstrap: list[str] = []
        shuffled = list(trainset)
        rng.shuffle(shuffled)
        for name, predictor in self._student.named_predictors():
            fields = set(predictor.signature.fields)
            labeled = [ex for ex in shuffled if fields <= set(ex.keys())]
            pools[name] = labeled[: self.demo_pool_size]
            if not pools[name]:
                need_bootstrap.append(name)
        if need_bootstrap:
            self._bootstrap(shuffled, pools, need_bootstrap)
        return pools

    def _bootstrap(
        self,
        trainset: Sequence[dspy.Example],
        pools: dict[str, list[dspy.Example]],
        names: list[str],
    ) -> None:
        assert self._student is not None
        by_id = {id(p): n for n, p in self._student.named_predictors()}
        for example in trainset[: 2 * self.demo_pool_size]:
            if all(len(pools[n]) >= self.demo_pool_size for n in names):
                break
            with dspy.context(trace=[]):
                try:
                    prediction = self._student(**example.inputs())
                except Exception as exc:  # noqa: BLE001 - a failed trace is just not a demo
                    logger.debug("bootstrap example failed: %s", exc)
                    continue
                trace = list(dspy.settings.trace)
            self.metric_calls += 1
            score = float(self.metric(example, prediction, trace))
            ok = score >= self.metric_threshold if self.metric_threshold is not None else score
            if not ok:
                continue
            for predictor, inputs, outputs in trace:
                name = by_id.get(id(predictor))
                if name in names and len(pools[name]) < self.demo_pool_size:
                    pools[name].append(dspy.Example(augmented=True, **inputs, **outputs))

    def _initial_population(
        self, seed_genome: Genome, rng: random.Random, started: float
    ) -> list[Genome]:
        for name in self._names:
            for _ in range(self.initial_proposals):
                if self._must_stop(started):
                    break
                self._propose(name, 0, rng, mistakes=[])
        population = [seed_genome]
        attempts = 0
        while len(population) < self.population_size and attempts < 50 * self.population_size:
            attempts += 1
            genome = tuple(
                Gene(
                    rng.randrange(len(self._instructions[name])),
                    self._random_demos(name, rng),
                )
                for name in self._names
            )
            if genome not in population:
                population.append(genome)
        while len(population) < self.population_size:  # tiny pools: allow duplicates
            population.append(seed_genome)
        return population

    def _random_demos(self, name: str, rng: random.Random) -> tuple[int, ...]:
        pool = len(self._demos[name])
        if pool == 0 or self.max_demos == 0:
            return ()
        k = rng.randint(1, min(self.max_demos, pool))
        return tuple(rng.sample(range(pool), k))

    # --- evaluation -----------------------------------------------------------------------

    def _update_best(self, min_evidence: int) -> None:
        """The best individual scored on at least `min_evidence` examples (elites keep it
        in the population; this also covers elite_count=0)."""
        scored = [g for g, s in self._scores.items() if len(s.by_example) >= min_evidence]
        if scored:
            best = max(scored, key=self._rank_key)
            self.best_genome, self.best_score = best, self._scores[best].fitness

    def _rank_key(self, genome: Genome) -> tuple[float, int]:
        scores = self._scores.get(genome)
        return (scores.fitness, len(scores.by_example)) if scores else (0.0, 0)

    def _evaluate(
        self,
        genomes: Sequence[Genome],
        batch: Sequence[int],
        valset: Sequence[dspy.Example],
        started: float,
    ) -> None:
        """Score each genome on the batch's examples it has not been scored on yet."""
        for genome in dict.fromkeys(genomes):  # unique, in order
            if self._must_stop(started):
                return
            scores = self._scores.setdefault(genome, _Scores())
            todo = [i for i in batch if i not in scores.by_example]
            if self.max_metric_calls is not None:
                todo = todo[: max(0, self.max_metric_calls - self.metric_calls)]
            if not todo:
                continue
            program = self.build(genome)

            def run(index: int, program: dspy.Module = program) -> tuple[float, Any]:
                example = valset[index]
                prediction = program(**example.inputs())
                return float(self.metric(example, prediction)), prediction

            executor = ParallelExecutor(
                num_threads=self.num_threads,
                max_errors=len(todo) + 1,
                disable_progress_bar=True,
                provide_traceback=False,
            )
            outcomes = executor.execute(run, todo)
            self.metric_calls += len(todo)
            for index, outcome in zip(todo, outcomes, strict=True):
                score, prediction = outcome if outcome is not None else (0.0, None)
                scores.by_example[index] = score
                if score < 1.0 and len(scores.mistakes) < 3:
                    scores.mistakes.append((valset[index], prediction))

    def _select_final(
        self, ranked: Sequence[Genome], valset: Sequence[dspy.Example], started: float
    ) -> None:
        """Score the finalists on the full valset and keep the best (ties: the earlier)."""
        candidates = [*ranked[: self.finalists]]
        if self.best_genome is not None:
            candidates.append(self.best_genome)
        finalists = list(dict.fromkeys(candidates))
        self._evaluate(finalists, range(len(valset)), valset, started)
        if self.stopped:
            return
        best = max(finalists, key=self._rank_key)
        self.best_genome, self.best_score = best, self._scores[best].fitness

    def _must_stop(self, started: float) -> bool:
        if self.stopped:
            return True
        over_calls = (
            self.max_metric_calls is not None and self.metric_calls >= self.max_metric_calls
        )
        over_time = self.max_seconds is not None and time.monotonic() - started >= self.max_seconds
        if over_calls or over_time or (self.should_stop is not None and self.should_stop()):
            self.stopped = True
        return self.stopped

    # --- variation --------------------------------------------------------------------------

    def _next_generation(
        self, ranked: Sequence[Genome], rng: random.Random, started: float
    ) -> list[Genome]:
        population = list(ranked[: self.elite_count])
        attempts = 0
        while len(population) < self.population_size:
            attempts += 1
            first, second = self._tournament(ranked, rng), self._tournament(ranked, rng)
            child = (
                self._crossover(first, second, rng) if rng.random() < self.crossover_rate else first
            )
            child = self._mutate(child, rng, started)
            if child in population and attempts < 20 * self.population_size:
                continue
            population.append(child)
        return population

    def _tournament(self, ranked: Sequence[Genome], rng: random.Random) -> Genome:
        entrants = rng.sample(list(ranked), min(self.tournament_size, len(ranked)))
        return max(entrants, key=self._rank_key)

    def _crossover(self, first: Genome, second: Genome, rng: random.Random) -> Genome:
        """Per predictor: the instruction of one parent, the demos of either or a mix."""
        genes = []
        for a, b in zip(first, second, strict=True):
            instruction = a.instruction if rng.random() < 0.5 else b.instruction
            choice = rng.random()
            if choice < 1 / 3:
                demos = a.demos
            elif choice < 2 / 3:
                demos = b.demos
            else:
                mixed = list(dict.fromkeys([*a.demos[: len(a.demos) // 2 + 1], *b.demos]))
                demos = tuple(mixed[: self.max_demos])
            genes.append(Gene(instruction, demos))
        return tuple(genes)

    def _mutate(self, genome: Genome, rng: random.Random, started: float) -> Genome:
        genes = list(genome)
        chosen = [i for i in range(len(genes)) if rng.random() < self.mutation_rate]
        if not chosen:
            chosen = [rng.randrange(len(genes))]
        for i in chosen:
            name, gene = self._names[i], genes[i]
            roll = rng.random()
            if roll < self.rewrite_rate and not self._must_stop(started):
                mistakes = self._scores.get(genome, _Scores()).mistakes
                new = self._propose(name, gene.instruction, rng, mistakes)
                genes[i] = Gene(new if new is not None else gene.instruction, gene.demos)
            elif roll < self.rewrite_rate + 0.15 and len(self._instructions[name]) > 1:
                genes[i] = Gene(rng.randrange(len(self._instructions[name])), gene.demos)
            else:
                genes[i] = Gene(gene.instruction, self._mutate_demos(name, gene.demos, rng))
        return tuple(genes)

    def _mutate_demos(
        self, name: str, demos: tuple[int, ...], rng: random.Random
    ) -> tuple[int, ...]:
        pool = len(self._demos[name])
        unused = [i for i in range(pool) if i not in demos]
        current = list(demos)
        roll = rng.random()
        if current and unused and roll < 0.5:  # swap one
            current[rng.randrange(len(current))] = rng.choice(unused)
        elif unused and len(current) < self.max_demos and roll < 0.8:  # add one
            current.insert(rng.randrange(len(current) + 1), rng.choice(unused))
        elif current:  # drop one
            current.pop(rng.randrange(len(current)))
        return tuple(current)

    def _propose(
        self,
        name: str,
        parent: int,
        rng: random.Random,
        mistakes: Sequence[tuple[dspy.Example, Any]],
    ) -> int | None:
        """Ask the LM for a rewrite of instruction `parent`; its pool index, or None."""
        current = self._instructions[name][parent]
        examples = self._demos[name][:3]
        tip = rng.choice(TIPS)
        proposer = dspy.Predict(ProposeInstruction)
        try:
            scope = dspy.context(lm=self.prompt_model) if self.prompt_model else nullcontext()
            with scope:
                result = proposer(
                    current_instruction=current,
                    task_examples=_format_examples(examples) or "(none)",
                    mistakes=_format_mistakes(mistakes) or "(none yet)",
                    tip=tip,
                )
        except Exception as exc:  # noqa: BLE001 - a failed proposal only skips this mutation
            logger.debug("instruction proposal failed: %s", exc)
            return None
        self.proposals += 1
        text = " ".join(str(getattr(result, "new_instruction", "") or "").split())
        if len(text) < 10 or len(text) > 1500:
            return None
        pool = self._instructions[name]
        if text in pool:
            return pool.index(text)
        pool.append(text)
        return len(pool) - 1


# Checkpoints hold plain data (dicts, lists, str), not DSPy objects, so a DSPy upgrade
# cannot make an old checkpoint unreadable.
ExampleState = tuple[dict[str, Any], list[str] | None]


def _example_state(example: dspy.Example) -> ExampleState:
    keys = example._input_keys  # None for bootstrapped traces
    return dict(example.items(include_dspy=True)), sorted(keys) if keys else None


def _example(state: ExampleState) -> dspy.Example:
    fields, input_keys = state
    example = dspy.Example(**fields)
    return example.with_inputs(*input_keys) if input_keys else example


def _prediction_state(prediction: Any) -> dict[str, Any] | None:
    return None if prediction is None else dict(prediction.items())


def _prediction(state: dict[str, Any] | None) -> Any:
    return None if state is None else dspy.Prediction(**state)


def _format_examples(examples: Sequence[dspy.Example]) -> str:
    return "\n\n".join(
        "\n".join(f"{key}: {value}" for key, value in ex.items() if key != "augmented")
        for ex in examples
    )


def _format_mistakes(mistakes: Sequence[tuple[dspy.Example, Any]]) -> str:
    lines = []
    for example, prediction in mistakes:
        inputs = ", ".join(f"{k}: {v}" for k, v in example.inputs().items())
        expected = ", ".join(f"{k}: {v}" for k, v in example.labels().items())
        got = (
            ", ".join(f"{k}: {v}" for k, v in prediction.items())
            if prediction is not None
            else "(no answer)"
        )
        lines.append(f"{inputs}\n  wrong: {got}\n  right: {expected}")
    return "\n\n".join(lines)


# --- behind the optimizer interface -----------------------------------------------------------

# Light is sized like MIPROv2 light in LM calls on a 20-example valset (~250-300).
PRESET_CONFIG: dict[str, dict[str, int]] = {
    "light": {"population_size": 6, "generations": 4, "minibatch_size": 10, "patience": 3},
    "medium": {"population_size": 8, "generations": 8, "minibatch_size": 12, "patience": 4},
    "heavy": {"population_size": 12, "generations": 12, "minibatch_size": 16, "patience": 5},
}


class GeneticOptimizer:
    name = "genetic"

    def total_iterations(self, request: CompileRequest) -> int | None:
        return int(request.options.get("generations", PRESET_CONFIG[request.budget]["generations"]))

    def compile(self, request: CompileRequest) -> OptimizeResult:
        check_preset(self.name, request.budget)
        total = self.total_iterations(request)

        def on_generation(generation: Generation) -> None:
            if request.on_iteration is not None:
                request.on_iteration(
                    IterationEvent(
                        generation.index,
                        total,
                        generation.best_fitness,
                        ga.best_score,
                        progress=min(1.0, generation.index / total) if total else None,
                    )
                )

        ga = GeneticTeleprompter(
            request.metric,
            **{**PRESET_CONFIG[request.budget], **request.options},
            metric_threshold=request.metric_threshold,
            num_threads=request.num_threads,
            seed=request.seed,
            prompt_model=request.reflection_lm,
            should_stop=request.should_stop,
            on_generation=on_generation,
            checkpoint_path=request.log_dir / "checkpoint.pkl" if request.log_dir else None,
        )
        student = request.program.deepcopy()
        try:
            program = ga.compile(student, trainset=request.trainset, valset=request.valset)
        except CycleStopped as stop:
            return OptimizeResult(
                program=ga.best_program or student,
                val_score=ga.best_score,
                iterations=len(ga.history),
                stopped_early=True,
                stop_reason=stop.reason,
                details={"stopped": stop.message, **_details(ga)},
            )
        if request.on_iteration is not None and not ga.stopped and ga.history:
            # The final selection's full-valset score replaces the minibatch fitness.
            last = len(ga.history)
            request.on_iteration(
                IterationEvent(last, total, ga.best_score, ga.best_score, progress=1.0)
            )
        return OptimizeResult(
            program=program,
            val_score=ga.best_score,
            iterations=len(ga.history),
            stopped_early=ga.stopped,
            details=_details(ga),
        )


def _details(ga: GeneticTeleprompter) -> dict[str, Any]:
    return {
        "generations": len(ga.history),
        "metric_calls": ga.metric_calls,
        "proposals": ga.proposals,
        "best_fitness": [round(g.best_fitness, 4) for g in ga.history],
    }
