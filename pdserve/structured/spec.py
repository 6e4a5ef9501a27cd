"""GrammarSpec: what a request's output must match, as a small value that crosses every boundary
(SamplingParams, a Reserve to a prefill instance, the compile cache's key). It carries text only;
compiling it is compiler.py's business, so this module imports no grammar engine.

    json_schema   a JSON schema (a JSON text)
    json_object   any JSON object (spec: "")
    regex         a regular expression the whole output matches
    choice        a JSON list of strings: the output is exactly one of them
    grammar       an EBNF grammar (GBNF style, a `root` rule)
    tool_calls    an xgrammar structural tag in JSON (tools.tool_call_grammar makes it)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.errors import InvalidRequestError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_calls")
MAX_SPEC_CHARS = 1 << 18  # a schema or grammar this long is a mistake or an attack, not a use


@dataclass(frozen=True)
class GrammarSpec:
    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidRequestError(
                f"structured output kind must be one of {', '.join(KINDS)}", "structured"
            )
        if not isinstance(self.spec, str):
            raise InvalidRequestError("a structured output spec must be a string", "structured")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise InvalidRequestError(
                f"a structured output spec is at most {MAX_SPEC_CHARS} characters", "structured"
            )
        if self.kind != "json_object" and not self.spec:
            raise InvalidRequestError(f"structured output {self.kind} needs a spec", "structured")

    @classmethod
    def of(cls, value: Any) -> GrammarSpec | None:
        """A spec from itself, None, or its wire form {"kind", "spec"} (dataclasses.asdict's)."""
        if value is None or isinstance(value, GrammarSpec):
            return value
        if not isinstance(value, dict) or set(value) - {"kind", "spec"} or "kind" not in value:
            raise InvalidRequestError('structured must be {"kind": str, "spec": str}', "structured")
        if not isinstance(value["kind"], str):
            raise InvalidRequestError("structured.kind must be a string", "structured")
        return cls(value["kind"], value.get("spec", ""))
