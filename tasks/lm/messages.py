"""A DSPy `Request` as chat messages and a JSON schema, and text back as a `Response`:
what the custom engines (`local`, `sim`) share."""

from __future__ import annotations

import logging
from typing import Any

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage

logger = logging.getLogger(__name__)


def estimate_tokens(request: dspy.lm15.Request) -> int:
    return max(1, len(prompt_text(request)) // 4)


def prompt_text(request: dspy.lm15.Request) -> str:
    return "\n".join(m["content"] for m in chat_messages(request))


def chat_messages(request: dspy.lm15.Request) -> list[dict[str, str]]:
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


def make_response(model: str, text: str, input_tokens: int, output_tokens: int) -> Response:
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


def response_schema(request: dspy.lm15.Request) -> dict[str, Any] | None:
    fmt = request.config.response_format if request.config else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = fmt.get("schema")
        return schema if isinstance(schema, dict) else None
    return None
