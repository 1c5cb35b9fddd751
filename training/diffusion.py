"""The denoising objective (paper eq. 1 and 12) and reproducible per-sample random draws.

Every random choice of a training sample -- its timestep, its noise, whether its caption is dropped -- is drawn from
a generator seeded by (run seed, epoch, dataset index). A sample therefore gets the same draws whichever rank, batch
position or resume point processes it, which is what makes a 2-process DDP run equal a 1-process run with the same
global batch, and a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

VALIDATION_EPOCH = 2 ** 31 - 1
"""The epoch number validation draws use: the same (x_t, t, noise) for every model and every epoch."""


class NoiseSchedule:
    """DDPM forward process from the checkpoint's `alphas_cumprod` [T]; parameterization "eps" or "v"."""

    def __init__(self, alphas_cumprod: torch.Tensor, parameterization: str = "eps"):
        if parameterization not in ("eps", "v"):
            raise ValueError(f"parameterization must be 'eps' or 'v', got {parameterization!r}")
        self.alphas_cumprod = alphas_cumprod.double()
        self.parameterization = parameterization

    @property
    def num_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        shape = (-1,) + (1,) * (like.ndim - 1)
        return (alpha_bar.sqrt().to(like.dtype).view(shape), (1 - alpha_bar).sqrt().to(like.dtype).view(shape))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. latents, noise [B x C x H x W]; timesteps [B] (int)."""
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * latents + sigma * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet predicts: eps, or v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
        if self.parameterization == "eps":
            return noise
        signal, sigma = self._coefficients(timesteps, latents)
        return signal * noise - sigma * latents


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The denoising loss's per-element term (paper eq. 1): (prediction - target)^2 in float32.

    prediction, target [B x C x H x W] (the UNet's eps or v, and `NoiseSchedule.target`) -> [B x C x H x W].
    """
    return (prediction.float() - target.float()).square()


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each sample's denoising loss: the mean of `squared_error` over channels and pixels. [B x C x H x W] -> [B]."""
    return squared_error(prediction, target).mean(dim=(1, 2, 3))


@dataclass
class Draws:
    """The random choices for a batch: timesteps [B] (int64), noise [B x C x H x W], drop_caption [B] (bool)."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    drop_caption: torch.Tensor


def draw_for_samples(indices: list[int], seed: int, epoch: int, latent_shape: tuple[int, ...], num_timesteps: int,
                     caption_dropout: float, timestep_range: tuple[int, int] | None = None) -> Draws:
    """Draws each sample's timestep (uniform over the schedule, or over `timestep_range` [low, high)), noise and
    caption dropout from its own generator seeded by (seed, epoch, dataset index)."""
    low, high = timestep_range or (0, num_timesteps)
    timesteps, noises, drops = [], [], []
    for index in indices:
        state = np.random.SeedSequence([seed, epoch, int(index)]).generate_state(2, dtype=np.uint64)
        generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
        timesteps.append(int(torch.randint(low, high, (1,), generator=generator)))
        drops.append(bool(torch.rand((), generator=generator) < caption_dropout))
        noises.append(torch.randn(latent_shape, generator=generator))
    return Draws(torch.tensor(timesteps, dtype=torch.long), torch.stack(noises), torch.tensor(drops))
