"""A host-free FLUX.1 transformer in BFL's layout (black-forest-labs/flux `model.py` / `modules/layers.py`, which
ComfyUI's `comfy/ldm/flux` keeps): the same module names and state-dict keys, so a transformer file (ComfyUI's
`models/diffusion_models`) loads into it as it is, and `afa.flux.EnsembleFlux` runs it with its default runner.

It is what the core builds FLUX members with where no host provides them: `python -m afa bench --arch flux-dev`
counts FLOPs on meta tensors with it, and the trainer can build members with it. Attention is torch's
`scaled_dot_product_attention` (ComfyUI's default on NVIDIA GPUs; on the CPU ComfyUI uses its sub-quadratic chunked
attention), the modulation is BFL's `(1 + scale) * x + shift` (ComfyUI: `torch.addcmul`) and the RMS norm is written
out (torch 2.1 has no `rms_norm`; ComfyUI calls torch's), so its results equal ComfyUI's within float32 rounding
(tests/test_flux.py on the stand-in; the real ComfyUI tier, tests/comfyui_real/flux_in_process.py: 3.6e-7 at full
width on the CPU, and bit for bit once ComfyUI's class is given these three ops).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .flux import FluxLayout, flux_timestep_embedding, patchify, unpatchify


@dataclass(frozen=True)
class FluxParams:
    """BFL's `FluxParams` (FLUX.1 [dev]: the defaults); `axes_dim` sums to hidden_size / num_heads."""

    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple = field(default=(16, 56, 56))
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True

    @classmethod
    def from_layout(cls, layout: FluxLayout, axes_dim: tuple | None = None) -> "FluxParams":
        """The params of a layout read off a file (afa.flux.flux_layout); rotary axes as FLUX.1's when the head
        width is 128, else `axes_dim` (it cannot be read off shapes)."""
        head = layout.hidden_size // layout.num_heads
        if axes_dim is None:
            if head != 128:
                raise ValueError(f"rotary axes for heads of width {head} are not FLUX.1's: give axes_dim")
            axes_dim = (16, 56, 56)
        return cls(in_channels=layout.in_channels, out_channels=layout.out_channels, vec_in_dim=layout.vec_dim,
                   context_in_dim=layout.context_dim, hidden_size=layout.hidden_size,
                   mlp_ratio=layout.mlp_hidden / layout.hidden_size, num_heads=layout.num_heads,
                   depth=layout.num_double_blocks, depth_single_blocks=layout.num_single_blocks,
                   axes_dim=tuple(axes_dim),
                   guidance_embed=layout.guidance_embed)


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotary frequencies of positions pos [B x L] -> [B x L x dim/2 x 2 x 2] (float32)."""
    scale = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    out = torch.einsum("...n,d->...nd", pos.to(torch.float64), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return rearrange(out, "b n d (i j) -> b n d i j", i=2, j=2).float()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Rotary-embedded multi-head attention. q, k, v [B x H x L x D], pe [B x 1 x L x D/2 x 2 x 2] ->
    [B x L x H*D]."""
    def rotate(t: torch.Tensor) -> torch.Tensor:
        pairs = t.to(pe.dtype).reshape(*t.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(*t.shape).type_as(v)

    return rearrange(F.scaled_dot_product_attention(rotate(q), rotate(k), v), "b h l d -> b l (h d)")


class EmbedND(nn.Module):
    """Rotary embedding of position ids [B x L x n_axes] -> [B x 1 x L x D/2 x 2 x 2]; no weights."""

    def __init__(self, dim: int, theta: int, axes_dim: tuple):
        super().__init__()
        self.dim, self.theta, self.axes_dim = dim, theta, list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])],
                         dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    """[B x in_dim] -> [B x hidden] (Linear, SiLU, Linear)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., dim] normalised by its root mean square (eps 1e-6), times `scale`."""
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + 1e-6) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Holds a stream's qkv projection, QK norm and output projection (the blocks run the attention jointly)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """vec [B x D] -> 1 or 2 (shift, scale, gate) triples of [B x 1 x D]."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [tuple(out[i:i + 3]) for i in range(0, self.multiplier, 3)]


def _mlp(hidden: int, mlp_hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))


def _qkv(attn: SelfAttention, x: torch.Tensor, num_heads: int):
    """x [B x L x D] -> q, k, v [B x H x L x D/H] with q and k RMS-normed."""
    q, k, v = rearrange(attn.qkv(x), "b l (k h d) -> k b h l d", k=3, h=num_heads)
    q, k = attn.norm(q, k, v)
    return q, k, v


class DoubleStreamBlock(nn.Module):
    """An image and a text stream with joint attention over [text | image]. (img [B x Li x D], txt [B x Lt x D],
    vec [B x D], pe) -> (img, txt)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        mlp_hidden = int(hidden * mlp_ratio)
        for stream in ("img", "txt"):
            setattr(self, f"{stream}_mod", Modulation(hidden, double=True))
            setattr(self, f"{stream}_norm1", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_attn", SelfAttention(hidden, num_heads, qkv_bias))
            setattr(self, f"{stream}_norm2", nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{stream}_mlp", _mlp(hidden, mlp_hidden))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor):
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)
        img_q, img_k, img_v = _qkv(self.img_attn, (1 + img_scale1) * self.img_norm1(img) + img_shift1,
                                   self.num_heads)
        txt_q, txt_k, txt_v = _qkv(self.txt_attn, (1 + txt_scale1) * self.txt_norm1(txt) + txt_shift1,
                                   self.num_heads)
        joint = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                          torch.cat((txt_v, img_v), dim=2), pe)
        txt_attn, img_attn = joint[:, :txt.shape[1]], joint[:, txt.shape[1]:]
        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * self.img_norm2(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * self.txt_norm2(txt) + txt_shift2)
        return img, txt


class SingleStreamBlock(nn.Module):
    """Attention and MLP in parallel on one sequence. (x [B x L x D], vec [B x D], pe) -> x."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads, self.hidden_size = num_heads, hidden
        self.mlp_hidden_dim = int(hidden * mlp_ratio)
        self.linear1 = nn.Linear(hidden, hidden * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = QKNorm(hidden // num_heads)
        self.pre_norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
        ((shift, scale, gate),) = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = rearrange(qkv, "b l (k h d) -> k b h l d", k=3, h=self.num_heads)
        q, k = self.norm(q, k, v)
        return x + gate * self.linear2(torch.cat((attention(q, k, v, pe), self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    """(x [B x L x D], vec [B x D]) -> [B x L x out_channels]."""

    def __init__(self, hidden: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    """A FLUX.1 transformer in BFL's layout (module names and keys as BFL's and ComfyUI's)."""

    def __init__(self, params: FluxParams = FluxParams()):
        super().__init__()
        self.params = params
        hidden = params.hidden_size
        if hidden % params.num_heads or sum(params.axes_dim) != hidden // params.num_heads:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to the head width {hidden // params.num_heads}")
        self.pe_embedder = EmbedND(hidden // params.num_heads, params.theta, params.axes_dim)
        self.img_in = nn.Linear(params.in_channels, hidden)
        self.time_in = MLPEmbedder(256, hidden)
        self.vector_in = MLPEmbedder(params.vec_in_dim, hidden)
        self.guidance_in = MLPEmbedder(256, hidden) if params.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(params.context_in_dim, hidden)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(hidden, params.num_heads, params.mlp_ratio,
                                                             params.qkv_bias) for _ in range(params.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(hidden, params.num_heads, params.mlp_ratio)
                                           for _ in range(params.depth_single_blocks))
        self.final_layer = LastLayer(hidden, params.out_channels)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor | None = None, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x [B x C x H x W] latent, timesteps [B] (sigma in 0..1), context [B x L x context_in_dim] T5 tokens,
        y [B x vec_in_dim] pooled CLIP (None: zeros), guidance [B] -> [B x C_out x H x W]."""
        img, img_ids, grid = patchify(x)
        img = self.img_in(img)
        vec = self.time_in(flux_timestep_embedding(timesteps, 256).to(img.dtype))
        if self.params.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(flux_timestep_embedding(guidance, 256).to(img.dtype))
        y = torch.zeros((x.shape[0], self.params.vec_in_dim), device=x.device, dtype=img.dtype) if y is None else y
        vec = vec + self.vector_in(y)
        txt = self.txt_in(context)
        txt_ids = torch.zeros((x.shape[0], context.shape[1], 3), device=x.device, dtype=x.dtype)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        tokens = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            tokens = block(tokens, vec=vec, pe=pe)
        out = self.final_layer(tokens[:, txt.shape[1]:], vec)
        return unpatchify(out, grid, x.shape[-2], x.shape[-1])


def load_flux_member(path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                     axes_dim: tuple | None = None) -> Flux:
    """Loads a FLUX-layout transformer file (ComfyUI's `models/diffusion_models` form, bare keys, or a checkpoint's
    `model.diffusion_model.` keys) as a frozen `Flux` in eval mode, every key checked (strict).

    Args:
        dtype: cast floating-point weights to this dtype while reading (None keeps the file's: bf16 for FLUX.1).
        axes_dim: the rotary axes, needed only for heads narrower than FLUX.1's 128 (FluxParams.from_layout).
    Raises:
        CheckpointError: not a FLUX-layout transformer, or its tensors do not fit the layout read off them.
    """
    from .errors import CheckpointError
    from .flux import FLUX_KEY_PREFIXES, FLUX_MARKER_KEY, flux_layout
    from .members import describe_difference, read_prefixed_tensors, read_shapes

    shapes = read_shapes(path)
    prefix = next((p for p in FLUX_KEY_PREFIXES if f"{p}{FLUX_MARKER_KEY}" in shapes), None)
    if prefix is None:
        raise CheckpointError(f"{path}: not a FLUX-layout transformer (no {FLUX_MARKER_KEY})")
    state_dict = read_prefixed_tensors(path, prefix, dtype)
    with torch.device("meta"):
        member = Flux(FluxParams.from_layout(flux_layout({k: tuple(v.shape) for k, v in state_dict.items()}),
                                             axes_dim))
    describe_difference({k: tuple(v.shape) for k, v in member.state_dict().items()},
                        {k: tuple(v.shape) for k, v in state_dict.items()}, what=f"{path}: tensors do not match "
                        f"a FLUX.1 transformer of its layout", expected_label="the layout", found_label="the file",
                        error=CheckpointError)
    member.load_state_dict(state_dict, strict=True, assign=True)
    return member.to(device).eval().requires_grad_(False)
