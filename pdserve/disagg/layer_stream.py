"""Layer-wise KV streaming: a prompt's KV leaves for its decode instance layer by layer, while the
prefill step is still computing the layers after it (direct-write paths: cuda_ipc; opt-in with
DisaggConfig.stream_layers / --kv-stream-layers).

    engine, launching a step: hook = connector.layer_hook(requests whose prompt the step completes)
    model, after layer i:     hook(i): the copy stream waits for what the compute stream has queued
                              and copies layer i of each request's blocks into its peer's pool
    engine, after the step:   connector.send_kv: only a fence (an event after the last copy), then
                              KVData(written) and the first token, as for a whole-request copy

Claiming a transfer at launch does what send_kv does first (the deadline check, the "reading" lease,
`sent`), so every write starts before the decode side's deadline and its "direct" lease covers it. A
request that ends during the step (an abort) is fenced from `request_finished`. If the step did not
call the hook for every layer (a one-token final chunk replayed from a CUDA graph), send_kv copies the
whole request as it would without streaming.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pdserve.disagg.transport.base import KVTransport
from pdserve.disagg.transport.blocks import paired_runs


@dataclass
class Streamed:
    """One transfer going out layer by layer."""

    peer: str
    src: list[int]
    dst: list[int]
    layers: int = 0  # layers queued so far
    # (src, dst, length) runs of blocks contiguous on both sides: the same for every layer
    runs: list[tuple[int, int, int]] = field(init=False)

    def __post_init__(self) -> None:
        self.runs = paired_runs(self.src, self.dst)


def make_hook(transport: KVTransport, streams: list[Streamed]) -> Callable[[int], None]:
    def after_layer(layer: int) -> None:
        for s in streams:
            transport.write_layer(s.peer, layer, s.runs)
            s.layers += 1

    return after_layer
