"""Built-in task `intent`: banking customer-support intent classification (10 labels).

A single `dspy.Predict` (no ChainOfThought: the local model is SmolLM2-135M, too small to reason).
The `Literal` output type becomes an enum under JSON-schema-constrained decoding, so the model
always emits a valid label; the task is hard for it only because it must pick the *right* one,
which is what better instructions and few-shot demos improve.
"""

from __future__ import annotations

import random
from typing import Any, Literal, get_args

import dspy

IntentLabel = Literal[
    "check_balance",
    "transfer_money",
    "card_lost",
    "dispute_charge",
    "open_account",
    "close_account",
    "update_address",
    "loan_inquiry",
    "reset_password",
    "speak_to_agent",
]

LABELS: tuple[str, ...] = get_args(IntentLabel)

# Labels a confused model plausibly mixes up; a simulated LM picks its wrong answers here first so
# that simulated errors look like real ones rather than uniform noise.
CONFUSABLE: dict[str, tuple[str, ...]] = {
    "check_balance": ("transfer_money", "dispute_charge"),
    "transfer_money": ("check_balance", "close_account"),
    "card_lost": ("dispute_charge", "reset_password"),
    "dispute_charge": ("card_lost", "check_balance"),
    "open_account": ("close_account", "loan_inquiry"),
    "close_account": ("open_account", "transfer_money"),
    "update_address": ("open_account", "card_lost"),
    "loan_inquiry": ("open_account", "speak_to_agent"),
    "reset_password": ("card_lost", "speak_to_agent"),
    "speak_to_agent": ("reset_password", "loan_inquiry"),
}


class ClassifyIntent(dspy.Signature):
    """Classify the intent of a bank customer's support message."""

    text: str = dspy.InputField(desc="the customer's message")
    intent: IntentLabel = dspy.OutputField(desc="the customer's intent")


class IntentClassifier(dspy.Module):
    """One Predict over `ClassifyIntent`; the optimizers tune its instructions and demos."""

    def __init__(self) -> None:
        super().__init__()
        self.classify = dspy.Predict(ClassifyIntent)

    def forward(self, text: str) -> dspy.Prediction:
        return self.classify(text=text)


def build_program() -> dspy.Module:
    return IntentClassifier()


def _normalize_label(value: Any) -> str:
    # Tolerate "Card_Lost " from an unconstrained LM; the label set itself is case-free snake_case.
    return str(value).strip().lower() if value is not None else ""


def metric(
    gold: dspy.Example,
    pred: dspy.Prediction,
    trace: Any = None,
    pred_name: str | None = None,
    pred_trace: Any = None,
) -> float:
    """Exact label match: 1.0 or 0.0.

    `pred_name`/`pred_trace` are accepted (and ignored) because GEPA refuses metrics that cannot
    be called with five arguments.
    """
    predicted = getattr(pred, "intent", None)
    return 1.0 if _normalize_label(predicted) == _normalize_label(gold.intent) else 0.0


def wrong_answer(gold_outputs: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A plausible wrong label: usually a confusable neighbour, sometimes any other label."""
    gold = _normalize_label(gold_outputs.get("intent"))
    neighbours = CONFUSABLE.get(gold, ())
    if neighbours and rng.random() < 0.7:
        choice = rng.choice(neighbours)
    else:
        choice = rng.choice([label for label in LABELS if label != gold])
    return {**gold_outputs, "intent": choice}
