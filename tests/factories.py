"""Random weights for test models, shared by the test tiers (tests/conftest.py, the stand-in harness and
tests/webui_real/), which cannot import one another's conftest modules (pytest names each of them `conftest`)."""

from __future__ import annotations

import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Replaces every parameter with seeded noise (so zero-initialised output layers are non-zero too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def lora_pair(weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random kohya LoRA for one layer of weight [out x in] (Linear) or [out x in x k x k] (Conv2d): the
    `lora_down.weight` [rank x in (x k x k)] and `lora_up.weight` [out x rank (x 1 x 1)] of its keys, and `alpha`
    (= rank, so the update is up @ down)."""
    if weight.ndim == 4:
        down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=generator) * scale
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator) * scale
    else:
        down = torch.randn(rank, weight.shape[1], generator=generator) * scale
        up = torch.randn(weight.shape[0], rank, generator=generator) * scale
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(rank))}


def write_captioned_images(folder, count: int = 12, width: int = 32, height: int = 32):
    """`count` random RGB PNGs of width x height with kohya-style `.txt` captions ("a red thing number 3") in
    `folder`; returns the folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        colour = ["red", "blue", "green"][index % 3]
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a {colour} thing number {index}")
    return folder
