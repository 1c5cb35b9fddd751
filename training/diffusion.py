"""The denoising objective (paper eq. 1 and 12) and reproducible per-sample random draws.

Every random choice of a training sample -- its timestep, its noise, whether its caption is dropped, the VAE
posterior noise of `--latents sample`, the position of a `--crop random` crop -- is drawn from a generator seeded by
(run seed, epoch, dataset index[, stream]). A sample therefore gets the same draws whichever rank, batch position,
DataLoader worker or resume point processes it, which is what makes a 2-process DDP run equal a 1-process run with
the same global batch, and a resumed run equal an uninterrupted one.
"""

from __future__ import annotations

import math
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


# -- FLUX.1's objective: rectified flow ----------------------------------------------------------------------------

TIMESTEP_SAMPLINGS = ("logit-normal", "uniform")
"""How a FLUX training sample's t is drawn before the resolution shift: sigmoid of a standard normal (BFL's and SD3's
logit-normal; kohya's `flux_shift`) or uniform in [0, 1)."""
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT = 0.5, 1.15
FLUX_BASE_TOKENS, FLUX_MAX_TOKENS = 256, 4096


def flux_shift_mu(image_tokens: int) -> float:
    """The time shift's mu for an image of `image_tokens` tokens: linear from 0.5 at 256 tokens to 1.15 at 4096
    (1024 x 1024 px), as BFL's `get_lin_function` and diffusers' `calculate_shift` give it."""
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_TOKENS - FLUX_BASE_TOKENS)
    return FLUX_BASE_SHIFT + slope * (image_tokens - FLUX_BASE_TOKENS)


def flux_time_shift(t: torch.Tensor, mu: float) -> torch.Tensor:
    """BFL's `time_shift(mu, 1, t)`: e^mu / (e^mu + (1/t - 1)); moves t towards 1 (more noise) for larger images.
    t [B] in [0, 1] -> [B]."""
    t = t.double()
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))
    return torch.where(t <= 0, torch.zeros_like(t), shifted).float()


def flux_image_tokens(latent_shape: tuple[int, ...]) -> int:
    """FLUX's image tokens of a latent [C x h x w]: its 2 x 2 patches (odd sides padded, as afa.flux.patchify)."""
    height, width = latent_shape[-2:]
    return ((height + 1) // 2) * ((width + 1) // 2)


class RectifiedFlow:
    """FLUX.1's forward process: x_t = (1 - t) x_0 + t noise for t in [0, 1] (the members' timestep, sigma), and the
    velocity the transformer predicts, noise - x_0 (BFL's and diffusers' flow-matching training target)."""

    parameterization = "velocity"

    @staticmethod
    def _t(timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return timesteps.to(like.device, like.dtype).view((-1,) + (1,) * (like.ndim - 1))

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """latents, noise [B x C x h x w]; timesteps [B] float in [0, 1] -> x_t [B x C x h x w]."""
        t = self._t(timesteps, latents)
        return (1 - t) * latents + t * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The velocity noise - x_0 [B x C x h x w] (the same at every t)."""
        return noise - latents


def draw_flow_for_samples(indices: list[int], seed: int, epoch: int, latent_shape: tuple[int, ...],
                          caption_dropout: float, sampling: str | None, posterior_noise: bool = False) -> Draws:
    """`draw_for_samples` for FLUX's rectified flow: each sample's t (float in [0, 1]), noise, caption dropout and
    posterior noise from its own generator seeded by (seed, epoch, dataset index).

    Args:
        sampling: "logit-normal" or "uniform" (TIMESTEP_SAMPLINGS), then shifted for the latent's image tokens
            (`flux_time_shift`, mu from `flux_shift_mu`), as FLUX trains; None: uniform and unshifted (validation and
            evaluation: every quarter of [0, 1) gets as many samples).
    """
    if sampling is not None and sampling not in TIMESTEP_SAMPLINGS:
        raise ValueError(f"sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)} or None, got {sampling!r}")
    timesteps, noises, drops, posterior_noises = [], [], [], []
    for index in indices:
        generator = sample_generator(seed, epoch, index)
        if sampling == "logit-normal":
            timesteps.append(torch.sigmoid(torch.randn((), generator=generator)))
        else:
            timesteps.append(torch.rand((), generator=generator))
        drops.append(bool(torch.rand((), generator=generator) < caption_dropout))
        noises.append(torch.randn(latent_shape, generator=generator))
        if posterior_noise:
            posterior_noises.append(torch.randn(latent_shape, generator=generator))
    t = torch.stack(timesteps).float() if timesteps else torch.zeros(0)
    if sampling is not None:
        t = flux_time_shift(t, flux_shift_mu(flux_image_tokens(latent_shape)))
    return Draws(t, torch.stack(noises), torch.tensor(drops),
                 torch.stack(posterior_noises) if posterior_noise else None)
