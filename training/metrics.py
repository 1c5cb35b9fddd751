"""Held-out denoising error (the paper's measure of denoising capability, section 3.3) of several models on
identical draws: every model sees the same (x_t, t, noise, caption) for every sample."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch

from .diffusion import VALIDATION_EPOCH, NoiseSchedule, draw_for_samples, per_sample_mse
from .text_encoder import encode, tokenize

TIMESTEP_RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))


def range_label(low: int, high: int) -> str:
    return f"t {low}-{high - 1}"


@torch.no_grad()
def prepare_batch(batch: dict, vae, text_encoder, schedule: NoiseSchedule, seed: int, device: torch.device,
                  epoch: int = VALIDATION_EPOCH, caption_dropout: float = 0.0) -> dict:
    """The model inputs of a batch (training/data.py's `collate`: "latents" [B x C x h x w] or "pixel_values"
    [B x 3 x H x W], "captions", "indices"), with its draws -- the same for training (its epoch, caption dropout)
    and evaluation (VALIDATION_EPOCH, no dropout).

    Returns {"noisy", "timesteps", "context", "target", "latents", "noise"} on `device`: noisy, target, latents and
    noise [B x C x h x w], timesteps [B] (int64), context [B x 77 x D].
    """
    latents = (batch["latents"].to(device) if "latents" in batch
               else vae.encode(batch["pixel_values"].to(device)))
    draws = draw_for_samples(batch["indices"], seed, epoch, tuple(latents.shape[1:]), schedule.num_timesteps,
                             caption_dropout)
    captions = ["" if drop else caption for caption, drop in zip(batch["captions"], draws.drop_caption)]
    timesteps, noise = draws.timesteps.to(device), draws.noise.to(device)
    return {"noisy": schedule.add_noise(latents, noise, timesteps), "timesteps": timesteps,
            "context": encode(text_encoder, tokenize(captions)),
            "target": schedule.target(latents, noise, timesteps), "latents": latents, "noise": noise}


@torch.no_grad()
def denoising_errors(models: Mapping[str, Callable], loader: Iterable[dict], vae, text_encoder,
                     schedule: NoiseSchedule, seed: int, device: torch.device,
                     ranges: tuple[tuple[int, int], ...] = TIMESTEP_RANGES) -> dict[str, dict[str, float]]:
    """Mean squared error of each model's prediction (eps or v) against the target, overall and per timestep range.

    Args:
        models: name -> callable(x_t [B x C x h x w], timesteps [B], context [B x 77 x D]) -> prediction.
        loader: batches as training/data.py's `collate` makes them (with "indices": the keys of the draws).
    Returns:
        {name: {"all": mse, "t 0-249": mse, ...}}; a range without samples is left out.
    """
    totals = {name: {} for name in models}
    counts: dict[str, int] = {}
    for batch in loader:
        if not batch["indices"]:
            continue
        inputs = prepare_batch(batch, vae, text_encoder, schedule, seed, device)
        labels = [["all"] + [range_label(low, high) for low, high in ranges if low <= int(t) < high]
                  for t in inputs["timesteps"]]
        for sample_labels in labels:
            for label in sample_labels:
                counts[label] = counts.get(label, 0) + 1
        for name, model in models.items():
            prediction = model(inputs["noisy"], inputs["timesteps"], inputs["context"])
            per_sample = per_sample_mse(prediction, inputs["target"]).tolist()
            for error, sample_labels in zip(per_sample, labels):
                for label in sample_labels:
                    totals[name][label] = totals[name].get(label, 0.0) + error
    order = ["all"] + [range_label(low, high) for low, high in ranges]
    return {name: {label: totals[name][label] / counts[label] for label in order if label in counts}
            for name in models}
