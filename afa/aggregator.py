"""SABW: the Spatial-Aware Block-Wise feature aggregator (paper section 3.3).

One `SabwBlock` per UNet block turns the N members' output features of that block into N weight maps:

    features (N x [B x C x H x W]) -> concat [B x N*C x H x W] -> pool to at most R x R
      -> input projection (1x1 conv) -> ResNet layer (+ timestep embedding) -> Transformer layer
         (cross-attention to the text context) -> zero-initialised 3x3 conv -> logits [B x N x h x w]
      -> bilinear upsampling to H x W -> softmax over members -> weights [B x N x H x W]

Cost: the paper runs this at every block's full resolution. Measured on CPU, a prototype whose transformer
self-attended over the 4096 tokens of the 64x64 blocks cost 14-26% of N UNets at 512 px. Two choices keep SABW
within a budget of 3% of N UNets (SD 1.5 at 512 px, N=2, default width 160: SABW adds 2.1% to the members' FLOPs,
0.8% at 768 px; `python -m afa bench` prints FLOP and time ratios):
  * the Transformer layer has cross-attention to the text only, no self-attention over pixels (the paper's insight is
    that weights can be computed "on each spatial location individually", conditioned on prompt and timestep);
  * weights are computed on features average-pooled to at most `max_resolution` (default 32) per side and the logits
    upsampled bilinearly; at 512 px only the six 64x64 blocks are pooled, to 32x32 (16 px of image per weight).
    `max_resolution=None` computes them at full resolution as in the paper.

The output convolution starts at zero, so an untrained aggregator gives every member weight 1/N at every pixel:
training starts from block-wise averaging, "a completely equitable state".
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import WeightsFileError
from .unet import block_name


@dataclass
class AggregatorConfig:
    """Everything needed to rebuild an aggregator; stored as JSON with every weights file.

    Serialised field names are permanent: add fields (with defaults), never rename them.

    Attributes:
        num_members: N, the number of ensembled UNets.
        block_channels: output channels of each UNet block in forward order (K = 25 for SD 1.x/2.x, 19 for SDXL);
            the last entry is the UNet's out_channels (the last block includes the output head).
        hidden_channels: width of each SABW block; a multiple of 32 (GroupNorm uses 32 groups).
        num_heads: attention heads of the cross-attention (must divide hidden_channels).
        context_dim: width of the text context the UNet's cross-attention reads (768 SD1, 1024 SD2, 2048 SDXL).
        max_resolution: weights are computed on features pooled to at most this size per side (None = full size).
        spatial: False gives one weight per member per block (the paper's "w/o spatial location" ablation).
        use_timestep: add a timestep embedding in the ResNet layer ("w/o timestep" ablation when False).
        use_text: cross-attend to the text context ("w/o textual condition" ablation when False).
        only_last_block: one SABW block, on the last block only ("only ensembling last block"); the members
            then run independently up to their predictions.
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

    def __post_init__(self):
        self.block_channels = [int(c) for c in self.block_channels]
        problems = []
        if self.num_members < 2:
            problems.append(f"num_members must be at least 2, got {self.num_members}")
        if len(self.block_channels) < 3 or len(self.block_channels) % 2 == 0:
            problems.append(f"block_channels needs an odd number (2 * input blocks + 1) of entries, "
                            f"got {len(self.block_channels)}")
        if self.hidden_channels <= 0 or self.hidden_channels % 32:
            problems.append(f"hidden_channels must be a positive multiple of 32, got {self.hidden_channels}")
        if self.num_heads <= 0 or self.hidden_channels % self.num_heads:
            problems.append(f"num_heads ({self.num_heads}) must divide hidden_channels ({self.hidden_channels})")
        if self.max_resolution is not None and self.max_resolution < 1:
            problems.append(f"max_resolution must be None or >= 1, got {self.max_resolution}")
        if problems:
            raise ValueError("invalid AggregatorConfig: " + "; ".join(problems))

    @property
    def num_blocks(self) -> int:
        return len(self.block_channels)

    @property
    def num_input_blocks(self) -> int:
        return (self.num_blocks - 1) // 2

    @property
    def aggregated_blocks(self) -> list[int]:
        """Indices of the blocks that have a SABW block."""
        return [self.num_blocks - 1] if self.only_last_block else list(range(self.num_blocks))

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


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal timestep embedding (as in ldm/guided-diffusion). timesteps [B] (may be fractional) -> [B x dim]."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                                  device=timesteps.device) / half)
    arguments = timesteps.float()[:, None] * frequencies[None]
    return torch.cat([torch.cos(arguments), torch.sin(arguments)], dim=-1)


class ResnetLayer(nn.Module):
    """GroupNorm-SiLU-conv3x3, plus the timestep embedding, GroupNorm-SiLU-conv3x3, residual. [B x C x h x w]."""

    def __init__(self, channels: int, time_embed_dim: int | None):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))
        self.emb_layers = (nn.Sequential(nn.SiLU(), nn.Linear(time_embed_dim, channels))
                           if time_embed_dim is not None else None)
        self.out_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor, time_embedding: torch.Tensor | None) -> torch.Tensor:
        h = self.in_layers(x)
        if self.emb_layers is not None:
            h = h + self.emb_layers(time_embedding)[:, :, None, None]
        return x + self.out_layers(h)


class TransformerLayer(nn.Module):
    """Pixels cross-attend to the text context, then a GEGLU feed-forward; residual. [B x C x h x w].

    There is deliberately no self-attention over pixels (cost; see the module docstring). With `context_dim=None`
    (the "w/o textual condition" ablation) only the feed-forward remains.
    """

    def __init__(self, channels: int, num_heads: int, context_dim: int | None):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(32, channels)
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
            heads = self.num_heads
            q = rearrange(self.to_q(self.attn_norm(h)), "b n (h d) -> b h n d", h=heads)
            context = context.to(q.dtype)
            k = rearrange(self.to_k(context), "b n (h d) -> b h n d", h=heads)
            v = rearrange(self.to_v(context), "b n (h d) -> b h n d", h=heads)
            attention = F.scaled_dot_product_attention(q, k, v)
            h = h + self.to_out(rearrange(attention, "b h n d -> b n (h d)"))
        value, gate = self.ff_in(self.ff_norm(h)).chunk(2, dim=-1)
        h = h + self.ff_out(value * F.gelu(gate))
        h = self.proj_out(h)
        return x + rearrange(h, "b (h w) c -> b c h w", h=height, w=width)


class SabwBlock(nn.Module):
    """The aggregator of one UNet block: N member features -> N logit maps (before softmax)."""

    def __init__(self, member_channels: int, config: AggregatorConfig, time_embed_dim: int | None):
        super().__init__()
        hidden = config.hidden_channels
        self.input_proj = nn.Conv2d(config.num_members * member_channels, hidden, 1)
        self.resnet = ResnetLayer(hidden, time_embed_dim)
        self.transformer = TransformerLayer(hidden, config.num_heads, config.context_dim if config.use_text else None)
        self.out = nn.Sequential(nn.GroupNorm(32, hidden), nn.SiLU(), nn.Conv2d(hidden, config.num_members, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # equal weights before training (paper eq. 11)
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
    """All SABW blocks of an ensemble, named after the UNet blocks they follow.

    Parameter names mirror the UNet's: `input_blocks.3.*`, `middle_block.*`, `output_blocks.11.*`, plus the shared
    `time_embed.*` (the paper's tau(t)).
    """

    def __init__(self, config: AggregatorConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_channels
        time_embed_dim = 4 * hidden if config.use_timestep else None
        if time_embed_dim is not None:
            self.time_embed = nn.Sequential(nn.Linear(hidden, time_embed_dim), nn.SiLU(),
                                            nn.Linear(time_embed_dim, time_embed_dim))
        self.input_blocks = nn.ModuleDict()
        self.middle_block = None
        self.output_blocks = nn.ModuleDict()
        for block_index in config.aggregated_blocks:
            block = SabwBlock(config.block_channels[block_index], config, time_embed_dim)
            name = block_name(block_index, config.num_input_blocks)
            if name == "middle_block":
                self.middle_block = block
            else:
                group, index = name.split(".")
                getattr(self, group)[index] = block

    def block(self, block_index: int) -> SabwBlock:
        name = block_name(block_index, self.config.num_input_blocks)
        if name == "middle_block":
            block = self.middle_block
        else:
            group, index = name.split(".")
            block = getattr(self, group)[index] if index in getattr(self, group) else None
        if block is None:
            raise KeyError(f"this aggregator has no SABW block for {name} (only_last_block="
                           f"{self.config.only_last_block})")
        return block

    def embed_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """timesteps [B] -> [B x 4*hidden], computed once per UNet call and shared by all blocks."""
        if not self.config.use_timestep:
            return None
        parameter = self.time_embed[0].weight
        return self.time_embed(timestep_embedding(timesteps, self.config.hidden_channels).to(parameter.dtype))

    def forward(self, block_index: int, features: list[torch.Tensor], time_embedding: torch.Tensor | None,
                context: torch.Tensor | None) -> torch.Tensor:
        """The weights of block `block_index`.

        Args:
            features: N member outputs of this block, each [B x C x H x W].
            time_embedding: `embed_timesteps(timesteps)`, [B x 4*hidden] (None without timestep conditioning).
            context: the text context the UNet got, [B x L x context_dim].
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
