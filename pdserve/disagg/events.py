"""What the KV connector hands the engine thread from `poll()`: one small dataclass per event.

Transport threads queue them; the engine applies them between steps and never touches the connector's
state directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pdserve.engine.sampler import SampleResult


@dataclass
class NewPrefill:
    """Prefill side: a decode instance reserved blocks and asks us to fill them."""

    transfer_id: str
    decode_addr: str
    prompt_token_ids: list[int]
    params: dict[str, Any]
    block_ids: list[int]


@dataclass
class KVReady:
    """Decode side: all of a request's KV landed, and its first token came with it."""

    request_id: str
    result: SampleResult
    num_cached_tokens: int


@dataclass
class TransferFailed:
    request_id: str
    reason: str
    refused: str = ""  # protocol.Failed.refused: why the prefill would not take it, if it would not


@dataclass
class AbortPrefill:
    """Prefill side: the decode instance gave up (or went away); stop computing for it."""

    request_id: str


@dataclass
class ReleaseBlocks:
    """A finished request's blocks were in use by a transfer when it ended; now they may be freed."""

    request_id: str


Event = NewPrefill | KVReady | TransferFailed | AbortPrefill | ReleaseBlocks
