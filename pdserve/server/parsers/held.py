"""Holding back a piece's end that may be the start of a tag the next piece completes."""

from __future__ import annotations


def partial_tag_start(text: str, tag: str) -> int:
    """Where the longest suffix of `text` that is a proper prefix of `tag` starts (len(text): none)."""
    for start in range(max(0, len(text) - len(tag) + 1), len(text)):
        if tag.startswith(text[start:]):
            return start
    return len(text)


def split_at_tag(text: str, tag: str) -> tuple[str, str | None, str]:
    """(before, after, held): `after` is the text past the first whole `tag` (None: no tag yet);
    without one, `held` is the end of `text` that may be the tag's start."""
    index = text.find(tag)
    if index >= 0:
        return text[:index], text[index + len(tag) :], ""
    cut = partial_tag_start(text, tag)
    return text[:cut], None, text[cut:]
