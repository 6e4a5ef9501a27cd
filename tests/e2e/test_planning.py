"""`pdserve profile --quick` on the default model, in its own process, feeds `pdserve simulate`, whose
JSON `pdserve bench plot` draws: the whole planning path on a real engine's measured costs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from pdserve.bench.plot import make_plots
from pdserve.cli import main


def test_profile_quick_feeds_simulate_and_plot(model_dir: str, tmp_path: Path) -> None:
    profile = tmp_path / "profile.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "pdserve.cli", "profile", "--quick", "--device", "cpu"]
    done = subprocess.run(
        [*cmd, "--model", model_dir, "--out", str(profile)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads(profile.read_text())
    assert data["format"] == "pdserve-profile/1" and data["tp"] == 1 and data["device"] == "cpu"
    assert data["kv"]["num_blocks"] > 0 and data["kv"]["bytes_per_token"] > 0
    assert all(s > 0 for row in data["prefill"]["seconds"] + data["decode"]["seconds"] for s in row)
    assert data["transfer"]["tcp"]["bytes"][0] == 0 and {"torch", "python"} <= set(data["versions"])

    runs = {}
    for layout in ("colocated:1", "pd:1:1"):
        out = tmp_path / f"{layout.replace(':', '_')}.json"
        args = ["simulate", "--profile", str(profile), "--layout", layout, "--workload", "64:8"]
        args += ["--request-rate", "0.05", "--num-prompts", "12", "--output", str(out)]  # one at a time
        assert main(args) == 0
        runs[layout] = json.loads(out.read_text())
    for run in runs.values():
        assert run["simulated"] and run["completed"] == 12 and run["mean_tpot_ms"] > 0
        assert len(run["ttfts"]) == 12 and run["total_output_tokens"] == 12 * 8
    # a pd layout moves the prompt's KV over tcp before its first token: never faster alone
    assert runs["pd:1:1"]["mean_ttft_ms"] > runs["colocated:1"]["mean_ttft_ms"]
    written = make_plots([tmp_path / "colocated_1.json", tmp_path / "pd_1_1.json"], tmp_path / "plots")
    assert all(p.stat().st_size > 0 for p in written)
