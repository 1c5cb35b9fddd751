"""tools/gpu_bench.py, the prepared GPU benchmark, as a CPU smoke run (`--quick`: tiny members, fp32) in a
subprocess, as it runs on the lent machine: what it prints and the JSON it leaves in $OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CALLS = ["one UNet", "N UNets", "average", "noise-average", "sabw [paper]", "last-block [paper]", "sabw [fast]",
         "last-block [fast]"]


def test_quick_run_writes_every_row_to_out(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}  # the script finds afa itself
    env["OUT"] = str(tmp_path)  # no --output: the default is $OUT/gpu_bench.json
    result = subprocess.run([sys.executable, "tools/gpu_bench.py", "--quick"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    figures = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert figures == json.loads(result.stdout.strip().splitlines()[-1])  # printed and written alike
    assert figures["complete"] and figures["quick"] and figures["settings"]["device"] == "cpu"
    assert figures["goals"] == {"fast": 1.03, "paper": 1.07}
    environment = figures["environment"]
    assert "scaled_dot_product_attention" in environment["member_attention"]
    assert environment["sdpa_check_max_abs_difference"] < 1e-4 and environment["torch"]

    assert [run["members"] for run in figures["runs"]] == [2, 3]
    for run in figures["runs"]:
        assert run["attention_layers_per_member"] == 32  # 16 transformer blocks, attn1 + attn2, all on SDPA
        assert run["repeats"] == 2 and set(run["sabw_parameters"]) == {"paper", "fast"}
        rows = {row["call"]: row for row in run["rows"]}
        assert list(rows) == CALLS
        assert all(row["seconds"] > 0 for row in rows.values())
        assert rows["N UNets"]["ratio_to_n_unets"] == 1.0 and rows["N UNets"]["seconds"] == run["seconds_n_unets"]
        for preset, goal in (("paper", 1.07), ("fast", 1.03)):
            for mode in ("sabw", "last-block"):
                row = rows[f"{mode} [{preset}]"]
                assert (row["preset"], row["mode"], row["goal"]) == (preset, mode, goal)
                assert row["meets_goal"] == (row["ratio_to_n_unets"] <= goal)
                assert row["flop_ratio_to_n_unets"] > 1.0
        assert rows["average"]["flop_ratio_to_n_unets"] == rows["noise-average"]["flop_ratio_to_n_unets"] == 1.0
        assert rows["average"]["goal"] is None and rows["average"]["preset"] is None
        # the paper design's self-attention over all pixels costs more than the fast design's pooled block
        assert rows["sabw [paper]"]["flop_ratio_to_n_unets"] > rows["sabw [fast]"]["flop_ratio_to_n_unets"]
    assert "sabw [paper]" in result.stdout and "<= 1.07" in result.stdout and "<= 1.03" in result.stdout


def test_refuses_a_full_run_without_cuda():
    import torch

    if torch.cuda.is_available():
        return  # the full run would start; nothing to check here
    result = subprocess.run([sys.executable, "tools/gpu_bench.py", "--budget-s", "1"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and "no CUDA device" in result.stderr
