"""Every option of every `pdserve` subcommand (serve, prepare, router, up, bench serve/sweep/plot) says
what it does in --help, and shows its default where it has one."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from pdserve.cli import build_parser
from pdserve.options import BY_NAME, OPTIONS

Parser = argparse.ArgumentParser


def subparsers(parser: argparse.ArgumentParser, prefix: str = "pdserve") -> Iterator[tuple[str, Parser]]:
    """Each (sub)command's parser, by its command line, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"{prefix} {name}", sub
                yield from subparsers(sub, f"{prefix} {name}")


COMMANDS = dict(subparsers(build_parser()))
_SERVE_DEFAULTS = {flag: o for o in OPTIONS for flag in o.flags}  # `up` passes these on, as given


def test_every_command_is_walked() -> None:
    expected = {
        "serve",
        "prepare",
        "router",
        "up",
        "bench",
        "bench serve",
        "bench sweep",
        "bench plot",
        "deploy",
        "profile",
        "simulate",
        "plan",
    }
    assert {name.removeprefix("pdserve ") for name in COMMANDS} == expected


def _shown_default(action: argparse.Action, command: str) -> object:
    """The default a user gets when leaving the option out (None: nothing to show)."""
    if command == "pdserve up" and action.default == [] and action.option_strings[0] in _SERVE_DEFAULTS:
        option = _SERVE_DEFAULTS[action.option_strings[0]]
        return None if option.flag else option.default
    if action.nargs == 0 or action.default in (None, [], argparse.SUPPRESS):
        return None  # a flag sets a constant; None and [] mean "not given", which the text explains
    return action.default


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_has_help_with_its_default(command: str) -> None:
    parser = COMMANDS[command]
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if not (action.help or "").strip():
            problems.append(f"{name}: no help")
            continue
        text = formatter._get_help_string(action) or ""
        text = formatter._expand_help(action) if "%(" in text else text
        default = _shown_default(action, command)
        if default is not None and "default:" not in text:
            problems.append(f"{name}: its default {default!r} is not shown: {text!r}")
    assert not problems, "\n".join(problems)


def test_help_renders_defaults_from_the_options_table() -> None:
    serve_help = COMMANDS["pdserve serve"].format_help()
    assert "(default: 2048)" in serve_help  # --max-num-batched-tokens, from OPTIONS
    up_help = " ".join(COMMANDS["pdserve up"].format_help().split())
    assert f"(default: {BY_NAME['max_num_batched_tokens'].default})" in up_help
    assert "--max-restarts N" in up_help and "(default: 5)" in up_help
