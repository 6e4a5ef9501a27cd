"""Parsers of a chat answer's text: reasoning (think tags) and tool calls, streamed or whole.

Every parser is a small state machine fed the answer's text piece by piece, as the engine makes it;
the whole answer is the same machine fed once and finished, so a streamed answer and a whole one
split the same text the same way, wherever a tag or a JSON object falls across pieces.

    reasoning.py     --reasoning-parser qwen3 | deepseek_r1: <think>...</think> -> reasoning_content
    tool_calls.py    the tool-call types and --tool-call-parser's registry
    hermes.py        <tool_call>{"name", "arguments"}</tool_call> (Qwen2.5, Qwen3, QwQ)
    llama3_json.py   {"name", "parameters"} (Llama 3.x), `;`-separated, after an optional <|python_tag|>
    forced.py        the JSON a tool_choice of required / a named function constrains the output to
    pipeline.py      one choice's parsers in a row: reasoning first, then tool calls on the rest
    requested.py     what a request's tools / tool_choice ask of its answer (vLLM's rules)
    held.py          holding back the end of a piece that may be the start of a tag

Knows nothing of HTTP or of the engine.
"""
