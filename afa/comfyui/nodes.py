"""AFA's ComfyUI nodes, one class per operation (ComfyUI's classic node API, as its core nodes use):

    AFA Ensemble               2-6 MODELs + mode + SABW weights -> one MODEL (and its aggregation maps)
    AFA Text Encode            a prompt + one CLIP per member -> CONDITIONING each member reads with its own CLIP
    AFA Aggregation Maps       the maps of the latest sampling run -> IMAGE (the paper's Figure 6)
    AFA Train                  2-6 MODELs + CLIPs + VAE + captioned images -> SABW weights (train.py's trainer)

They validate and build; the work is in afa.comfyui.ensemble_model, .text, .maps and .training, and in the core.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import folder_paths

from afa.aggregator import DEFAULT_PRESET, SABW_PRESETS
from afa.members import MAX_MEMBERS, MIN_MEMBERS
from afa.modes import CHOICES

from .ensemble_model import build_ensemble
from .text import encode_for_members

WEIGHTS_FOLDER = "afa"
NO_WEIGHTS = "none"
CATEGORY = "advanced/model_merging/AFA"
TRAIN_PRECISIONS = ("auto", "no", "fp16", "bf16")


def weights_choices() -> list[str]:
    return [NO_WEIGHTS] + [name for name in folder_paths.get_filename_list(WEIGHTS_FOLDER)
                           if name.endswith(".safetensors")]


def _numbered(kind: str, tooltip: str, required_count: int) -> tuple[dict, dict]:
    """The inputs `<kind>_1`..`<kind>_6` of a node: the first `required_count` required, the rest optional."""
    inputs = {f"{kind.lower()}_{index}": (kind, {"tooltip": tooltip.format(index=index)})
              for index in range(1, MAX_MEMBERS + 1)}
    names = list(inputs)
    return ({name: inputs[name] for name in names[:required_count]},
            {name: inputs[name] for name in names[required_count:]})


def _connected(first, kwargs: dict, kind: str) -> list:
    """The connected numbered inputs in order (first, then <kind>_2..), skipping unconnected optional ones."""
    rest = [kwargs.get(f"{kind}_{index}") for index in range(2, MAX_MEMBERS + 1)]
    return [first] + [value for value in rest if value is not None]


class AFAEnsemble:
    """Ensembles 2-6 checkpoints of one architecture at inference (SD 1.x, SD 2.x, SDXL, or FLUX.1 transformers):
    every member runs at every step, and after every block their features are mixed (SABW: learned per-pixel or
    per-image-token weights; or equal weights)."""

    @classmethod
    def INPUT_TYPES(cls):
        required, optional = _numbered("MODEL", "member {index}: a checkpoint's or diffusion model's MODEL (LoRAs "
                                                "applied to it apply to this member only)", MIN_MEMBERS)
        return {"required": {
            **required,
            "mode": ([mode.label for mode in CHOICES], {
                "default": "Block average",
                "tooltip": "SABW: mix with the learned weights of a weights file trained for these members. "
                           "Block average: equal weights after every block (no file). Noise average: average "
                           "the members' predictions (no file)."}),
            "weights": (weights_choices(), {
                "tooltip": "SABW weights (models/afa/), made by training/train.py or the A1111 AFA Training tab "
                           "for these members in this order; used in mode SABW only"}),
        }, "optional": {**optional, "weights_name": ("STRING", {
            "forceInput": True,
            "tooltip": "a weights file name in models/afa that replaces 'weights' when linked: connect AFA "
                       "Train's weights output to sample with the weights it has just trained"})}}

    RETURN_TYPES = ("MODEL", "AFA_MAPS")
    RETURN_NAMES = ("model", "maps")
    OUTPUT_TOOLTIPS = ("the ensemble: connect it wherever a MODEL goes (samplers, hires pass, img2img)",
                       "the aggregation maps of its latest sampling run, for AFA Aggregation Maps")
    FUNCTION = "ensemble"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def ensemble(self, model_1, model_2, mode, weights, weights_name=None, **optional):
        models = _connected(model_1, {"model_2": model_2, **optional}, "model")
        if weights_name:  # linked from AFA Train: the file it has just written
            weights = weights_name
        path = None if weights == NO_WEIGHTS else folder_paths.get_full_path_or_raise(WEIGHTS_FOLDER, weights)
        return build_ensemble(models, mode, Path(path) if path else None)


class AFATextEncode:
    """Encodes a prompt with each member's own CLIP (as CLIPTextEncode does with each), so that every member of an
    AFA ensemble reads the prompt as its own text encoder encodes it. With one CLIP, every member reads its
    encoding (exactly CLIPTextEncode's conditioning)."""

    @classmethod
    def INPUT_TYPES(cls):
        required, optional = _numbered("CLIP", "the CLIP of member {index}'s checkpoint (in the ensemble's order)",
                                       1)
        return {"required": {
            "text": ("STRING", {"multiline": True, "dynamicPrompts": True, "tooltip": "the prompt"}),
            **required,
        }, "optional": optional}

    RETURN_TYPES = ("CONDITIONING",)
    OUTPUT_TOOLTIPS = ("the prompt as each member's CLIP encodes it",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def encode(self, text, clip_1, **optional):
        return (encode_for_members(_connected(clip_1, optional, "clip"), text),)


class AFAAggregationMaps:
    """Draws how the ensemble mixed its members in its latest sampling run: for chosen blocks and steps, each pixel
    in the colours of the members that own it (the paper's Figure 6)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "maps": ("AFA_MAPS", {"tooltip": "the maps output of AFA Ensemble"}),
            "samples": ("LATENT", {"tooltip": "the sampler's output: the maps are drawn after it ran"}),
            "blocks": ("STRING", {"default": "", "tooltip": "block names, comma separated (e.g. output_blocks.1, "
                                  "output_blocks.11); empty: the last output block at each resolution"}),
            "every": ("INT", {"default": 0, "min": 0, "max": 1000, "tooltip": "draw every N-th step and the last; "
                              "0: the last step only"}),
        }}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "draw"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def draw(self, maps, samples, blocks, every):
        names = [name.strip() for name in blocks.split(",") if name.strip()]
        image = maps.render(names, every)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        return (pixels[None],)  # IMAGE: [1 x H x W x 3] in 0..1


class AFATrain:
    """Trains SABW weights for the connected members with AFA's trainer (training/train.py: the same code, defaults
    and flags) on captioned images: each PNG's positive prompt from its ComfyUI workflow (or WebUI infotext, or a
    .txt beside it). Progress in the progress bar; Interrupt stops after the current step and keeps the training
    state; run it again with the same output name and resume on to continue it."""

    @classmethod
    def INPUT_TYPES(cls):
        models, more_models = _numbered("MODEL", "member {index}: a checkpoint's MODEL", MIN_MEMBERS)
        clips, more_clips = _numbered("CLIP", "the CLIP of member {index}'s checkpoint (one per member, in the "
                                              "members' order, or only clip_1 for all)", 1)
        return {"required": {
            **models, **clips,
            "vae": ("VAE", {"tooltip": "the members' VAE (member 1's checkpoint's): encodes the training images"}),
            "data": ("STRING", {"default": "output", "tooltip": "where the images are: 'output' (ComfyUI's output "
                                "folder, with the prompts ComfyUI saved in each PNG) or a folder on the server"}),
            "output_name": ("STRING", {"default": "afa-comfyui", "tooltip": "the weights file: "
                                       "models/afa/<name>.safetensors (and the run's state under the user folder)"}),
            "resume": ("BOOLEAN", {"default": False, "tooltip": "continue the stopped (or finished) run of this name "
                                   "with its settings and data snapshot; a larger epochs or max_steps trains longer"}),
            "validation_share": ("FLOAT", {"default": 0.05, "min": 0.0, "max": 0.9, "step": 0.01,
                                           "tooltip": "share of the images held out for validation"}),
            "epochs": ("INT", {"default": 10, "min": 1, "max": 100000, "tooltip": "passes over the images"}),
            "max_steps": ("INT", {"default": 0, "min": 0, "max": 10000000,
                                  "tooltip": "stop after this many optimizer steps (0: train for the epochs)"}),
            "batch_size": ("INT", {"default": 8, "min": 1, "max": 4096}),
            "precision": (list(TRAIN_PRECISIONS), {"default": "auto", "tooltip": "auto: the dtype ComfyUI loaded "
                          "the members in (fp16 members train under fp16 autocast, fp32 members in fp32)"}),
            "gradient_checkpointing": ("BOOLEAN", {"default": False, "tooltip": "recompute member blocks in the "
                                                   "backward pass: less memory, slower"}),
            "design": (list(SABW_PRESETS), {"default": DEFAULT_PRESET, "tooltip": "SABW design: paper (the "
                       "authors' aggregator) or fast (AFA's cheaper one)"}),
        }, "optional": {
            **more_models, **more_clips,
            "resolution": ("INT", {"default": 0, "min": 0, "max": 4096, "step": 8, "tooltip": "training image "
                           "size (0: the members' native size, 512 SD 1.x, 768 SD 2.x-v, 1024 SDXL)"}),
            "training_seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1, "tooltip": "train.py's --seed: "
                                      "the data order, the held-out images and every random draw"}),
            "extra_flags": ("STRING", {"default": "", "tooltip": "more training/train.py flags, e.g. "
                                       "--learning-rate 5e-5 --latents mean --validate-every 100"}),
        }}

    RETURN_TYPES = ("STRING", "STRING", "IMAGE")
    RETURN_NAMES = ("weights_name", "validation", "curves")
    OUTPUT_TOOLTIPS = ("the weights file in models/afa: link it to AFA Ensemble's weights_name",
                       "held-out denoising error of the members, block averaging and AFA (lower is better)",
                       "the training loss and the validation errors")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    DESCRIPTION = __doc__

    def train(self, model_1, model_2, clip_1, vae, **inputs):
        from .training import Request, train_members

        models = _connected(model_1, {"model_2": model_2, **inputs}, "model")
        clips = _connected(clip_1, inputs, "clip")
        if "training_seed" in inputs:
            inputs["seed"] = inputs.pop("training_seed")
        fields = {name: inputs[name] for name in Request.__dataclass_fields__ if name in inputs}
        weights_name, text, image = train_members(models, clips, vae, Request(**fields))
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
        return weights_name, text, pixels[None]


NODE_CLASS_MAPPINGS = {
    "AFAEnsemble": AFAEnsemble,
    "AFATextEncode": AFATextEncode,
    "AFAAggregationMaps": AFAAggregationMaps,
    "AFATrain": AFATrain,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AFAEnsemble": "AFA Ensemble",
    "AFATextEncode": "AFA Text Encode (per member)",
    "AFAAggregationMaps": "AFA Aggregation Maps",
    "AFATrain": "AFA Train (SABW weights)",
}
