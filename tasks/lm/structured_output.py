"""Structured output for remote LMs: which `response_format` a cycle sends.

DSPy's JSONAdapter sends the output fields' JSON schema only to models LiteLLM lists as
supporting it; a model served by vLLM, SGLang, llama.cpp or Ollama under a name LiteLLM
does not know gets `{"type": "json_object"}`, and a small model then writes until
`max_tokens` and its answers fail to parse. Those servers all decode to a JSON schema
(they compile it to a grammar), in one of two dialects:

- OpenAI's `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`:
  vLLM, SGLang, Ollama, llama.cpp's `llama-server`;
- `{"type": "json_object", "schema": {...}}`: llama-cpp-python's server (which refuses
  the first with HTTP 422) and `llama-server`.

`json_schema` mode sends the first; if the server refuses it, the second, remembered per
server for the rest of the process.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Literal

import dspy

from tasks.cycle.spec import LMSpec

logger = logging.getLogger(__name__)

FormatMode = Literal["json_schema", "json_object"]

# Servers (api_base) known to refuse OpenAI's json_schema form but take json_object+schema.
_schema_in_json_object: set[str] = set()
_dialect_lock = threading.Lock()


class ResponseFormatAdapter(dspy.JSONAdapter):
    """A JSONAdapter that always sends the chosen `response_format`, whatever LiteLLM
    knows of the model (overrides JSONAdapter's choice; dspy 3.4, pinned <3.5)."""

    def __init__(self, mode: FormatMode, server: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mode = mode
        self.server = server or ""

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any) -> None:
        if self.mode == "json_object":
            lm_kwargs["response_format"] = {"type": "json_object"}
            return
        schema = output_schema(signature)
        if schema is None:
            lm_kwargs["response_format"] = {"type": "json_object"}
        elif self.server in _schema_in_json_object:
            lm_kwargs["response_format"] = {"type": "json_object", "schema": schema}
        else:
            lm_kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "outputs", "schema": schema, "strict": True},
            }

    def __call__(self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: Any, inputs: Any):
        try:
            return super().__call__(lm, dict(lm_kwargs), signature, demos, inputs)
        except Exception as exc:
            if not self._switch_dialect(exc):
                raise
            return super().__call__(lm, dict(lm_kwargs), signature, demos, inputs)

    async def acall(
        self, lm: Any, lm_kwargs: dict[str, Any], signature: Any, demos: Any, inputs: Any
    ):
        try:
            return await super().acall(lm, dict(lm_kwargs), signature, demos, inputs)
        except Exception as exc:
            if not self._switch_dialect(exc):
                raise
            return await super().acall(lm, dict(lm_kwargs), signature, demos, inputs)

    def _switch_dialect(self, exc: Exception) -> bool:
        """True if the server refused OpenAI's json_schema form (and we now use the other)."""
        from dspy.utils.exceptions import LMProviderError

        # Only the server's refusal of the request: a parse error of an answer may quote
        # the schema too, and must not change what every later request sends.
        if not isinstance(exc, LMProviderError):
            return False
        if self.mode != "json_schema" or self.server in _schema_in_json_object:
            return False
        text = str(exc).lower()
        if "response_format" not in text and "json_schema" not in text:
            return False
        with _dialect_lock:
            _schema_in_json_object.add(self.server)
        logger.warning(
            "%s refused response_format json_schema; sending json_object with the schema",
            self.server or "the LM server",
        )
        return True


def output_schema(signature: Any) -> dict[str, Any] | None:
    """The JSON schema of a signature's output fields, or None when they cannot be
    described by a closed schema (an open dict field)."""
    import pydantic
    from dspy.adapters.json_adapter import _get_structured_outputs_response_format

    try:
        model = _get_structured_outputs_response_format(signature)
    except (
        ValueError,
        pydantic.PydanticInvalidForJsonSchema,
        pydantic.PydanticSchemaGenerationError,
    ):
        logger.warning("outputs of %s have no closed JSON schema: using json_object", signature)
        return None
    return model.model_json_schema()


def adapter_for(spec: LMSpec, lm: dspy.LM) -> dspy.Adapter | None:
    """The adapter a remote LM's cycle uses; None leaves DSPy's default (ChatAdapter)."""
    mode = spec.structured_output
    if mode == "auto":
        if spec.api_base:
            mode = "json_schema"
        else:
            try:
                known = bool(lm.supports_response_schema)
            except Exception:  # noqa: BLE001 - a capability lookup is advisory
                known = False
            return dspy.JSONAdapter() if known else None
    if mode == "off":
        # DSPy's text format, and no JSON-mode retry behind the user's back.
        return dspy.ChatAdapter(use_json_adapter_fallback=False)
    return ResponseFormatAdapter(mode, server=spec.api_base)
