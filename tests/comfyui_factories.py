"""Tiny ComfyUI models on the stand-in of ComfyUI 0.3.64's `comfy` modules (tests/comfyui_standin, README there).

ComfyUI's checkpoint detection only recognises real widths, so the models are built directly, the way
`comfy.sd.load_state_dict_guess_config` builds them after detection: a `comfy.supported_models` config
(`SD15` / `SD20` / `SDXL`) from a UNet config in `comfy.model_detection.detect_unet_config`'s form -> `.get_model()` ->
`comfy.model_patcher.ModelPatcher`; text encoders as `comfy.sd.CLIP(model_config.clip_target(), ...)` with ComfyUI's
own SD1/SD2/SDXL CLIP classes made tiny through their `model_options["<clip name>_model_config"]` overrides (no
subclass), and the real SD1 tokenizer.

The UNet layouts are AFA's tiny ldm presets (afa.unet.PRESETS["tiny"], tests/factories.py TINY_SD2_UNET and
tiny_sdxl_unet): SD's 12/1/12 blocks (SDXL's 9/1/9), so the state-dict keys and shapes equal those of AFA's ldm
builds and ldm weights load 1:1 (`tiny_model(..., unet_state_dict=ldm_unet.state_dict())`).

Use (every function here imports `comfy`, so call them inside the stand-in; ComfyUI's executor runs a prompt, its
loaders included, in torch.inference_mode(), which node outputs such as VAEDecode's rely on):

    with comfyui_standin(tmp_path) as comfy_env, torch.inference_mode():   # or the `comfy_standin` fixture
        model, clip, vae = tiny_checkpoint("sdxl", seed=1)
        positive = encode(clip, "a cat")
        (latent,) = comfy_env.nodes.common_ksampler(model, 0, 2, 5.0, "euler", "normal", positive,
                                                    encode(clip, ""), empty_latent())
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import os
import sys
import types
import weakref
from pathlib import Path

import torch

STANDIN_ROOT = Path(__file__).resolve().parent / "comfyui_standin"
# The stand-in's top-level modules (ComfyUI's root folder); `comfy` and `comfy_extras` are namespace packages there.
STANDIN_TOP_LEVEL = ("comfy", "comfy_extras", "folder_paths", "nodes", "node_helpers", "latent_preview",
                     "comfyui_version")
# What importing the stand-in imports (the modules a node pack uses; `nodes` pulls in most of the rest).
STANDIN_MODULES = (
    "comfy.model_management", "comfy.patcher_extension", "comfy.model_patcher", "comfy.utils", "comfy.conds",
    "comfy.samplers", "comfy.sample", "comfy.sampler_helpers", "comfy.model_base", "comfy.supported_models",
    "comfy.model_detection", "comfy.sd", "comfy.sd1_clip", "comfy.sdxl_clip",
    "comfy.ldm.modules.diffusionmodules.openaimodel", "comfy.ldm.modules.diffusionmodules.util",
    "folder_paths", "node_helpers", "latent_preview", "nodes", "comfy_extras.nodes_model_merging",
)
# The project's modules that import ComfyUI (the node pack): unloaded with the stand-in, so each use imports them
# against the fresh `comfy` modules.
NODE_PACK_MODULES = ("afa.comfyui",)
# ComfyUI's CLI defaults plus --cpu (the flags of a headless CPU ComfyUI; --base-directory is added per use).
DEFAULT_ARGV = ("--cpu",)

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------------------
# the stand-in on sys.path

def _is_standin_module(module) -> bool:
    """Whether a module's file or (namespace) package path lies in the stand-in."""
    root = str(STANDIN_ROOT)
    try:
        paths = [getattr(module, "__file__", None) or ""]
        package_path = getattr(module, "__path__", None)
        if isinstance(package_path, (list, tuple)) or type(package_path).__name__ == "_NamespacePath":
            paths += list(package_path)
        return any(isinstance(p, str) and p.startswith(root) for p in paths)
    except Exception:  # exotic module objects (torch._classes, lazy modules): not ours
        return False


def unload_standin(extra_modules: tuple[str, ...] = ()) -> list[str]:
    """Removes the stand-in's modules (and those named by or under `extra_modules`, e.g. a node pack that imported
    `comfy`) from sys.modules; returns their names."""
    prefixes = tuple(STANDIN_TOP_LEVEL) + tuple(extra_modules)
    removed = []
    for name, module in list(sys.modules.items()):
        top = name.split(".")[0]
        if (top in prefixes or name in prefixes or any(name.startswith(p + ".") for p in prefixes)
                or (module is not None and _is_standin_module(module))):
            del sys.modules[name]
            removed.append(name)
    importlib.invalidate_caches()
    return removed


@contextlib.contextmanager
def comfyui_standin(base_directory: str | os.PathLike, *, argv: tuple[str, ...] = DEFAULT_ARGV,
                    extra_modules: tuple[str, ...] = NODE_PACK_MODULES):
    """Imports the ComfyUI stand-in as a headless `python main.py --cpu --base-directory <base_directory>` would:
    tests/comfyui_standin first on sys.path, ComfyUI's CLI args parsed from `argv` (defaults + --cpu; pytest's own
    argv is never parsed), `folder_paths` rooted at `base_directory` (models/, input/, output/, temp/ there), and the
    modules of STANDIN_MODULES imported. Yields a namespace: `.nodes`, `.folder_paths`, `.comfy` (the package),
    `.args` (comfy.cli_args.args), `.base_directory`, `.models_dir` and `.module(name)` (import one more).

    On exit every stand-in module (and those named by or under `extra_modules`, by default the node pack
    `afa.comfyui`, which imports `comfy` at import time) leaves sys.modules and sys.path is
    restored (nodes.py puts `<stand-in>/comfy` on sys.path as ComfyUI does), so nothing leaks into other tests, e.g.
    the WebUI stand-in's top-level `modules`, or the top-level `ldm` of stable-diffusion-sdkit (`comfy.ldm` is the
    stand-in's own subpackage and never shadows it). Not re-entrant: a second stand-in cannot be active at once."""
    if "comfy" in sys.modules:
        raise RuntimeError("a ComfyUI stand-in (or another `comfy`) is already imported: "
                           f"{getattr(sys.modules['comfy'], '__path__', None)}")
    base_directory = Path(base_directory).resolve()
    base_directory.mkdir(parents=True, exist_ok=True)
    saved_path = list(sys.path)
    saved_argv = sys.argv
    sys.path.insert(0, str(STANDIN_ROOT))
    try:
        # ComfyUI's main.py: `comfy.options.enable_args_parsing()` before anything imports comfy.cli_args, whose
        # module-level parse reads sys.argv (with parsing off, as in a library use, it parses [] = the defaults).
        sys.argv = ["main.py", *argv, "--base-directory", str(base_directory)]
        import comfy.options
        comfy.options.enable_args_parsing()
        try:
            import comfy.cli_args
        finally:
            sys.argv = saved_argv
            comfy.options.enable_args_parsing(False)
        for name in STANDIN_MODULES:
            importlib.import_module(name)
        namespace = types.SimpleNamespace(
            comfy=sys.modules["comfy"], nodes=sys.modules["nodes"], folder_paths=sys.modules["folder_paths"],
            args=comfy.cli_args.args, base_directory=base_directory,
            models_dir=Path(sys.modules["folder_paths"].models_dir), module=importlib.import_module)
        yield namespace
    finally:
        sys.argv = saved_argv
        try:
            # free what the model manager still holds (loaded patchers) before the modules go
            mm = sys.modules.get("comfy.model_management")
            if mm is not None:
                mm.current_loaded_models.clear()
        finally:
            unload_standin(extra_modules)
            sys.path[:] = saved_path


# ----------------------------------------------------------------------------------------------------------------------
# tiny models

def _common_unet(**extra) -> dict:
    """A UNet config in detect_unet_config's form (what ComfyUI's loader reads from a checkpoint's tensors)."""
    config = {"use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
              "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "use_temporal_resblock": False,
              "use_temporal_attention": False}
    config.update(extra)
    return config


# AFA's tiny layouts in ComfyUI's form (detect_unet_config of the ldm builds gives exactly these).
TINY_UNET_CONFIGS = {
    # afa.unet.PRESETS["tiny"]: SD1's 12/1/12 blocks, attention on levels 0-2, width 32, context 32
    "sd1": _common_unet(model_channels=32, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 2, 2],
                        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                        use_linear_in_transformer=False, context_dim=32),
    # tests/factories.py TINY_SD2_UNET: the same blocks with linear projections, context 64 (the OpenCLIP tower width)
    "sd2": _common_unet(model_channels=32, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 1, 2, 2],
                        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                        transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                        use_linear_in_transformer=True, context_dim=64),
    # tests/factories.py tiny_sdxl_unet (PRESETS["tiny-sdxl"]): 9/1/9 blocks, depths 0/2/3, middle 3, label embedding
    # of y = pooled G (64) + 6 x 256 size embeddings, context = CLIP-L (32) + G (64)
    "sdxl": _common_unet(num_classes="sequential", adm_in_channels=64 + 6 * 256, model_channels=64,
                         num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 2], transformer_depth=[0, 0, 2, 2, 3, 3],
                         transformer_depth_output=[0, 0, 0, 2, 2, 2, 3, 3, 3], transformer_depth_middle=3,
                         use_linear_in_transformer=True, context_dim=96),
}
# Set after the supported_models config added its unet_extra_config (SD15: 8 heads; SD20/SDXL: 64 channels a head),
# so the attention heads equal AFA's ldm builds of the same layout (tiny: 2 heads; SD2: 32 channels a head; SDXL: 64).
TINY_UNET_OVERRIDES = {"sd1": {"num_heads": 2, "num_head_channels": -1},
                       "sd2": {"num_heads": -1, "num_head_channels": 32},
                       "sdxl": {}}
DEFAULT_PARAMETERIZATION = {"sd1": "eps", "sd2": "v", "sdxl": "eps"}

# Tiny text encoders: overrides of ComfyUI's CLIP json configs (sd1_clip_config.json, sd2_clip_config.json,
# clip_config_bigg.json) through model_options["<name>_model_config"]. SD1's matches training/sd_checkpoint.py's
# TINY_CLIP_TEXT_CONFIG; SD2's and SDXL's have 3 layers because ComfyUI reads their penultimate layer
# (layer_idx=-2, which SDClipModel asserts is < the layer count).
TINY_CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "hidden_act": "quick_gelu"}
TINY_CLIP_L_SDXL = dict(TINY_CLIP_L, num_hidden_layers=3)
TINY_CLIP_H = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2,
               "hidden_act": "gelu"}
TINY_CLIP_G = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3, "num_attention_heads": 2,
               "hidden_act": "gelu"}
TINY_CLIP_MODEL_OPTIONS = {
    "sd1": {"clip_l_model_config": TINY_CLIP_L},
    "sd2": {"clip_h_model_config": TINY_CLIP_H},
    "sdxl": {"clip_l_model_config": TINY_CLIP_L_SDXL, "clip_g_model_config": TINY_CLIP_G},
}
# The tiny VAE: ComfyUI's SD VAE (AutoencoderKL) at width 32 with 4 levels, so it scales by 8 like the
# `downscale_ratio` comfy.sd.VAE assumes (GroupNorm's 32 groups need widths that are multiples of 32).
TINY_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}

_FACTORY_ARGS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _layout(layout: str) -> str:
    if layout not in TINY_UNET_CONFIGS:
        raise ValueError(f"unknown layout {layout!r}: one of {sorted(TINY_UNET_CONFIGS)}")
    return layout


def _model_config_class(layout: str):
    import comfy.supported_models
    return {"sd1": comfy.supported_models.SD15, "sd2": comfy.supported_models.SD20,
            "sdxl": comfy.supported_models.SDXL}[_layout(layout)]


def randomize_parameters_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Seeded weights for every parameter in named_parameters() order (ComfyUI's layers are created uninitialised):
    normalisation weights 1 + scale * noise, everything else scale * noise. Deterministic for a given seed."""
    generator = torch.Generator().manual_seed(seed)
    norm_types = (torch.nn.LayerNorm, torch.nn.GroupNorm)
    norm_weights = {id(m.weight) for m in module.modules() if isinstance(m, norm_types) and m.weight is not None}
    with torch.no_grad():
        for _, parameter in module.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator) * scale
            parameter.copy_((noise + 1.0) if id(parameter) in norm_weights else noise)
    return module


def tiny_model_config(layout: str = "sd1"):
    """The `comfy.supported_models` config (SD15, SD20 or SDXL) of a tiny layout, float32 for the CPU, as the
    loader prepares it (`set_inference_dtype`)."""
    config = _model_config_class(layout)(copy.deepcopy(TINY_UNET_CONFIGS[layout]))
    config.unet_config.update(TINY_UNET_OVERRIDES[layout])
    config.set_inference_dtype(torch.float32, None)
    return config


def tiny_model(layout: str = "sd1", seed: int = 0, *, parameterization: str | None = None, scale: float = 0.05,
               unet_state_dict: dict[str, torch.Tensor] | None = None):
    """A `comfy.model_patcher.ModelPatcher` (load and offload device: the CPU) around the tiny `layout` model:
    "sd1" (SD 1.x: comfy.model_base.BaseModel, eps), "sd2" (SD 2.x, v-prediction by default), "sdxl"
    (comfy.model_base.SDXL, eps). `parameterization` "eps" or "v" sets the ModelType, which ComfyUI's loader
    derives from the checkpoint (SD20.model_type's statistic, SDXL's `v_pred` key). UNet weights: seeded noise
    (randomize_parameters_, deterministic from `seed`) or `unet_state_dict` (ldm / ComfyUI keys without the
    `model.diffusion_model.` prefix, e.g. an AFA ldm build of the same layout), loaded by
    `BaseModel.load_model_weights` like a checkpoint. Two calls with the same arguments give equal weights in
    different objects; see also `twin`."""
    import comfy.model_base
    import comfy.model_patcher

    parameterization = parameterization or DEFAULT_PARAMETERIZATION[_layout(layout)]
    model_type = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}[parameterization]
    model_config = tiny_model_config(layout)
    # the loader's path: model_config.get_model(state_dict) (SD15/SD20 -> BaseModel, SDXL -> model_base.SDXL), with
    # the model type given instead of read from the checkpoint
    model_config.model_type = lambda state_dict, prefix="": model_type
    try:
        model = model_config.get_model({}, "", device=CPU)
    finally:
        del model_config.model_type
    if unet_state_dict is None:
        randomize_parameters_(model.diffusion_model, seed, scale)
    else:
        expected = set(model.diffusion_model.state_dict())
        if set(unet_state_dict) != expected:
            raise KeyError(f"unet_state_dict keys differ from the {layout} layout's: missing "
                           f"{sorted(expected - set(unet_state_dict))[:5]}, unexpected "
                           f"{sorted(set(unet_state_dict) - expected)[:5]}")
        model.load_model_weights(dict(unet_state_dict), "")
    model.eval()
    _FACTORY_ARGS[model] = dict(layout=layout, seed=seed, parameterization=parameterization, scale=scale,
                                unet_state_dict=unet_state_dict)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def twin(patcher):
    """Another member with the same UNet weights but its own objects (BaseModel, diffusion model, ModelPatcher):
    what loading the same checkpoint file twice gives, unlike `patcher.clone()`, which shares the model. Only for
    patchers made by tiny_model or tiny_flux (rebuilt from their arguments, so LoRA patches or object patches are
    not carried)."""
    args = _FACTORY_ARGS.get(patcher.model)
    if args is None:
        raise ValueError("twin() needs a ModelPatcher made by comfyui_factories.tiny_model or tiny_flux")
    if args["layout"] == "flux":
        return tiny_flux(**{key: value for key, value in args.items() if key != "layout"})
    return tiny_model(**args)


# FLUX: ComfyUI's detection hard-codes FLUX.1's widths (hidden 3072, 24 heads, context 4096), so the tiny model is
# built from comfy.supported_models.Flux with this config, as the loader does after detection. Head width 16
# (2 heads of 32 / 2), rotary axes 4 + 6 + 6 = 16; 16 latent channels (patch 2 x 2: 64 per token) as FLUX.1.
TINY_FLUX_CONFIG = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=16, context_in_dim=24,
                        hidden_size=32, mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=2,
                        axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def tiny_flux_transformer(seed: int = 0, *, scale: float = 0.05, **overrides) -> torch.nn.Module:
    """ComfyUI's `comfy.ldm.flux.model.Flux` at TINY_FLUX_CONFIG (+ overrides), seeded weights, fp32, eval."""
    import comfy.ldm.flux.model
    import comfy.ops

    config = dict(TINY_FLUX_CONFIG, **overrides)
    model = comfy.ldm.flux.model.Flux(**config, operations=comfy.ops.disable_weight_init)
    return randomize_parameters_(model, seed, scale).eval().requires_grad_(False)


def tiny_flux(seed: int = 0, *, scale: float = 0.05, guidance_embed: bool = True):
    """A `ModelPatcher` (CPU) around `comfy.model_base.Flux` built by `comfy.supported_models.Flux` (FLUX.1 [dev]:
    guidance embedding, ModelSamplingFlux) or `FluxSchnell` (guidance_embed False) from TINY_FLUX_CONFIG, as
    ComfyUI's loader builds a detected FLUX transformer; seeded weights."""
    import comfy.model_patcher
    import comfy.supported_models

    config_class = comfy.supported_models.Flux if guidance_embed else comfy.supported_models.FluxSchnell
    config = config_class(dict(TINY_FLUX_CONFIG, guidance_embed=guidance_embed))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=CPU)
    randomize_parameters_(model.diffusion_model, seed, scale)
    model.eval()
    _FACTORY_ARGS[model] = dict(layout="flux", seed=seed, scale=scale, guidance_embed=guidance_embed)
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def flux_conditioning(seed: int = 0, tokens: int = 5, guidance: float | None = 3.5) -> list:
    """A FLUX CONDITIONING as CLIPTextEncode with a FLUX CLIP gives it (T5 tokens [1 x tokens x 24], pooled CLIP-L
    [1 x 16]), seeded noise in place of the text encoders (a T5-XXL is too big here), with FluxGuidance's
    `guidance` set as that node sets it (None: no guidance key)."""
    import node_helpers

    generator = torch.Generator().manual_seed(seed)
    cond = torch.randn(1, tokens, TINY_FLUX_CONFIG["context_in_dim"], generator=generator)
    pooled = torch.randn(1, TINY_FLUX_CONFIG["vec_in_dim"], generator=generator)
    conditioning = [[cond, {"pooled_output": pooled}]]
    if guidance is None:
        return conditioning
    return node_helpers.conditioning_set_values(conditioning, {"guidance": guidance})  # FluxGuidance.execute


def flux_latent(width: int = 64, height: int = 64, batch_size: int = 1) -> dict:
    """EmptySD3LatentImage's latent (the empty latent ComfyUI's FLUX workflows use): zeros [B x 16 x h/8 x w/8]."""
    return {"samples": torch.zeros([batch_size, 16, height // 8, width // 8])}


def tiny_clip(layout: str = "sd1", seed: int = 0, *, scale: float = 0.05):
    """A `comfy.sd.CLIP` for a tiny layout: ComfyUI's own text encoder classes (sd1_clip.SD1ClipModel / CLIP-L;
    text_encoders.sd2_clip.SD2ClipModel / OpenCLIP-H's penultimate layer; sdxl_clip.SDXLClipModel / CLIP-L
    penultimate + bigG penultimate and pooled) at the TINY_CLIP_* widths via model_options overrides, with the real
    SD1 tokenizer (comfy/sd1_tokenizer); seeded weights. Its conditioning has the width of the layout's context_dim
    (sd1 32, sd2 64, sdxl 96), and SDXL's pooled output 64."""
    import comfy.sd

    target = tiny_model_config(layout).clip_target()
    clip = comfy.sd.CLIP(target, model_options=copy.deepcopy(TINY_CLIP_MODEL_OPTIONS[layout]))
    randomize_parameters_(clip.cond_stage_model, seed, scale)
    return clip


def tiny_vae(seed: int = 0, *, scale: float = 0.05):
    """A `comfy.sd.VAE` with ComfyUI's SD AutoencoderKL at TINY_VAE_DDCONFIG (8x down/up-scaling, 4 latent channels),
    seeded weights, passed as a state dict with its config like a VAE file."""
    import comfy.ldm.models.autoencoder
    import comfy.sd

    params = {"ddconfig": copy.deepcopy(TINY_VAE_DDCONFIG), "embed_dim": 4}
    source = comfy.ldm.models.autoencoder.AutoencoderKL(**copy.deepcopy(params))
    state_dict = randomize_parameters_(source, seed, scale).state_dict()
    return comfy.sd.VAE(sd=state_dict, config={"params": params})


def tiny_checkpoint(layout: str = "sd1", seed: int = 0, *, parameterization: str | None = None):
    """(model, clip, vae) as CheckpointLoaderSimple returns them, for a tiny layout, all seeded from `seed`."""
    return (tiny_model(layout, seed, parameterization=parameterization), tiny_clip(layout, seed),
            tiny_vae(seed))


def encode(clip, text: str):
    """nodes.CLIPTextEncode().encode(clip, text)[0]: a CONDITIONING ([[cond, {"pooled_output": ...}]])."""
    import nodes
    return nodes.CLIPTextEncode().encode(clip, text)[0]


def empty_latent(width: int = 64, height: int = 64, batch_size: int = 1) -> dict:
    """nodes.EmptyLatentImage().generate(width, height, batch_size)[0]: {"samples": zeros [B x 4 x h/8 x w/8]}."""
    import nodes
    return nodes.EmptyLatentImage().generate(width, height, batch_size)[0]


def sample(model, clip, prompt: str = "a prompt", negative: str = "", *, seed: int = 0, steps: int = 2,
           cfg: float = 5.0, sampler_name: str = "euler", scheduler: str = "normal", latent: dict | None = None,
           denoise: float = 1.0) -> torch.Tensor:
    """KSampler through nodes.common_ksampler (as the KSampler node runs it) with two encoded prompts; returns the
    sampled latent tensor."""
    import nodes
    latent = empty_latent() if latent is None else latent
    (out,) = nodes.common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, encode(clip, prompt),
                                   encode(clip, negative), latent, denoise=denoise)
    return out["samples"]
