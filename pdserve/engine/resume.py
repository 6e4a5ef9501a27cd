"""Resume: a request that starts with output tokens already generated (elsewhere, before a fault).

Think of it as a request preempted before it arrived: its outputs join its token ids, the scheduler
recomputes prompt + outputs (locally, or on a prefill instance, whose prefix cache helps), and every
rule that counts outputs (max_tokens, min_tokens, penalties, stop tokens, the seeded draw's position)
counts them. The detokenizer is primed with them, so text continues at `text_chars_sent`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resume:
    """output_token_ids: the outputs already generated (at least one). text_chars_sent: characters of
    their text the client already has (None: no text is wanted, a prefill for a peer). whole_text: the
    answer repeats those characters anyway (a non-streamed answer holds the whole text)."""

    output_token_ids: tuple[int, ...]
    text_chars_sent: int | None = 0
    whole_text: bool = False
