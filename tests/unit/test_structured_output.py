"""What a remote LM is asked for, and when the adapter changes its mind."""

from __future__ import annotations

import dspy
from dspy.utils.exceptions import LMProviderError

from tasks.cycle.spec import LMSpec
from tasks.lm.structured_output import ResponseFormatAdapter, adapter_for


class Classify(dspy.Signature):
    text: str = dspy.InputField()
    label: str = dspy.OutputField()


def _format(adapter: ResponseFormatAdapter) -> dict:
    lm_kwargs: dict = {}
    adapter._prepare_response_format(None, lm_kwargs, Classify)
    return lm_kwargs["response_format"]


def test_a_server_gets_the_schema_in_openai_form() -> None:
    adapter = adapter_for(LMSpec(model="openai/m", api_base="http://127.0.0.1:1/v1"), None)
    assert isinstance(adapter, ResponseFormatAdapter)
    sent = _format(adapter)
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["schema"]["required"] == ["label"]


def test_only_a_refused_request_switches_the_dialect() -> None:
    server = "http://127.0.0.1:2/v1"
    adapter = ResponseFormatAdapter("json_schema", server=server)
    # A parse failure that quotes the schema is not the server refusing the form.
    assert not adapter._switch_dialect(ValueError("could not parse json_schema answer"))
    assert _format(adapter)["type"] == "json_schema"
    refusal = LMProviderError("'loc': ('body', 'response_format', 'type') literal_error")
    assert adapter._switch_dialect(refusal)
    assert _format(adapter) == {
        "type": "json_object",
        "schema": _format(ResponseFormatAdapter("json_schema"))["json_schema"]["schema"],
    }
    # Remembered per server: a new cycle's adapter sends the accepted form at once.
    assert _format(ResponseFormatAdapter("json_schema", server=server))["type"] == "json_object"


def test_json_object_and_off_modes() -> None:
    base = "http://127.0.0.1:3/v1"
    spec = LMSpec(model="openai/m", api_base=base, structured_output="json_object")
    assert _format(adapter_for(spec, None)) == {"type": "json_object"}
    off = adapter_for(spec.model_copy(update={"structured_output": "off"}), None)
    assert type(off) is dspy.ChatAdapter
