"""`--prefill URL...` (decode), `--decode URL...` and `--decode-max-queued` (prefill): an instance that
is its cluster's entry. Each flag reaches ServerConfig; a flag given to the wrong role is refused."""

from __future__ import annotations

import argparse

import pytest

from pdserve.cli import build_parser, server_config


def _serve(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--device", "cpu", *args])


def test_peers_reach_the_config_normalized() -> None:
    config = server_config(
        _serve("--role", "prefill", "--decode", "h:1", "http://x:2/", "--decode-max-queued", "0")
    )
    assert (config.decode_peers, config.prefill_peers, config.decode_max_queued) == (
        ("http://h:1", "http://x:2"),
        (),
        0,
    )
    config = server_config(_serve("--role", "decode", "--prefill", "https://p:3"))
    assert (config.prefill_peers, config.decode_peers, config.decode_max_queued) == (("https://p:3",), (), 5)


@pytest.mark.parametrize(
    "args",
    [
        ("--role", "decode", "--decode", "h:1"),
        ("--role", "prefill", "--prefill", "h:1"),
        ("--prefill", "h:1"),  # role both: colocated, no peers
    ],
)
def test_peers_of_the_wrong_role_are_refused(args: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="is for a"):
        server_config(_serve(*args))


def test_bad_peer_urls_and_bounds_are_refused_by_the_parser() -> None:
    for args in (("--decode", "ftp://h:1"), ("--decode-max-queued", "-1"), ("--prefill",)):
        with pytest.raises(SystemExit):
            _serve("--role", "prefill", *args)
