"""Stable Diffusion checkpoints in the WebUI's format: the tiny SD1-style model used by tests and the demo.

A WebUI (ldm `LatentDiffusion`) checkpoint is one flat state dict:
    model.diffusion_model.*                       the UNet
    first_stage_model.{encoder,decoder,quant_conv,post_quant_conv}.*   the VAE (AutoencoderKL)
    cond_stage_model.transformer.text_model.*     the SD1 text encoder (transformers' CLIPTextModel)
    betas, alphas_cumprod, ...                    the noise schedule buffers of LatentDiffusion
with an ldm config yaml beside it (`<name>.yaml`), as the WebUI expects for non-standard architectures. The tiny
model's yaml names its text encoder by the absolute path of a folder beside the checkpoints (`tiny-clip-text/`: the
text config and SD1's tokenizer files), which the WebUI and the trainer build it from offline.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from afa.aggregator import TEXT_CONDITIONINGS
from afa.hashing import unet_fingerprint
from afa.members import (MemberRef, check_members, checkpoint_keys, config_beside, load_member,
                         read_prefixed_tensors, unet_shapes)
from afa.unet import PRESETS, UNET_KEY_PREFIX, UNET_TARGET, BlockLayout, build_unet

from .diffusion import NoiseSchedule

VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."

# The tiny VAE: one downsampling level (latents are images / 2), 4 latent channels like SD.
TINY_VAE_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
    num_res_blocks=1, attn_resolutions=[], dropout=0.0,
)
# The tiny text encoder: SD1's CLIP text model shape at width 32 (same vocabulary and 77-token context).
TINY_CLIP_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    max_position_embeddings=77, hidden_act="quick_gelu",
)


# The folder holding the tiny text encoder's config and tokenizer, beside the checkpoints whose yamls name it.
TINY_TEXT_ENCODER_FOLDER_NAME = "tiny-clip-text"


def tiny_sd_config(text_encoder_folder: str | Path, *, parameterization: str = "eps") -> dict:
    """The ldm config (yaml content) of the tiny SD1-style LatentDiffusion, in the form the WebUI loads.

    Its text encoder is ldm's `FrozenCLIPEmbedder` with `version` = the absolute path of `text_encoder_folder`,
    written here (idempotently) with the tiny CLIP text config and SD1's tokenizer: the WebUI builds the text model
    from that folder's config.json and the tokenizer from its files, offline (see
    `training.text_encoder.write_text_encoder_folder`). Callers that write checkpoints pass a folder beside them
    (`<folder of the checkpoints>/tiny-clip-text`, TINY_TEXT_ENCODER_FOLDER_NAME), so the checkpoints and the folder
    their yamls name live and go together.
    """
    from .text_encoder import write_text_encoder_folder  # imports transformers: only when needed

    folder = write_text_encoder_folder(text_encoder_folder, TINY_CLIP_TEXT_CONFIG)
    params = dict(
        linear_start=0.00085, linear_end=0.012, timesteps=1000, first_stage_key="jpg", cond_stage_key="txt",
        image_size=16, channels=4, cond_stage_trainable=False, conditioning_key="crossattn", scale_factor=1.0,
        unet_config=dict(target=UNET_TARGET, params=copy.deepcopy(PRESETS["tiny"])),
        first_stage_config=dict(
            target="ldm.models.autoencoder.AutoencoderKL",
            params=dict(embed_dim=4, ddconfig=copy.deepcopy(TINY_VAE_DDCONFIG),
                        lossconfig=dict(target="torch.nn.Identity")),
        ),
        cond_stage_config=dict(
            target="ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            params=dict(version=str(folder)),
        ),
    )
    if parameterization != "eps":
        params["parameterization"] = parameterization
    return dict(model=dict(target="ldm.models.diffusion.ddpm.LatentDiffusion", params=params))


def schedule_buffers(linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000) \
        -> dict[str, torch.Tensor]:
    """The noise-schedule buffers `LatentDiffusion.register_schedule` stores in every checkpoint (SD's "linear"
    schedule: betas linear in sqrt space)."""
    betas = np.linspace(linear_start ** 0.5, linear_end ** 0.5, timesteps, dtype=np.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
    values = dict(
        betas=betas, alphas_cumprod=alphas_cumprod, alphas_cumprod_prev=alphas_cumprod_prev,
        sqrt_alphas_cumprod=np.sqrt(alphas_cumprod), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
        log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
        sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
        sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
        posterior_variance=posterior_variance,
        posterior_log_variance_clipped=np.log(np.maximum(posterior_variance, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
    )
    return {name: torch.tensor(value, dtype=torch.float32) for name, value in values.items()}


def build_tiny_vae(ddconfig: dict | None = None, embed_dim: int = 4) -> torch.nn.ModuleDict:
    """The VAE's four parts under their checkpoint names (ldm's AutoencoderKL without pytorch_lightning)."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder

    ddconfig = ddconfig or TINY_VAE_DDCONFIG
    z_channels = ddconfig["z_channels"]
    return torch.nn.ModuleDict(dict(
        encoder=Encoder(**ddconfig), decoder=Decoder(**ddconfig),
        quant_conv=torch.nn.Conv2d(2 * z_channels, 2 * embed_dim, 1),
        post_quant_conv=torch.nn.Conv2d(embed_dim, z_channels, 1),
    ))


def build_tiny_text_encoder(text_config: dict | None = None) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**(text_config or TINY_CLIP_TEXT_CONFIG)))


def tiny_sd_state_dict(seed: int, unet_params: dict | None = None) -> dict[str, torch.Tensor]:
    """A complete WebUI-format state dict of the tiny model with random weights drawn from `seed`.

    The UNet's output layers are zero-initialised by ldm; they are re-drawn here so the UNet's output depends on
    its weights and two seeds give two different members.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = build_unet(unet_params or PRESETS["tiny"])
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if parameter.abs().sum() == 0 and parameter.ndim > 1:  # zero_module() layers
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    state_dict = {UNET_KEY_PREFIX + k: v for k, v in unet.state_dict().items()}
    state_dict.update({VAE_PREFIX + k: v for k, v in build_tiny_vae().state_dict().items()})
    state_dict.update({TEXT_ENCODER_PREFIX + k: v for k, v in build_tiny_text_encoder().state_dict().items()})
    state_dict.update(schedule_buffers())
    return state_dict


def write_webui_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict | None = None,
                           dtype: torch.dtype | None = None) -> Path:
    """Writes a checkpoint the WebUI can load: `.safetensors` or `.ckpt` (a pickled {"state_dict": ...}), plus
    `<name>.yaml` beside it when `config` is given. `dtype` casts floating-point tensors (fp16 checkpoints are the
    common case on CivitAI). The file is written under a temporary name and renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
               for k, v in state_dict.items()}
    temporary = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": tensors}, temporary)
    os.replace(temporary, path)
    if config is not None:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


# -- reading the non-UNet parts of a checkpoint (the trainer takes VAE and schedule from member 1, and each member's
#    own text encoder) --

# The VAE of every SD 1.x/2.x checkpoint (v1-inference.yaml's first_stage_config).
SD_VAE_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
SD1_DEFAULTS = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000, scale_factor=0.18215)
# SDXL's latent scale (sd_xl_base.yaml's scale_factor); its VAE and schedule (LegacyDDPMDiscretization) are SD1's.
SDXL_SCALE_FACTOR = 0.13025
SDXL_TEXT_ENCODER_PREFIX = "conditioner.embedders."


def is_sdxl_checkpoint(path: str | Path) -> bool:
    """Whether a checkpoint holds SDXL's conditioner (its text encoders under `conditioner.embedders.*`). Asked once
    per file version: a `.ckpt` is a pickle that is read whole to list its keys, and the resolution default, the
    config defaults and the text encoders all ask."""
    try:
        stat = Path(path).stat()
    except OSError:  # reading it says what is wrong
        return _holds_sdxl_conditioner(str(path), 0)
    return _holds_sdxl_conditioner(str(Path(path).resolve()), stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _holds_sdxl_conditioner(path: str, mtime_ns: int) -> bool:
    return bool(read_prefixed_tensors(path, SDXL_TEXT_ENCODER_PREFIX + "1.model.ln_final."))


NATIVE_RESOLUTIONS = {"sd": 512, "v": 768, "sdxl": 1024}


def native_resolution(path: str | Path, config: str | Path | None = None,
                      components: str | Path | None = None) -> int:
    """The image size a checkpoint's family was trained at: 1024 for SDXL, 768 for v-prediction models (SD 2.x
    768-v), else 512 (SD 1.x, SD 2.x base); a UNet-only file's is its `components` checkpoint's. 512 when the file
    cannot be read (loading it reports why)."""
    from afa.errors import AfaError

    try:
        if components is not None and not holds_text_encoder(path):
            path = components
        if is_sdxl_checkpoint(path):
            return NATIVE_RESOLUTIONS["sdxl"]
        params = read_sd_config(path, config)["model"]["params"]
    except (AfaError, OSError, ValueError):
        return NATIVE_RESOLUTIONS["sd"]
    return NATIVE_RESOLUTIONS["v" if params.get("parameterization") == "v" else "sd"]


def read_sd_config(path: str | Path, config: str | Path | None = None) -> dict:
    """The ldm (or sgm, SDXL) config of a checkpoint: `config`, else `<name>.yaml` beside it, else the defaults of
    its family (v1-inference's; SDXL's scale factor for a checkpoint with SDXL's conditioner)."""
    config = config or config_beside(path)
    if config is None:
        defaults = dict(SD1_DEFAULTS, first_stage_config=dict(params=dict(embed_dim=4, ddconfig=SD_VAE_DDCONFIG)))
        if is_sdxl_checkpoint(path):
            defaults["scale_factor"] = SDXL_SCALE_FACTOR
        return dict(model=dict(params=defaults))
    from afa.errors import CheckpointError

    try:
        loaded = yaml.safe_load(Path(config).read_text(encoding="utf-8"))
        loaded["model"]["params"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise CheckpointError(f"{config}: not a readable ldm model config: {error}") from None
    return loaded


class Vae(torch.nn.Module):
    """ldm's AutoencoderKL without pytorch_lightning; latents are scaled by `scale_factor` as LatentDiffusion does."""

    def __init__(self, ddconfig: dict, embed_dim: int, scale_factor: float):
        super().__init__()
        self.parts = build_tiny_vae(ddconfig, embed_dim)
        self.scale_factor = scale_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B x 3 x H x W] in [-1, 1] -> latents [B x 4 x H/f x W/f]: the posterior mean (`--latents mean`),
        a deterministic function of the image."""
        moments = self.parts["quant_conv"](self.parts["encoder"](images))
        mean, _ = moments.chunk(2, dim=1)
        return mean * self.scale_factor

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B x 3 x H x W] in [-1, 1] -> (mean, std), each [B x 4 x H/f x W/f] and scaled like the latents:
        ldm's DiagonalGaussianDistribution (log-variance clamped to [-30, 20]), whose `sample()` -- what the
        authors train on, `--latents sample` -- is mean + std * standard normal noise."""
        moments = self.parts["quant_conv"](self.parts["encoder"](images))
        mean, log_variance = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        return mean * self.scale_factor, std * self.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B x 4 x h x w] -> images [B x 3 x h*f x w*f] in about [-1, 1]."""
        return self.parts["decoder"](self.parts["post_quant_conv"](latents / self.scale_factor))


def load_vae(path: str | Path, config: dict, device: torch.device | str = "cpu",
             dtype: torch.dtype | None = None) -> Vae:
    """The checkpoint's VAE (`first_stage_model.*`), frozen."""
    from afa.errors import CheckpointError
    from afa.members import describe_difference

    params = config["model"]["params"]
    first_stage = params.get("first_stage_config", {}).get("params", {})
    vae = Vae(first_stage.get("ddconfig", SD_VAE_DDCONFIG), first_stage.get("embed_dim", 4),
              float(params.get("scale_factor", SD1_DEFAULTS["scale_factor"])))
    state_dict = read_prefixed_tensors(path, VAE_PREFIX, dtype)
    expected = {k: tuple(v.shape) for k, v in vae.parts.state_dict().items()}
    describe_difference(expected, {k: tuple(v.shape) for k, v in state_dict.items()},
                        what=f"{path}: the VAE (first_stage_model.*) does not match its config",
                        expected_label="the config", found_label="the file", error=CheckpointError)
    vae.parts.load_state_dict(state_dict)
    return vae.to(device).eval().requires_grad_(False)


def load_schedule(path: str | Path, config: dict) -> NoiseSchedule:
    """The noise schedule: the checkpoint's `alphas_cumprod` buffer (ldm) or `denoiser.sigmas` (sgm's discrete
    denoiser, sigma^2 = (1 - alphas_cumprod) / alphas_cumprod) when stored, else rebuilt from the config (sgm's
    LegacyDDPMDiscretization is ldm's linear schedule); parameterization "eps" unless the config says "v" (SD 2.x
    768-v models: `parameterization: v`; sgm yamls: a `VScaling` denoiser)."""
    params = config["model"]["params"]
    stored = {k: v for k, v in read_prefixed_tensors(path, "alphas_cumprod").items() if k == ""}
    sigmas = {k: v for k, v in read_prefixed_tensors(path, "denoiser.sigmas").items() if k == ""}
    if stored:
        alphas_cumprod = stored[""]
    elif sigmas:
        alphas_cumprod = 1.0 / (1.0 + sigmas[""].double() ** 2)
    else:
        alphas_cumprod = schedule_buffers(params.get("linear_start", SD1_DEFAULTS["linear_start"]),
                                          params.get("linear_end", SD1_DEFAULTS["linear_end"]),
                                          params.get("timesteps", SD1_DEFAULTS["timesteps"]))["alphas_cumprod"]
    scaling = str(params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", ""))
    parameterization = "v" if scaling.endswith("VScaling") else params.get("parameterization", "eps")
    return NoiseSchedule(alphas_cumprod.float(), parameterization)


@dataclass
class FrozenModels:
    """Everything the trainer and the evaluator read from the member checkpoints, frozen and in eval mode.

    Attributes:
        member_refs: name and sha256 of each member, in the given order (what a weights file is bound to).
        members: the members' ldm UNets.
        layout: their shared block layout.
        vae, schedule: the first member's VAE and noise schedule (`base_checkpoint`'s: --components' when the
            first member's file holds a UNet only).
        text_encoders: each member's own text encoder(s), float32, in member order: SD1's CLIPTextModel
            (transformers), SD 2.x's OpenCLIP tower (training/open_clip_text.py) or SDXL's pair
            (training/sdxl_text.py). Members whose text-encoder weights are identical share one module object, so
            each distinct encoder is held once and runs once per batch (training/metrics.py's
            `encode_for_members`). One SD1 text encoder is 123M parameters (0.5 GB in float32), SD 2.x's 354M
            (1.4 GB), SDXL's pair 817M (3.3 GB).
        runner: how the members' blocks run in the ensemble (afa.ensemble's LdmBlockRunner, or a host's subclass
            for UNets of the host's own code: ComfyUI's, afa/comfyui/training.py); None: ldm's.

    A host hands train.py its own models (`train(..., frozen=...)`) as an object with these attributes: a `vae`
    with `encode` and `posterior` (images [B x 3 x H x W] in [-1, 1] -> scaled latents) and `parameters()`, text
    encoders that read captions (training/metrics.py's `reads_captions`) with `config.hidden_size`.
    """

    member_refs: list[MemberRef]
    members: list[torch.nn.Module]
    layout: BlockLayout
    vae: Vae
    text_encoders: list[torch.nn.Module]
    schedule: NoiseSchedule
    base_checkpoint: Path | None = None  # the file the VAE and schedule were read from (None: not from a file)
    runner: object | None = None

    @property
    def text_encoder(self) -> torch.nn.Module:
        """The first member's text encoder (what every member reads with shared text conditioning)."""
        return self.text_encoders[0]

    @property
    def distinct_text_encoders(self) -> int:
        return len({id(encoder) for encoder in self.text_encoders})

    def text_encoders_for(self, text_conditioning: str) -> list[torch.nn.Module]:
        """The encoder each member reads under a text conditioning (AggregatorConfig.text_conditioning):
        "per_member", its own; "shared", the first member's for every member (so only that one runs)."""
        if text_conditioning not in TEXT_CONDITIONINGS:
            raise ValueError(f"text_conditioning must be one of {', '.join(TEXT_CONDITIONINGS)}, "
                             f"got {text_conditioning!r}")
        if text_conditioning == "shared":
            return [self.text_encoders[0]] * len(self.text_encoders)
        return list(self.text_encoders)


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    """Whether two modules hold identical tensors under identical names (compared exactly, value by value)."""
    first_state, second_state = first.state_dict(), second.state_dict()
    return first_state.keys() == second_state.keys() and all(
        first_state[key].shape == second_state[key].shape and torch.equal(first_state[key], second_state[key])
        for key in first_state)


def text_encoder_search_dirs(path: str | Path) -> list[Path]:
    """Where a yaml's relative text encoder folder may be: the WebUI's directory (the WebUI resolves it from there,
    its working directory) when this extension sits in one, the current directory, and the checkpoint's folder."""
    from afa.host import find_webui

    webui = find_webui()
    return ([webui.root] if webui is not None else []) + [Path.cwd(), Path(path).parent]


def load_text_encoders(member_paths: list[str | Path], config: str | Path | None = None,
                       device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> list[torch.nn.Module]:
    """Each member's own frozen text encoder(s) (`cond_stage_model.*`, SDXL's `conditioner.embedders.*`; float32, or
    `dtype`, on `device`), in member order; members whose encoders have identical weights get the same module
    object (compared in float32, before the cast).

    Raises:
        CheckpointError: a member holds no text encoder, or one that does not match its yaml (named).
    """
    from .sdxl_text import load_sdxl_text_encoders
    from .text_encoder import load_text_encoder  # imports transformers: only when needed

    distinct: list[torch.nn.Module] = []
    encoders = []
    for path in member_paths:
        sd_config, search_dirs = read_sd_config(path, config), text_encoder_search_dirs(path)
        sdxl = {SDXL_TEXT_ENCODER_PREFIX + key: value
                for key, value in read_prefixed_tensors(path, SDXL_TEXT_ENCODER_PREFIX).items()}
        if sdxl:
            encoder = load_sdxl_text_encoders(sdxl, sd_config, checkpoint_name=str(path), search_dirs=search_dirs)
        else:
            tensors = {f"cond_stage_model.{k}": v for k, v in read_prefixed_tensors(path, "cond_stage_model.").items()}
            encoder = load_text_encoder(tensors, sd_config, checkpoint_name=str(path), search_dirs=search_dirs)
        del sdxl
        # Loaded (float32) weights are compared, so an fp16 file of an fp32 encoder counts as another encoder
        # exactly when its rounding changed a value.
        shared = next((other for other in distinct if same_weights(other, encoder)), None)
        if shared is None:
            shared = encoder
            distinct.append(shared)
        encoders.append(shared)
    for encoder in distinct:  # on the CPU until compared; Module.to moves in place, so shared stays shared
        encoder.to(device, dtype)
    return encoders


class ComponentSources(NamedTuple):
    """Where the parts of the frozen models come from: each member's text encoder (`text_encoders`, one path per
    member) and the VAE, noise schedule and config of the ensemble (`base`)."""

    text_encoders: list[Path]
    base: Path


def holds_text_encoder(path: str | Path) -> bool:
    """Whether a checkpoint holds a text encoder (SD 1.x/2.x `cond_stage_model.*`, SDXL `conditioner.embedders.*`);
    a UNet-only file (ComfyUI's models/diffusion_models, a bare or prefixed UNet state dict) does not."""
    return any(key.startswith(("cond_stage_model.", SDXL_TEXT_ENCODER_PREFIX)) for key in checkpoint_keys(path))


def component_sources(member_paths: Sequence[str | Path], components: str | Path | None = None) -> ComponentSources:
    """Members read their text encoder from their own file, and the ensemble its VAE, schedule and config from the
    first member's; a member whose file holds a UNet only reads them from `components`, a full checkpoint of the
    members' family (e.g. the one the UNet-only files were fine-tuned from).

    Raises:
        CheckpointError: a member holds a UNet only and no `components` file is given.
    """
    from afa.errors import CheckpointError

    sources = []
    for path in map(Path, member_paths):
        if holds_text_encoder(path):
            sources.append(path)
        elif components is None:
            raise CheckpointError(
                f"{path}: this file holds a UNet only (no text encoder or VAE; e.g. a file of ComfyUI's "
                f"models/diffusion_models): give a full checkpoint of its family with --components, whose text "
                f"encoder, VAE and config the UNet-only members then use")
        else:
            sources.append(Path(components))
    if components is not None and not holds_text_encoder(components):
        raise CheckpointError(f"--components {components}: this file holds no text encoder: give a full checkpoint "
                              f"(UNet, VAE and text encoder)")
    return ComponentSources(sources, sources[0])


def load_frozen_models(member_paths: list[str | Path], config: str | Path | None = None,
                       device: torch.device | str = "cpu", member_dtype: torch.dtype | None = None,
                       members: list[torch.nn.Module | None] | None = None,
                       member_refs: list[MemberRef] | None = None,
                       text_encoder_dtype: torch.dtype | None = None,
                       components: str | Path | None = None) -> FrozenModels:
    """Loads the members (cast to `member_dtype`), each member's own text encoder, and the first member's VAE and
    schedule: what training/train.py trains with and training/evaluate.py evaluates with. The VAE stays float32
    (SDXL's VAE overflows in fp16), the text encoders too unless `text_encoder_dtype` is given. Members whose files
    hold a UNet only read their text encoder, and the VAE and schedule, from `components` (`component_sources`).

    `members` may give UNets already in memory for some of the paths (None entries are read from their files):
    they are used as they are (their dtype and device), frozen and in eval mode. `member_refs` may give the files'
    names and sha256 already known (the WebUI's hash cache), so the files are not hashed again.

    Raises:
        AfaError: a checkpoint is unreadable, or the members cannot be ensembled (the message names the file).
    """
    sources = component_sources(member_paths, components)
    if member_refs is None:
        member_refs = [MemberRef.from_file(path) for path in member_paths]
    given = list(members) if members is not None else [None] * len(member_paths)
    if len(given) != len(member_paths):
        raise ValueError(f"members: {len(given)} UNets for {len(member_paths)} member files")
    # a UNet-only member's architecture is its components checkpoint's (the yaml beside it), unless --config says
    members = [load_member(path, member_dtype, device, config or (config_beside(source) if Path(path) != source
                                                                   else None))
               if unet is None else unet.eval().requires_grad_(False)
               for path, source, unet in zip(member_paths, sources.text_encoders, given)]
    layout = check_members([(ref.name, unet_shapes(member)) for ref, member in zip(member_refs, members)])
    # Weights files bind their members by UNet fingerprint too, so that ComfyUI (where a model has no file) can
    # check them; the loaded UNets give it without reading the files again.
    states = [member.state_dict() for member in members]
    member_refs = [ref if ref.unet else dataclasses.replace(ref, unet=unet_fingerprint(state, state.__getitem__))
                   for ref, state in zip(member_refs, states)]
    sd_config = read_sd_config(sources.base, config)
    vae = load_vae(sources.base, sd_config, device)
    text_encoders = load_text_encoders(sources.text_encoders, config, device, text_encoder_dtype)
    return FrozenModels(member_refs, members, layout, vae, text_encoders, load_schedule(sources.base, sd_config),
                        base_checkpoint=sources.base)
