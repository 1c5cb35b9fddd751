"""Random weights for test models, shared by the test tiers (tests/conftest.py, the stand-in harness and
tests/webui_real/), which cannot import one another's conftest modules (pytest names each of them `conftest`)."""

from __future__ import annotations

import socket
from pathlib import Path

import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Replaces every parameter with seeded noise (so zero-initialised output layers are non-zero too)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return module


def lora_pair(weight: torch.Tensor, rank: int, scale: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random kohya LoRA for one layer of weight [out x in] (Linear) or [out x in x k x k] (Conv2d): the
    `lora_down.weight` [rank x in (x k x k)] and `lora_up.weight` [out x rank (x 1 x 1)] of its keys, and `alpha`
    (= rank, so the update is up @ down)."""
    if weight.ndim == 4:
        down = torch.randn(rank, weight.shape[1], *weight.shape[2:], generator=generator) * scale
        up = torch.randn(weight.shape[0], rank, 1, 1, generator=generator) * scale
    else:
        down = torch.randn(rank, weight.shape[1], generator=generator) * scale
        up = torch.randn(weight.shape[0], rank, generator=generator) * scale
    return {"lora_down.weight": down.contiguous(), "lora_up.weight": up.contiguous(),
            "alpha": torch.tensor(float(rank))}


def write_captioned_images(folder, count: int = 12, width: int = 32, height: int = 32):
    """`count` random RGB PNGs of width x height with kohya-style `.txt` captions ("a red thing number 3") in
    `folder`; returns the folder."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        colour = ["red", "blue", "green"][index % 3]
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a {colour} thing number {index}")
    return folder


def trainer_args(members, dataset, run_folder, name: str, *extra: str) -> list[str]:
    """training/train.py's command line for a short CPU run on tiny members: 32 px, batch 4, a quarter held out,
    SABW 32 wide, fp32 weights written to `<run_folder>/<name>.safetensors`, the run in `<run_folder>/<name>`."""
    return ["--members", *map(str, members), "--data", str(dataset), "--resolution", "32", "--batch-size", "4",
            "--val-split", "0.25", "--hidden-channels", "32", "--num-workers", "0", "--save-dtype", "fp32",
            "--output", str(run_folder / f"{name}.safetensors"), "--run-dir", str(run_folder / name), *extra]


# The trainer's ablation flags and the latent cache, as every family's tests train them.
TRAINER_VARIANTS = {
    "ablations": ("--no-spatial", "--no-timestep", "--no-text"),
    "last-block-fast": ("--mode", "last-block", "--preset", "fast"),
    "shared-cached": ("--text-conditioning", "shared", "--cache-latents", "--crop", "center"),
}


def check_variant_config(config, flags) -> None:
    """Asserts that a weights file's AggregatorConfig records the TRAINER_VARIANTS flags it was trained with."""
    if "--no-text" in flags:
        assert not config.use_text and not config.spatial and not config.use_timestep, config
    if "last-block" in flags:
        assert config.only_last_block and config.design == "fast", config
    if "shared" in flags:
        assert config.text_conditioning == "shared", config


# A tiny SD 2.x-v model: the tiny UNet with linear transformer projections (SD 2.x's) reading a 64-wide context, and
# an OpenCLIP text tower (open_clip's key layout, 2 layers, width 64, 1 head) under cond_stage_model.model.*.
TINY_SD2_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
                     num_res_blocks=2, channel_mult=[1, 1, 2, 2], num_head_channels=32, use_spatial_transformer=True,
                     use_linear_in_transformer=True, transformer_depth=1, context_dim=64, use_checkpoint=False,
                     legacy=False)
TINY_OPEN_CLIP = dict(vocab_size=49408, context_length=77, width=64, layers=2, heads=1, mlp_width=256, embed_dim=64)
# The tiny tower's architecture name in the yamls of tiny SDXL checkpoints: known to the WebUI stand-in only
# (tests/webui_standin/modules/standin_sgm.py); the trainer reads a tower's sizes from its tensors.
TINY_OPEN_CLIP_ARCH = "afa-test-tiny"
# open_clip's ViT-B-32 text tower: what a real WebUI builds for a yaml naming `arch: ViT-B-32` (the smallest open_clip
# architecture; the tiny tower above has no open_clip architecture name, so only the trainer can read it).
VIT_B_32_OPEN_CLIP = dict(vocab_size=49408, context_length=77, width=512, layers=12, heads=8, mlp_width=2048,
                          embed_dim=512)


def write_tiny_sd2_checkpoint(path, seed: int, parameterization: str = "v", tower: dict = TINY_OPEN_CLIP,
                              arch: str = "ViT-H-14"):
    """A WebUI-format tiny SD 2.x checkpoint with its yaml (ldm's FrozenOpenCLIPEmbedder of `arch`, penultimate
    layer, and `parameterization: v` for a 768-v model); the UNet reads the tower's width. Returns its path."""
    from pathlib import Path

    from training.open_clip_text import OpenClipTextEncoder
    from training.sd_checkpoint import (TEXT_ENCODER_PREFIX, tiny_sd_config, tiny_sd_state_dict,
                                        write_webui_checkpoint)

    path = Path(path)
    unet = dict(TINY_SD2_UNET, context_dim=tower["width"])
    state_dict = tiny_sd_state_dict(seed, unet)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
    torch.manual_seed(seed)
    text_tower = randomize_(OpenClipTextEncoder(**tower), seed=seed, scale=0.05)
    state_dict.update({"cond_stage_model.model." + k: v for k, v in text_tower.state_dict().items()})
    config = tiny_sd_config(path.parent / "tiny-clip-text", parameterization=parameterization)
    config["model"]["params"]["unet_config"]["params"] = unet
    config["model"]["params"]["cond_stage_config"] = {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {"arch": arch, "version": "laion2b_s32b_b79k", "freeze": True, "layer": "penultimate"}}
    return write_webui_checkpoint(path, state_dict, config)


# A tiny SDXL model in the WebUI's form (sd_xl_base.yaml's structure at test size): the tiny-sdxl UNet (depths 0/2/3,
# middle 3, 9/1/9 blocks, a label embedding of `y`), the tiny VAE, and the conditioner's two text encoders: the tiny
# CLIP under conditioner.embedders.0.transformer.* and an OpenCLIP tower under conditioner.embedders.1.model.*; the
# context is their widths together, `y` the tower's pooled width + 3 x 2 x 256 (the size embeddings).
SGM = "sgm.modules.diffusionmodules."
SDXL_SIZE_CONDITIONS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
SDXL_VAE_DDCONFIG = dict(attn_type="vanilla", double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3,
                         ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def tiny_sdxl_unet(clip_width: int, tower: dict) -> dict:
    """The tiny-sdxl UNet parameters (sgm's network_config.params) reading a context of the CLIP and tower widths."""
    from afa.unet import PRESETS

    return dict(PRESETS["tiny-sdxl"], context_dim=clip_width + tower["width"],
                adm_in_channels=tower["embed_dim"] + 3 * 2 * 256, spatial_transformer_attn_type="softmax")


def tiny_sdxl_config(clip_folder, unet: dict, big_g_arch: str = "ViT-B-32", parameterization: str = "eps") -> dict:
    """sd_xl_base.yaml's structure (sgm's DiffusionEngine) with the tiny UNet, VAE and text encoders; the CLIP-L
    embedder names `clip_folder` (the tiny CLIP's config and tokenizer), its hidden layer the penultimate of 2."""
    text_encoders = [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": 1, "version": str(clip_folder)}},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": big_g_arch, "version": "laion2b_s34b_b79k", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
    ]
    sizes = [{"is_trainable": False, "input_key": key, "params": {"outdim": 256},
              "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"} for key in SDXL_SIZE_CONDITIONS]
    scaling = "VScaling" if parameterization == "v" else "EpsScaling"
    denoiser = {"num_idx": 1000, "weighting_config": {"target": SGM + "denoiser_weighting.EpsWeighting"},
                "scaling_config": {"target": SGM + "denoiser_scaling." + scaling},
                "discretization_config": {"target": SGM + "discretizer.LegacyDDPMDiscretization"}}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": SGM + "denoiser.DiscreteDenoiser", "params": denoiser},
        "network_config": {"target": SGM + "openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner",
                               "params": {"emb_models": text_encoders + sizes}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": SDXL_VAE_DDCONFIG,
            "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def write_tiny_sdxl_checkpoint(path, seed: int, tower: dict = TINY_OPEN_CLIP, text_seed: int | None = None,
                               with_yaml: bool = True, big_g_arch: str = TINY_OPEN_CLIP_ARCH):
    """A WebUI-format tiny SDXL checkpoint (the keys sgm's DiffusionEngine saves) with its sgm yaml, built without
    sgm: the UNet with AFA's ldm build of the same parameters (tests/webui_real/test_sgm_unet.py checks it against
    sgm's class), random weights from `seed`; the text encoders from `text_seed` (default: `seed`), so members may
    share them. The tiny CLIP's folder is written beside the checkpoint. Returns its path."""
    from pathlib import Path

    from transformers import CLIPTextConfig, CLIPTextModel

    from afa.unet import build_unet
    from training.open_clip_text import OpenClipTextEncoder
    from training.sd_checkpoint import TINY_CLIP_TEXT_CONFIG, TINY_TEXT_ENCODER_FOLDER_NAME, build_tiny_vae, \
        write_webui_checkpoint
    from training.text_encoder import write_text_encoder_folder

    path = Path(path)
    text_seed = seed if text_seed is None else text_seed
    folder = write_text_encoder_folder(path.parent / TINY_TEXT_ENCODER_FOLDER_NAME, TINY_CLIP_TEXT_CONFIG)
    unet_params = tiny_sdxl_unet(TINY_CLIP_TEXT_CONFIG["hidden_size"], tower)
    torch.manual_seed(seed)
    state_dict = {"model.diffusion_model." + k: v
                  for k, v in randomize_(build_unet(unet_params), seed=seed, scale=0.05).state_dict().items()}
    state_dict.update({"first_stage_model." + k: v
                       for k, v in randomize_(build_tiny_vae(SDXL_VAE_DDCONFIG), seed=seed, scale=0.05)
                       .state_dict().items()})
    clip_l = randomize_(CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG)), seed=text_seed, scale=0.05)
    big_g = randomize_(OpenClipTextEncoder(**tower), seed=text_seed + 1000, scale=0.05)
    state_dict.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.state_dict().items()})
    state_dict.update({"conditioner.embedders.1.model." + k: v for k, v in big_g.state_dict().items()})
    config = tiny_sdxl_config(folder, unet_params, big_g_arch) if with_yaml else None
    return write_webui_checkpoint(path, state_dict, config)


# The word-level vocabulary of the tiny T5 tokenizer (write_flux_components): the words of write_captioned_images'
# captions, so no caption token is unknown.
FLUX_TOKENIZER_WORDS = ["a", "red", "blue", "green", "thing", "number"] + [str(n) for n in range(12)]


def write_flux_components(folder: Path, *, vae_resolution: int, vae_channel_multipliers: list[int], clip_width: int,
                          clip_heads: int, clip_intermediate: int, t5_width: int) -> dict[str, Path]:
    """The components FLUX members share, as the files train.py's --vae, --clip-l, --t5 and --t5-tokenizer read,
    written into `folder`: a 16-channel autoencoder (32 base channels, one res block per level, downsampling
    2 ** (levels - 1)), a 1-layer CLIP-L text model, a 1-layer T5 encoder (d_kv 8, d_ff 32; the tied embedding stored
    once, as ComfyUI's files store it) and a word-level T5 tokenizer.json of FLUX_TOKENIZER_WORDS. Returns the paths
    by component: "vae", "clip_l", "t5", "t5_tokenizer"."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(100)
    ddconfig = dict(double_z=True, z_channels=16, resolution=vae_resolution, in_channels=3, out_ch=3, ch=32,
                    ch_mult=list(vae_channel_multipliers), num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    vae = {f"encoder.{k}": v for k, v in Encoder(**ddconfig).state_dict().items()}
    vae.update({f"decoder.{k}": v for k, v in Decoder(**ddconfig).state_dict().items()})
    paths = {"vae": folder / "ae.safetensors", "clip_l": folder / "clip_l.safetensors",
             "t5": folder / "t5xxl_tiny.safetensors", "t5_tokenizer": folder / "t5_tokenizer"}
    save_file(vae, str(paths["vae"]))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=clip_width, intermediate_size=clip_intermediate,
                                        num_hidden_layers=1, num_attention_heads=clip_heads,
                                        max_position_embeddings=77))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(paths["clip_l"]))
    t5 = T5EncoderModel(T5Config(vocab_size=len(FLUX_TOKENIZER_WORDS) + 3, d_model=t5_width, d_kv=8, d_ff=32,
                                 num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"))
    state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(paths["t5"]))
    vocabulary = {"<pad>": 0, "</s>": 1, "<unk>": 2,
                  **{word: index + 3 for index, word in enumerate(FLUX_TOKENIZER_WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    paths["t5_tokenizer"].mkdir(exist_ok=True)
    tokenizer.save(str(paths["t5_tokenizer"] / "tokenizer.json"))
    return paths


# -- the real-host tiers' servers (tests/webui_real, tests/comfyui_real) -------------------------------------------

def free_port() -> int:
    """A free TCP port on the loopback interface, for a host server the tier starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tail(log: Path, lines: int = 60) -> str:
    """The last `lines` lines of a server's log, for a failure message."""
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(no log: {error})"
