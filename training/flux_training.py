"""FLUX.1 members in the trainer and the evaluator: the shared components, the cached text encodings and the
rectified-flow objective (training/train.py and training/evaluate.py with FLUX-layout transformer members).

A FLUX member is a transformer-only file in BFL's layout (ComfyUI's `models/diffusion_models`, afa.flux.is_flux);
the members share the components FLUX.1 models are distributed without, given by flags as ComfyUI loads them:
- `--vae`: FLUX's 16-channel autoencoder (BFL's `ae.safetensors`, whose keys are ldm's AutoencoderKL encoder and
  decoder without quant convs); latents are 0.3611 x (mean - 0.1159), BFL's scale and shift;
- `--clip-l`: CLIP ViT-L/14's text model (transformers' CLIPTextModel keys, ComfyUI's `clip_l.safetensors`); members
  read its pooled output (`vector_in`);
- `--t5` and `--t5-tokenizer`: T5-XXL's encoder (transformers' T5EncoderModel keys, ComfyUI's `t5xxl_fp16.safetensors`)
  and its tokenizer (a `tokenizer.json`, e.g. ComfyUI's `comfy/text_encoders/t5_tokenizer/`); members read its
  `--t5-max-length` tokens (512 for FLUX.1 [dev], as BFL and kohya's sd-scripts encode).

Every caption (and the empty one, for caption dropout) is encoded once before training and stored on disk
(`TextEncodingCache`, <run dir>/text-cache): the encoders are freed before the members load, and a resumed run or an
evaluation of the same captions loads no encoder at all.

The objective is FLUX.1's rectified flow (training/diffusion.py `RectifiedFlow`): x_t = (1 - t) x_0 + t noise, the
members predict the velocity noise - x_0; t is drawn logit-normal (or uniform) and shifted for the image's token
count (mu 0.5 at 256 tokens to 1.15 at 4096). Members of FLUX.1 [dev] read a distilled guidance value (`--guidance`,
3.5 by default: what ComfyUI's FluxGuidance gives them at inference, and kohya's and diffusers' training default).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch

from afa.errors import AfaError, CheckpointError, IncompatibleMembersError
from afa.flux import FluxLayout, flux_layout, flux_shapes, is_flux
from afa.hashing import file_sha256, unet_fingerprint
from afa.members import MemberRef, check_members, describe_difference, read_prefixed_tensors, read_shapes

from .diffusion import TIMESTEP_SAMPLINGS, VALIDATION_EPOCH, RectifiedFlow, draw_flow_for_samples, per_sample_mse
from .metrics import batch_posterior

FLUX_VAE_SCALE_FACTOR = 0.3611
FLUX_VAE_SHIFT_FACTOR = 0.1159
DEFAULT_GUIDANCE = 3.5
T5_MAX_LENGTH = 512
FLUX_RESOLUTION = 1024
FLUX_FLAGS = ("vae", "clip_l", "t5", "t5_tokenizer", "t5_max_length", "guidance", "timestep_sampling",
              "text_mixing", "rope_axes", "text_cache_dir")
"""The trainer's and evaluator's flags for FLUX members only (None unless given, or filled in for FLUX members)."""
FLUX_DEFAULTS = {"t5_max_length": T5_MAX_LENGTH, "guidance": DEFAULT_GUIDANCE, "timestep_sampling": "logit-normal",
                 "text_mixing": "image-mean"}
REQUIRED_FLUX_FLAGS = ("vae", "clip_l", "t5", "t5_tokenizer")
UNET_ONLY_FLAGS = ("config", "components")


# -- members -------------------------------------------------------------------------------------------------------

def member_family(paths: Sequence[str | Path]) -> str:
    """"flux" when every member file is a FLUX-layout transformer, "unet" when none is, read from the .safetensors
    headers only: FLUX members are .safetensors files (a .ckpt would have to be unpickled whole to list its keys, so
    it counts as a UNet checkpoint here, as it always did).

    Raises:
        IncompatibleMembersError: the members mix both, naming which are which.
    """
    flux = [Path(path).suffix == ".safetensors" and is_flux(read_shapes(path)) for path in paths]
    if all(flux):
        return "flux"
    if any(flux):
        names = lambda wanted: ", ".join(Path(p).name for p, f in zip(paths, flux) if f == wanted)  # noqa: E731
        raise IncompatibleMembersError(f"the members mix FLUX transformers ({names(True)}) and UNet checkpoints "
                                       f"({names(False)}): an ensemble's members are of one architecture")
    return "unet"


def check_flux_members(paths: Sequence[str | Path]) -> FluxLayout:
    """The members' shared FLUX layout, read from the file headers; IncompatibleMembersError naming the first
    differing tensor when they are not of one layout (widths, block counts, guidance embedding)."""
    return check_members([(Path(path).name, flux_shapes(read_shapes(path))) for path in paths], flux_layout)


def add_flux_arguments(parser: argparse.ArgumentParser, training: bool = True) -> None:
    """The flags of FLUX.1 members (training/flux_training.py); None unless given (filled in for FLUX members)."""
    group = parser.add_argument_group("FLUX.1 members (transformer-only files in BFL's layout, as ComfyUI's "
                                      "models/diffusion_models holds them; the components they share by flag)")
    group.add_argument("--vae", help="FLUX's autoencoder (ae.safetensors, BFL's layout; latents 0.3611 x (z - "
                       "0.1159))")
    group.add_argument("--clip-l", help="CLIP-L's text model (clip_l.safetensors); members read its pooled output")
    group.add_argument("--t5", help="T5-XXL's encoder (t5xxl_fp16.safetensors or an fp8 file, transformers' keys)")
    group.add_argument("--t5-tokenizer", help="T5's tokenizer.json, or a folder holding it (e.g. ComfyUI's "
                       "comfy/text_encoders/t5_tokenizer)")
    group.add_argument("--t5-max-length", type=int, help=f"T5 tokens per caption (default "
                       f"{T5_MAX_LENGTH}: FLUX.1 [dev]'s; [schnell] was trained with 256)")
    group.add_argument("--guidance", type=float, help=f"the distilled guidance value members with a guidance "
                       f"embedding read (FLUX.1 [dev]; default {DEFAULT_GUIDANCE}: FluxGuidance's "
                       f"at inference, kohya's and diffusers' training default)")
    if training:
        group.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLINGS, help="how t is drawn before FLUX's "
                           "resolution shift (mu 0.5 at 256 image tokens to 1.15 at 4096): sigmoid of a normal "
                           "(logit-normal, the default, as BFL and kohya's flux_shift) or uniform")
        group.add_argument("--text-mixing", choices=["image-mean", "average"], help="how the text tokens are "
                           "mixed: each member's mean image-token weight (image-mean, the default) or 1/N (the "
                           "ablation)")
    group.add_argument("--rope-axes", type=int, nargs=3, help="the rotary axes of the members' attention heads "
                       "(default FLUX.1's 16 56 56); needed only for heads narrower than 128")
    group.add_argument("--text-cache-dir", help="where the captions' T5 and CLIP-L encodings are cached (default: "
                       + ("<run-dir>/text-cache)" if training else "<output-dir>/text-cache)"))


def check_flux_flags(args, family: str, error: Callable[[str], None]) -> None:
    """Refuses (`error(message)`) the component flags of the other family and missing FLUX components; fills in the
    FLUX defaults for FLUX members."""
    given = [name for name in FLUX_FLAGS if getattr(args, name, None) is not None]
    if family == "unet":
        if given:
            error(f"{', '.join(flag(name) for name in given)}: for FLUX transformer members only (these members are "
                  f"UNet checkpoints, which hold their own VAE and text encoder)")
        return
    unet_only = [name for name in UNET_ONLY_FLAGS if getattr(args, name, None) is not None]
    if unet_only:
        error(f"{', '.join(flag(name) for name in unet_only)}: for UNet members only; FLUX members take their "
              f"components from --vae, --clip-l, --t5 and --t5-tokenizer")
    missing = [name for name in REQUIRED_FLUX_FLAGS if getattr(args, name, None) is None]
    if missing:
        error(f"FLUX members hold a transformer only: give the components they share with "
              f"{', '.join(flag(name) for name in missing)} (FLUX's ae.safetensors, clip_l.safetensors, a "
              f"t5xxl*.safetensors and the T5 tokenizer.json, e.g. ComfyUI's comfy/text_encoders/t5_tokenizer)")
    for name, value in FLUX_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.t5_max_length < 1:
        error("--t5-max-length must be at least 1")
    if getattr(args, "clip_skip", None) not in (None, 1):
        error("--clip-skip: FLUX members read CLIP-L's pooled output and T5's last layer; CLIP skip does not apply")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def load_flux_members(paths: Sequence[str | Path], device: torch.device, dtype: torch.dtype | None,
                      rope_axes: Sequence[int] | None = None,
                      member_refs: Sequence[MemberRef] | None = None) -> tuple[list[torch.nn.Module], FluxLayout,
                                                                               list[MemberRef]]:
    """(the members as frozen afa.flux_model.Flux in `dtype`, their layout, their refs with sha256 and fingerprint:
    the tensors' `afa.hashing.unet_fingerprint`, which binds the weights file in ComfyUI)."""
    from afa.flux_model import load_flux_member

    layout = check_flux_members(paths)
    if member_refs is None:
        member_refs = [MemberRef.from_file(path) for path in paths]
    axes = tuple(rope_axes) if rope_axes else None
    try:
        members = [load_flux_member(path, dtype, device, axes_dim=axes) for path in paths]
    except ValueError as error:  # heads narrower than FLUX.1's and no rotary axes
        raise AfaError(f"{paths[0]}: {error} (--rope-axes)") from None
    refs = []
    for ref, member in zip(member_refs, members):
        state = member.state_dict()
        refs.append(MemberRef(ref.name, ref.sha256, ref.unet or unet_fingerprint(state, state.__getitem__)))
    return members, layout, refs


# -- the autoencoder -----------------------------------------------------------------------------------------------

VAE_KEY_PREFIXES = ("", "first_stage_model.", "vae.")


def _prefixed(shapes: dict[str, tuple], marker: str, prefixes: Sequence[str]) -> str | None:
    return next((prefix for prefix in prefixes if f"{prefix}{marker}" in shapes), None)


def flux_vae_ddconfig(shapes: dict[str, tuple], name: str = "--vae") -> dict:
    """ldm's AutoencoderKL `ddconfig` of an autoencoder in BFL's (= ldm's) key layout, read off its shapes (without
    prefix): FLUX.1's ae.safetensors gives ch 128, ch_mult [1, 2, 4, 4], 2 res blocks, 16 latent channels."""
    needed = ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_in.weight",
              "decoder.conv_out.weight")
    missing = [key for key in needed if key not in shapes]
    if missing:
        hint = (" (this is a diffusers-layout VAE: give BFL's ae.safetensors, ComfyUI's models/vae form)"
                if any(key.startswith("encoder.down_blocks.") for key in shapes) else "")
        raise CheckpointError(f"{name}: not an autoencoder in BFL's ae.safetensors layout: lacks "
                              f"{', '.join(missing)}{hint}")
    if any(re.match(r"encoder\.down\.\d+\.attn\.", key) for key in shapes):
        raise CheckpointError(f"{name}: an autoencoder with attention in its down levels is not FLUX's")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    z_channels = shapes["decoder.conv_in.weight"][1]
    levels = sorted({int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", key))})
    ch_mult = [shapes[f"encoder.down.{level}.block.0.conv2.weight"][0] // ch for level in levels]
    blocks = {int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", key))}
    return dict(double_z=shapes["encoder.conv_out.weight"][0] == 2 * z_channels, z_channels=z_channels,
                resolution=256, in_channels=in_channels, out_ch=shapes["decoder.conv_out.weight"][0], ch=ch,
                ch_mult=ch_mult, num_res_blocks=len(blocks), attn_resolutions=[], dropout=0.0)


class FluxVae(torch.nn.Module):
    """FLUX's autoencoder (BFL's `AutoEncoder`: ldm's encoder and decoder, no quant convs); latents are
    scale x (z - shift), BFL's `AutoEncoder.encode`. The trainer's VAE interface (training/sd_checkpoint.Vae's)."""

    def __init__(self, ddconfig: dict, scale_factor: float = FLUX_VAE_SCALE_FACTOR,
                 shift_factor: float = FLUX_VAE_SHIFT_FACTOR):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Decoder, Encoder

        self.encoder, self.decoder = Encoder(**ddconfig), Decoder(**ddconfig)
        self.scale_factor, self.shift_factor = scale_factor, shift_factor

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [B x 3 x H x W] in [-1, 1] -> (mean, std) [B x 16 x H/8 x W/8] each, scaled (and the mean shifted)
        like the latents; a sample is mean + std * standard normal noise (BFL's DiagonalGaussian)."""
        mean, log_variance = self.encoder(images).chunk(2, dim=1)
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        return (mean - self.shift_factor) * self.scale_factor, std * self.scale_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B x 3 x H x W] in [-1, 1] -> the posterior mean's latents [B x 16 x H/8 x W/8]."""
        return self.posterior(images)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B x 16 x h x w] -> images [B x 3 x 8h x 8w] in about [-1, 1]."""
        return self.decoder(latents / self.scale_factor + self.shift_factor)


def load_flux_vae(path: str | Path, device: torch.device | str = "cpu") -> FluxVae:
    """FLUX's autoencoder from `path` (bare keys, `first_stage_model.` or `vae.`), float32, frozen."""
    shapes = read_shapes(path)
    prefix = _prefixed(shapes, "encoder.conv_in.weight", VAE_KEY_PREFIXES) or ""
    shapes = {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    vae = FluxVae(flux_vae_ddconfig(shapes, f"--vae {path}"))
    state_dict = {key: value for key, value in read_prefixed_tensors(path, prefix, torch.float32).items()
                  if key.startswith(("encoder.", "decoder."))}
    describe_difference({k: tuple(v.shape) for k, v in vae.state_dict().items()},
                        {k: tuple(v.shape) for k, v in state_dict.items()},
                        what=f"--vae {path}: not FLUX's autoencoder layout", expected_label="the layout",
                        found_label="the file", error=CheckpointError)
    vae.load_state_dict(state_dict)
    return vae.to(device).eval().requires_grad_(False)


# -- the text encoders ---------------------------------------------------------------------------------------------

TEXT_KEY_PREFIXES = ("", "text_encoders.clip_l.transformer.", "clip_l.transformer.", "transformer.",
                     "text_encoders.t5xxl.transformer.", "t5xxl.transformer.")


def load_clip_l(path: str | Path, device: torch.device | str = "cpu",
                dtype: torch.dtype | None = None) -> torch.nn.Module:
    """CLIP-L's text model (transformers' CLIPTextModel keys; ComfyUI's clip_l.safetensors), frozen; its config is
    CLIP ViT-L/14's, or inferred from the tensors for another width (training/text_encoder.py)."""
    from .text_encoder import TEXT_ENCODER_PREFIX, load_text_encoder

    shapes = read_shapes(path)
    prefix = _prefixed(shapes, "text_model.embeddings.token_embedding.weight", TEXT_KEY_PREFIXES)
    if prefix is None:
        raise CheckpointError(f"--clip-l {path}: not a CLIP text model (no "
                              f"text_model.embeddings.token_embedding.weight)")
    tensors = {TEXT_ENCODER_PREFIX + key: value for key, value in read_prefixed_tensors(path, prefix).items()
               if key.startswith("text_model.")}  # not text_projection / logit_scale: FLUX reads the pooled output
    encoder = load_text_encoder(tensors, None, checkpoint_name=f"--clip-l {path}")
    return encoder.to(device, dtype)


def t5_config(shapes: dict[str, tuple], name: str = "--t5"):
    """transformers' T5Config of a T5 encoder's tensors (T5 v1.1 XXL: 24 layers, width 4096, 64 heads of 64, gated
    GELU MLP of 10240)."""
    from transformers import T5Config

    try:
        vocab_size, d_model = shapes["shared.weight"]
        buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    except KeyError as error:
        raise CheckpointError(f"{name}: not a T5 encoder in transformers' layout: lacks {error}") from None
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"][0]
    layers = {int(m.group(1)) for key in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", key))}
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=len(layers),
                    num_heads=heads, relative_attention_num_buckets=buckets,
                    feed_forward_proj="gated-gelu" if gated else "relu", is_encoder_decoder=False, use_cache=False)


def load_t5(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """T5's encoder (transformers' T5EncoderModel keys; ComfyUI's t5xxl_fp16.safetensors or fp8 files, cast while
    read) as a frozen T5EncoderModel in `dtype` (default float32). Built on the meta device, so T5-XXL's 4.7B
    parameters are allocated once, as read."""
    from transformers import T5EncoderModel

    shapes = read_shapes(path)
    prefix = _prefixed(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", TEXT_KEY_PREFIXES)
    if prefix is None:
        raise CheckpointError(f"--t5 {path}: not a T5 encoder (no encoder.block.0.layer.0.SelfAttention.q.weight)")
    shapes = {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    config = t5_config(shapes, f"--t5 {path}")
    state_dict = read_prefixed_tensors(path, prefix, dtype or torch.float32)
    state_dict.setdefault("encoder.embed_tokens.weight", state_dict.get("shared.weight"))  # tied to shared
    with torch.device("meta"):
        model = T5EncoderModel(config)
    describe_difference({k: tuple(v.shape) for k, v in model.state_dict().items()},
                        {k: tuple(v.shape) for k, v in state_dict.items() if v is not None},
                        what=f"--t5 {path}: tensors do not match a T5 encoder of its shapes",
                        expected_label="the layout", found_label="the file", error=CheckpointError)
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.set_input_embeddings(model.shared)  # one embedding again (assign made two parameters of one tensor)
    return model.to(device).eval().requires_grad_(False)


def tokenizer_file(path: str | Path) -> Path:
    """A tokenizer.json: `path`, or the one in the folder `path` names."""
    path = Path(path)
    candidate = path / "tokenizer.json" if path.is_dir() else path
    if not candidate.is_file():
        raise AfaError(f"--t5-tokenizer {path}: no tokenizer.json there (give T5's tokenizer.json, e.g. ComfyUI's "
                       f"comfy/text_encoders/t5_tokenizer/tokenizer.json)")
    return candidate


class T5Tokens:
    """T5's tokenizer from a `tokenizer.json` (the `tokenizers` library; no sentencepiece): each caption's tokens,
    then </s>, padded with <pad> (id 0) or truncated to `max_length`, as BFL's HFEmbedder tokenizes."""

    def __init__(self, path: str | Path, max_length: int):
        from tokenizers import Tokenizer

        self.path = tokenizer_file(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as error:  # noqa: BLE001 -- any parse failure of a user's file
            raise AfaError(f"--t5-tokenizer {self.path}: not a readable tokenizer.json ({error})") from None
        pad_id = self.tokenizer.token_to_id("<pad>")
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(length=max_length, pad_id=0 if pad_id is None else pad_id, pad_token="<pad>")

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """B captions -> token ids [B x max_length] (int64)."""
        return torch.tensor([encoding.ids for encoding in self.tokenizer.encode_batch(list(captions))],
                            dtype=torch.long)


@dataclass
class FluxTextEncoders:
    """CLIP-L and T5 with their tokenizers: what FLUX members read of a caption."""

    clip: torch.nn.Module
    t5: torch.nn.Module
    t5_tokens: T5Tokens

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """B captions -> (T5's last hidden state [B x max_length x 4096], CLIP-L's pooled output [B x 768]), as BFL's
        HFEmbedder encodes them (no attention masks, CLIP padded to 77 tokens)."""
        from .text_encoder import tokenize

        clip_ids = tokenize(list(captions)).to(self.clip.device)
        pooled = self.clip(input_ids=clip_ids).pooler_output
        t5_ids = self.t5_tokens(captions).to(self.t5.device)
        return self.t5(input_ids=t5_ids).last_hidden_state, pooled


class TextEncodingCache:
    """Each caption's encodings, one safetensors file per caption ("t5" [max_length x D], "pooled" [768]) named by
    the sha256 of (the encoders' identity, the caption): built once before training (`build`), read per batch
    (`load`). FLUX.1's are 4 MB per caption in bfloat16 (512 x 4096 T5 tokens)."""

    def __init__(self, folder: str | Path, identity: str):
        self.folder, self.identity = Path(folder), identity

    @staticmethod
    def identity_of(t5: str | Path, clip_l: str | Path, tokenizer: str | Path, max_length: int,
                    dtype: torch.dtype) -> str:
        """What the encodings depend on: the files' sha256, the T5 length and the encoders' dtype."""
        return (f"t5 {file_sha256(t5)}; clip-l {file_sha256(clip_l)}; "
                f"tokenizer {file_sha256(tokenizer_file(tokenizer))}; max_length {max_length}; "
                f"{str(dtype).replace('torch.', '')}")

    def path(self, caption: str) -> Path:
        key = hashlib.sha256(f"{self.identity}\0{caption}".encode("utf-8")).hexdigest()
        return self.folder / key[:2] / f"{key}.safetensors"

    def missing(self, captions: Sequence[str]) -> list[str]:
        """The distinct captions without a cached encoding, in first-seen order."""
        return [caption for caption in dict.fromkeys(captions) if not self.path(caption).is_file()]

    def build(self, captions: Sequence[str], load_encoders: Callable[[], FluxTextEncoders], batch_size: int = 8,
              log: Callable[[str], None] = print) -> int:
        """Encodes the captions not cached yet; the encoders are loaded (`load_encoders()`) only when some are, and
        let go afterwards. Returns how many were encoded."""
        from safetensors.torch import save_file

        missing = self.missing(captions)
        if not missing:
            return 0
        log(f"encoding {len(missing)} captions with CLIP-L and T5 into {self.folder}")
        encoders = load_encoders()
        for start in range(0, len(missing), batch_size):
            chunk = missing[start:start + batch_size]
            contexts, pooled = encoders.encode(chunk)
            for caption, context, vector in zip(chunk, contexts, pooled):
                path = self.path(caption)
                path.parent.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(path.name + ".tmp")
                save_file({"t5": context.cpu().contiguous(), "pooled": vector.cpu().contiguous()}, str(temporary),
                          metadata={"caption": caption, "identity": self.identity})
                temporary.replace(path)
        del encoders
        free_memory()
        return len(missing)

    def load(self, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """B captions -> (T5 tokens [B x max_length x D], pooled CLIP-L [B x 768]) on `device`."""
        from safetensors.torch import load_file

        contexts, pooled = [], []
        for caption in captions:
            path = self.path(caption)
            if not path.is_file():
                raise AfaError(f"{self.folder}: no cached text encoding of the caption {caption!r}")
            tensors = load_file(str(path))
            contexts.append(tensors["t5"])
            pooled.append(tensors["pooled"])
        return torch.stack(contexts).to(device), torch.stack(pooled).to(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- the frozen models ---------------------------------------------------------------------------------------------

@dataclass
class FrozenFlux:
    """What the trainer and the evaluator read for FLUX members (training/sd_checkpoint.FrozenModels' counterpart).

    Attributes:
        member_refs: name, sha256 and tensor fingerprint of each member, in order.
        members: afa.flux_model.Flux transformers, frozen. layout: their FluxLayout.
        vae: FluxVae (float32). vae_file: --vae (the latent cache's key).
        text: the captions' cached encodings (every member reads the same: one T5 and one CLIP-L).
        guidance: the distilled guidance value members with `guidance_in` read (FLUX.1 [dev]).
        timestep_sampling: the training draws of t (training/diffusion.py TIMESTEP_SAMPLINGS).
    """

    family: ClassVar[str] = "flux"
    member_refs: list[MemberRef]
    members: list[torch.nn.Module]
    layout: FluxLayout
    vae: FluxVae
    vae_file: Path
    text: TextEncodingCache
    guidance: float
    timestep_sampling: str
    flow: RectifiedFlow = RectifiedFlow()
    runner: object | None = None
    distinct_text_encoders: int = 1


def text_encoder_dtype(device: torch.device, mixed_precision: bool) -> torch.dtype:
    """bfloat16 on a GPU under mixed precision (T5-XXL overflows in float16; evaluate.py always asks for it on a
    GPU: T5-XXL is 19 GB in float32), else float32."""
    return torch.bfloat16 if device.type == "cuda" and mixed_precision else torch.float32


def load_frozen_flux(args, captions: Sequence[str], device: torch.device, member_dtype: torch.dtype | None,
                     text_dtype: torch.dtype, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
                     log: Callable[[str], None] = print, member_refs: Sequence[MemberRef] | None = None,
                     cache_dir: str | Path | None = None) -> FrozenFlux:
    """Checks the members' layout (headers only), encodes the captions not cached yet (the main process; CLIP-L and
    T5 are loaded only then, and freed before the members load), then loads the members and the VAE.

    `args`: members, vae, clip_l, t5, t5_tokenizer, t5_max_length, guidance, timestep_sampling, rope_axes, run_dir or
    text_cache_dir (train.py's and evaluate.py's flags).
    """
    check_flux_members(args.members)
    cache = TextEncodingCache(cache_dir or args.text_cache_dir or Path(args.run_dir) / "text-cache",
                              TextEncodingCache.identity_of(args.t5, args.clip_l, args.t5_tokenizer,
                                                            args.t5_max_length, text_dtype))

    def load_encoders() -> FluxTextEncoders:
        log(f"loading CLIP-L {args.clip_l} and T5 {args.t5} ({str(text_dtype)[6:]}) on {device}")
        return FluxTextEncoders(load_clip_l(args.clip_l, device, text_dtype), load_t5(args.t5, device, text_dtype),
                                T5Tokens(args.t5_tokenizer, args.t5_max_length))

    if is_main:
        cache.build(list(captions) + [""], load_encoders, log=log)  # "": the dropped captions' encoding
    barrier()
    members, layout, refs = load_flux_members(args.members, device, member_dtype, args.rope_axes, member_refs)
    vae = load_flux_vae(args.vae, device)
    return FrozenFlux(refs, members, layout, vae, Path(args.vae), cache, float(args.guidance),
                      args.timestep_sampling)


# -- the objective: model inputs, the loss, the rows of the tables -------------------------------------------------

@torch.no_grad()
def prepare_flux_batch(batch: dict, frozen: FrozenFlux, seed: int, device: torch.device,
                       epoch: int = VALIDATION_EPOCH, caption_dropout: float = 0.0, sample_latents: bool = False,
                       sampling: str | None = None) -> dict:
    """The model inputs of a `collate` batch with its draws (training/metrics.prepare_batch's FLUX counterpart).

    Args:
        sampling: how t is drawn (training/diffusion.py `draw_flow_for_samples`): the run's --timestep-sampling in
            training, None (uniform, unshifted) for validation and evaluation.
    Returns:
        {"noisy", "target", "latents", "noise"} [B x 16 x h x w], "timesteps" [B] float t in [0, 1],
        "member_contexts" N x [B x L x D] (one tensor, every member reads it), "member_vectors" N x [B x 768],
        "guidance" [B].
    """
    mean, std = batch_posterior(batch, frozen.vae, device, sample_latents)
    draws = draw_flow_for_samples(batch["indices"], seed, epoch, tuple(mean.shape[1:]), caption_dropout, sampling,
                                  posterior_noise=sample_latents)
    latents = mean + std * draws.posterior_noise.to(device) if sample_latents else mean
    captions = ["" if drop else caption for caption, drop in zip(batch["captions"], draws.drop_caption)]
    context, pooled = frozen.text.load(captions, device)
    timesteps, noise = draws.timesteps.to(device), draws.noise.to(device)
    count = len(frozen.members)
    return {"noisy": frozen.flow.add_noise(latents, noise, timesteps), "timesteps": timesteps,
            "member_contexts": [context] * count, "member_vectors": [pooled] * count,
            "target": frozen.flow.target(latents, noise, timesteps), "latents": latents, "noise": noise,
            "guidance": torch.full((latents.shape[0],), frozen.guidance, device=device)}


class FluxMicroBatchLoss:
    """train.py's MicroBatchLoss for FLUX members: the sum of the micro-batch's per-sample flow-matching MSEs
    (velocity), scaled by processes / --batch-size."""

    def __init__(self, frozen: FrozenFlux, sample_latents: bool, seed: int, caption_dropout: float, batch_size: int,
                 autocast: contextlib.AbstractContextManager, device: torch.device, world_size: int):
        self.frozen, self.sample_latents, self.seed = frozen, sample_latents, seed
        self.caption_dropout, self.batch_size = caption_dropout, batch_size
        self.autocast, self.device, self.world_size = autocast, device, world_size

    def __call__(self, model: torch.nn.Module, batch: dict, epoch: int) -> torch.Tensor | None:
        if not batch["indices"]:
            return None
        inputs = prepare_flux_batch(batch, self.frozen, self.seed, self.device, epoch, self.caption_dropout,
                                    self.sample_latents, self.frozen.timestep_sampling)
        with self.autocast:
            prediction = model(inputs["noisy"], inputs["timesteps"], guidance=inputs["guidance"],
                               member_contexts=inputs["member_contexts"], member_vectors=inputs["member_vectors"])
        return per_sample_mse(prediction, inputs["target"]).sum() * self.world_size / self.batch_size


def flux_member_alone(member: torch.nn.Module, guidance: float) -> Callable:
    """A FLUX member on its own as training/metrics.py's ModelCall: (x_t, t, member_contexts, member_vectors) ->
    velocity [B x 16 x h x w] (float32), reading the shared encodings and the run's guidance."""
    dtype = member.img_in.weight.dtype

    def call(noisy, timesteps, member_contexts, member_vectors=None):
        guidance_values = torch.full_like(timesteps, guidance, dtype=torch.float32)
        vector = member_vectors[0].to(dtype) if member_vectors is not None else None
        return member(noisy.to(dtype), timesteps, member_contexts[0].to(dtype), vector, guidance_values).float()
    return call


def flux_ensemble_reading(ensemble: torch.nn.Module, guidance: float) -> Callable:
    """An EnsembleFlux as a ModelCall: every member and SABW read the shared encodings, with the run's guidance."""
    def call(noisy, timesteps, member_contexts, member_vectors=None):
        guidance_values = torch.full_like(timesteps, guidance, dtype=torch.float32)
        return ensemble(noisy, timesteps, member_contexts[0],
                        member_vectors[0] if member_vectors is not None else None, guidance_values).float()
    return call


def flux_denoising_errors(models: dict[str, Callable], loader, frozen: FrozenFlux, seed: int,
                          device: torch.device) -> dict[str, dict[str, float]]:
    """Held-out flow-matching MSE (velocity) of each model, overall and per quarter of t (metrics.
    FLOW_TIMESTEP_RANGES), on identical draws: t uniform in [0, 1), the latents the VAE posterior's means."""
    from .metrics import FLOW_TIMESTEP_RANGES, denoising_errors

    return denoising_errors(models, loader, None, [], None, seed, device, ranges=FLOW_TIMESTEP_RANGES,
                            prepare=lambda batch: prepare_flux_batch(batch, frozen, seed, device))
