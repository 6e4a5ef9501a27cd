"""Grammars: compiles GrammarSpecs for one tokenizer with xgrammar, each spec once (a bounded LRU
keyed by the spec), and makes per-request Matchers from them.

xgrammar was chosen by measurement (benchmarks/grammar_engines.py, docs/benchmarks.md): its masks cost
microseconds per token at a 152k vocabulary where llguidance's p99 costs milliseconds; its compile is
slower (tens to hundreds of ms for a nested schema), which the cache pays once per schema and the HTTP
edge pays off the engine's thread (EngineFront.add compiles before it queues a request).
Thread-safe: the HTTP edge compiles on worker threads while the engine thread reads the cache.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from pdserve.errors import InvalidRequestError
from pdserve.structured.matcher import Matcher
from pdserve.structured.spec import GrammarSpec

_PREFIX = re.compile(r"^\[[0-9:]+\] \S+:[0-9]+: ")
CACHE_SIZE = 256  # compiled grammars kept (a compiled JSON schema is tens of KB to a few MB)


class Grammars:
    """The compiler of one engine's tokenizer. vocab_size: the logits' width (may exceed the
    tokenizer's); stop_token_ids: the tokens that end a request (allowed where the grammar may end)."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[GrammarSpec, Any] = OrderedDict()

    def compile(self, spec: GrammarSpec) -> Any:
        """The compiled grammar of `spec` (xgrammar.CompiledGrammar); InvalidRequestError if it has none."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
            compiler = self._xgr_compiler()
        try:
            compiled = _compile(compiler, spec)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar's errors derive from these
            raise InvalidRequestError(
                f"the {spec.kind} cannot be compiled: {_first_line(e)}", "structured"
            ) from e
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> Matcher:
        import xgrammar as xgr

        return Matcher(xgr.GrammarMatcher(self.compile(spec)), self.vocab_size)

    def _xgr_compiler(self) -> Any:
        """Built on first use (reading the vocabulary takes a second): engines that never see a
        constrained request never pay it. Called under the lock."""
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
            )
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler


def _compile(compiler: Any, spec: GrammarSpec) -> Any:
    if spec.kind == "json_schema":
        return compiler.compile_json_schema(spec.spec, any_whitespace=False)
    if spec.kind == "json_object":
        return compiler.compile_builtin_json_grammar()
    if spec.kind == "regex":
        return compiler.compile_regex(spec.spec)
    if spec.kind == "choice":
        return compiler.compile_grammar(choice_ebnf(spec.spec))
    if spec.kind == "grammar":
        return compiler.compile_grammar(spec.spec)
    return compiler.compile_structural_tag(spec.spec)  # tool_calls


def choice_ebnf(spec: str) -> str:
    """`root ::= "a" | "b"` for a JSON list of strings (each one JSON-escaped, as EBNF reads it)."""
    try:
        choices = json.loads(spec)
    except ValueError:
        choices = None
    ok = isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)
    if not ok:
        raise InvalidRequestError("a choice must be a non-empty list of non-empty strings", "structured")
    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


def _first_line(e: Exception) -> str:
    """The error's first line without xgrammar's "[time] source.cc:line: " prefix."""
    lines = str(e).strip().splitlines()
    first = _PREFIX.sub("", lines[0]) if lines else type(e).__name__
    return first[:300]
