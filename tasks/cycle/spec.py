"""Cycle specs: the pydantic models shared by the CLI, Prefect flow parameters and Python
callers. Bad input fails here, naming the field, before anything is written."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

StructuredOutput = Literal["auto", "json_schema", "json_object", "off"]

# Optimizers behind the one interface in tasks/optimizers (names only: no dspy import here).
# `capacity` is a capacity-test workload with a fixed LM-call count, not a real optimizer.
KNOWN_OPTIMIZERS = ("mipro", "gepa", "genetic", "capacity")
DEFAULT_TIME_BUDGET_S = 7200.0
DEFAULT_WARNING_AT = 0.8


class BudgetPreset(StrEnum):
    """How much search an optimizer does; each optimizer maps it to its own settings.
    The one list of presets: specs, the CLI's choices, the nightly suite, the optimizers."""

    light = "light"
    medium = "medium"
    heavy = "heavy"


class LMSpec(BaseModel):
    """Which LM a cycle uses: `local`, `sim`, or any `dspy.LM` model string."""

    # No inf/nan anywhere: they pass gt/ge checks (or fail them obscurely) and break the
    # budget and latency arithmetic later.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(
        "local",
        description="`local` (SmolLM2 in-process), `sim` (simulated, for capacity and fault "
        "tests), or a dspy.LM model string such as `openai/gpt-4o-mini`.",
    )
    api_base: str | None = Field(None, description="OpenAI-compatible server, e.g. vLLM.")
    api_key_env: str | None = Field(
        None, description="Name of the environment variable that holds the API key."
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Sampling temperature.")
    max_tokens: int = Field(512, gt=0, description="Most output tokens per LM call.")
    num_retries: int = Field(4, ge=0, description="Retries of transient LM errors.")
    cache: bool = Field(False, description="DSPy's response cache (remote LMs only).")
    structured_output: StructuredOutput = Field(
        "auto",
        description="What a remote LM is asked for: `json_schema` (the output fields' JSON "
        "schema as `response_format`; vLLM, SGLang, llama.cpp and Ollama decode to it), "
        "`json_object` (any JSON), `off` (DSPy's text format, no `response_format`), or "
        "`auto` (`json_schema` with `api_base` or a model LiteLLM knows supports it, else "
        "DSPy's default).",
    )
    price_per_1k_input_usd: float | None = Field(
        None, ge=0, description="USD per 1000 prompt tokens (cost figures and `cost_budget_usd`)."
    )
    price_per_1k_output_usd: float | None = Field(
        None, ge=0, description="USD per 1000 output tokens."
    )
    seed: int = Field(0, description="The LM's sampling seed (the local and simulated LMs).")
    # The simulated provider: latency, faults, and accuracy that depends on the prompt.
    sim_latency_ms: float = Field(0.0, ge=0.0, description="Median latency (log-normal).")
    sim_latency_sigma: float = Field(
        0.5, ge=0.0, description="Spread of the simulated latency (log-normal sigma)."
    )
    sim_error_rate: float = Field(0.0, ge=0.0, le=1.0, description="Transient 429/503 rate.")
    sim_permanent_error_rate: float = Field(
        0.0, ge=0.0, le=1.0, description="Rate of simulated errors that no retry cures."
    )
    sim_base_accuracy: float = Field(
        0.3, ge=0.0, le=1.0, description="Simulated accuracy of the unoptimized program."
    )
    sim_demo_bonus: float = Field(
        0.15,
        ge=0.0,
        le=1.0,
        description="Added per demo that shows this input's gold answer (or a like input); "
        "demos that show neither add nothing (tasks.lm.sim.SimulatedEngine).",
    )
    sim_instruction_bonus: float = Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="Most an instruction adds (a hash of its text stands in for quality).",
    )
    sim_max_accuracy: float = Field(
        0.95, ge=0.0, le=1.0, description="Ceiling of the simulated accuracy."
    )

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        value = value.strip()
        if value in ("local", "sim"):
            return value
        provider, _, name = value.partition("/")
        if not provider or not name:
            raise ValueError(
                f"unknown LM {value!r}: use `local`, `sim`, or a provider/model string "
                "such as `openai/gpt-4o-mini`"
            )
        return value

    @property
    def provider(self) -> str:
        return self.model if self.model in ("local", "sim") else "remote"

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            key = os.environ.get(self.api_key_env)
            if not key:
                raise ValueError(
                    f"lm.api_key_env: environment variable {self.api_key_env} is unset"
                )
            return key
        # An OpenAI-compatible server still needs some key string.
        return "local-server" if self.api_base else None


class CycleSpec(BaseModel):
    """One optimization cycle: program, data, metric, optimizer and budget, LM, limits."""

    # No inf/nan anywhere: they pass gt/ge checks (or fail them obscurely) and break the
    # budget and latency arithmetic later.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    task: str = Field("intent", description="A built-in task (intent, extraction) or a label.")
    program: str | None = Field(None, description="Your own program: `module:attr`.")
    metric: str | None = Field(None, description="Your own metric: `module:function`.")
    dataset: Path | None = Field(None, description="Your own data: a JSONL file.")
    optimizer: str = Field("mipro", description="mipro, gepa or genetic.")
    budget: BudgetPreset = Field(
        BudgetPreset.light, description="How much search the optimizer does: light, medium, heavy."
    )
    lm: LMSpec = Field(default_factory=LMSpec, description="The LM the program runs on.")
    # allow_inf_nan=False: `inf` passes gt=0 and then breaks the budget arithmetic later.
    time_budget_s: float = Field(
        DEFAULT_TIME_BUDGET_S,
        gt=0,
        allow_inf_nan=False,
        description="Hard limit on the cycle's wall time.",
    )
    budget_warning_at: float = Field(
        DEFAULT_WARNING_AT, gt=0, lt=1, description="Warn at this fraction of any budget."
    )
    # Optional hard budgets besides time; reaching one stops the cycle like the time budget.
    lm_call_budget: int | None = Field(None, gt=0, description="Stop after this many LM calls.")
    token_budget: int | None = Field(
        None, gt=0, description="Stop after this many LM tokens (input + output)."
    )
    cost_budget_usd: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="Stop at this LM cost (needs a known or configured price).",
    )
    reflection_lm: LMSpec | None = Field(
        None,
        description="LM that proposes instructions (GEPA's reflection LM, the genetic "
        "optimizer's rewrites). Default: the task LM.",
    )
    priority: int = Field(0, description="Higher runs first in a batch.")
    seed: int = Field(0, description="Seed of the data splits and the optimizer.")
    num_threads: int = Field(1, ge=1, le=256, description="DSPy evaluation threads.")
    max_train: int | None = Field(None, gt=0, description="Use at most this many train examples.")
    max_val: int | None = Field(None, gt=0, description="Cap on validation examples.")
    max_test: int | None = Field(None, gt=0, description="Cap on test examples.")
    demo_selection: Literal["none", "diverse", "nearest"] = Field(
        "none",
        description="Embedding-based demo pool for the optimizer (all-MiniLM-L6-v2, cosine on "
        "the best device): `diverse` = farthest-point spread over the trainset, `nearest` = "
        "the training examples closest to the validation inputs. `none` = the whole trainset.",
    )
    demo_pool_size: int = Field(16, ge=1, description="Size of the selected demo pool.")

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        if value not in KNOWN_OPTIMIZERS:
            raise ValueError(f"unknown optimizer {value!r}; known: {', '.join(KNOWN_OPTIMIZERS)}")
        return value

    @field_validator("budget", mode="before")
    @classmethod
    def _known_preset(cls, value: object) -> object:
        known = [p.value for p in BudgetPreset]
        if isinstance(value, str) and value not in known:
            raise ValueError(f"unknown budget preset {value!r}; known: {', '.join(known)}")
        return value

    @model_validator(mode="after")
    def _cost_budget_has_a_price(self) -> CycleSpec:
        # local and sim have no price unless one is configured; remote models may have a
        # known price (checked when the cycle runs).
        lms = [self.lm, *([self.reflection_lm] if self.reflection_lm else [])]
        unpriced = [
            lm.model
            for lm in lms
            if lm.provider != "remote"
            and lm.price_per_1k_input_usd is None
            and lm.price_per_1k_output_usd is None
        ]
        if self.cost_budget_usd is not None and unpriced:
            raise ValueError(
                f"cost_budget_usd needs a price for LM {unpriced[0]!r}: set "
                "lm.price_per_1k_input_usd / lm.price_per_1k_output_usd"
            )
        return self

    @model_validator(mode="after")
    def _task_is_resolvable(self) -> CycleSpec:
        user_parts = (self.program, self.metric, self.dataset)
        if any(p is not None for p in user_parts):
            if not all(p is not None for p in user_parts):
                raise ValueError("program, metric and dataset go together: give all three")
            if self.task == "intent":
                self.task = "custom"
            return self
        from tasks.programs import list_tasks

        if self.task not in list_tasks():
            raise ValueError(f"unknown task {self.task!r}; known: {', '.join(list_tasks())}")
        return self

    @classmethod
    def from_options(cls, *, lm: str = "local", **fields: object) -> CycleSpec:
        """Build from flat CLI options (`--lm sim`)."""
        return cls(lm=LMSpec(model=lm), **fields)

    def run_fields(self) -> dict[str, Any]:
        """The run row's columns this spec decides (`Repository.create_run(s)`): the one
        mapping from a spec to a row, for single runs, batches and the nightly suite."""
        return {
            "task": self.program or self.task,
            "optimizer": self.optimizer,
            "budget": self.budget,
            "lm": self.lm.model,
            "spec": self.model_dump(mode="json"),
            "priority": self.priority,
            "simulated": self.lm.provider == "sim",
        }
