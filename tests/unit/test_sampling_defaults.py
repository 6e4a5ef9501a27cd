"""Which generation_config.json values become a server's sampling defaults (server/sampling_defaults.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pdserve.server.sampling_defaults import SamplingDefaults, load_defaults


def _dir(tmp_path: Path, config: dict[str, object] | None) -> str:
    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return str(tmp_path)


def test_the_models_recommended_values_are_taken(tmp_path: Path) -> None:
    qwen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    got = load_defaults(_dir(tmp_path, {"bos_token_id": 1, **qwen}))
    assert got == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert got.changed() == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}


def test_none_or_no_file_or_no_sampling_fields_keep_openais(tmp_path: Path) -> None:
    assert load_defaults(_dir(tmp_path, None)) == SamplingDefaults()  # no file
    assert load_defaults(_dir(tmp_path, {"temperature": 0.2}), "none") == SamplingDefaults()
    assert load_defaults(_dir(tmp_path, {"eos_token_id": 2, "use_cache": True})) == SamplingDefaults()
    assert SamplingDefaults().changed() == {}


def test_values_no_request_could_ask_for_are_skipped(tmp_path: Path) -> None:
    bad = {"temperature": -1.0, "top_p": 0.0, "top_k": True, "min_p": "0.1", "repetition_penalty": 1.1}
    assert load_defaults(_dir(tmp_path, bad)) == SamplingDefaults(repetition_penalty=1.1)


def test_an_unknown_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="generation_config"):
        load_defaults(str(tmp_path), "vllm")


def test_the_serve_flag_reaches_the_server_config() -> None:
    from pdserve.cli import build_parser, server_config

    def parsed(*args: str) -> str:
        return server_config(build_parser().parse_args(["serve", "--device", "cpu", *args])).generation_config

    assert parsed() == "auto"
    assert parsed("--generation-config", "none") == "none"
    with pytest.raises(SystemExit):
        parsed("--generation-config", "vllm")
