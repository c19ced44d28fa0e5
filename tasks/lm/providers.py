"""`build_lm`: a fresh `dspy.LM` for one cycle from its `LMSpec`, for `local`, `sim` or
any `dspy.LM` model string (OpenAI, or an OpenAI-compatible server via `api_base`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import dspy

from tasks.cycle.spec import LMSpec
from tasks.lm.local import LOCAL_MODEL_NAME, LocalLlamaEngine
from tasks.lm.managed import Engine, ManagedEngine, RetryPolicy
from tasks.lm.rate_limit import RateLimiter
from tasks.lm.sim import SimulatedEngine
from tasks.lm.usage import CycleUsage, known_price, use_bundled_litellm_prices

if TYPE_CHECKING:
    from tasks.programs import TaskDefinition

logger = logging.getLogger(__name__)


@dataclass
class CycleLM:
    """The LM of one cycle, its adapter, and its usage tracker."""

    lm: dspy.LM
    adapter: dspy.Adapter | None
    usage: CycleUsage
    engine: ManagedEngine | None
    simulated: bool

    def context(self, **extra: Any):
        """`dspy.context` for this cycle: the only way to set the LM in worker threads."""
        kwargs: dict[str, Any] = {"lm": self.lm, "usage_tracker": self.usage, **extra}
        if self.adapter is not None:
            kwargs["adapter"] = self.adapter
        return dspy.context(**kwargs)


def build_lm(
    spec: LMSpec,
    task: TaskDefinition | None = None,
    *,
    limiter: RateLimiter | None = None,
    usage: CycleUsage | None = None,
) -> CycleLM:
    """A fresh `dspy.LM` for one cycle (engines are shared, usage is not). Pass the cycle's
    `usage` to build a second LM of the same cycle (a reflection LM) priced on it."""
    usage = usage if usage is not None else CycleUsage()
    if spec.provider in ("local", "sim"):
        inner: Engine = (
            LocalLlamaEngine.shared() if spec.provider == "local" else SimulatedEngine(spec, task)
        )
        engine = ManagedEngine(
            inner=inner, retry=RetryPolicy(retries=spec.num_retries), limiter=limiter
        )
        name = LOCAL_MODEL_NAME if spec.provider == "local" else "sim/oracle"
        lm = dspy.LM(
            name,
            engine=engine,
            cache=False,
            num_retries=0,  # ManagedEngine retries with backoff and jitter
            temperature=spec.temperature,
            max_tokens=spec.max_tokens,
        )
        usage.set_price(name, spec.price_per_1k_input_usd, spec.price_per_1k_output_usd)
        # The engines answer with schema-constrained JSON: no ChatAdapter round trip.
        adapter = dspy.JSONAdapter()
        return CycleLM(lm, adapter, usage, engine, simulated=spec.provider == "sim")
    kwargs: dict[str, Any] = {
        "cache": spec.cache,
        "num_retries": spec.num_retries,
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
    }
    if spec.api_base:
        kwargs["api_base"] = spec.api_base
    api_key = spec.resolved_api_key()
    if api_key:
        kwargs["api_key"] = api_key
    use_bundled_litellm_prices()
    lm = dspy.LM(spec.model, **kwargs)
    configured = (spec.price_per_1k_input_usd, spec.price_per_1k_output_usd)
    price = configured if configured != (None, None) else known_price(spec.model)
    if price is not None:
        usage.set_price(spec.model, *price)
    from tasks.lm.structured_output import adapter_for

    return CycleLM(lm, adapter_for(spec, lm), usage, None, simulated=False)
