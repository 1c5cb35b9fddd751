"""`python -m afa inspect | check | bench` with FLUX-layout transformers: tiny transformer files in ComfyUI's
`models/diffusion_models` form (bare keys) and in a checkpoint's (`model.diffusion_model.` keys), written from the
core's BFL-layout class (afa.flux_model); FLOP counts of FLUX ensembles on meta tensors."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from afa.bench import flux_architectures
from afa.flux_model import Flux
from test_cli import run_afa


def write_transformer(path, seed: int, prefix: str = "", **overrides):
    torch.manual_seed(seed)
    params = flux_architectures()["flux-tiny"]
    model = Flux(params.__class__(**{**params.__dict__, **overrides}))
    save_file({prefix + key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def test_inspect_and_check_flux_transformers(tmp_path, checkpoint_factory):
    bare = write_transformer(tmp_path / "pixelwave.safetensors", 1)
    checkpoint = write_transformer(tmp_path / "verus.safetensors", 2, prefix="model.diffusion_model.")
    result = run_afa("inspect", str(bare))
    assert result.returncode == 0, result.stderr
    assert "FLUX-layout transformer" in result.stdout and '"num_double_blocks": 1' in result.stdout
    assert "2   single_blocks.1          64  (with final_layer: the prediction)" in result.stdout
    result = run_afa("check", str(bare), str(checkpoint), "--preset", "fast")
    assert result.returncode == 0, result.stderr
    assert "2 FLUX members can be ensembled: pixelwave.safetensors, verus.safetensors" in result.stdout
    assert "design fast" in result.stdout and "context 24, text tokens mixed by image-mean" in result.stdout
    wide = write_transformer(tmp_path / "wide.safetensors", 3, context_in_dim=32)
    result = run_afa("check", str(bare), str(wide))
    assert result.returncode == 2 and "wide.safetensors cannot be ensembled with pixelwave.safetensors" in \
        result.stderr and "txt_in.weight" in result.stderr
    result = run_afa("check", str(bare), str(checkpoint_factory(1)))
    assert result.returncode == 2 and "is not a FLUX-layout transformer, pixelwave.safetensors is" in result.stderr


def test_bench_counts_the_flops_of_a_flux_ensemble():
    result = run_afa("bench", "--arch", "flux-tiny", "--latent", "8", "--preset", "paper")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    ratios = figures["flop_ratio_to_n_members"]
    assert ratios["average"] == ratios["noise-average"] == 1.0 and ratios["sabw"] > ratios["last-block"] > 1.0
    assert figures["flop_check_passed"] and figures["sabw_config"]["family"] == "flux"
    assert "FLOP check: FlopCounterMode's count of SABW equals the analytic count" in result.stdout
    result = run_afa("bench", "--arch", "flux-tiny", "--train-step")
    assert result.returncode == 2 and "FLUX architectures count FLOPs only" in result.stderr


def test_load_flux_member_reads_transformer_files_and_checkpoints(tmp_path):
    """afa.flux_model.load_flux_member (how the core, and later the trainer, loads a FLUX member) reads both key
    forms into the same model, casts while reading, and refuses what is not a FLUX transformer."""
    import pytest

    from afa.errors import CheckpointError
    from afa.flux_model import load_flux_member

    bare = write_transformer(tmp_path / "bare.safetensors", 1)
    prefixed = write_transformer(tmp_path / "ckpt.safetensors", 1, prefix="model.diffusion_model.")
    first, second = (load_flux_member(path, axes_dim=(4, 6, 6)) for path in (bare, prefixed))
    x = torch.randn(1, 16, 4, 4)
    inputs = (torch.tensor([0.5]), torch.randn(1, 3, 24), torch.randn(1, 16), torch.tensor([3.5]))
    assert torch.equal(first(x, *inputs), second(x, *inputs))
    assert not any(p.requires_grad for p in first.parameters())
    half = load_flux_member(bare, dtype=torch.bfloat16, axes_dim=(4, 6, 6))
    assert half.img_in.weight.dtype == torch.bfloat16
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(CheckpointError, match="unet.safetensors: not a FLUX-layout transformer"):
        load_flux_member(tmp_path / "unet.safetensors")
