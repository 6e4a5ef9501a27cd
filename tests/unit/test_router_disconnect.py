"""until_disconnect: a stream that became ready just as the client left is closed (its relay releases
the route and the upstream connection), not dropped; one handed to the client is left to its server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pdserve.router.app import until_disconnect
from pdserve.router.errors import RouterError
from pdserve.router.relay import SSEResponse


class _Relay:
    def __init__(self) -> None:
        self.closed = False

    async def events(self) -> AsyncIterator[bytes]:
        yield b"data: [DONE]\n\n"

    async def close(self) -> None:
        self.closed = True


class _Client:
    """A request whose client leaves during the disconnect check, while the stream gets ready."""

    def __init__(self, gate: asyncio.Event, leaves: bool) -> None:
        self.gate, self.leaves = gate, leaves

    async def is_disconnected(self) -> bool:
        self.gate.set()
        await asyncio.sleep(0.01)  # the work finishes meanwhile
        return self.leaves


async def _run(leaves: bool) -> tuple[_Relay, bool]:
    gate, relay = asyncio.Event(), _Relay()

    async def work() -> SSEResponse:
        await gate.wait()
        return SSEResponse(relay)  # type: ignore[arg-type]

    try:
        response = await until_disconnect(_Client(gate, leaves), work())  # type: ignore[arg-type]
    except RouterError as e:
        assert e.status == 499
        return relay, False
    return relay, isinstance(response, SSEResponse)


def test_a_stream_ready_as_the_client_leaves_is_closed() -> None:
    relay, handed = asyncio.run(_run(leaves=True))
    assert not handed and relay.closed


def test_a_stream_handed_to_the_client_stays_open() -> None:
    relay, handed = asyncio.run(_run(leaves=False))
    assert handed and not relay.closed
