"""Deterministic sampling for the image-level evaluation: DDIM (eta = 0) with classifier-free guidance, the sampler
of the paper's evaluation (its section 4.1 and Tables 7 and 8: 50 steps, and fewer), for any model that
training/metrics.py can evaluate (a `ModelCall`: a member, a merge, an ensemble).

Given the same initial noise, prompts and step count, every model starts from the same latents and nothing random
happens after, so the images differ only by the models.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .diffusion import NoiseSchedule
from .metrics import ModelCall


def ddim_timesteps(steps: int, num_timesteps: int = 1000) -> list[int]:
    """The timesteps of a DDIM run, first to last: ldm's "uniform" discretisation (every c-th timestep from 1,
    c = num_timesteps // steps), e.g. 50 steps -> 981, 961, ..., 1; 10 steps -> 901, 801, ..., 1."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be 1 to {num_timesteps}, got {steps}")
    stride = num_timesteps // steps
    return [step + 1 for step in range(0, num_timesteps, stride)][:steps][::-1]


def initial_noise(seed: int, index: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """[C x h x w] standard normal noise of prompt `index`, seeded by (seed, index): the same for every model and
    every step count."""
    state = np.random.SeedSequence([seed, int(index)]).generate_state(1, dtype=np.uint64)
    return torch.randn(tuple(latent_shape), generator=torch.Generator().manual_seed(int(state[0] >> np.uint64(1))))


def _batched(conditioned: Sequence[torch.Tensor], unconditioned: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each member's [unconditioned; conditioned] batch, members that share a tensor sharing the result (as
    EnsembleUNet recognises a shared text encoder)."""
    done: dict[tuple[int, int], torch.Tensor] = {}
    result = []
    for cond, uncond in zip(conditioned, unconditioned):
        key = (id(cond), id(uncond))
        if key not in done:
            done[key] = torch.cat([uncond, cond])
        result.append(done[key])
    return result


@torch.no_grad()
def ddim_sample(model: ModelCall, noise: torch.Tensor, member_contexts: Sequence[torch.Tensor],
                empty_contexts: Sequence[torch.Tensor], schedule: NoiseSchedule, steps: int,
                guidance_scale: float, member_vectors: Sequence[torch.Tensor] | None = None,
                empty_vectors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Latents [B x C x h x w] sampled from `noise` [B x C x h x w] with DDIM (eta = 0) in `steps` steps.

    Args:
        model: a metrics.ModelCall (x_t, timesteps, member_contexts, member_vectors) -> eps or v prediction.
        member_contexts: N x [B x 77 x D], the prompts as each member's (and merge's) text encoder encodes them;
            empty_contexts: N x [B x 77 x D], the empty prompt's, for the unconditioned half of classifier-free
            guidance (prediction = uncond + guidance_scale * (cond - uncond)). SDXL: member_vectors and
            empty_vectors N x [B x adm] likewise.
    """
    contexts = _batched(member_contexts, empty_contexts)
    vectors = _batched(member_vectors, empty_vectors) if member_vectors is not None else None
    alphas = schedule.alphas_cumprod
    timesteps = ddim_timesteps(steps, schedule.num_timesteps)
    x = noise
    for position, step in enumerate(timesteps):
        alpha = alphas[step].item()
        # ldm's DDIM: the last step goes to alphas_cumprod[0], not to 1
        alpha_prev = alphas[timesteps[position + 1]].item() if position + 1 < len(timesteps) else alphas[0].item()
        t = torch.full((2 * x.shape[0],), step, dtype=torch.long, device=x.device)
        uncond, cond = model(torch.cat([x, x]), t, contexts, vectors).float().chunk(2)
        prediction = uncond + guidance_scale * (cond - uncond)
        if schedule.parameterization == "v":  # eps and x0 from v = sqrt(a) eps - sqrt(1 - a) x0
            eps = alpha ** 0.5 * prediction + (1 - alpha) ** 0.5 * x
        else:
            eps = prediction
        x0 = (x - (1 - alpha) ** 0.5 * eps) / alpha ** 0.5
        x = alpha_prev ** 0.5 * x0 + (1 - alpha_prev) ** 0.5 * eps
    return x
