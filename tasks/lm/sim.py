"""`sim`: a simulated provider for capacity and fault tests (latency, error rate, a
signal that rewards demos only where they help). Figures made with it say so."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import threading
import time
from typing import TYPE_CHECKING, Any

import dspy
from dspy.lm15 import Response

from tasks.cycle.spec import LMSpec
from tasks.lm.messages import chat_messages, make_response, response_schema

if TYPE_CHECKING:
    from tasks.programs import TaskDefinition

logger = logging.getLogger(__name__)


_FIELD_RE = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond |\Z)", re.S)


class SimulatedEngine:
    """A fake LM with realistic costs and an accuracy that depends on the prompt.

    It knows the task's gold answers (the oracle) and answers correctly with probability
    `base_accuracy + instruction_bonus * quality(instructions) + demo_bonus * help`,
    capped at `max_accuracy`. Quality is a deterministic pseudo-random score of the
    instruction text (an optimizer finds good instructions only by trying them). `help`
    is what the prompt's demos show about *this* input, summed over demos and capped at
    `DEMO_HELP_CAP`: a demo counts by the share of this input's gold output fields it
    shows (an intent demo with the same label: 1; an extraction demo with the same
    quantity: 0.5), or by how alike its input is to this one (word overlap beyond chance),
    whichever is more. A demo that shows neither adds nothing, so adding demos pays only
    when they are the right ones: demo selection and optimizers are compared on a signal
    that the formula does not hand to whoever adds the most demos.

    The same prompt gets the same answer (as at temperature 0). Latency is log-normal;
    transient errors (429, 503) and permanent errors are injected at configured rates.
    Every figure produced with it must say `sim`.
    """

    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens"})

    def __init__(self, spec: LMSpec, task: TaskDefinition | None = None) -> None:
        self.spec = spec
        self.task = task
        self._rng = random.Random(spec.seed)
        self._rng_lock = threading.Lock()
        self._oracle: dict[tuple[str, ...], dict[str, Any]] = {}
        if task is not None:
            splits = task.load_splits()
            for example in [*splits.train, *splits.val, *splits.test]:
                key = tuple(str(example[f]).strip() for f in task.input_fields)
                self._oracle[key] = {f: example[f] for f in task.output_fields}

    def complete(self, request: dspy.lm15.Request) -> Response:
        from dspy.lm15 import RateLimitError, ServerError

        spec = self.spec
        with self._rng_lock:
            latency = (
                spec.sim_latency_ms / 1000.0 * math.exp(self._rng.gauss(0, spec.sim_latency_sigma))
                if spec.sim_latency_ms > 0
                else 0.0
            )
            fault = self._rng.random()
        if latency > 0:
            time.sleep(latency)
        if fault < spec.sim_permanent_error_rate:
            from dspy.lm15 import InvalidRequestError

            raise InvalidRequestError("simulated permanent error (HTTP 400)", provider="sim")
        if fault < spec.sim_permanent_error_rate + spec.sim_error_rate:
            if fault < spec.sim_permanent_error_rate + spec.sim_error_rate / 2:
                raise RateLimitError("simulated rate limit (HTTP 429)", provider="sim")
            raise ServerError("simulated server error (HTTP 503)", provider="sim")

        messages = chat_messages(request)
        prompt = "\n".join(m["content"] for m in messages)
        answer = self._answer(messages, response_schema(request))
        text = json.dumps(answer)
        return make_response("sim/oracle", text, max(1, len(prompt) // 4), max(1, len(text) // 4))

    def _answer(
        self, messages: list[dict[str, str]], schema: dict[str, Any] | None
    ) -> dict[str, Any]:
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        prompt_key = hashlib.sha256(
            ("\x00".join(m["content"] for m in messages) + str(self.spec.seed)).encode()
        ).digest()
        rng = random.Random(prompt_key)
        found = self._gold(messages)
        if found is not None and self.task is not None:
            gold, p = found
            if rng.random() < p:
                return dict(gold)
            return self.task.wrong_answer(dict(gold), rng)
        return _generic_answer(schema, system, rng)

    def correct_probability(self, messages: list[dict[str, str]]) -> float | None:
        """The chance that this prompt gets its input's gold answer; None for inputs
        the oracle does not know (instruction proposals, reflection)."""
        found = self._gold(messages)
        return None if found is None else found[1]

    def _gold(self, messages: list[dict[str, str]]) -> tuple[dict[str, Any], float] | None:
        if self.task is None or not messages:
            return None
        inputs = {name: value.strip() for name, value in _FIELD_RE.findall(messages[-1]["content"])}
        gold = self._oracle.get(tuple(inputs.get(f, "") for f in self.task.input_fields))
        if gold is None:
            return None
        has_system = messages[0]["role"] == "system"
        system = messages[0]["content"] if has_system else ""
        demos = _demo_pairs(messages[int(has_system) : -1])
        help_ = sum(self.demo_help(user, assistant, inputs, gold) for user, assistant in demos)
        return gold, self.accuracy(instructions=_instructions(system), demo_help=help_)

    def demo_help(
        self, user: str, assistant: str, inputs: dict[str, str], gold: dict[str, Any]
    ) -> float:
        """What one demo (its user and assistant turns) shows about an input with this
        gold output, in [0, 1]: the share of gold output fields it shows, or its input's
        word overlap with this input beyond chance, whichever is larger."""
        shown = _demo_outputs(assistant)
        fields = list(gold)
        share = sum(_same(shown.get(f), gold[f]) for f in fields) / len(fields) if fields else 0.0
        demo_inputs = {name: value.strip() for name, value in _FIELD_RE.findall(user)}
        names = self.task.input_fields if self.task is not None else tuple(inputs)
        overlap = _word_overlap(
            " ".join(demo_inputs.get(f, "") for f in names),
            " ".join(inputs.get(f, "") for f in names),
        )
        similar = max(0.0, (overlap - SIMILARITY_FLOOR) / (1.0 - SIMILARITY_FLOOR))
        return max(share, similar)

    def accuracy(self, *, instructions: str, demo_help: float = 0.0) -> float:
        """The probability of a correct answer for a prompt with these features."""
        spec = self.spec
        quality = int.from_bytes(hashlib.sha256(instructions.encode()).digest()[:4]) / 2**32
        p = (
            spec.sim_base_accuracy
            + spec.sim_demo_bonus * min(demo_help, DEMO_HELP_CAP)
            + spec.sim_instruction_bonus * quality
        )
        return max(0.0, min(spec.sim_max_accuracy, p))


# A sim prompt's demos help up to this many "whole" demos' worth; word overlap below the
# floor is what unrelated inputs share by chance ("i", "need", "of", "my") and counts 0.
DEMO_HELP_CAP = 3.0
SIMILARITY_FLOOR = 0.25
_WORD_RE = re.compile(r"[a-z0-9]+")


def _demo_pairs(turns: list[dict[str, str]]) -> list[tuple[str, str]]:
    """(user, assistant) contents of the demo turns between the system and last message."""
    pairs: list[tuple[str, str]] = []
    for user, assistant in zip(turns[0::2], turns[1::2], strict=False):
        if user["role"] == "user" and assistant["role"] == "assistant":
            pairs.append((user["content"], assistant["content"]))
    return pairs


def _demo_outputs(content: str) -> dict[str, Any]:
    """The output fields an assistant demo turn shows: JSON (JSONAdapter) or
    `[[ ## field ## ]]` sections (ChatAdapter)."""
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    return {name: value.strip() for name, value in _FIELD_RE.findall(content)}


def _same(shown: Any, gold: Any) -> bool:
    if shown is None:
        return False
    return str(shown).strip().lower() == str(gold).strip().lower()


def _word_overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' lowercase word sets."""
    wa, wb = set(_WORD_RE.findall(a.lower())), set(_WORD_RE.findall(b.lower()))
    if not wa or not wb:
        return 0.0
    return len(wa & wb) / len(wa | wb)


def _instructions(system: str) -> str:
    marker = "In adhering to this structure, your objective is:"
    return system.split(marker, 1)[1].strip() if marker in system else system[-400:]


_WORDS = (
    "carefully",
    "precisely",
    "concise",
    "label",
    "intent",
    "customer",
    "message",
    "classify",
    "extract",
    "field",
    "answer",
    "exactly",
    "single",
    "best",
    "category",
    "given",
    "text",
    "value",
    "quantity",
    "product",
    "step",
)


def _generic_answer(
    schema: dict[str, Any] | None, system: str, rng: random.Random
) -> dict[str, Any]:
    """Answers for prompts without a gold answer (instruction proposals, reflection)."""
    if schema and isinstance(schema.get("properties"), dict):
        props = schema["properties"]
    else:
        names = re.findall(r"\[\[ ## (\w+) ## \]\]", system.split("Outputs will be", 1)[-1])
        props = {n: {"type": "string"} for n in names if n != "completed"} or {
            "answer": {"type": "string"}
        }
    return {name: _fake_value(prop, rng) for name, prop in props.items()}


def _fake_value(prop: dict[str, Any], rng: random.Random) -> Any:
    if "enum" in prop:
        return rng.choice(prop["enum"])
    for option in prop.get("anyOf", []):
        if option.get("type") != "null":
            return _fake_value(option, rng)
    kind = prop.get("type", "string")
    if kind == "integer":
        return rng.randint(0, 10)
    if kind == "number":
        return round(rng.random(), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        return []
    if kind == "object":
        return {}
    words = rng.sample(_WORDS, k=8)
    return "Read the input " + " ".join(words) + f" (variant {rng.randint(0, 9999)})."
