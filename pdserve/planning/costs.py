"""The price of one scheduled step, read off a profile.

A chunk is a decode when it is one token after the prompt; anything else (a prompt chunk, a recompute
after preemption) is prefill work. The profile measured the two kinds apart, so a step is priced as:

    decodes only   decode(B, mean context)
    prefill only   prefill(T, P)                      T: tokens of the step, P: their mean cached prefix
    mixed          measured (profile.mixed): mixed(T, B) + decode(B, ctx) - decode(B, its context)
                                     + prefill(T, P) - prefill(T, 0)
                   not measured:     prefill(T + B, P) + decode(B, ctx) - decode(B, smallest context)

(a mixed step reads the weights once, as a prefill of T + B tokens; the decodes add their attention
over their context; a measured one also has whatever the engine does differently for a step that
mixes the two, which the composed price misses). The simulator never looks at the model; this is all
it knows of it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pdserve.engine.scheduler import ScheduledChunk
from pdserve.planning.profile import Profile


def is_decode(chunk: ScheduledChunk) -> bool:
    return chunk.num_tokens == 1 and chunk.start >= chunk.request.num_prompt_tokens


def step_seconds(profile: Profile, chunks: Sequence[ScheduledChunk]) -> float:
    """How long the engine takes to run these chunks as one step."""
    decodes = [c for c in chunks if is_decode(c)]
    prompts = [c for c in chunks if not is_decode(c)]
    batch = len(decodes)
    context = sum(c.start + 1 for c in decodes) / batch if batch else 0.0
    if not prompts:
        return profile.decode.at(batch, context) if batch else 0.0
    tokens = sum(c.num_tokens for c in prompts)
    cached = sum(c.start * c.num_tokens for c in prompts) / tokens
    if batch and profile.mixed is not None:
        m = profile.mixed
        seconds = (
            m.grid.at(tokens, batch) + profile.decode.at(batch, context) - profile.decode.at(batch, m.context)
        )
        return max(0.0, seconds + profile.prefill.at(tokens, cached) - profile.prefill.at(tokens, 0.0))
    seconds = profile.prefill.at(tokens + batch, cached)
    if batch:
        seconds += max(
            0.0, profile.decode.at(batch, context) - profile.decode.at(batch, profile.decode.ys[0])
        )
    return seconds


def handoff_bytes(profile: Profile, num_blocks: int) -> int:
    """The KV bytes of `num_blocks` blocks (what a prefill sends for them)."""
    return num_blocks * profile.block_size * profile.kv_bytes_per_token
