"""Full-width random Stable Diffusion 1.5 checkpoints for the real-ComfyUI tier (tests/comfyui_real).

ComfyUI recognises a checkpoint's model family by its tensors' names and shapes, so the tier's members must have
SD 1.5's full width (a tiny UNet is not an SD 1.5 there). This writes one in the original ldm key layout, fp16:

    model.diffusion_model.*                          the UNet (v1-inference.yaml: afa.unet.PRESETS["sd15"])
    first_stage_model.*                              the VAE (ldm's AutoencoderKL, SD's ddconfig, embed_dim 4)
    cond_stage_model.transformer.text_model.*        CLIP ViT-L/14's text model (transformers' CLIPTextModel)
    betas, alphas_cumprod, ...                       LatentDiffusion's schedule buffers (fp32)

The names and shapes come from the classes AFA's own trainer loads members with (ldm's UNetModel, Encoder,
Decoder; transformers' CLIPTextModel), built on the meta device: nothing is allocated or initialised but the
tensors written. Weights are drawn from one seeded `torch.Generator` in name order (normal(0, std) for matrices,
convolutions and embeddings, 1 for norm weights, 0 for biases), so a seed gives the same bytes on every run (the
file has one metadata key: safetensors writes several in random order). Two seeds differ in every part, so two
members have different UNets *and* different text encoders.

Runs in AFA's own environment (.venv: torch, safetensors, ldm, transformers), not in ComfyUI's:

    .venv/bin/python tests/comfyui_real/random_sd15.py OUT.safetensors --seed 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GENERATOR_VERSION = 1
"""Part of the cache key of written files (tests/comfyui_real/conftest.py): bump it whenever the bytes change."""
DEFAULT_STD = 0.02

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."


def _repo_on_path() -> None:
    repo = str(Path(__file__).resolve().parents[2])
    if repo not in sys.path:
        sys.path.insert(0, repo)


def tensor_specs() -> list[tuple[str, tuple[int, ...], str, object]]:
    """(checkpoint key, shape, kind, dtype) of every tensor of an SD 1.5 checkpoint, in the order they are drawn;
    kind is "random", "norm" (weights of norm layers: 1), "bias" (0) or "position_ids" (0..76)."""
    _repo_on_path()
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from afa.unet import PRESETS, build_unet
    from training.sd_checkpoint import SD_VAE_DDCONFIG, build_tiny_vae
    from training.text_encoder import SD1_CLIP_TEXT_CONFIG

    with torch.device("meta"):
        parts = [
            (UNET_PREFIX, build_unet(PRESETS["sd15"], device="meta")),
            (VAE_PREFIX, build_tiny_vae(SD_VAE_DDCONFIG)),
            (TEXT_ENCODER_PREFIX, CLIPTextModel(CLIPTextConfig(**SD1_CLIP_TEXT_CONFIG))),
        ]
    norms = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    specs = []
    for prefix, module in parts:
        for module_name, child in module.named_modules():
            for name, parameter in child.named_parameters(recurse=False):
                kind = "bias" if name == "bias" else "norm" if isinstance(child, norms) else "random"
                key = f"{prefix}{module_name}.{name}" if module_name else prefix + name
                specs.append((key, tuple(parameter.shape), kind, torch.float16))
        for name, buffer in module.named_buffers():
            if name.endswith("position_ids"):  # transformers 4.30 keeps it in the state dict, as SD 1.5 files have it
                specs.append((prefix + name, tuple(buffer.shape), "position_ids", torch.int64))
    return specs


def random_sd15_state_dict(seed: int, std: float = DEFAULT_STD) -> dict:
    """The checkpoint's tensors for `seed` (about 1.07 G parameters, 2 GB in fp16)."""
    _repo_on_path()
    import torch

    from training.sd_checkpoint import schedule_buffers

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, shape, kind, dtype in tensor_specs():
        if kind == "bias":
            tensors[key] = torch.zeros(shape, dtype=dtype)
        elif kind == "norm":
            tensors[key] = torch.ones(shape, dtype=dtype)
        elif kind == "position_ids":
            tensors[key] = torch.arange(shape[-1], dtype=dtype).expand(shape).contiguous()
        else:
            tensors[key] = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(dtype)
    tensors.update(schedule_buffers())
    return tensors


def write_random_sd15(path: str | Path, seed: int, std: float = DEFAULT_STD) -> Path:
    """Writes the checkpoint of `seed` to `path` (through a temporary file, so a killed run leaves no partial
    file under the name)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".{os.getpid()}.tmp")
    tensors = random_sd15_state_dict(seed, std)
    metadata = {"afa_random_sd15": json.dumps({"seed": seed, "std": std, "generator_version": GENERATOR_VERSION})}
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--std", type=float, default=DEFAULT_STD)
    args = parser.parse_args(argv)
    started = time.monotonic()
    path = write_random_sd15(args.output, args.seed, args.std)
    print(f"wrote {path} (seed {args.seed}, {path.stat().st_size / 2 ** 30:.2f} GiB) in "
          f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
