"""The "AFA Ensemble" settings section (Settings page) and typed accessors for its values.

Options are registered in an `on_ui_settings` callback (modules/script_callbacks.py), so before the UI is built they
do not exist in `shared.opts` yet; `value(key)` falls back to the defaults below, which keeps every reader working
whatever the order of WebUI startup (or an API-only start).
"""

from __future__ import annotations

import gradio as gr
import torch

from modules import devices, shared

from . import folders

SECTION = ("afa", "AFA Ensemble")

NO_WEIGHTS = folders.NO_WEIGHTS

PRECISIONS = {"Same as WebUI": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

CACHE_NONE, CACHE_RAM, CACHE_VRAM = "No", "RAM", "VRAM"
CACHE_POLICIES = (CACHE_NONE, CACHE_RAM, CACHE_VRAM)

OFFLOAD_AUTOMATIC, OFFLOAD_ALWAYS, OFFLOAD_NEVER = "Automatic", "Always", "Never"
OFFLOAD_POLICIES = (OFFLOAD_AUTOMATIC, OFFLOAD_ALWAYS, OFFLOAD_NEVER)

MAPS_OFF, MAPS_LAST_STEP, MAPS_EVERY_N = "Off", "Last step", "Every N steps"
MAPS_CHOICES = (MAPS_OFF, MAPS_LAST_STEP, MAPS_EVERY_N)

DEFAULTS = {
    "afa_default_members": [],
    "afa_default_weights": NO_WEIGHTS,
    "afa_member_precision": "Same as WebUI",
    "afa_member_cache": CACHE_RAM,
    "afa_member_offload": OFFLOAD_AUTOMATIC,
    "afa_maps": MAPS_OFF,
    "afa_maps_every": 5,
}


def value(key: str):
    """The current value of an AFA setting (its default until `on_ui_settings` registered it)."""
    if key in shared.opts.data_labels:
        return getattr(shared.opts, key)
    return DEFAULTS[key]


def options(on_cache_change) -> dict:
    """The OptionInfos of the section, keyed like DEFAULTS. `on_cache_change` runs when the cache policy changes."""
    info = shared.OptionInfo
    return {
        "afa_default_members": info(
            DEFAULTS["afa_default_members"], "Default ensemble members", gr.Dropdown,
            lambda: {"choices": shared.list_checkpoint_tiles(False), "multiselect": True},
            refresh=shared.refresh_checkpoints,
        ).info("preselected in the AFA ensemble accordion; a weights file chosen there replaces them with its own"),
        "afa_default_weights": info(
            DEFAULTS["afa_default_weights"], "Default SABW weights", gr.Dropdown,
            lambda: {"choices": folders.weights_choices()}, refresh=folders.refresh,
        ).info(f"files in {folders.describe_weights_dir()}; {NO_WEIGHTS}: block averaging"),
        "afa_member_precision": info(
            DEFAULTS["afa_member_precision"], "Member precision", gr.Radio, {"choices": list(PRECISIONS)},
        ).info("dtype of the member UNets; 'Same as WebUI' follows --no-half/--precision. An SD 1.5 UNet takes "
               "1.72 GB in fp16/bf16, 3.44 GB in fp32"),
        "afa_member_cache": info(
            DEFAULTS["afa_member_cache"], "Keep members loaded between jobs", gr.Radio,
            {"choices": list(CACHE_POLICIES)}, onchange=on_cache_change,
        ).info("No: free them after every job (least memory, reloads from disk each time); RAM: park them on the "
               "CPU; VRAM: keep them on the GPU (fastest). Only the members of the last job are kept"),
        "afa_member_offload": info(
            DEFAULTS["afa_member_offload"], "Offload members for low VRAM", gr.Radio,
            {"choices": list(OFFLOAD_POLICIES)},
        ).info("members stay in RAM and each block moves to the GPU only while it runs; "
               "Automatic: when the WebUI runs with --medvram/--lowvram"),
        "afa_maps": info(
            DEFAULTS["afa_maps"], "Aggregation maps", gr.Radio, {"choices": list(MAPS_CHOICES)},
        ).info("which sampling steps 'Show aggregation maps' draws; Off also unticks it by default"),
        "afa_maps_every": info(
            DEFAULTS["afa_maps_every"], "Aggregation maps: every N steps", gr.Slider,
            {"minimum": 1, "maximum": 50, "step": 1},
        ),
    }


def register(on_cache_change) -> None:
    """Adds the section to `shared.opts` (call from an `on_ui_settings` callback)."""
    for key, option in options(on_cache_change).items():
        option.section = SECTION
        shared.opts.add_option(key, option)


# -- typed accessors -----------------------------------------------------------------------------------------------

def member_dtype() -> torch.dtype:
    """The dtype members are loaded in: the setting, or the WebUI's UNet dtype (float32 with --no-half)."""
    dtype = PRECISIONS.get(value("afa_member_precision"))
    if dtype is None:
        dtype = devices.dtype_unet
        if not dtype.is_floating_point or dtype.itemsize < 2:  # FP8 storage (--fp8 settings): compute in fp16
            dtype = torch.float16
    return dtype


def cache_policy() -> str:
    policy = value("afa_member_cache")
    return policy if policy in CACHE_POLICIES else CACHE_RAM


def offload_members(sd_model) -> bool:
    """Whether member blocks are paged to the GPU one at a time (the members' side of --medvram/--lowvram)."""
    policy = value("afa_member_offload")
    if policy == OFFLOAD_ALWAYS:
        return True
    if policy == OFFLOAD_NEVER:
        return False
    return bool(getattr(sd_model, "lowvram", False) or shared.cmd_opts.medvram or shared.cmd_opts.lowvram)


def maps_every() -> int | None:
    """Steps between drawn aggregation maps: None = the last step only."""
    if value("afa_maps") != MAPS_EVERY_N:
        return None
    return max(1, int(value("afa_maps_every")))


def maps_default() -> bool:
    return value("afa_maps") != MAPS_OFF
