"""The ensemble MODEL: members checked, SABW weights bound to them, one cloned `ModelPatcher` with one wrapper.
Members are UNets (SD 1.x, 2.x, XL) or FLUX.1 transformers (afa.flux), all of one family.

The ensemble is a clone of member 1's `ModelPatcher` (its LoRAs and other patches stay), with
- a `DIFFUSION_MODEL` wrapper (afa.comfyui.forward) that runs every member block by block and mixes after each block;
- the other members, and the SABW aggregator, as its additional models: ComfyUI's model management loads them
  with it, partially in low VRAM, offloads them after, and applies each member's own patches (LoRAs) to it;
- an `OUTER_SAMPLE` wrapper that starts a new recording of aggregation maps at each sampling run.
A member connected twice (the same loaded model with the same patches) is held once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension

from afa.ensemble import EnsembleUNet
from afa.errors import AfaError, IncompatibleMembersError
from afa.flux import EnsembleFlux, flux_layout
from afa.hashing import shorthash, unet_fingerprint
from afa.maps import blocks_to_show
from afa.members import MAX_MEMBERS, MIN_MEMBERS, check_members, unet_shapes
from afa.modes import LAST_BLOCK, parse_mode
from afa.unet import block_layout
from afa.weights import check_member_fingerprints, check_weights_fit, load_weights, read_weights_info

from .forward import EnsembleForward, FluxEnsembleForward
from .maps import SamplingMaps

WRAPPER_KEY = "afa_ensemble"
PREFIX = "diffusion_model."


FLUX_MODULES = ("img_in", "time_in", "guidance_in", "vector_in", "txt_in", "pe_embedder", "double_blocks",
                "single_blocks", "final_layer")


def member_family(patcher) -> str:
    """"unet" (`comfy.ldm`'s UNetModel) or "flux" (`comfy.ldm.flux`'s Flux in a `model_base.Flux`: FLUX.1 [dev],
    [schnell], Fill, Kontext, and their fine-tunes), else "" (SD3, Chroma, video models, ...)."""
    model = getattr(patcher, "model", None)
    network = getattr(model, "diffusion_model", None)
    if network is not None and hasattr(network, "input_blocks"):
        return "unet"
    if isinstance(model, comfy.model_base.Flux) and all(hasattr(network, name) for name in FLUX_MODULES):
        return "flux"
    return ""


def member_network(patcher, label: str):
    """The member's diffusion model (a UNet or a FLUX transformer); AfaError for other models (SD3, Chroma, ...)."""
    if not member_family(patcher):
        model = getattr(patcher, "model", None)
        raise IncompatibleMembersError(
            f"{label} is a {type(model).__name__} model, neither a UNet nor a FLUX.1 transformer: AFA ensembles "
            f"SD 1.x, SD 2.x, SDXL and FLUX.1 models")
    if patcher.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY):
        raise IncompatibleMembersError(f"{label} is already an AFA ensemble: connect its members instead")
    return patcher.model.diffusion_model


def member_fingerprint(patcher) -> str:
    """`afa.hashing.unet_fingerprint` of the member's UNet as loaded, without its patches (LoRAs, merges): the
    weights ComfyUI keeps unpatched (`get_key_patches` reads the backup while a patched model is loaded)."""
    patches = patcher.get_key_patches(PREFIX)
    names = {key[len(PREFIX):]: key for key in patches}
    return unet_fingerprint(names, lambda name: patches[names[name]][0][0])


def _family(patcher) -> str:
    model = patcher.model
    return f"{type(model.model_config).__name__} ({model.model_type.name.lower().replace('_', '-')})"


def check_ensemble_members(models: Sequence) -> None:
    """Refuses fewer than 2 or more than 6 members, models that are neither UNets nor FLUX transformers, and members
    of other families or prediction types than member 1 (naming the first differing tensor)."""
    if not MIN_MEMBERS <= len(models) <= MAX_MEMBERS:
        raise IncompatibleMembersError(f"AFA ensembles {MIN_MEMBERS} to {MAX_MEMBERS} members, got {len(models)}")
    labels = [f"model_{index + 1}" for index in range(len(models))]
    networks = [member_network(model, label) for model, label in zip(models, labels)]
    first_family = _family(models[0])
    for model, label in zip(models[1:], labels[1:]):
        if _family(model) != first_family:
            raise IncompatibleMembersError(f"{label} is {_family(model)}, model_1 is {first_family}: members must "
                                           f"be of one model family and prediction type")
    layout = flux_layout if member_family(models[0]) == "flux" else block_layout
    check_members([(label, unet_shapes(network)) for label, network in zip(labels, networks)], layout)


def distinct_members(models: Sequence) -> list:
    """For members 2..N: the `BaseModel` to run, or None where the member is member 1's own loaded model.

    ComfyUI holds one copy of a loaded model's weights and patches them in place, so two members that are the same
    loaded model must carry the same patches; such a member is run from the first one's weights, not loaded twice.
    """
    first_by_model: dict[int, tuple[int, object]] = {}
    others = []
    for index, patcher in enumerate(models):
        seen = first_by_model.setdefault(id(patcher.model), (index, patcher))
        if seen[1] is not patcher and not seen[1].clone_has_same_weights(patcher):
            raise AfaError(f"model_{index + 1} and model_{seen[0] + 1} are the same loaded checkpoint with different "
                           f"patches (a LoRA on one of them): ComfyUI holds one copy of its weights, so both cannot "
                           f"run side by side. Load the checkpoint with a second loader node for the other member")
        if index > 0:
            others.append(None if seen[0] == 0 else patcher.model)
    return others


def additional_patchers(models: Sequence) -> list:
    """The members' patchers ComfyUI must load with the ensemble: one per loaded model other than member 1's."""
    seen = {id(models[0].model)}
    out = []
    for patcher in models[1:]:
        if id(patcher.model) not in seen:
            seen.add(id(patcher.model))
            out.append(patcher)
    return out


def build_ensemble(models: Sequence, mode_label: str, weights_path: Path | None) -> tuple[object, SamplingMaps]:
    """(the ensemble MODEL, its aggregation-map recording). `weights_path` None: no SABW weights.

    Raises:
        AfaError: with what was expected and what was found (members, weights, mode).
    """
    models = list(models)
    check_ensemble_members(models)
    others = distinct_members(models)
    mode = parse_mode(mode_label)
    names = [f"model_{index + 1}" for index in range(len(models))]
    aggregator_patcher = None
    if mode.needs_weights:
        if weights_path is None:
            raise AfaError("mode SABW needs SABW weights trained for these members: choose a file in 'weights' "
                           "(models/afa/), or use Block average or Noise average, which need none")
        aggregator_patcher, mode, names = _bind_weights(models, weights_path, mode)

    networks = [member_network(model, name) for model, name in zip(models, names)]
    flux = member_family(models[0]) == "flux"
    # the observer and the default blocks need the layout only: one ensemble over the members, never run here
    layout_probe = (EnsembleFlux if flux else EnsembleUNet)(
        networks, aggregator_patcher.model if aggregator_patcher else None, mode=mode)
    maps = SamplingMaps(blocks_to_show(layout_probe, mode), layout_probe.block_names, names)

    ensemble = models[0].clone()
    forward = (FluxEnsembleForward if flux else EnsembleForward)(others, mode, aggregator_patcher, maps)
    ensemble.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, forward)
    ensemble.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                  _start_maps_run(maps))
    ensemble.set_additional_models("afa_members", additional_patchers(models))
    if aggregator_patcher is not None:
        ensemble.set_additional_models("afa_sabw", [aggregator_patcher])
    return ensemble, maps


def _start_maps_run(maps: SamplingMaps):
    def outer_sample(executor, *args, **kwargs):
        maps.start_run()
        return executor(*args, **kwargs)
    return outer_sample


def _bind_weights(models: Sequence, weights_path: Path, mode):
    """(the aggregator's ModelPatcher, the mode the weights were trained for, member labels from the file)."""
    info = read_weights_info(weights_path)
    fingerprints = [member_fingerprint(model) for model in models]
    given = [f"model_{index + 1}" for index in range(len(models))]
    if not check_member_fingerprints(info, fingerprints, given):
        logging.warning("AFA: %s records no UNet fingerprints (written before ComfyUI support), so its members "
                        "cannot be checked here: connect %s, in this order (found: %s)", weights_path.name,
                        ", ".join(str(member) for member in info.members),
                        ", ".join(shorthash(fingerprint) for fingerprint in fingerprints))
    family = member_family(models[0])
    shapes = unet_shapes(member_network(models[0], "model_1"))
    if family == "flux":
        layout = flux_layout(shapes)
        channels, context_dim = layout.channels, layout.context_dim
    else:
        channels = block_layout(shapes).channels
        context_dim = next((shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    check_weights_fit(info, channels, context_dim, len(models), family)
    if mode is LAST_BLOCK and info.mode is not LAST_BLOCK:
        raise AfaError(f"{weights_path.name} was trained for SABW after every block, not for the last block only")
    # SABW is ~2% of the members' compute and trained in fp32: it stays fp32 whatever the members' precision
    aggregator, info = load_weights(weights_path, dtype=torch.float32)
    patcher = comfy.model_patcher.ModelPatcher(aggregator,
                                               load_device=comfy.model_management.get_torch_device(),
                                               offload_device=comfy.model_management.unet_offload_device())
    names = [f"model_{index + 1} ({member.name})" for index, member in enumerate(info.members)]
    return patcher, info.mode, names
