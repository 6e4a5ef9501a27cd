"""Matcher: one request's position in its grammar. It advances on every token the request accepts
(sampled here, a first token from a prefill instance, resumed outputs replayed) and fills that
request's row of the step's token bitmask (32 tokens an int32 word, bit set: allowed). Stop tokens
are allowed only where the grammar may end; once one is accepted the matcher is done and constrains
nothing more (a request with ignore_eos goes on unconstrained).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class Matcher:
    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._m = matcher  # xgrammar.GrammarMatcher
        self.vocab_size = vocab_size
        self.num_accepted = 0

    @property
    def constrains(self) -> bool:
        """Whether the next token is constrained (False once the grammar has ended)."""
        return not self._m.is_terminated()

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (and no move) if the grammar does not allow it here."""
        if not self.constrains:
            return True
        ok = bool(self._m.accept_token(token_id))
        self.num_accepted += ok
        return ok

    def replay(self, token_ids: Iterable[int]) -> bool:
        """Accept tokens generated before (a resume, a hand-off's first token); False at the first
        one the grammar refuses."""
        return all(self.accept(t) for t in token_ids)

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into bitmask[row] (a CPU int32 [rows, words] tensor)."""
        self._m.fill_next_token_bitmask(bitmask, row)
