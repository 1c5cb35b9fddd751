"""SABW: the Spatial-Aware Block-Wise feature aggregator (paper section 3.3).

One `SabwBlock` per UNet block turns the N members' output features of that block into N weight maps:

    features (N x [B x C x H x W]) -> concat [B x N*C x H x W] -> (fast: pool to at most R x R)
      -> input projection (1x1 conv) -> ResNet layer (+ time embedding) -> Transformer layer(s)
         (attention to the text context) -> zero-initialised output conv -> logits [B x N x h x w]
      -> (fast: bilinear upsampling to H x W) -> softmax over members -> weights [B x N x H x W]

Two designs (`AggregatorConfig.design`), each the default of a preset (`preset_config`):

* `paper` -- the authors' aggregator (GitHub Tenvence/afa, `models/modules/aggregator.py`) module for module:
  1x1 conv with bias (N*C -> 128), diffusers' `ResnetBlock2D` (GroupNorm eps 1e-6) whose time input is the mean of
  the members' own time embeddings, `Transformer2DModel` with 2 `BasicTransformerBlock`s (self-attention over all
  H*W pixels, cross-attention to the text, GEGLU feed-forward; 8 heads x 16) at every block's full resolution, and a
  bias-free zero-initialised 1x1 conv to N logits. 42,425,344 parameters for SD 1.5 with 2 members, +2,707,072 per
  member (the paper's Appendix B). Parameter names follow diffusers' (`res_block.norm1`, `transformer.
  transformer_blocks.0.attn1.to_q`, ...) mapped onto ours by `afa.official`.
* `fast` -- AFA's own, cheaper block (format 1 files are all `fast`): pixels cross-attend to the text without
  self-attention, the 64x64 blocks are pooled to 32x32 (`max_resolution`), a GroupNorm-SiLU-3x3 conv head, and a time
  MLP of its own. SD 1.5, N=2 at 512 px: 37.9M parameters and 2.1% of the members' FLOPs, against the paper design's
  12.9% (its self-attention over the 4096 tokens of the 64x64 blocks); `python -m afa bench --preset` prints both.

The output convolution starts at zero, so an untrained aggregator gives every member weight 1/N at every pixel:
training starts from block-wise averaging, "a completely equitable state".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import MembersMismatchError, WeightsFileError
from .unet import block_name


def flux_block_names(num_double_blocks: int, num_single_blocks: int) -> list[str]:
    """The module names of a FLUX-layout transformer's blocks in forward order: double_blocks.*, single_blocks.*."""
    return ([f"double_blocks.{index}" for index in range(num_double_blocks)]
            + [f"single_blocks.{index}" for index in range(num_single_blocks)])

DESIGNS = ("fast", "paper")
TEXT_CONDITIONINGS = ("per_member", "shared")
FAMILIES = ("unet", "flux")
FAMILY_LABELS = {"unet": "UNet members (SD 1.x, SD 2.x, SDXL)", "flux": "FLUX transformer members"}
TEXT_MIXINGS = ("image-mean", "average")


@dataclass
class AggregatorConfig:
    """Everything needed to rebuild an aggregator and feed it as it was trained; stored as JSON with every weights
    file.

    Serialised field names are permanent: add fields (with defaults that keep older files meaning what they meant),
    never rename them. The defaults of the fields added in format 2 are what every format 1 file was; those of format 3
    (family, num_double_blocks, text_mixing) are what every format 1 and 2 file was (UNet members).

    Attributes:
        num_members: N, the number of ensembled UNets.
        block_channels: output channels of each UNet block in forward order (K = 25 for SD 1.x/2.x, 19 for SDXL);
            the last entry is the UNet's out_channels (the last block includes the output head).
        hidden_channels: width of each SABW block; a multiple of 32 (GroupNorm uses 32 groups).
        num_heads: attention heads (must divide hidden_channels).
        context_dim: width of the text context the UNet's cross-attention reads (768 SD1, 1024 SD2, 2048 SDXL).
        max_resolution: weights are computed on features pooled to at most this size per side (None = full size).
        spatial: False gives one weight per member per block (the paper's "w/o spatial location" ablation).
        use_timestep: condition on the time ("w/o timestep" ablation when False).
        use_text: cross-attend to the text context ("w/o textual condition" ablation when False).
        only_last_block: one SABW block, on the last block only ("only ensembling last block"); the members
            then run independently up to their predictions.
        design: "fast" or "paper" (module docstring).
        transformer_depth: transformer blocks per SABW block ("paper" design; "fast" has one cross-attention layer).
        member_time_embed_dim: width of the members' time embeddings (4 x model_channels: 1280 for SD 1.5); the
            "paper" design reads their mean. None for "fast", which embeds the timestep itself.
        norm_eps: epsilon of the GroupNorms of the ResNet and Transformer layers (diffusers: 1e-6).
        text_conditioning: how the members read the prompt in training, and so how they must read it at inference:
            "per_member" (each member's cross-attention reads the prompt encoded by that member's own text encoder;
            SABW reads the mean of the encodings, as the authors' code does) or "shared" (every member and SABW read
            one encoder's encoding: the first member's in training, the loaded model's in the WebUI).
        clip_skip: the CLIP skip the text encodings were made with in training (1 = the last layer).
        family: the members' architecture: "unet" (ldm UNets: blocks input_blocks.*, middle_block, output_blocks.*)
            or "flux" (FLUX-layout transformers: double_blocks.*, then single_blocks.*; afa.flux). Format 3 added
            it; older files are all "unet".
        num_double_blocks: "flux": how many of the blocks are double-stream blocks (the rest are single-stream);
            0 for "unet".
        text_mixing: "flux": how the text tokens (the text stream of double blocks, the text part of single blocks)
            are mixed: "image-mean" (member i's weight is the mean of its image-token weights, per sample) or
            "average" (1/N); see afa.flux. Ignored by "unet".
    """

    num_members: int
    block_channels: list[int]
    hidden_channels: int = 160
    num_heads: int = 4
    context_dim: int = 768
    max_resolution: int | None = 32
    spatial: bool = True
    use_timestep: bool = True
    use_text: bool = True
    only_last_block: bool = False
    design: str = "fast"
    transformer_depth: int = 1
    member_time_embed_dim: int | None = None
    norm_eps: float = 1e-5
    text_conditioning: str = "shared"
    clip_skip: int = 1
    family: str = "unet"
    num_double_blocks: int = 0
    text_mixing: str = "image-mean"

    def __post_init__(self):
        self.block_channels = [int(c) for c in self.block_channels]
        problems = []
        if self.num_members < 2:
            problems.append(f"num_members must be at least 2, got {self.num_members}")
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        elif self.family == "unet" and (len(self.block_channels) < 3 or len(self.block_channels) % 2 == 0):
            problems.append(f"block_channels needs an odd number (2 * input blocks + 1) of entries, "
                            f"got {len(self.block_channels)}")
        elif self.family == "unet" and self.num_double_blocks:
            problems.append(f"UNets have no double blocks, got num_double_blocks {self.num_double_blocks}")
        elif self.family == "flux" and not 0 <= self.num_double_blocks <= len(self.block_channels) - 1:
            problems.append(f"num_double_blocks must be 0..{len(self.block_channels) - 1} (at least one single "
                            f"block), got {self.num_double_blocks}")
        if self.text_mixing not in TEXT_MIXINGS:
            problems.append(f"text_mixing must be one of {', '.join(TEXT_MIXINGS)}, got {self.text_mixing!r}")
        if self.hidden_channels <= 0 or self.hidden_channels % 32:
            problems.append(f"hidden_channels must be a positive multiple of 32, got {self.hidden_channels}")
        if self.num_heads <= 0 or self.hidden_channels % self.num_heads:
            problems.append(f"num_heads ({self.num_heads}) must divide hidden_channels ({self.hidden_channels})")
        if self.max_resolution is not None and self.max_resolution < 1:
            problems.append(f"max_resolution must be None or >= 1, got {self.max_resolution}")
        if self.design not in DESIGNS:
            problems.append(f"design must be one of {', '.join(DESIGNS)}, got {self.design!r}")
        if self.design == "fast" and self.transformer_depth != 1:
            problems.append(f"the fast design has one transformer layer, got transformer_depth "
                            f"{self.transformer_depth}")
        if self.transformer_depth < 1:
            problems.append(f"transformer_depth must be at least 1, got {self.transformer_depth}")
        if self.design == "paper" and self.use_timestep and not self.member_time_embed_dim:
            problems.append("the paper design reads the members' time embeddings: member_time_embed_dim is needed")
        if self.design == "fast" and self.member_time_embed_dim is not None:
            problems.append("the fast design embeds the timestep itself: member_time_embed_dim must be None")
        if self.text_conditioning not in TEXT_CONDITIONINGS:
            problems.append(f"text_conditioning must be one of {', '.join(TEXT_CONDITIONINGS)}, "
                            f"got {self.text_conditioning!r}")
        if self.clip_skip < 1:
            problems.append(f"clip_skip must be at least 1, got {self.clip_skip}")
        if problems:
            raise ValueError("invalid AggregatorConfig: " + "; ".join(problems))

    @property
    def num_blocks(self) -> int:
        return len(self.block_channels)

    @property
    def num_input_blocks(self) -> int:
        """UNets: input blocks (= output blocks); 0 for FLUX."""
        return (self.num_blocks - 1) // 2 if self.family == "unet" else 0

    @property
    def block_names(self) -> list[str]:
        """The members' module name of every block in forward order (`input_blocks.0`, ..., or `double_blocks.0`,
        ..., `single_blocks.37`): the SABW block of block k is named like it."""
        if self.family == "flux":
            return flux_block_names(self.num_double_blocks, self.num_blocks - self.num_double_blocks)
        return [block_name(index, self.num_input_blocks) for index in range(self.num_blocks)]

    @property
    def aggregated_blocks(self) -> list[int]:
        """Indices of the blocks that have a SABW block."""
        return [self.num_blocks - 1] if self.only_last_block else list(range(self.num_blocks))

    @property
    def reads_member_time_embeddings(self) -> bool:
        return self.use_timestep and self.member_time_embed_dim is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "AggregatorConfig":
        """Builds a config from its JSON form; unknown or missing fields are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        unknown, missing = sorted(set(values) - names), sorted(required - set(values))
        if unknown or missing:
            raise WeightsFileError(f"{source}: aggregator config has unknown fields {unknown} / lacks {missing}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as error:
            raise WeightsFileError(f"{source}: {error}") from None


def check_family(config: AggregatorConfig, family: str, source: str = "these SABW weights") -> None:
    """Refuses weights trained for members of another family ("unet" or "flux") than the members given."""
    if config.family != family:
        raise MembersMismatchError(f"{source} were trained for {FAMILY_LABELS.get(config.family, config.family)}; "
                                   f"these members are {FAMILY_LABELS.get(family, family)}: train SABW weights for "
                                   f"these members")


SABW_PRESETS = {
    # The authors' aggregator (Tenvence/afa as it ran: depth 2, see the module docstring).
    "paper": dict(design="paper", hidden_channels=128, num_heads=8, transformer_depth=2, max_resolution=None,
                  norm_eps=1e-6),
    # AFA's own cheaper block (the only design before format 2).
    "fast": dict(design="fast", hidden_channels=160, num_heads=4, transformer_depth=1, max_resolution=32,
                 norm_eps=1e-5),
}
DEFAULT_PRESET = "paper"


def preset_config(preset: str, num_members: int, block_channels: Sequence[int], context_dim: int,
                  member_time_embed_dim: int | None = None, **overrides) -> AggregatorConfig:
    """The config of a preset ("paper" or "fast") for members with these block channels; `overrides` set any other
    field (ablations, text_conditioning, clip_skip, a width, the family). `member_time_embed_dim`: the width of the
    members' time embeddings the paper design reads (default: an ldm UNet's, 4 x the first block's channels)."""
    if preset not in SABW_PRESETS:
        raise ValueError(f"unknown SABW preset {preset!r}; choose one of {', '.join(SABW_PRESETS)}")
    values = dict(SABW_PRESETS[preset])
    if values["design"] == "paper":
        # ldm's UNetModel: time_embed_dim = 4 * model_channels, and the first block (conv_in) has model_channels.
        values["member_time_embed_dim"] = member_time_embed_dim or 4 * int(block_channels[0])
    values.update(overrides)
    return AggregatorConfig(num_members=num_members, block_channels=list(block_channels), context_dim=context_dim,
                            **values)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embedding (as in ldm/guided-diffusion). timesteps [B] (may be fractional) -> [B x dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                  device=timesteps.device) / half)
    arguments = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(arguments), torch.sin(arguments)], dim=-1)


class ResnetLayer(nn.Module):
    """GroupNorm-SiLU-conv3x3, plus the time embedding, GroupNorm-SiLU-conv3x3, residual. [B x C x h x w].

    diffusers' `ResnetBlock2D(C, temb_channels)` with in = out channels computes the same (norm1/conv1, SiLU +
    time_emb_proj, norm2/conv2 are in_layers.0/.2, emb_layers.1, out_layers.0/.2 here)."""

    def __init__(self, channels: int, time_embed_dim: int | None, eps: float = 1e-5):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=eps), nn.SiLU(),
                                       nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = (nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, channels))
                           if time_embed_dim is not None else None)
        self.out_layers = nn.Sequential(nn.GroupNorm(32, channels, eps=eps), nn.SiLU(),
                                        nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor | None) -> torch.Tensor:
        h = self.in_layers(x)
        if self.emb_layers is not None:
            h = h + self.emb_layers(time_embedding.to(h.dtype))[:, :, None, None]
        return x + self.out_layers(h)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention. q [B x L x C], k and v [B x M x C] -> [B x L x C]."""
    q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=num_heads) for t in (q, k, v))
    return rearrange(F.scaled_dot_product_attention(q, k, v), "b h n d -> b n (h d)")


class TransformerLayer(nn.Module):
    """The fast design's transformer: pixels cross-attend to the text context, then a GEGLU feed-forward; residual.
    [B x C x h x w].

    There is deliberately no self-attention over pixels (cost; see the module docstring). With `context_dim=None`
    (the "w/o textual condition" ablation) only the feed-forward remains.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int | None, eps: float = 1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(32, channels, eps=eps)
        self.proj_in = nn.Linear(channels, channels)
        if context_dim is not None:
            self.attn_norm = nn.LayerNorm(channels)
            self.to_q = nn.Linear(channels, channels, bias=False)
            self.to_k = nn.Linear(context_dim, channels, bias=False)
            self.to_v = nn.Linear(context_dim, channels, bias=False)
            self.to_out = nn.Linear(channels, channels)
        self.use_text = context_dim is not None
        self.ff_norm = nn.LayerNorm(channels)
        self.ff_in = nn.Linear(channels, channels * 8)  # GEGLU: value and gate of width 4C
        self.ff_out = nn.Linear(channels * 4, channels)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))
        if self.use_text:
            context = context.to(h.dtype)
            attention = _attend(self.to_q(self.attn_norm(h)), self.to_k(context), self.to_v(context), self.num_heads)
            h = h + self.to_out(attention)
        value, gate = self.ff_in(self.ff_norm(h)).chunk(2, dim=-1)
        h = h + self.ff_out(value * F.gelu(gate))
        h = self.proj_out(h)
        return x + rearrange(h, "b (h w) c -> b c h w", h=height, w=width)


class Attention(nn.Module):
    """Multi-head attention of tokens [B x L x C] to themselves (`context_dim=None`) or to a context [B x M x D]:
    diffusers' `Attention` (bias-free q/k/v, output projection with bias)."""

    def __init__(self, channels: int, num_heads: int, context_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_dim or channels, channels, bias=False)
        self.to_v = nn.Linear(context_dim or channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = h if context is None else context.to(h.dtype)
        return self.to_out(_attend(self.to_q(h), self.to_k(source), self.to_v(source), self.num_heads))


class TransformerBlock(nn.Module):
    """diffusers' `BasicTransformerBlock` as the paper design uses it, on tokens [B x L x C]: self-attention,
    cross-attention to the text (absent with `context_dim=None`), GEGLU feed-forward, each pre-LayerNorm with a
    residual."""

    def __init__(self, channels: int, num_heads: int, context_dim: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.self_attention = Attention(channels, num_heads)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(channels)
            self.cross_attention = Attention(channels, num_heads, context_dim)
        self.use_text = context_dim is not None
        self.norm3 = nn.LayerNorm(channels)
        self.ff_in = nn.Linear(channels, channels * 8)  # GEGLU: value and gate of width 4C
        self.ff_out = nn.Linear(channels * 4, channels)

    def forward(self, h: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        h = h + self.self_attention(self.norm1(h))
        if self.use_text:
            h = h + self.cross_attention(self.norm2(h), context)
        value, gate = self.ff_in(self.norm3(h)).chunk(2, dim=-1)
        return h + self.ff_out(value * F.gelu(gate))


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel` (continuous input, conv projections) as the paper design uses it:
    GroupNorm, 1x1 conv in, `depth` transformer blocks over all h*w pixels, 1x1 conv out, residual.
    [B x C x h x w] -> same."""

    def __init__(self, channels: int, num_heads: int, context_dim: int | None, depth: int, eps: float):
        super().__init__()
        self.norm = nn.GroupNorm(32, channels, eps=eps)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.blocks = nn.ModuleList(TransformerBlock(channels, num_heads, context_dim) for _ in range(depth))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        height, width = x.shape[-2:]
        h = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")
        for block in self.blocks:
            h = block(h, context)
        return x + self.proj_out(rearrange(h, "b (h w) c -> b c h w", h=height, w=width))


class SabwBlock(nn.Module):
    """The aggregator of one UNet block: N member features -> N logit maps (before softmax)."""

    def __init__(self, member_channels: int, config: AggregatorConfig, time_embed_dim: int | None):
        super().__init__()
        hidden = config.hidden_channels
        context_dim = config.context_dim if config.use_text else None
        self.input_proj = nn.Conv2d(config.num_members * member_channels, hidden, 1)
        self.resnet = ResnetLayer(hidden, time_embed_dim, config.norm_eps)
        if config.design == "paper":
            self.transformer = SpatialTransformer(hidden, config.num_heads, context_dim, config.transformer_depth,
                                                  config.norm_eps)
            self.out = nn.Conv2d(hidden, config.num_members, 1, bias=False)
            nn.init.zeros_(self.out.weight)  # equal weights before training (paper eq. 11)
        else:
            self.transformer = TransformerLayer(hidden, config.num_heads, context_dim, config.norm_eps)
            self.out = nn.Sequential(nn.GroupNorm(32, hidden, eps=config.norm_eps), nn.SiLU(),
                                     nn.Conv2d(hidden, config.num_members, 3, padding=1))
            nn.init.zeros_(self.out[-1].weight)
            nn.init.zeros_(self.out[-1].bias)

    def forward(self, stacked: torch.Tensor, time_embedding: torch.Tensor | None,
                context: torch.Tensor | None) -> torch.Tensor:
        """stacked [B x N*C x h x w] -> logits [B x N x h x w]."""
        h = self.resnet(self.input_proj(stacked), time_embedding)
        h = self.transformer(h, context)
        return self.out(h)


def _pooled_size(height: int, width: int, max_resolution: int | None) -> tuple[int, int]:
    """The size features are pooled to: an integer factor keeps the aspect ratio and pixel alignment."""
    if max_resolution is None or max(height, width) <= max_resolution:
        return height, width
    factor = math.ceil(max(height, width) / max_resolution)
    return math.ceil(height / factor), math.ceil(width / factor)


class Aggregator(nn.Module):
    """All SABW blocks of an ensemble, named after the member blocks they follow.

    Parameter names mirror the members': `input_blocks.3.*`, `middle_block.*`, `output_blocks.11.*` (UNets) or
    `double_blocks.0.*`, `single_blocks.37.*` (FLUX), plus, in the fast design, the shared `time_embed.*` (the
    paper's tau(t)).
    """

    def __init__(self, config: AggregatorConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_channels
        if not config.use_timestep:
            time_embed_dim = None
        elif config.reads_member_time_embeddings:
            time_embed_dim = config.member_time_embed_dim
        else:
            time_embed_dim = 4 * hidden
            self.time_embed = nn.Sequential(nn.Linear(hidden, time_embed_dim), nn.SiLU(),
                                            nn.Linear(time_embed_dim, time_embed_dim))
        self.block_names = names = config.block_names
        groups = ("double_blocks", "single_blocks") if config.family == "flux" else ("input_blocks", "output_blocks")
        for group in groups:
            setattr(self, group, nn.ModuleDict())
            if group == "input_blocks":
                self.middle_block = None
        for block_index in config.aggregated_blocks:
            block = SabwBlock(config.block_channels[block_index], config, time_embed_dim)
            name = names[block_index]
            if name == "middle_block":
                self.middle_block = block
            else:
                group, index = name.split(".")
                getattr(self, group)[index] = block

    def block(self, block_index: int) -> SabwBlock:
        name = self.block_names[block_index]
        if name == "middle_block":
            block = self.middle_block
        else:
            group, index = name.split(".")
            block = getattr(self, group)[index] if index in getattr(self, group) else None
        if block is None:
            raise KeyError(f"this aggregator has no SABW block for {name} (only_last_block="
                           f"{self.config.only_last_block})")
        return block

    def embed_time(self, timesteps: torch.Tensor,
                   member_embeddings: Sequence[torch.Tensor] | None = None) -> torch.Tensor | None:
        """The time input of every SABW block, computed once per UNet call.

        Args:
            timesteps: [B].
            member_embeddings: the members' own time embeddings, N x [B x member_time_embed_dim] (what their
                ResNet blocks read); the paper design reads their mean.
        Returns:
            [B x D] (D = 4*hidden in the fast design, member_time_embed_dim in the paper design), or None without
            timestep conditioning.
        """
        if not self.config.use_timestep:
            return None
        if self.config.reads_member_time_embeddings:
            if member_embeddings is None:
                raise ValueError("this aggregator reads the members' time embeddings: pass member_embeddings")
            return torch.stack([embedding.float() for embedding in member_embeddings]).mean(dim=0)
        parameter = self.time_embed[0].weight
        return self.time_embed(timestep_embedding(timesteps, self.config.hidden_channels).to(parameter.dtype))

    def forward(self, block_index: int, features: list[torch.Tensor], time_embedding: torch.Tensor | None,
                context: torch.Tensor | None) -> torch.Tensor:
        """The weights of block `block_index`.

        Args:
            features: N member outputs of this block, each [B x C x H x W].
            time_embedding: `embed_time(...)`, [B x D] (None without timestep conditioning).
            context: the text context SABW reads, [B x L x context_dim] (with per-member text conditioning, the
                mean of the members' contexts).
        Returns:
            weights [B x N x H x W] (or [B x N x 1 x 1] when not spatial), summing to one over N at every pixel.
        """
        if len(features) != self.config.num_members:
            raise ValueError(f"aggregator built for {self.config.num_members} members got {len(features)} features")
        parameter = self.block(block_index).input_proj.weight
        stacked = torch.cat(features, dim=1).to(parameter.dtype)
        height, width = stacked.shape[-2:]
        pooled_size = _pooled_size(height, width, self.config.max_resolution)
        if pooled_size != (height, width):
            stacked = F.adaptive_avg_pool2d(stacked, pooled_size)
        logits = self.block(block_index)(stacked, time_embedding, context)
        if not self.config.spatial:
            logits = logits.mean(dim=(2, 3), keepdim=True)
        elif logits.shape[-2:] != (height, width):
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
        return logits.float().softmax(dim=1)
