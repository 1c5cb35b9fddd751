"""The denoising objective (paper eq. 1 and 12) and reproducible per-sample random draws.

Every random choice of a training sample -- its timestep, its noise, whether its caption is dropped, the VAE
posterior noise of `--latents sample`, the position of a `--crop random` crop -- is drawn from a generator seeded by
(run seed, epoch, dataset index[, stream]). A sample therefore gets the same draws whichever rank, batch position,
DataLoader worker or resume point processes it, which is what makes a 2-process DDP run equal a 1-process run with
the same global batch, and a resumed run equal an uninterrupted one.
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


CROP_STREAM = 1
"""The stream of `sample_generator` that random crops draw from (training/data.py), apart from the main draws."""


def sample_generator(seed: int, epoch: int, index: int, *stream: int) -> torch.Generator:
    """The generator of one sample's draws in one epoch: seeded by (seed, epoch, dataset index) for the main draws
    (`draw_for_samples`), and by (seed, epoch, index, stream) for draws made elsewhere (CROP_STREAM), so that adding
    a kind of draw never changes the others."""
    # SeedSequence: well-mixed seeds from a tuple of integers (neighbouring indices give unrelated generators).
    state = np.random.SeedSequence([seed, epoch, int(index), *stream]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


@dataclass
class Draws:
    """The random choices for a batch: timesteps [B] (int64), noise [B x C x H x W], drop_caption [B] (bool), and
    posterior_noise [B x C x H x W] (the VAE posterior sample's standard normal draw) or None when not drawn."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    drop_caption: torch.Tensor
    posterior_noise: torch.Tensor | None = None


def draw_for_samples(indices: list[int], seed: int, epoch: int, latent_shape: tuple[int, ...], num_timesteps: int,
                     caption_dropout: float, timestep_range: tuple[int, int] | None = None,
                     posterior_noise: bool = False) -> Draws:
    """Draws each sample's timestep (uniform over the schedule, or over `timestep_range` [low, high)), noise and
    caption dropout -- and with `posterior_noise` the noise of its VAE posterior sample -- from its own generator
    seeded by (seed, epoch, dataset index)."""
    low, high = timestep_range or (0, num_timesteps)
    timesteps, noises, drops, posterior_noises = [], [], [], []
    for index in indices:
        generator = sample_generator(seed, epoch, index)
        timesteps.append(int(torch.randint(low, high, (1,), generator=generator)))
        drops.append(bool(torch.rand((), generator=generator) < caption_dropout))
        noises.append(torch.randn(latent_shape, generator=generator))
        if posterior_noise:  # drawn last, so the draws above are the same with or without it
            posterior_noises.append(torch.randn(latent_shape, generator=generator))
    return Draws(torch.tensor(timesteps, dtype=torch.long), torch.stack(noises), torch.tensor(drops),
                 torch.stack(posterior_noises) if posterior_noise else None)
