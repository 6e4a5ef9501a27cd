"""Where `pdserve up` puts its instances: GPU groups per instance, CPU threads split between them."""

from __future__ import annotations

import pytest

from pdserve.placement import gpu_groups, instance_envs, option_value


def test_one_gpu_per_instance() -> None:
    assert gpu_groups([1, 1], ["0", "1"]) == ["0", "1"]
    assert gpu_groups([1, 1, 1], ["0", "1", "2", "3"]) == ["0", "1", "2"]


def test_tp_groups_and_sharing() -> None:
    assert gpu_groups([2, 2], ["0", "1", "2", "3"]) == ["0,1", "2,3"]
    assert gpu_groups([1, 1, 1], ["4", "5"]) == ["4", "5", "4"]  # wraps around: shared
    assert gpu_groups([2, 2], ["0", "1", "2"]) == ["0,1", "0,1"]  # a group never straddles the end
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        gpu_groups([2], ["0"])


def test_different_tp_per_instance() -> None:
    # 2 prefill at TP 1, 1 decode at TP 2 on four GPUs; then a decode at TP 4 after a prefill at TP 2
    assert gpu_groups([1, 1, 2], ["0", "1", "2", "3"]) == ["0", "1", "2,3"]
    assert gpu_groups([2, 4], ["0", "1", "2", "3", "4", "5"]) == ["0,1", "2,3,4,5"]
    assert gpu_groups([2, 4], ["0", "1", "2", "3"]) == ["0,1", "0,1,2,3"]  # too few: shared


def test_cpu_instances_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert instance_envs([1] * 4, "cpu", None) == [{"OMP_NUM_THREADS": "2"}] * 4
    assert instance_envs([1] * 16, "cpu", None) == [{"OMP_NUM_THREADS": "1"}] * 16


def test_explicit_gpus() -> None:
    assert instance_envs([1, 1], "cuda", "2,3") == [
        {"CUDA_VISIBLE_DEVICES": "2"},
        {"CUDA_VISIBLE_DEVICES": "3"},
    ]


def test_option_value_reads_pass_through_args() -> None:
    args = ["--device", "cuda", "--tp=2", "--num-blocks", "64"]
    assert option_value(args, ["--device"], "auto") == "cuda"
    assert option_value(args, ["--tp", "--tensor-parallel-size"], "1") == "2"
    assert option_value(args, ["--dtype"], "auto") == "auto"
