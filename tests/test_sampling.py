"""training/sampling.py: DDIM's timesteps, and a sampler that follows an oracle back to its image."""

from __future__ import annotations

import pytest
import torch

from training.diffusion import NoiseSchedule
from training.sampling import ddim_sample, ddim_timesteps, initial_noise
from training.sd_checkpoint import schedule_buffers


def test_ddim_timesteps_are_ldms_uniform_discretisation():
    assert ddim_timesteps(50)[:3] == [981, 961, 941] and ddim_timesteps(50)[-1] == 1 and len(ddim_timesteps(50)) == 50
    assert ddim_timesteps(10) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert len(ddim_timesteps(20)) == 20
    with pytest.raises(ValueError):
        ddim_timesteps(0)


@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("steps", [50, 10])
def test_an_oracle_model_is_followed_back_to_its_image(parameterization, steps):
    """A model that predicts exactly the noise (or v) of a fixed image x0 puts x_t on the line sqrt(a) x0 +
    sqrt(1 - a) eps at the first step (eps: the noise that start implies) and keeps it there, so DDIM ends at
    sqrt(a_0) x0 + sqrt(1 - a_0) eps, whatever the guidance (the conditioned and unconditioned predictions agree)."""
    schedule = NoiseSchedule(schedule_buffers()["alphas_cumprod"], parameterization)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    calls = []

    def oracle(x, timesteps, member_contexts, member_vectors=None):
        calls.append((x.shape[0], [context.shape[0] for context in member_contexts]))
        alpha = schedule.alphas_cumprod[timesteps].float().view(-1, 1, 1, 1)
        clean = image.repeat(2, 1, 1, 1)
        eps = (x - alpha.sqrt() * clean) / (1 - alpha).sqrt()
        return eps if parameterization == "eps" else alpha.sqrt() * eps - (1 - alpha).sqrt() * clean

    contexts = [torch.zeros(2, 77, 8)] * 2
    result = ddim_sample(oracle, noise, contexts, [torch.ones(2, 77, 8)] * 2, schedule, steps, guidance_scale=5.0)
    start = schedule.alphas_cumprod[ddim_timesteps(steps)[0]].item()
    implied_noise = (noise - start ** 0.5 * image) / (1 - start) ** 0.5
    last = schedule.alphas_cumprod[0].item()
    torch.testing.assert_close(result, last ** 0.5 * image + (1 - last) ** 0.5 * implied_noise, rtol=1e-4, atol=1e-4)
    # One call per step on the [unconditioned; conditioned] batch, members sharing a context sharing the batch.
    assert calls == [(4, [4, 4])] * steps


def test_initial_noise_is_seeded_per_prompt():
    assert torch.equal(initial_noise(0, 3, (4, 2, 2)), initial_noise(0, 3, (4, 2, 2)))
    assert not torch.equal(initial_noise(0, 3, (4, 2, 2)), initial_noise(0, 4, (4, 2, 2)))
    assert not torch.equal(initial_noise(0, 3, (4, 2, 2)), initial_noise(1, 3, (4, 2, 2)))
