"""Which instance most recently served each prompt prefix: the router's soft state for cache_aware.

The router does not tokenize, so a prompt is cut into text chunks and each chunk's hash is chained to
its parent's, as the block manager chains its blocks' hashes:

    chat        one chunk per message (its JSON, keys sorted)        [sys] -> [user1] -> [asst1] -> ...
    completions one chunk per CHUNK_CHARS characters of the prompt; token-id prompts per CHUNK_TOKENS ids

The root hash is seeded with the request's kind and model, so two models never share a prefix. A chunk
weighs its length in characters; the match of an instance is the total weight of the prompt's chunks,
from the start, whose chain hash it served last (a chain hash names the whole prefix up to that chunk).

`PrefixIndex` is an LRU map chain hash -> instance URL with a cap on its entries, per role. Losing it
only costs cache hits; a hash collision only misroutes a request (instances check their own caches).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CHUNK_CHARS = 256
CHUNK_TOKENS = 64
MAX_CHUNKS = 1024  # a longer prompt is indexed by its first MAX_CHUNKS chunks only
DEFAULT_CAPACITY = 65536  # entries per role: 8-byte keys and a shared URL string, a few MiB at most


@dataclass(frozen=True)
class Chain:
    """A prompt's chained chunk hashes and each chunk's weight (characters), in prompt order."""

    hashes: tuple[bytes, ...]
    weights: tuple[int, ...]


def _chained(seed: str, chunks: Iterable[tuple[str, int]]) -> Chain:
    parent = hashlib.blake2b(seed.encode(), digest_size=8).digest()
    hashes: list[bytes] = []
    weights: list[int] = []
    for text, weight in chunks:
        if len(hashes) >= MAX_CHUNKS:
            break
        parent = hashlib.blake2b(parent + text.encode(errors="replace"), digest_size=8).digest()
        hashes.append(parent)
        weights.append(weight)
    return Chain(tuple(hashes), tuple(weights))


def _text_chunks(text: str) -> Iterable[tuple[str, int]]:
    for start in range(0, len(text), CHUNK_CHARS):
        piece = text[start : start + CHUNK_CHARS]
        yield piece, len(piece)


def _token_chunks(ids: Sequence[int]) -> Iterable[tuple[str, int]]:
    for start in range(0, len(ids), CHUNK_TOKENS):
        piece = ids[start : start + CHUNK_TOKENS]
        yield ",".join(map(str, piece)), 4 * len(piece)  # about 4 characters a token


def _message_chunks(messages: Sequence[Any]) -> Iterable[tuple[str, int]]:
    for message in messages:
        text = json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        yield text, len(text)


def prompt_chain(body: Mapping[str, Any]) -> Chain:
    """The chain of a chat or completion request's prompt; empty for anything it cannot read."""
    model = body.get("model")
    model = model if isinstance(model, str) else ""
    messages, prompt = body.get("messages"), body.get("prompt")
    if isinstance(messages, list):
        return _chained("chat\0" + model, _message_chunks(messages))
    if isinstance(prompt, str):
        return _chained("text\0" + model, _text_chunks(prompt))
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return _chained("ids\0" + model, _token_chunks(prompt))
    if isinstance(prompt, list):  # a batch: its JSON as one text
        return _chained("batch\0" + model, _text_chunks(json.dumps(prompt, ensure_ascii=False)))
    return Chain((), ())


class PrefixIndex:
    """chain hash -> the URL that served that prefix last; least recently used entries go first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("a prefix index needs room for at least one entry")
        self.capacity = capacity
        self._owner: OrderedDict[bytes, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    def matches(self, chain: Chain, urls: Iterable[str]) -> dict[str, int]:
        """For each of `urls`, the weight of the longest prefix of `chain` it served last (0: none)."""
        found = dict.fromkeys(urls, 0)
        depth = 0
        for digest, weight in zip(chain.hashes, chain.weights, strict=True):
            depth += weight
            owner = self._owner.get(digest)
            if owner in found:  # deeper entries may outlive shallower ones, so walk the whole chain
                found[owner] = depth
        return found

    def record(self, chain: Chain, url: str) -> None:
        """`url` serves this prompt: it now owns every prefix of it."""
        for digest in chain.hashes:
            self._owner[digest] = url
            self._owner.move_to_end(digest)
        while len(self._owner) > self.capacity:
            self._owner.popitem(last=False)

    def forget(self, url: str) -> None:
        """Drop every entry of an instance that left."""
        for digest in [d for d, owner in self._owner.items() if owner == url]:
            del self._owner[digest]

    def urls(self) -> set[str]:
        return set(self._owner.values())
