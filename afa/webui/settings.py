"""The "AFA Ensemble" settings section (Settings page) and typed accessors for its values.

`register()` adds the options when the script is imported, as the built-in Lora extension does
(extensions-builtin/Lora/scripts/lora_script.py v1.10), so they exist with `--nowebui` (API only) and before the UI
is built; `shared.opts` then answers every key with its saved value or its default.
"""

from __future__ import annotations

import gradio as gr
import torch

from modules import devices, shared
from modules.ui_components import DropdownMulti

from . import folders

SECTION = ("afa", "AFA Ensemble")

NO_WEIGHTS = folders.NO_WEIGHTS

PRECISIONS = {"Same as WebUI": None, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

CACHE_NONE, CACHE_RAM, CACHE_VRAM = "No", "RAM", "VRAM"
CACHE_POLICIES = (CACHE_NONE, CACHE_RAM, CACHE_VRAM)

OFFLOAD_AUTOMATIC, OFFLOAD_ALWAYS, OFFLOAD_NEVER = "Automatic", "Always", "Never"
OFFLOAD_POLICIES = (OFFLOAD_AUTOMATIC, OFFLOAD_ALWAYS, OFFLOAD_NEVER)

TEXT_PER_MEMBER, TEXT_SHARED = "Each member's own", "The loaded checkpoint's"
TEXT_CHOICES = (TEXT_PER_MEMBER, TEXT_SHARED)
TEXT_ENCODERS_INFOTEXT = "AFA text encoders"

MAPS_OFF, MAPS_LAST_STEP, MAPS_EVERY_N = "Off", "Last step", "Every N steps"
MAPS_CHOICES = (MAPS_OFF, MAPS_LAST_STEP, MAPS_EVERY_N)


def options(on_cache_change) -> dict:
    """The OptionInfos of the section. `on_cache_change` runs when the cache policy changes.

    Component arguments are only those the component's `update()` also takes: the Settings page sends them again
    with every value it loads (`gr.update(value=..., **component_args)`, modules/ui_settings.py v1.10), and an
    argument `update()` rejects (a Dropdown's `multiselect`) fails the load of the whole page. A multiselect setting
    therefore uses the WebUI's own `DropdownMulti`."""
    info = shared.OptionInfo
    return {
        "afa_default_members": info(
            [], "Default ensemble members", DropdownMulti,
            lambda: {"choices": shared.list_checkpoint_tiles(False)}, refresh=shared.refresh_checkpoints,
        ).info("preselected in the AFA ensemble accordion; a weights file chosen there replaces them with its own"),
        "afa_default_weights": info(
            NO_WEIGHTS, "Default SABW weights", gr.Dropdown,
            lambda: {"choices": folders.weights_choices()}, refresh=folders.refresh,
        ).info(f"files in {folders.describe_weights_dir()}; {NO_WEIGHTS}: block averaging"),
        "afa_member_precision": info(
            "Same as WebUI", "Member precision", gr.Radio, {"choices": list(PRECISIONS)},
        ).info("dtype of the member UNets; 'Same as WebUI' follows --no-half/--precision. An SD 1.5 UNet takes "
               "1.72 GB in fp16/bf16, 3.44 GB in fp32"),
        "afa_member_cache": info(
            CACHE_RAM, "Keep members loaded between jobs", gr.Radio,
            {"choices": list(CACHE_POLICIES)}, onchange=on_cache_change,
        ).info("No: free them after every job (least memory, reloads from disk each time); RAM: park them on the "
               "CPU; VRAM: keep them on the GPU (fastest). Only the members of the last job are kept"),
        "afa_member_offload": info(
            OFFLOAD_AUTOMATIC, "Offload members for low VRAM", gr.Radio,
            {"choices": list(OFFLOAD_POLICIES)},
        ).info("members stay in RAM and each block moves to the GPU only while it runs; "
               "Automatic: when the WebUI runs with --medvram/--lowvram"),
        "afa_text_encoders": info(
            TEXT_PER_MEMBER, "Members' text encoders", gr.Radio, {"choices": list(TEXT_CHOICES)},
            infotext=TEXT_ENCODERS_INFOTEXT,
        ).info("Each member's own: every member reads the prompt as its own checkpoint's text encoder encodes it "
               "(as the paper's code does; one more text-encoder pass per distinct encoder, and its weights in RAM: "
               "0.25 GB for SD 1.x in fp16, 1.6 GB for SDXL's pair); the loaded checkpoint's: every member reads "
               "the loaded model's encoding"),
        "afa_maps": info(
            MAPS_OFF, "Aggregation maps", gr.Radio, {"choices": list(MAPS_CHOICES)},
        ).info("which sampling steps 'Show aggregation maps' draws; Off also unticks it by default"),
        "afa_maps_every": info(
            5, "Aggregation maps: every N steps", gr.Slider,
            {"minimum": 1, "maximum": 50, "step": 1},
        ),
    }


def register(on_cache_change) -> None:
    """Adds the section to the WebUI's settings (call when the script is imported).

    At startup `opts.data_labels` is the option templates dict the built-in Lora extension adds to; once a UI was
    built it is a reordered copy (options.py v1.10, Options.reorder), so an extension loaded by "Apply and restart
    UI" must add its options to `opts` itself, as `add_option` does."""
    for key, info in shared.options_section(SECTION, options(on_cache_change)).items():
        shared.opts.add_option(key, info)


# -- typed accessors -----------------------------------------------------------------------------------------------

def member_dtype() -> torch.dtype:
    """The dtype members are loaded in: the setting, or the WebUI's UNet dtype (float32 with --no-half)."""
    dtype = PRECISIONS.get(shared.opts.afa_member_precision)
    if dtype is None:
        dtype = devices.dtype_unet
        if not dtype.is_floating_point or dtype.itemsize < 2:  # FP8 storage (--fp8 settings): compute in fp16
            dtype = torch.float16
    return dtype


def cache_policy() -> str:
    policy = shared.opts.afa_member_cache
    return policy if policy in CACHE_POLICIES else CACHE_RAM


def offload_members(sd_model) -> bool:
    """Whether member blocks are paged to the GPU one at a time (the members' side of --medvram/--lowvram)."""
    policy = shared.opts.afa_member_offload
    if policy == OFFLOAD_ALWAYS:
        return True
    if policy == OFFLOAD_NEVER:
        return False
    return bool(getattr(sd_model, "lowvram", False) or shared.cmd_opts.medvram or shared.cmd_opts.lowvram)


def per_member_text() -> bool:
    return shared.opts.afa_text_encoders != TEXT_SHARED


def maps_every() -> int | None:
    """Steps between drawn aggregation maps: None = the last step only."""
    if shared.opts.afa_maps != MAPS_EVERY_N:
        return None
    return max(1, int(shared.opts.afa_maps_every))


def maps_default() -> bool:
    return shared.opts.afa_maps != MAPS_OFF
