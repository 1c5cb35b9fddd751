"""Held-out denoising error (the paper's measure of denoising capability, section 3.3) of several models on
identical draws: every model sees the same (x_t, t, noise, caption) for every sample."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import torch

from afa.ensemble import mix

from .diffusion import VALIDATION_EPOCH, NoiseSchedule, draw_for_samples, per_sample_mse
from .text_encoder import encode, tokenize

TIMESTEP_RANGES = ((0, 250), (250, 500), (500, 750), (750, 1000))
FLOW_TIMESTEP_RANGES = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0))
"""FLUX's (rectified flow, t in [0, 1]): the quarters of t, as TIMESTEP_RANGES are of a DDPM schedule's 1000 steps."""


def range_label(low: int | float, high: int | float) -> str:
    """"t 0-249" for a range of integer timesteps [low, high); "t 0.00-0.25" for one of FLUX's t in [0, 1]."""
    if isinstance(low, float):
        return f"t {low:.2f}-{high:.2f}"
    return f"t {low}-{high - 1}"


ModelCall = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Tensor], "Sequence[torch.Tensor] | None"],
                     torch.Tensor]
"""A model as `denoising_errors` calls it: (x_t [B x C x h x w], timesteps [B], member_contexts N x [B x 77 x D],
member_vectors N x [B x adm] or None) -> prediction [B x C x h x w]; member_contexts[i] (and for SDXL members
member_vectors[i], their `y`) is the prompt as member i's own text encoders encode it."""


def member_alone(unet: Callable, member_index: int) -> ModelCall:
    """Member `member_index` run on its own, reading its own text encoders' encoding (as a user runs it)."""
    def call(noisy, timesteps, member_contexts, member_vectors=None):
        y = member_vectors[member_index] if member_vectors is not None else None
        return unet(noisy, timesteps, member_contexts[member_index], y=y)
    return call


class RememberedPrediction:
    """A ModelCall that keeps its prediction for the inputs it last saw (the same tensor objects: `denoising_errors`
    hands every row of a batch the same ones), so rows computed from it cost no second pass."""

    def __init__(self, call: ModelCall):
        self.call = call
        self._inputs: tuple | None = None
        self._prediction: torch.Tensor | None = None

    def __call__(self, noisy, timesteps, member_contexts, member_vectors=None) -> torch.Tensor:
        inputs = (noisy, timesteps, member_contexts, member_vectors)
        if self._inputs is None or any(new is not old for new, old in zip(inputs, self._inputs)):
            self._prediction = self.call(noisy, timesteps, member_contexts, member_vectors)
            self._inputs = inputs  # held, so no later tensor can reuse these objects' ids
        return self._prediction


def noise_average_of(members: Sequence[ModelCall]) -> ModelCall:
    """Noise averaging from the members' own calls (each reading its own encoding, as EnsembleUNet's noise average
    reads "per_member"): their predictions mixed with uniform weights as the ensemble mixes them, so the result is
    EnsembleUNet's bit for bit. With `RememberedPrediction` members it costs no UNet pass of its own."""
    def call(noisy, timesteps, member_contexts, member_vectors=None):
        predictions = [member(noisy, timesteps, member_contexts, member_vectors) for member in members]
        weights = torch.full((noisy.shape[0], len(predictions), 1, 1), 1.0 / len(predictions), dtype=torch.float32,
                             device=noisy.device)
        return mix(predictions, weights).to(noisy.dtype)
    return call


def ensemble_reading(ensemble: Callable, text_conditioning: str) -> ModelCall:
    """An EnsembleUNet reading the prompt as `text_conditioning` says: "per_member" (member i reads member i's
    encoding, SABW their mean) or "shared" (every member and SABW read the first member's).

    The contexts may go on past the members' (a merge's own text encoder, training/evaluate.py): the ensemble reads
    the first len(ensemble.members)."""
    count = len(ensemble.members)
    if text_conditioning == "per_member":
        return lambda noisy, timesteps, member_contexts, member_vectors=None: ensemble(
            noisy, timesteps, member_contexts=member_contexts[:count],
            member_vectors=member_vectors[:count] if member_vectors is not None else None)
    if text_conditioning == "shared":
        return lambda noisy, timesteps, member_contexts, member_vectors=None: ensemble(
            noisy, timesteps, member_contexts[0], y=member_vectors[0] if member_vectors is not None else None)
    raise ValueError(f"text_conditioning must be per_member or shared, got {text_conditioning!r}")


def reads_captions(encoder) -> bool:
    """Whether a text encoder takes the captions as text (`encode_captions(captions, sizes, dropped)` -> (context
    [B x L x D], vector [B x adm] or None)) rather than SD1 token ids: a host's own encoder, e.g. ComfyUI's CLIP in
    afa/comfyui/training.py, which tokenizes as that host does."""
    return bool(getattr(encoder, "reads_captions", False))


@torch.no_grad()
def encode_for_members(text_encoders: Sequence[torch.nn.Module], token_ids: torch.Tensor | None, clip_skip: int = 1,
                       sizes: torch.Tensor | None = None, dropped: Sequence[bool] | None = None,
                       captions: Sequence[str] | None = None) \
        -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Each member's conditioning for token ids [B x 77]: (contexts N x [B x 77 x D], vectors N x [B x adm] for
    SDXL members, else None). Each distinct encoder module runs once, and members sharing a module get the same
    tensor objects (which EnsembleUNet reads as one shared context).

    SDXL (training/sdxl_text.py's SdxlTextEncoders) also needs `sizes` [B x 6] (training/data.py's
    `load_image_and_sizes`: original size, crop top-left, target size) for `y`. Its `dropped` samples (caption
    dropout) get zero text embeddings -- context and pooled part of `y`, the size embeddings stay -- as sgm's
    conditioner drops them in training and as the WebUI conditions SDXL on an empty negative prompt; SD 1.x/2.x drop
    captions by encoding the empty prompt (the caller's part). Encoders that read the captions as text
    (`reads_captions`) get `captions` (dropped ones already empty), `sizes` and `dropped`, and do the same themselves.
    """
    from .sdxl_text import SdxlTextEncoders

    by_module: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for encoder in text_encoders:
        if id(encoder) in by_module:
            continue
        if reads_captions(encoder):  # a host's own text encoder (ComfyUI's CLIP): the captions, not SD1 token ids
            if captions is None:
                raise ValueError(f"{type(encoder).__name__} encodes the captions themselves: pass captions")
            by_module[id(encoder)] = encoder.encode_captions(list(captions), sizes, dropped)
            continue
        if not isinstance(encoder, SdxlTextEncoders):
            by_module[id(encoder)] = encode(encoder, token_ids, clip_skip), None
            continue
        if sizes is None:
            raise ValueError("SDXL members need the images' size conditioning (sizes [B x 6])")
        context, pooled = encoder.encode(token_ids)
        if dropped is not None and any(dropped):
            keep = torch.tensor([not drop for drop in dropped], dtype=context.dtype, device=context.device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        sizes = sizes.to(pooled.device)
        by_module[id(encoder)] = context, encoder.vector(pooled, sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6])
    contexts = [by_module[id(encoder)][0] for encoder in text_encoders]
    vectors = [by_module[id(encoder)][1] for encoder in text_encoders]
    return contexts, (vectors if vectors[0] is not None else None)


@torch.no_grad()
def prepare_batch(batch: dict, vae, text_encoders: Sequence[torch.nn.Module] | torch.nn.Module,
                  schedule: NoiseSchedule, seed: int, device: torch.device, epoch: int = VALIDATION_EPOCH,
                  caption_dropout: float = 0.0, clip_skip: int = 1, sample_latents: bool = False) -> dict:
    """The model inputs of a batch (training/data.py's `collate`: "latents" [B x C x h x w], "moments"
    [B x 2C x h x w] or "pixel_values" [B x 3 x H x W], "captions", "indices"), with its draws -- the same for
    training (its epoch, caption dropout) and evaluation (VALIDATION_EPOCH, no dropout).

    Args:
        text_encoders: the encoder each member reads (FrozenModels.text_encoders_for), or one encoder every member
            reads. Each distinct module runs once.
        clip_skip: the CLIP skip of the encodings (1 = the last layer).
        sample_latents: train on a sample of the VAE posterior (`--latents sample`, mean + std * noise, the noise
            drawn per sample, training/diffusion.py) instead of its mean. Needs "pixel_values" or "moments".

    Returns {"noisy", "timesteps", "member_contexts", "member_vectors", "target", "latents", "noise"} on `device`:
    noisy, target, latents and noise [B x C x h x w], timesteps [B] (int64), member_contexts N x [B x 77 x D]
    (members sharing an encoder share the tensor; EnsembleUNet gives SABW their mean), member_vectors N x [B x adm]
    for SDXL members (their `y`, from the batch's "sizes"), else None.
    """
    if isinstance(text_encoders, torch.nn.Module):
        text_encoders = [text_encoders]
    mean, std = batch_posterior(batch, vae, device, sample_latents)
    draws = draw_for_samples(batch["indices"], seed, epoch, tuple(mean.shape[1:]), schedule.num_timesteps,
                             caption_dropout, posterior_noise=sample_latents)
    latents = mean + std * draws.posterior_noise.to(device) if sample_latents else mean
    captions = ["" if drop else caption for caption, drop in zip(batch["captions"], draws.drop_caption)]
    timesteps, noise = draws.timesteps.to(device), draws.noise.to(device)
    token_ids = None if all(reads_captions(encoder) for encoder in text_encoders) else tokenize(captions)
    member_contexts, member_vectors = encode_for_members(text_encoders, token_ids, clip_skip, batch.get("sizes"),
                                                         draws.drop_caption, captions=captions)
    return {"noisy": schedule.add_noise(latents, noise, timesteps), "timesteps": timesteps,
            "member_contexts": member_contexts, "member_vectors": member_vectors,
            "target": schedule.target(latents, noise, timesteps), "latents": latents, "noise": noise}


def batch_posterior(batch: dict, vae, device: torch.device, need_std: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's VAE posterior: (mean, std) [B x C x h x w] each (std None when not needed)."""
    if "moments" in batch:
        mean, std = batch["moments"].to(device).chunk(2, dim=1)
        return mean, std
    if "latents" in batch:
        if need_std:
            raise ValueError("latents sampled from the VAE posterior need its moments or the images, not cached means")
        return batch["latents"].to(device), None
    pixel_values = batch["pixel_values"].to(device)
    return vae.posterior(pixel_values) if need_std else (vae.encode(pixel_values), None)


@torch.no_grad()
def denoising_errors(models: Mapping[str, ModelCall], loader: Iterable[dict], vae,
                     text_encoders: Sequence[torch.nn.Module], schedule: NoiseSchedule, seed: int,
                     device: torch.device, ranges: tuple[tuple[int, int], ...] = TIMESTEP_RANGES,
                     clip_skip: int = 1, prepare: Callable[[dict], dict] | None = None) -> dict[str, dict[str, float]]:
    """Mean squared error of each model's prediction (eps or v) against the target, overall and per timestep range.

    Args:
        models: name -> `ModelCall` (wrap a member in `member_alone`, an ensemble in `ensemble_reading`).
        loader: batches as training/data.py's `collate` makes them (with "indices": the keys of the draws).
        text_encoders: each member's own text encoder (FrozenModels.text_encoders), then any other model's (a
            merge's), whose encodings follow the members' in the models' member_contexts; the latents are the VAE
            posterior means.
        prepare: batch -> the model inputs with their draws (`prepare_batch`'s keys), instead of `prepare_batch` with
            `vae`, `text_encoders` and `schedule`: FLUX members' (training/flux_training.py), whose timesteps are
            floats in [0, 1] (`ranges` FLOW_TIMESTEP_RANGES).
    Returns:
        {name: {"all": mse, "t 0-249": mse, ...}}; a range without samples is left out.
    """
    totals = {name: {} for name in models}
    counts: dict[str, int] = {}
    for batch in loader:
        if not batch["indices"]:
            continue
        inputs = (prepare(batch) if prepare is not None
                  else prepare_batch(batch, vae, text_encoders, schedule, seed, device, clip_skip=clip_skip))
        labels = [["all"] + [range_label(low, high) for low, high in ranges if low <= t.item() < high]
                  for t in inputs["timesteps"]]
        for sample_labels in labels:
            for label in sample_labels:
                counts[label] = counts.get(label, 0) + 1
        for name, model in models.items():
            prediction = model(inputs["noisy"], inputs["timesteps"], inputs["member_contexts"],
                               inputs["member_vectors"])
            per_sample = per_sample_mse(prediction, inputs["target"]).tolist()
            for error, sample_labels in zip(per_sample, labels):
                for label in sample_labels:
                    totals[name][label] = totals[name].get(label, 0.0) + error
    order = ["all"] + [range_label(low, high) for low, high in ranges]
    return {name: {label: totals[name][label] / counts[label] for label in order if label in counts}
            for name in models}
