"""`--engine-process` / `--no-engine-process` and $PDSERVE_ENGINE_PROCESS choose where the engine runs."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser, server_config
from pdserve.options import ENGINE_PROCESS_ENV


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ((), None, False),
        ((), "1", True),
        ((), "0", False),
        (("--engine-process",), None, True),
        (("--engine-process",), "0", True),
        (("--no-engine-process",), "1", False),
        (("--engine-process", "--no-engine-process"), None, False),  # the last one given wins
    ],
)
def test_the_flag_wins_over_the_environment(
    flags: tuple[str, ...], env: str | None, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv(ENGINE_PROCESS_ENV, raising=False)
    else:
        monkeypatch.setenv(ENGINE_PROCESS_ENV, env)
    args = build_parser().parse_args(["serve", "--device", "cpu", *flags])
    assert server_config(args).engine_process is expected


@pytest.mark.parametrize(("device", "env", "expected"), [("cuda", None, True), ("cuda", "0", False)])
def test_a_gpu_server_runs_its_engine_in_a_process_unless_told(
    device: str, env: str | None, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if env is None:
        monkeypatch.delenv(ENGINE_PROCESS_ENV, raising=False)
    else:
        monkeypatch.setenv(ENGINE_PROCESS_ENV, env)
    args = build_parser().parse_args(["serve", "--device", device])
    assert server_config(args).engine_process is expected


def test_pdserve_up_passes_either_flag_on() -> None:
    for flag in ("--engine-process", "--no-engine-process"):
        args = build_parser().parse_args(["up", flag])
        assert flag in args.serve_args
