"""`python -m afa` end to end, in subprocesses as users run it; and the core's independence from the WebUI."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from afa import (DEFAULT_PRESET, SABW_PRESETS, Aggregator, AggregatorConfig, MemberRef, file_sha256, preset_config,
                 save_weights)

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
    config = preset_config(DEFAULT_PRESET, 2, TINY_CHANNELS, context_dim=32, hidden_channels=64)
    assert f"SABW parameters for them: {_parameters(config) / 1e6:.2f}M (preset {DEFAULT_PRESET}" in result.stdout

    wide = checkpoint_factory(3, name="wide", unet_params=dict(tiny_params, model_channels=64))
    result = run_afa("check", str(checkpoint_factory(1)), str(wide))
    assert result.returncode == 2
    assert "error: wide.safetensors cannot be ensembled" in result.stderr and "Traceback" not in result.stderr
    result = run_afa("check", str(checkpoint_factory(1)))
    assert result.returncode == 2 and "at least 2 members" in result.stderr


TINY_CHANNELS = [32] * 7 + [64] * 12 + [32] * 5 + [4]


def _parameters(config: AggregatorConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Aggregator(config).parameters())


def test_check_counts_the_parameters_of_each_preset(checkpoint_factory):
    paths = [str(checkpoint_factory(1)), str(checkpoint_factory(2))]
    counts = {}
    for preset in SABW_PRESETS:
        result = run_afa("check", *paths, "--preset", preset)
        assert result.returncode == 0, result.stderr
        config = preset_config(preset, 2, TINY_CHANNELS, context_dim=32)
        counts[preset] = _parameters(config)
        assert (f"SABW parameters for them: {counts[preset] / 1e6:.2f}M (preset {preset}: design {config.design}, "
                f"hidden {config.hidden_channels}, depth {config.transformer_depth}, context 32)") in result.stdout
    assert counts["paper"] != counts["fast"]
    result = run_afa("check", *paths)  # no --preset: the default preset
    assert f"{counts[DEFAULT_PRESET] / 1e6:.2f}M (preset {DEFAULT_PRESET}:" in result.stdout
    result = run_afa("check", *paths, "--preset", "nonesuch")
    assert result.returncode == 2 and "invalid choice" in result.stderr


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
    assert figures["preset"] == DEFAULT_PRESET and figures["sabw_config"]["design"] == DEFAULT_PRESET
    assert figures["flop_check_passed"] and "FLOP check: FlopCounterMode's count of SABW equals" in result.stdout
    assert figures["seconds_n_unets"] > 0
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:8]] == ["one", "N", "sabw", "average", "noise-average", "last-block"]


def test_bench_runs_label_conditioned_sdxl_members():
    """The SDXL layout (9/1/9 blocks, per-level depths) gets a random y for its label embedding; its FLOP check
    passes like SD's."""
    result = run_afa("bench", "--arch", "tiny-sdxl", "--latent", "8", "--repeats", "1", "--hidden", "32")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["arch"] == "tiny-sdxl" and figures["flop_check_passed"], figures
    assert figures["flop_ratio_to_n_unets"]["average"] == 1.0 and figures["flop_ratio_to_n_unets"]["sabw"] > 1.0


def test_bench_fast_preset_with_overrides():
    result = run_afa("bench", "--arch", "tiny", "--latent", "8", "--repeats", "1", "--preset", "fast", "--hidden", "64",
                     "--max-resolution", "0")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    config = figures["sabw_config"]
    assert figures["preset"] == "fast" and config["design"] == "fast" and config["transformer_depth"] == 1
    assert config["hidden_channels"] == 64 and config["max_resolution"] is None
    assert figures["flop_check_passed"] and figures["sabw_flops_analytic"]["sabw"]["self_attention"] == 0
    assert figures["sabw_parameters"] == _parameters(AggregatorConfig.from_dict(config))


def test_flop_counter_counts_the_paper_designs_self_attention():
    """SD 1.5, 512 px, 2 members, batch 1: FlopCounterMode (meta tensors) counts SABW's self-attention products
    over all h*w pixels of every block, twice per block (depth 2), as written out by hand here."""
    from torch.utils.flop_counter import FlopCounterMode

    from afa.aggregator import SabwBlock
    from afa.bench import count_flops, preset_configs, sabw_flops_for_latent
    from afa.members import unet_shapes
    from afa.unet import PRESETS, block_layout, build_unet

    # one attention layer of the paper design on the 4096 tokens of a 64x64 block
    config = preset_config("paper", 2, SD15_CHANNELS, context_dim=768)
    with torch.device("meta"):
        block = SabwBlock(320, config, config.member_time_embed_dim)
        tokens = torch.randn(1, 64 * 64, 128)
        with FlopCounterMode(display=False) as counter:
            block.transformer.blocks[0].self_attention(tokens)
    projections = 4 * 2 * 4096 * 128 * 128  # q, k, v, out
    products = 2 * 2 * 4096 * 4096 * 128  # q k^T and attn v: 8 heads x 16, every token with every token
    assert counter.get_total_flops() == projections + products

    with torch.device("meta"):
        layout = block_layout(unet_shapes(build_unet(PRESETS["sd15"])))
    assert list(layout.channels) == SD15_CHANNELS
    levels = {side: sum(1 for factor in layout.downsampling if 64 // factor == side) for side in (64, 32, 16, 8)}
    assert levels == {64: 7, 32: 6, 16: 6, 8: 6}  # output_blocks.8 upsamples to 64x64: 7 full-resolution blocks
    by_hand = 2 * sum(count * 2 * 2 * (side * side) ** 2 * 128 for side, count in levels.items())

    counts = count_flops("sd15", 2, 64, 1, preset_configs("paper", 2, layout.channels, 768))
    analytic = counts["sabw_analytic"]["sabw"]
    assert analytic["self_attention"] == by_hand
    assert counts["modes"]["sabw"] - 2 * counts["one_unet"] == analytic["total"]  # the counter misses nothing
    assert sabw_flops_for_latent(config, layout.downsampling, 64, 1) == analytic
    assert by_hand > 0.5 * analytic["total"]  # the self-attention is most of the paper design's cost
    assert counts["modes"]["sabw"] / (2 * counts["one_unet"]) > 1.10


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


SD15_CHANNELS = [320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280,
                 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 4]
