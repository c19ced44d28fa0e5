"""Usage and cost of one cycle's LM calls, exact across DSPy's worker threads, priced
from the spec or LiteLLM's bundled price table."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from dspy.utils.usage_tracker import UsageTracker

logger = logging.getLogger(__name__)


class CycleUsage(UsageTracker):
    """DSPy usage tracker shared by all worker threads of one cycle.

    DSPy deep-copies the tracker per worker thread and drops the copies' counts, so
    `__deepcopy__` returns the same object and `add_usage` takes a lock.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.calls = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.cost_usd = 0.0
        self.priced = False  # True once any call had a known or configured price
        self.by_lm: dict[str, dict[str, int]] = {}
        self._prices: dict[str, tuple[float, float]] = {}  # USD per 1k input/output tokens

    def __deepcopy__(self, memo: dict[int, Any]) -> CycleUsage:
        return self

    def set_price(self, lm: str, per_1k_input: float | None, per_1k_output: float | None) -> None:
        """Price the calls of one model (a cycle may use a task LM and a reflection LM)."""
        if per_1k_input is None and per_1k_output is None:
            return
        with self._lock:
            self._prices[lm] = (per_1k_input or 0.0, per_1k_output or 0.0)

    def add_usage(self, lm: str, usage_entry: dict[str, Any]) -> None:
        if not usage_entry:
            return
        input_tokens = int(usage_entry.get("prompt_tokens") or usage_entry.get("input_tokens") or 0)
        output_tokens = int(
            usage_entry.get("completion_tokens") or usage_entry.get("output_tokens") or 0
        )
        with self._lock:
            self.calls += 1
            self.input_tokens += input_tokens
            self.output_tokens += output_tokens
            per_lm = self.by_lm.setdefault(lm, {"calls": 0, "input_tokens": 0, "output_tokens": 0})
            per_lm["calls"] += 1
            per_lm["input_tokens"] += input_tokens
            per_lm["output_tokens"] += output_tokens
            # A configured price wins over what the provider reports.
            price = self._prices.get(lm)
            cost = usage_entry.get("cost")
            if price is not None:
                self.cost_usd += input_tokens / 1000 * price[0] + output_tokens / 1000 * price[1]
                self.priced = True
            elif isinstance(cost, int | float):
                self.cost_usd += float(cost)
                self.priced = True

    def snapshot(self) -> dict[str, Any]:
        """Totals; `cost_usd` is None while no call had a known price."""
        with self._lock:
            return {
                "lm_calls": self.calls,
                "input_tokens": self.input_tokens,
                "output_tokens": self.output_tokens,
                "cost_usd": self.cost_usd if self.priced else None,
            }


def use_bundled_litellm_prices() -> None:
    """LiteLLM fetches its price map from the internet when first imported (about 8 s of
    retries offline); the copy it ships is what we price with. Call before that import."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def known_price(model: str) -> tuple[float, float] | None:
    """USD per 1k input/output tokens from LiteLLM's price list, for remote models."""
    use_bundled_litellm_prices()
    try:
        import litellm
    except ImportError:  # pragma: no cover - dspy ships litellm
        return None
    for name in (model, model.partition("/")[2]):
        info = litellm.model_cost.get(name) if name else None
        if info and info.get("input_cost_per_token") is not None:
            return (
                float(info["input_cost_per_token"]) * 1000,
                float(info.get("output_cost_per_token") or 0.0) * 1000,
            )
    return None
