"""Built-in task `extraction`: pull the product and the quantity out of a customer order message.

Both fields are spans of the message (the quantity may be written as a word: "three", "a dozen").
The dataset's conventions are what a tiny model gets wrong and what demos teach: the product
excludes the count, a leading article and packaging words ("2 boxes of green tea" -> "green tea"),
"a"/"an" means 1, and when the customer corrects themselves the last number wins. Distractor
numbers (sizes, model numbers, prices, order ids) make the quantity non-trivial.
"""

from __future__ import annotations

import random
import re
import string
from typing import Any

import dspy

OUTPUT_FIELDS: tuple[str, ...] = ("product", "quantity")


class ExtractOrder(dspy.Signature):
    """Extract the product a customer wants to order and how many units they want."""

    text: str = dspy.InputField(desc="the customer's order message")
    product: str = dspy.OutputField(
        desc="the product as written in the message, without the quantity or packaging words"
    )
    quantity: int = dspy.OutputField(desc="how many units the customer wants")


class OrderExtractor(dspy.Module):
    """One Predict over `ExtractOrder`; the optimizers tune its instructions and demos."""

    def __init__(self) -> None:
        super().__init__()
        self.extract = dspy.Predict(ExtractOrder)

    def forward(self, text: str) -> dspy.Prediction:
        return self.extract(text=text)


def build_program() -> dspy.Module:
    return OrderExtractor()


_SURROUNDING = string.punctuation.replace("'", "") + string.whitespace + "'\"“”‘’"


def normalize_text(value: Any) -> str:
    """Lower-case, collapse whitespace, drop surrounding quotes/punctuation ("Mugs." == "mugs")."""
    if value is None:
        return ""
    return re.sub(r"\s+", " ", str(value)).strip(_SURROUNDING).lower()


def to_int(value: Any) -> int | None:
    """An int from an int, an integral float or a numeric string; None when it is not one."""
    if isinstance(value, bool):  # bool is an int subclass, but True is not a quantity
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            number = float(value.strip().replace(",", ""))
        except ValueError:
            return None
        return int(number) if number.is_integer() else None
    return None


def metric(
    gold: dspy.Example,
    pred: dspy.Prediction,
    trace: Any = None,
    pred_name: str | None = None,
    pred_trace: Any = None,
) -> float:
    """Mean of per-field exact match after normalization: 0.0, 0.5 or 1.0.

    Partial credit gives optimizers a smoother signal than all-or-nothing. Note that DSPy's
    bootstrapping accepts any truthy score as a demo unless `metric_threshold=1.0` is set.
    `pred_name`/`pred_trace` are accepted (and ignored) because GEPA requires a 5-argument metric.
    """
    product_ok = normalize_text(getattr(pred, "product", None)) == normalize_text(gold.product)
    predicted_qty = to_int(getattr(pred, "quantity", None))
    quantity_ok = predicted_qty is not None and predicted_qty == to_int(gold.quantity)
    return (float(product_ok) + float(quantity_ok)) / 2


def wrong_answer(gold_outputs: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """A plausible wrong extraction: an off-by-one quantity and/or a product with a word lost.

    Always wrong on at least one field, so a simulated LM's accuracy is exactly what it is set to.
    """
    product = str(gold_outputs.get("product", ""))
    quantity = to_int(gold_outputs.get("quantity"))
    quantity = 1 if quantity is None else quantity
    roll = rng.random()
    wrong_quantity = roll < 0.6
    wrong_product = roll >= 0.4  # 0.4 <= roll < 0.6: both fields wrong
    result = dict(gold_outputs)
    if wrong_quantity:
        # Off by one, never below 1 (nobody orders zero items).
        result["quantity"] = quantity + 1 if quantity <= 1 or rng.random() < 0.5 else quantity - 1
    if wrong_product:
        result["product"] = _neighbouring_product(product, rng)
    return result


def _neighbouring_product(product: str, rng: random.Random) -> str:
    words = product.split()
    if len(words) > 1:
        # Lose the first or the last word: "ceramic mugs" -> "mugs" / "ceramic".
        return " ".join(words[1:]) if rng.random() < 0.5 else " ".join(words[:-1])
    if product.endswith("s") and len(product) > 1:
        return product[:-1]  # "mugs" -> "mug"
    return product + "s" if product else "item"
