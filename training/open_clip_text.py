"""SD 2.x's text encoder: open_clip's text tower as a WebUI checkpoint stores it (`cond_stage_model.model.*`), and its
conditioning as ldm's `FrozenOpenCLIPEmbedder` with `layer: penultimate` computes it (every SD 2.x yaml says so).

open_clip_torch itself is not imported: its `__init__` imports torchvision, which this environment keeps out. The
module below has open_clip's text tower's modules and key names (`token_embedding`, `positional_embedding`,
`transformer.resblocks.N.{ln_1, attn, ln_2, mlp.c_fc, mlp.c_proj}`, `ln_final`, `text_projection`, `logit_scale`),
so a checkpoint's tensors load into it strictly; its sizes are read off those tensors (64 channels per head, as in
every open_clip text tower: ViT-H-14's 1024 / 16). The real-WebUI tier compares it with open_clip and ldm's embedder
on the same weights.

Tokens are SD1's (the same BPE vocabulary, BOS, prompt, EOS), padded with 0 after the EOS, as open_clip's tokenizer
and the WebUI's SD2 conditioning pad.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from types import SimpleNamespace

import torch
from torch import nn

from afa.errors import CheckpointError

HEAD_WIDTH = 64
PAD_ID = 0


class ResidualAttentionBlock(nn.Module):
    """open_clip's ResidualAttentionBlock (no LayerScale): pre-norm causal self-attention, then a GELU MLP."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp_width)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        """x [B x L x width] -> [B x L x width]."""
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask.to(x.dtype))[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_width: int):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers))


class OpenClipTextEncoder(nn.Module):
    """open_clip's text tower. `config` has the fields the trainer reads of a text encoder (`hidden_size`, ...)."""

    def __init__(self, vocab_size: int, context_length: int, width: int, layers: int, heads: int, mlp_width: int,
                 embed_dim: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=mlp_width, vocab_size=vocab_size,
                                      max_position_embeddings=context_length)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, mlp_width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]))
        # open_clip's causal mask: -inf above the diagonal
        self.register_buffer("attn_mask", torch.full((context_length, context_length), float("-inf")).triu_(1),
                             persistent=False)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def device(self) -> torch.device:
        return self.token_embedding.weight.device

    def penultimate(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [B x 77] -> the input of the last transformer block [B x 77 x width] (no `ln_final`)."""
        x = self.token_embedding(token_ids.to(self.device)) + self.positional_embedding
        for block in self.transformer.resblocks[:-1]:
            x = block(x, self.attn_mask)
        return x

    def pooled(self, penultimate: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """open_clip's text embedding [B x embed_dim] from `penultimate`: the last block, `ln_final`, the EOS position
        (the row's highest id, open_clip's `text.argmax(dim=-1)`), times `text_projection`."""
        last = self.ln_final(self.transformer.resblocks[-1](penultimate, self.attn_mask))
        return last[torch.arange(last.shape[0]), token_ids.argmax(dim=-1)] @ self.text_projection

    def encode(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token ids [B x 77] -> the penultimate layer's hidden states after `ln_final` [B x 77 x width] (ldm's
        FrozenOpenCLIPEmbedder with layer "penultimate", what the WebUI gives SD 2.x at every CLIP skip)."""
        return self.ln_final(self.penultimate(token_ids))


def open_clip_config(tensors: Mapping[str, torch.Tensor], checkpoint_name: str) -> dict:
    """The tower's sizes from its tensors (names relative to `cond_stage_model.model.`)."""
    try:
        vocab_size, width = tensors["token_embedding.weight"].shape
        context_length = tensors["positional_embedding"].shape[0]
        mlp_width = tensors["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        embed_dim = tensors["text_projection"].shape[1]
    except KeyError as error:
        raise CheckpointError(f"{checkpoint_name}: its OpenCLIP text encoder lacks {error}") from None
    layers = len({key.split(".")[2] for key in tensors if key.startswith("transformer.resblocks.")})
    if width % HEAD_WIDTH:
        raise CheckpointError(f"{checkpoint_name}: its OpenCLIP text encoder is {width} wide, which gives no head "
                              f"count ({HEAD_WIDTH} channels per head)")
    return dict(vocab_size=vocab_size, context_length=context_length, width=width, layers=layers,
                heads=width // HEAD_WIDTH, mlp_width=mlp_width, embed_dim=embed_dim)


def load_open_clip_text_encoder(tensors: Mapping[str, torch.Tensor],
                                checkpoint_name: str = "checkpoint") -> OpenClipTextEncoder:
    """The frozen tower (float32, CPU, eval mode) from its tensors (names relative to `cond_stage_model.model.`;
    open_clip's vision tower, if the file kept one, is ignored)."""
    tensors = {key: value for key, value in tensors.items() if not key.startswith("visual.")}
    config = open_clip_config(tensors, checkpoint_name)
    with torch.device("meta"):
        expected = set(OpenClipTextEncoder(**config).state_dict())
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint_name}: its OpenCLIP text encoder ({config['layers']} layers, width "
                              f"{config['width']}) has missing keys {missing[:4]} and unexpected keys "
                              f"{unexpected[:4]} (names relative to cond_stage_model.model.)")
    encoder = OpenClipTextEncoder(**config)
    encoder.load_state_dict(tensors, strict=True)
    return encoder.requires_grad_(False).eval()


def pad_after_end(token_ids: torch.Tensor, end_id: int) -> torch.Tensor:
    """SD1's EOS-padded token ids [B x 77] padded with 0 after each row's first EOS (SD 2.x's padding)."""
    seen_end = (token_ids == end_id).int().cumsum(dim=1) > 0  # at and after the first EOS
    after_end = torch.zeros_like(seen_end)
    after_end[:, 1:] = seen_end[:, :-1]  # strictly after it
    return token_ids.masked_fill(after_end, PAD_ID)
