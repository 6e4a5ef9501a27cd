"""What a chat request asks of its answer's parsing: the server's reasoning parser, and what its
`tools` / `tool_choice` mean (vLLM's rules):

    no tools, or tool_choice none     no tool parsing (the tools still reach the chat template)
    parallel_tool_calls false         the first call only
    auto (the default with tools)     the server's --tool-call-parser, if --enable-auto-tool-choice;
                                      else 400
    required, or a named function     the output constrained to hermes <tool_call> blocks
                                      (pdserve.structured's tool_call_grammar), read by the hermes
                                      parser; with a reasoning parser, after the model's reasoning
                                      (the grammar allows the think block first, the reasoning
                                      parser reads it)
"""

from __future__ import annotations

from typing import Any

from pdserve.config import ServerConfig
from pdserve.errors import InvalidRequestError
from pdserve.server import protocol as p
from pdserve.server.parsers.pipeline import ParserSpec


def parser_spec(req: p.ChatCompletionRequest, config: ServerConfig) -> ParserSpec:
    """The parsing of this request's answer; InvalidRequestError for a tool_choice it cannot have."""
    reasoning = config.reasoning_parser
    choice = req.tool_choice
    parallel = req.parallel_tool_calls is not False
    if not req.tools:
        if choice not in (None, "none"):
            raise InvalidRequestError("tool_choice needs tools", "tool_choice")
        return ParserSpec(reasoning)
    if choice == "none":
        return ParserSpec(reasoning)
    if choice is None or choice == "auto":
        if not (config.enable_auto_tool_choice and config.tool_call_parser):
            raise InvalidRequestError(
                'tool_choice "auto" needs the server started with --enable-auto-tool-choice and '
                "--tool-call-parser",
                "tool_choice",
            )
        return ParserSpec(reasoning, config.tool_call_parser, "auto", parallel_tool_calls=parallel)
    if choice == "required":
        return ParserSpec(reasoning, "hermes", "required", parallel_tool_calls=parallel)
    names = {t.function.name for t in req.tools}
    if choice.function.name not in names:
        raise InvalidRequestError(
            f"tool_choice names {choice.function.name!r}, not one of the tools", "tool_choice"
        )
    return ParserSpec(reasoning, "hermes", "function", choice.function.name, parallel_tool_calls=False)


def forced_grammar(req: p.ChatCompletionRequest, spec: ParserSpec) -> Any:
    """The grammar that constrains a `required` or named-function answer (None: not constrained)."""
    if spec.tool_mode not in ("required", "function"):
        return None
    try:
        from pdserve.structured import tool_call_grammar  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raise InvalidRequestError(
            f"tool_choice {spec.tool_mode} needs structured output, which this build lacks", "tool_choice"
        ) from None
    choice = req.tool_choice
    mode = choice.model_dump() if isinstance(choice, p.NamedToolChoice) else choice  # as sent
    tools = template_tools(req) or []
    return tool_call_grammar(tools, mode, parallel=spec.parallel_tool_calls, reasoning=spec.reasoning)


def template_tools(req: p.ChatCompletionRequest | p.TokenizeRequest) -> list[dict[str, Any]] | None:
    """The tools as chat templates read them (OpenAI's shape)."""
    return [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
