"""Structured output: grammars that constrain what a request may generate (JSON schema, JSON, regex,
a choice, an EBNF grammar, tool calls). The request carries a GrammarSpec (spec.py); the engine
compiles it once (compiler.py, xgrammar), keeps a Matcher per request (matcher.py) that advances on
every accepted token, and the sampler masks the logits of constrained rows (masks.py). Tool-call
grammars for tool_choice required / a named function come from tools.py.
"""

from pdserve.structured.spec import KINDS, GrammarSpec
from pdserve.structured.tools import tool_call_grammar

__all__ = ["KINDS", "GrammarSpec", "tool_call_grammar"]
