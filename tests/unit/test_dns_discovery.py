"""dns://NAME:PORT discovery: every address of a name, followed as its answers change, through the
router's instance table (Registry.sync via MembershipWatcher); a resolver given as a parameter, and once
the system's getaddrinfo on localhost."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Sequence

import pytest

from pdserve.registry.dns import DnsMembership, address_url, getaddrinfo, parse_dns_url
from pdserve.registry.membership import Seen
from pdserve.router.app import RouterConfig
from pdserve.router.instances import Registry
from pdserve.router.membership import MembershipWatcher, membership_sources


class Answers:
    """A resolver whose answers the test changes; an OSError answer fails like a DNS timeout."""

    def __init__(self, answers: dict[str, Sequence[str] | OSError]) -> None:
        self.answers = answers
        self.calls = 0

    async def __call__(self, name: str, port: int) -> Sequence[str]:
        self.calls += 1
        answer = self.answers[name]
        if isinstance(answer, OSError):
            raise answer
        return answer


def urls(registry: Registry, role: str = "decode") -> set[str]:
    return {i.url for i in registry.instances if i.role == role}


async def test_a_name_is_followed_as_its_addresses_change() -> None:
    resolve = Answers({"decode.svc": ["10.0.0.1", "10.0.0.2"], "prefill.svc": ["fd00::7"]})
    names = [("decode", "dns://decode.svc:8000"), ("prefill", "dns://prefill.svc:9000")]
    source = DnsMembership(names, resolve=resolve, interval=0.02)
    registry = Registry()
    joined: list[str] = []
    watcher = MembershipWatcher(registry, [source], lambda i: joined.append(i.url))
    await watcher.start()
    try:
        assert urls(registry) == {"http://10.0.0.1:8000", "http://10.0.0.2:8000"}
        assert urls(registry, "prefill") == {"http://[fd00::7]:9000"}
        survivor = next(i for i in registry.instances if i.url == "http://10.0.0.2:8000")

        resolve.answers["decode.svc"] = ["10.0.0.2", "10.0.0.3", "10.0.0.3"]  # scaled: one out, one in
        await asyncio.sleep(0.2)
        assert urls(registry) == {"http://10.0.0.2:8000", "http://10.0.0.3:8000"}
        assert "http://10.0.0.3:8000" in joined
        assert any(i is survivor for i in registry.instances), "a survivor keeps its Instance"

        resolve.answers["decode.svc"] = OSError("temporary failure in name resolution")
        await asyncio.sleep(0.2)
        assert urls(registry) == {"http://10.0.0.2:8000", "http://10.0.0.3:8000"}, "a failure keeps the last"

        resolve.answers["decode.svc"] = ["not-an-address", "10.0.0.9"]  # a bad answer is no answer
        await asyncio.sleep(0.2)
        assert urls(registry) == {"http://10.0.0.2:8000", "http://10.0.0.3:8000"}

        resolve.answers["decode.svc"] = []  # scaled to zero
        await asyncio.sleep(0.2)
        assert urls(registry) == set()
        assert urls(registry, "prefill") == {"http://[fd00::7]:9000"}
    finally:
        await watcher.stop()
    calls = resolve.calls
    await asyncio.sleep(0.1)
    assert resolve.calls == calls, "stopped watchers resolve nothing"


async def test_static_urls_stay_beside_dns_names() -> None:
    sources = membership_sources(
        [("prefill", ["127.0.0.1:7001", "dns://p.svc:7000"]), ("decode", ["http://127.0.0.1:7002/"])],
        None,
        lambda up: None,
    )
    dns = sources[1]
    assert isinstance(dns, DnsMembership)
    dns.resolve = Answers({"p.svc": ["10.1.0.1"]})
    registry = Registry.build(["127.0.0.1:7001", "dns://p.svc:7000"], ["http://127.0.0.1:7002/"], [])
    assert [i.url for i in registry.instances] == ["http://127.0.0.1:7001", "http://127.0.0.1:7002"]
    watcher = MembershipWatcher(registry, sources, lambda i: None)
    await watcher.start()
    await watcher.stop()
    assert urls(registry, "prefill") == {"http://127.0.0.1:7001", "http://10.1.0.1:7000"}
    assert urls(registry) == {"http://127.0.0.1:7002"}
    assert membership_sources([("both", ["127.0.0.1:1"])], None, lambda up: None) == []  # nothing to follow


async def test_localhost_through_the_system_resolver() -> None:
    expected = {info[4][0] for info in socket.getaddrinfo("localhost", 8123, type=socket.SOCK_STREAM)}
    assert "127.0.0.1" in expected
    assert set(await getaddrinfo("localhost", 8123)) == expected
    seen = await DnsMembership([("both", "dns://localhost:8123")]).poll()
    assert Seen("both", "http://127.0.0.1:8123") in seen
    assert {s.url for s in seen} == {address_url(a, 8123) for a in expected}
    assert await DnsMembership([("both", "dns://no-such-name.invalid:1")]).poll() == frozenset()


@pytest.mark.parametrize(
    "url",
    ["dns://svc", "dns://:80", "dns://svc:80/path", "http://svc:80", "dns://svc:port", "dns://svc:99999"],
)
def test_malformed_dns_urls_are_refused_at_the_edge(url: str) -> None:
    with pytest.raises(ValueError):
        parse_dns_url(url)
    if url.startswith("dns://"):
        with pytest.raises(ValueError):
            RouterConfig(prefill=(url,), decode=("127.0.0.1:1",))


def test_router_config_with_a_registry_needs_no_urls() -> None:
    assert RouterConfig(registry="redis://127.0.0.1:6379/0").registry is not None
    with pytest.raises(ValueError):
        RouterConfig()
    with pytest.raises(ValueError, match=r"\*\*\*@"):  # never the password in the message
        RouterConfig(registry="http://:s3cret@127.0.0.1:6379")
