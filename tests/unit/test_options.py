"""One table of options (pdserve/options.py) gives `pdserve serve`'s flags, `pdserve up`'s pass-through
flags and LLM's keyword arguments; these check that each path builds the config it did by hand."""

from __future__ import annotations

import argparse

import pytest

from pdserve.cli import build_parser, server_config
from pdserve.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig, SchedulerConfig
from pdserve.kernels.config import KernelConfig
from pdserve.options import OPTIONS, engine_config, offline_engine_config


def _serve(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", "--device", "cpu", *args])


def test_serve_defaults_build_the_default_chain() -> None:
    config = server_config(_serve())
    assert (config.host, config.port, config.api_key) == ("127.0.0.1", 8000, None)
    assert config.served_model_name is None
    assert config.generation_config == "auto"
    engine = config.engine
    assert engine.model == ModelConfig(path=engine.model.path, device="cpu")
    assert engine.cache == CacheConfig()
    assert engine.scheduler == SchedulerConfig(max_num_seqs=64, max_waiting=512, overlap_outputs=None)
    assert engine.disagg == DisaggConfig(kv_host="127.0.0.1")
    assert engine.kernels == KernelConfig()


def test_every_serve_flag_reaches_its_field() -> None:
    args = _serve(
        *("--host", "0.0.0.0", "--port", "9000", "--api-key", "k", "--served-model-name", "m"),
        *("--generation-config", "none", "--max-num-seqs", "8", "--max-num-batched-tokens", "512"),
        *("--max-waiting", "7", "--no-overlap-outputs", "--block-size", "32", "--num-blocks", "100"),
        *("--kv-cache-memory", "2GiB", "--dtype", "float32", "--max-model-len", "256"),
        *("--load-format", "dummy", "--tokenizer", "/tok", "--gpu-memory-utilization", "0.5"),
        *("--enforce-eager", "--tp", "2", "--kernels", "pdl=off,attention=torch", "--no-prefix-caching"),
        *("--seed", "3", "--role", "prefill", "--kv-transport", "tcp", "--kv-stream-layers"),
        *("--kv-port", "5000", "--kv-advertise-host", "peer", "--kv-transfer-timeout", "9"),
    )
    config = server_config(args)
    assert (config.host, config.port, config.api_key, config.served_model_name) == ("0.0.0.0", 9000, "k", "m")
    assert config.generation_config == "none"
    engine = config.engine
    assert engine.model == ModelConfig(
        path=engine.model.path,
        dtype="float32",
        device="cpu",
        max_model_len=256,
        seed=3,
        load_format="dummy",
        tokenizer="/tok",
        gpu_memory_utilization=0.5,
        enforce_eager=True,
        tensor_parallel_size=2,
    )
    assert engine.cache == CacheConfig(
        block_size=32, num_blocks=100, kv_cache_memory_bytes=2**31, enable_prefix_caching=False
    )
    assert engine.scheduler == SchedulerConfig(
        max_num_seqs=8, max_num_batched_tokens=512, max_waiting=7, overlap_outputs=False
    )
    assert engine.disagg == DisaggConfig(
        role="prefill",
        kv_transport="tcp",
        kv_host="0.0.0.0",  # --kv-host defaults to --host
        kv_port=5000,
        kv_advertise_host="peer",
        kv_transfer_timeout=9.0,
        stream_layers=True,
    )
    assert engine.kernels == KernelConfig(pdl=False, attention="torch")
    assert server_config(_serve("--kv-host", "10.0.0.1")).engine.disagg.kv_host == "10.0.0.1"


def test_a_bad_kernel_spec_is_refused_by_the_parser() -> None:
    with pytest.raises(SystemExit):
        _serve("--kernels", "pdl=maybe")
    with pytest.raises(SystemExit):
        _serve("--kernels", "no_such_kernel=on")


def test_llm_options_build_the_offline_chain() -> None:
    config = offline_engine_config(model=None, num_blocks=64, block_size=4, enable_prefix_caching=False)
    assert config == EngineConfig(
        model=ModelConfig(path="", device="cpu"),
        cache=CacheConfig(block_size=4, num_blocks=64, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=64, max_waiting=1 << 30),
        disagg=DisaggConfig(kv_transport="inproc"),
    )
    assert offline_engine_config(kernels="pdl=off").kernels == KernelConfig(pdl=False)
    no_split = KernelConfig(split_norm=False)
    assert offline_engine_config(kernels=no_split).kernels == no_split
    assert offline_engine_config(overlap_outputs=True).scheduler.overlap_outputs is True
    assert offline_engine_config(kv_stream_layers=True).disagg.stream_layers is True


def test_llm_refuses_unknown_and_server_only_options() -> None:
    with pytest.raises(TypeError, match="no_such_option"):
        offline_engine_config(no_such_option=1)
    with pytest.raises(TypeError, match="kv_port"):
        offline_engine_config(kv_port=5000)
    with pytest.raises(TypeError, match="host"):
        engine_config(host="0.0.0.0")  # a server option, not an engine one


def _up(*args: str) -> argparse.Namespace:
    return build_parser().parse_args(["up", *args])


def test_up_passes_serve_flags_through_as_given() -> None:
    args = _up("--instances", "1", "--kernels", "pdl=off", "--kv-cache-memory", "2GiB", "--no-prefix-caching")
    assert args.serve_args == ["--kernels", "pdl=off", "--kv-cache-memory", "2GiB", "--no-prefix-caching"]
    assert _up("--tp", "2", "--max-num-seqs", "8").serve_args == ["--tp", "2", "--max-num-seqs", "8"]
    with pytest.raises(SystemExit):
        _up("--kernels", "pdl=maybe")
    with pytest.raises(SystemExit):
        _up("--max-num-seqs", "0")


def test_up_offers_every_serve_flag_but_those_it_sets_itself() -> None:
    up = build_parser()._subparsers._group_actions[0].choices["up"]  # type: ignore[union-attr]
    passed = {a.option_strings[0] for a in up._actions if a.dest == "serve_args" and a.option_strings}
    own = {"--host", "--port", "--model", "--api-key", "--role", "--kv-port", "--cluster-secret-file"}
    own |= {"--prefill", "--decode", "--decode-max-queued"}  # up's own, for its router
    assert passed == {o.flags[0] for o in OPTIONS} - own
