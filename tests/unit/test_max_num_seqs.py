"""Sequences one step may hold when the user does not say: by device (config.default_max_num_seqs)."""

from __future__ import annotations

import pytest

from pdserve.cli import build_parser, server_config
from pdserve.options import offline_engine_config


def _max_num_seqs(*args: str) -> int:
    return server_config(build_parser().parse_args(["serve", *args])).engine.scheduler.max_num_seqs


def test_serve_defaults_by_device_and_takes_what_is_given() -> None:
    assert _max_num_seqs("--device", "cpu") == 64
    assert _max_num_seqs("--device", "cuda") == 256
    assert offline_engine_config(device="cuda:1").scheduler.max_num_seqs == 256  # LLM(device="cuda:1")
    assert offline_engine_config().scheduler.max_num_seqs == 64  # LLM() runs on the CPU
    assert _max_num_seqs("--device", "cuda", "--max-num-seqs", "8") == 8
    assert _max_num_seqs("--device", "cpu", "--max-num-seqs", "300") == 300


def test_an_explicit_zero_is_refused_not_taken_for_the_default() -> None:
    from pdserve import LLM

    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(max_num_seqs=0)  # the config refuses it before any model is loaded
