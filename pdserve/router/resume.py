"""What a relayed stream has delivered so far, so that it can be resumed on another instance.

An instance asked with `X-PDServe-Resumable: 1` puts an `id:` line on every event that follows new
output tokens: `id: <chars>:<ids>`, the characters of output text sent so far in the whole answer and
the token ids this event adds (comma-joined, possibly none). `Progress` keeps the ids (in order), the
last character count, and the completion id/created of the first chunk; from those, `resume_field`
builds the request body's `resume` object (see the resume contract in docs/architecture.md):

    {"output_token_ids": [...], "text_chars_sent": N, "completion_id": "chatcmpl-...", "created": T}

An id line is the instance's input to the router and is checked: one that does not parse, or whose
character count goes backwards, makes the stream not resumable (it is relayed on; a failure then ends
it with an error event, as before). The ids are bounded (MAX_TOKENS): an answer longer than that is not
resumed either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RESUMABLE_HEADER = "X-PDServe-Resumable"
# error codes (an SSE error event, or a 5xx answer) that another instance may do better on
RESUMABLE_CODES = frozenset(
    {
        "instance_failed",
        "instance_draining",
        "engine_dead",
        "prefill_failed",
        "prefill_draining",
        "kv_timeout",
    }
)
# of those, the ones the prefill instance answers for: another prefill instance is tried
PREFILL_CODES = frozenset({"prefill_failed", "prefill_draining", "kv_timeout"})
MAX_TOKENS = 1 << 20
_MAX_MARK_BYTES = 1 << 20  # one id line: far more than any one event's tokens


class BadMark(ValueError):
    """An `id:` line that is not `<chars>:<comma-joined ids>`."""


def parse_mark(value: bytes) -> tuple[int, list[int]]:
    """`b"12:345,678"` -> (12, [345, 678]); `b"12:"` -> (12, [])."""
    if len(value) > _MAX_MARK_BYTES:
        raise BadMark("id line too long")
    chars, sep, ids = value.partition(b":")
    if not sep or not chars.isdigit():
        raise BadMark(f"id line {value[:40]!r} is not <chars>:<ids>")
    tokens: list[int] = []
    for part in ids.split(b",") if ids else ():
        if not part.isdigit():
            raise BadMark(f"id line {value[:40]!r} holds a token id that is no integer")
        tokens.append(int(part))
    return int(chars), tokens


@dataclass
class Progress:
    """One answer's delivered output: token ids, characters, its completion id and creation time."""

    token_ids: list[int] = field(default_factory=list)
    chars: int = 0
    completion_id: str | None = None
    created: int | None = None
    finished: bool = False  # a finish_reason has been relayed: nothing is left to resume
    broken: str | None = None  # why the stream can no longer be resumed

    def mark(self, value: bytes) -> bool:
        """Take one id line's value; True if it added token ids."""
        if self.broken is not None:
            return False
        try:
            chars, tokens = parse_mark(value)
        except BadMark as e:
            self.broken = str(e)
            return False
        if chars < self.chars:
            self.broken = f"the character count went back from {self.chars} to {chars}"
        elif len(self.token_ids) + len(tokens) > MAX_TOKENS:
            self.broken = f"more than {MAX_TOKENS} output tokens"
        else:
            self.chars = chars
            self.token_ids += tokens
        return bool(tokens)

    def see(self, data: Any) -> None:
        """A relayed chunk: its id and created (the first ones), and whether it finished the answer."""
        if not isinstance(data, dict):
            return
        if self.completion_id is None and isinstance(data.get("id"), str):
            self.completion_id = data["id"]
        if self.created is None and type(data.get("created")) is int:
            self.created = data["created"]
        choices = data.get("choices")
        if isinstance(choices, list) and any(isinstance(c, dict) and c.get("finish_reason") for c in choices):
            self.finished = True

    @property
    def resumable(self) -> bool:
        """Whether `resume_field` can describe what the client has: at least one token, all known."""
        return (
            bool(self.token_ids)
            and self.broken is None
            and not self.finished
            and self.completion_id is not None
            and self.created is not None
        )

    def resume_field(self) -> dict[str, Any]:
        return {
            "output_token_ids": list(self.token_ids),
            "text_chars_sent": self.chars,
            "completion_id": self.completion_id,
            "created": self.created,
        }
