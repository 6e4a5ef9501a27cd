"""The structured output a request asks for, as one GrammarSpec (or None): OpenAI's response_format
(text, json_object, json_schema) and vLLM's extras, `structured_outputs` {json, regex, choice,
grammar, json_object} and the older guided_json / guided_regex / guided_choice / guided_grammar.
At most one of them may be given; every value the engine cannot take is a 400 naming its field.
Whether a schema or grammar compiles is the engine's to say (EngineFront.add, also a 400).
"""

from __future__ import annotations

import json
from typing import Any

from pdserve.errors import InvalidRequestError
from pdserve.server import protocol as p
from pdserve.structured.spec import GrammarSpec

_STRUCTURED_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def structured_spec(req: p.SamplingRequest) -> GrammarSpec | None:
    asked = [
        spec
        for spec in (
            _response_format(getattr(req, "response_format", None)),
            _structured_outputs(req.structured_outputs),
            _guided(req),
        )
        if spec is not None
    ]
    if len(asked) > 1:
        raise InvalidRequestError(
            "give one of response_format, structured_outputs and guided_*, not several", "structured_outputs"
        )
    return asked[0] if asked else None


def _response_format(fmt: dict[str, Any] | None) -> GrammarSpec | None:
    kind = (fmt or {}).get("type", "text")
    if fmt is None or kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind != "json_schema":
        raise InvalidRequestError(f"response_format type {kind!r} is not supported", "response_format.type")
    inner = fmt.get("json_schema")
    schema = inner.get("schema") if isinstance(inner, dict) else None
    if not isinstance(schema, dict):
        raise InvalidRequestError(
            "response_format.json_schema.schema must be a JSON schema object", "response_format"
        )
    return _spec("json_schema", json.dumps(schema), "response_format")


def _structured_outputs(so: dict[str, Any] | None) -> GrammarSpec | None:
    if not so:
        return None
    unknown = set(so) - set(_STRUCTURED_KEYS) - {"json_object"}
    if unknown:
        raise InvalidRequestError(
            f"structured_outputs.{sorted(unknown)[0]} is not supported", "structured_outputs"
        )
    given = [k for k in so if so[k] is not None and so[k] is not False]
    if len(given) != 1:
        raise InvalidRequestError(
            "structured_outputs takes exactly one of json, regex, choice, grammar", "structured_outputs"
        )
    key = given[0]
    if key == "json_object":
        return GrammarSpec("json_object")
    return _value(_STRUCTURED_KEYS[key], so[key], f"structured_outputs.{key}")


def _guided(req: p.SamplingRequest) -> GrammarSpec | None:
    fields = {
        "guided_json": ("json_schema", req.guided_json),
        "guided_regex": ("regex", req.guided_regex),
        "guided_choice": ("choice", req.guided_choice),
        "guided_grammar": ("grammar", req.guided_grammar),
    }
    given = [(name, kind, v) for name, (kind, v) in fields.items() if v is not None]
    if len(given) > 1:
        raise InvalidRequestError("give one guided_* field, not several", given[1][0])
    return _value(given[0][1], given[0][2], given[0][0]) if given else None


def _value(kind: str, value: Any, param: str) -> GrammarSpec:
    """A spec from a field's JSON value: a schema (object or its JSON text), a regex or grammar
    (a string), a choice (a list of strings)."""
    if kind == "json_schema" and isinstance(value, dict):
        return _spec(kind, json.dumps(value), param)
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise InvalidRequestError(f"{param} must be a non-empty list of non-empty strings", param)
        return _spec(kind, json.dumps(value), param)
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"{param} must be a non-empty string", param)
    return _spec(kind, value, param)


def _spec(kind: str, spec: str, param: str) -> GrammarSpec:
    try:
        return GrammarSpec(kind, spec)
    except InvalidRequestError as e:
        raise InvalidRequestError(str(e), param) from None
