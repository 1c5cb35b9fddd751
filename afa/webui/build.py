"""Building a job's EnsembleUNet against the loaded checkpoint: compatibility checks, the members (the loaded
checkpoint's own UNet when it is one of them, the others from the member cache), LoRA names, tiling, offloading,
the SABW weights, the aggregation-map observer and the members' text encoders."""

from __future__ import annotations

import torch

from modules import devices, sd_hijack, shared

from afa.ensemble import EnsembleUNet
from afa.errors import AfaError, IncompatibleMembersError
from afa.members import check_members, unet_shapes

from . import checkpoints, settings
from .member_cache import cache
from .text_conditioning import (PER_MEMBER, SHARED, MemberTextConditioning, plan_member_texts, text_encoder_module,
                                text_encoder_prefix)


class LoadingInterrupted(AfaError):
    """The user pressed Interrupt while members were loading."""


IN_CHANNELS_KEY = "input_blocks.0.0.weight"


def check_compatible(base_name: str, base_shapes: dict, member_shapes: list[tuple[str, dict]]) -> None:
    """Refuses members that cannot run with the loaded checkpoint's text encoder, VAE and sampler: every member
    must have the loaded UNet's architecture. Inpainting (9-channel) members only go with an inpainting checkpoint
    loaded and all members inpainting, since the WebUI feeds the UNet what the loaded model expects."""
    base_channels = base_shapes.get(IN_CHANNELS_KEY, (0, 0))[1]
    for name, shapes in member_shapes:
        channels = shapes.get(IN_CHANNELS_KEY, (0, 0))[1]
        if channels != base_channels and 9 in (channels, base_channels):
            inpainting, other = (name, base_name) if channels == 9 else (base_name, name)
            raise IncompatibleMembersError(
                f"{inpainting} is an inpainting model (9 input channels) and {other} is not: an ensemble of "
                f"inpainting models needs an inpainting checkpoint loaded and every member an inpainting model")
    check_members([(f"the loaded checkpoint {base_name}", base_shapes)] + member_shapes)


def name_layers_for_lora(unet: torch.nn.Module) -> None:
    """Gives a member's layers the names the built-in Lora extension gave the loaded UNet's layers
    (extensions-builtin/Lora/networks.py v1.10: assign_network_names_to_compvis_modules), so prompt LoRAs are merged
    into every member too (Lora merges into any layer carrying `network_layer_name`, keeping its own backup)."""
    for name, module in unet.named_modules():
        module.network_layer_name = "diffusion_model" + ("_" + name.replace(".", "_") if name else "")


def set_tiling(unet: torch.nn.Module, enabled: bool) -> None:
    """The "Tiling" option for a member: sd_hijack's apply_circular (sd_hijack.py v1.10) only switches the Conv2d
    layers of the loaded model, captured when it was hijacked."""
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.padding_mode = "circular" if enabled else "zeros"


def build_ensemble(job) -> tuple[EnsembleUNet, MemberTextConditioning | None]:
    """The EnsembleUNet of a job's plan against the loaded checkpoint, and what its members' cross-attention reads
    (None: the loaded encoding). Raises AfaError if it cannot be built."""
    plan = job.plan
    sd_model = shared.sd_model
    base = sd_model.model.diffusion_model
    base_info = sd_model.sd_checkpoint_info
    check_compatible(base_info.short_title, unet_shapes(base),
                     [(checkpoints.label(info), checkpoints.unet_shapes_of(info)) for info in plan.members])

    dtype = settings.member_dtype()
    if dtype != torch.float32 and devices.device.type == "cpu":
        # ldm's GroupNorm32 normalises in float32, which half-precision weights only allow under CUDA autocast
        raise AfaError(f"{str(dtype).replace('torch.', '')} members cannot run on the CPU; set Settings > AFA "
                       f"Ensemble > Member precision to fp32 or Same as WebUI")
    offload = settings.offload_members(sd_model)
    home = devices.cpu if offload else devices.device
    lora = hasattr(sd_model, "network_layer_mapping")
    tiling = bool(getattr(sd_hijack.model_hijack, "circular_enabled", False))
    base_dtype = next(base.parameters()).dtype
    reuse_base = [checkpoints.is_loaded_checkpoint(info, base_info) and base_dtype == dtype for info in plan.members]
    cache.keep_only(cache.key(info, dtype) for info, reused in zip(plan.members, reuse_base) if not reused)

    unets = []
    for index, (info, reused) in enumerate(zip(plan.members, reuse_base)):
        if shared.state.interrupted:
            raise LoadingInterrupted("interrupted while loading members")
        shared.state.textinfo = f"AFA: loading member {index + 1}/{len(plan.members)}: {info.name_for_extra}"
        if reused:
            # apply_unet() just parked it on the CPU; under --medvram/--lowvram the WebUI's hooks move it
            if not offload and not getattr(sd_model, "lowvram", False):
                base.to(devices.device)
            unets.append(base)
            continue
        unet = cache.get(info, dtype, home)
        if lora:
            name_layers_for_lora(unet)
        set_tiling(unet, tiling)
        unets.append(unet)

    aggregator = None
    if plan.weights_path is not None:
        shared.state.textinfo = f"AFA: loading {plan.weights_path.name}"
        aggregator, _ = cache.get_aggregator(plan.weights_path, plan.member_refs, devices.device)

    observer = None
    if job.maps is not None:
        observer = job.maps.observe
    ensemble = EnsembleUNet(unets, aggregator, mode=plan.mode, observer=observer)
    if offload:
        ensemble.offload_device = devices.device
    if job.maps is not None:
        job.maps.configure(ensemble, plan.mode)
    return ensemble, build_text_conditioning(job, sd_model, reuse_base, aggregator)


def build_text_conditioning(job, sd_model, reuse_base: list[bool], aggregator) -> MemberTextConditioning | None:
    """What each member's cross-attention reads (afa.webui.text_conditioning), per the "Members' text encoders"
    setting; records on the job what it used and where that differs from what the SABW weights were trained with.
    None: every member reads the loaded encoding."""
    plan = job.plan
    module = text_encoder_module(sd_model)
    used = PER_MEMBER if settings.per_member_text() and module is not None else SHARED
    remarks = []
    if aggregator is not None:
        trained = aggregator.config
        if trained.text_conditioning != used:
            remarks.append(f"SABW was trained with {describe_text(trained.text_conditioning)}, this job used "
                           f"{describe_text(used)}")
        clip_skip = int(getattr(shared.opts, "CLIP_stop_at_last_layers", 1))
        # the WebUI applies CLIP skip to SD 1.x only (SD 2.x and SDXL read fixed layers: v1.10's defaults)
        if trained.clip_skip != clip_skip and not (getattr(sd_model, "is_sd2", False) or
                                                   getattr(sd_model, "is_sdxl", False)):
            remarks.append(f"SABW was trained at CLIP skip {trained.clip_skip}, this job used {clip_skip}")
    text = None
    if used == PER_MEMBER:
        shared.state.textinfo = "AFA: comparing the members' text encoders"
        dtype = next(module.parameters()).dtype
        prefix = text_encoder_prefix(sd_model)
        tensors = [None if reused else cache.get_text_encoder(info, dtype, prefix)
                   for info, reused in zip(plan.members, reuse_base)]
        texts, encoders = plan_member_texts(module, tensors, plan.member_labels, prefix)
        remarks += [member.note for member in texts if member.note]
        text = MemberTextConditioning(sd_model, texts, encoders)
    job.text_conditioning = used
    job.text_remarks = remarks
    for remark in remarks:
        print(f"AFA: {remark}")
    return text if text is not None and text.needed else None


def describe_text(conditioning: str) -> str:
    return "each member's own text encoder" if conditioning == PER_MEMBER else "one shared text encoding"
