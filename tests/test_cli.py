"""`python -m afa` end to end, in subprocesses as users run it; and the core's independence from the WebUI."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from afa import Aggregator, AggregatorConfig, MemberRef, file_sha256, save_weights

REPO = Path(__file__).resolve().parent.parent


def run_afa(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "afa", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_help_lists_the_commands():
    result = run_afa("--help")
    assert result.returncode == 0
    assert all(command in result.stdout for command in ("inspect", "check", "bench"))


def test_inspect_checkpoint(checkpoint_factory):
    path = checkpoint_factory(1)
    result = run_afa("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert f"sha256 {file_sha256(path)}" in result.stdout
    assert "middle_block" in result.stdout and "output_blocks.11" in result.stdout
    assert '"model_channels": 32' in result.stdout


def test_inspect_weights_file(checkpoint_factory, tmp_path):
    members = [MemberRef.from_file(checkpoint_factory(seed)) for seed in (1, 2)]
    config = AggregatorConfig(2, [32] * 7 + [64] * 12 + [32] * 5 + [4], hidden_channels=32, num_heads=2,
                              context_dim=32)
    path = save_weights(tmp_path / "w.safetensors", Aggregator(config), members, {"steps": 5})
    result = run_afa("inspect", str(path))
    assert result.returncode == 0, result.stderr
    assert f"0: {members[0].name}  sha256 {members[0].sha256}" in result.stdout
    assert f"1: {members[1].name}  sha256 {members[1].sha256}" in result.stdout
    assert "mode sabw" in result.stdout and '"steps": 5' in result.stdout
    count = sum(p.numel() for p in Aggregator(config).parameters())
    assert f"SABW parameters {count / 1e6:.2f}M" in result.stdout


def test_check_members(checkpoint_factory, tiny_params):
    result = run_afa("check", str(checkpoint_factory(1)), str(checkpoint_factory(2)), "--hidden", "64")
    assert result.returncode == 0, result.stderr
    assert "2 members can be ensembled" in result.stdout and "output_blocks.11" in result.stdout
    config = AggregatorConfig(2, [32] * 7 + [64] * 12 + [32] * 5 + [4], hidden_channels=64, context_dim=32)
    with torch.device("meta"):
        count = sum(p.numel() for p in Aggregator(config).parameters())
    assert f"SABW parameters for them: {count / 1e6:.2f}M" in result.stdout

    wide = checkpoint_factory(3, name="wide", unet_params=dict(tiny_params, model_channels=64))
    result = run_afa("check", str(checkpoint_factory(1)), str(wide))
    assert result.returncode == 2
    assert "error: wide.safetensors cannot be ensembled" in result.stderr and "Traceback" not in result.stderr
    result = run_afa("check", str(checkpoint_factory(1)))
    assert result.returncode == 2 and "at least 2 members" in result.stderr


def test_bench_prints_figures_and_a_json_line():
    result = run_afa("bench", "--arch", "tiny", "--members", "3", "--latent", "8", "--repeats", "1")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(figures["ratio_to_n_unets"]) == {"sabw", "average", "noise-average", "last-block"}
    assert figures["members"] == 3 and figures["sabw_parameters"] > 0 and figures["peak_rss_gib"] > 0
    assert all(value > 0 for value in figures["seconds"].values())
    # FLOPs: averaging modes do exactly the members' work; SABW adds its own
    assert figures["flop_ratio_to_n_unets"]["average"] == figures["flop_ratio_to_n_unets"]["noise-average"] == 1.0
    assert figures["flop_ratio_to_n_unets"]["sabw"] > 1.0


def test_core_never_imports_the_webui_or_gradio():
    """afa/ (outside afa/webui/) must import in a plain interpreter with no WebUI and no gradio."""
    code = ("import sys, afa, afa.bench, afa.maps, afa.__main__; bad = [m for m in sys.modules if "
            "m.split('.')[0] in ('modules', 'launch', 'gradio') or m.startswith('afa.webui')]; print(bad)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    for path in (REPO / "afa").rglob("*.py"):
        if "webui" in path.relative_to(REPO / "afa").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            assert not [n for n in names if n.split(".")[0] in ("modules", "launch", "gradio")], path


def test_bench_train_step():
    result = run_afa("bench", "--arch", "tiny", "--latent", "16", "--repeats", "1", "--train-step", "--hidden", "32",
                     "--gradient-checkpointing")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["gradient_checkpointing"] is True
    assert figures["seconds_train_step"] > 0 and figures["ratio_train_step_to_forward"] > 1
