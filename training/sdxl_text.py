"""SDXL's conditioning as sgm's `GeneralConditioner` of sd_xl_base.yaml builds it, from a WebUI checkpoint's own
text encoders, without sgm (it is not on PyPI):

    conditioner.embedders.0.transformer.*   CLIP ViT-L (transformers' CLIPTextModel), layer "hidden" at
                                            `layer_idx` (11: the penultimate of 12), no final layer norm
    conditioner.embedders.1.model.*         OpenCLIP ViT-bigG text tower (training/open_clip_text.py), layer
                                            "penultimate" (no ln_final), plus its pooled output: ln_final of the last
                                            layer at the EOS position, times text_projection
    context [B x 77 x (768 + 1280)]  = the two hidden states concatenated
    y       [B x (1280 + 3 x 2 x 256)] = pooled, then each of original size (h, w), crop top-left (top, left) and
                                       target size (h, w) as 256-wide sinusoidal embeddings (ConcatTimestepEmbedderND)

The widths come from the tensors (the tiny test models are narrower). The real-WebUI tier compares both outputs
with sgm's conditioner on the same checkpoint. The trainer and the evaluator read SDXL members' prompts through it
(training/metrics.py's `encode_for_members`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from afa.errors import CheckpointError

from .open_clip_text import OpenClipTextEncoder, load_open_clip_text_encoder, pad_after_end
from .text_encoder import END_OF_TEXT_ID, load_text_encoder

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIG_G_PREFIX = "conditioner.embedders.1.model."
SIZE_EMBEDDING_WIDTH = 256  # sd_xl_base.yaml's ConcatTimestepEmbedderND outdim


def timestep_embedding(values: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """The sinusoidal embedding of ldm/sgm (cos half, then sin half): values [N] -> [N x dim]."""
    half = dim // 2
    frequencies = torch.exp(-torch.log(torch.tensor(float(max_period))) * torch.arange(half, dtype=torch.float32)
                            / half).to(values.device)
    arguments = values[:, None].float() * frequencies[None]
    return torch.cat([torch.cos(arguments), torch.sin(arguments)], dim=-1)


def size_embeddings(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor,
                    width: int = SIZE_EMBEDDING_WIDTH) -> torch.Tensor:
    """Each [B x 2] (height, width / top, left) -> [B x 3 * 2 * width], in the conditioner's order."""
    parts = []
    for values in (original_size, crop_top_left, target_size):
        batch = values.shape[0]
        parts.append(timestep_embedding(values.reshape(-1), width).reshape(batch, -1))
    return torch.cat(parts, dim=1)


class SdxlTextEncoders(nn.Module):
    """SDXL's two text encoders of one checkpoint, frozen. `config.hidden_size` is the context width."""

    def __init__(self, clip_l: nn.Module, big_g: OpenClipTextEncoder, clip_l_layer_idx: int = 11):
        super().__init__()
        self.clip_l, self.big_g, self.clip_l_layer_idx = clip_l, big_g, clip_l_layer_idx
        self.config = type(big_g.config)(hidden_size=clip_l.config.hidden_size + big_g.config.hidden_size,
                                         pooled_size=big_g.text_projection.shape[1])

    @property
    def device(self) -> torch.device:
        return self.big_g.device

    @torch.no_grad()
    def encode(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SD1-style token ids [B x 77] (EOS padding, what CLIP-L reads) -> (context [B x 77 x D], pooled [B x P]).
        bigG reads the same ids with 0 padding after EOS, as open_clip's tokenizer pads."""
        token_ids = token_ids.to(self.device)
        hidden = self.clip_l(input_ids=token_ids, output_hidden_states=True).hidden_states[self.clip_l_layer_idx]
        big_g_ids = pad_after_end(token_ids, END_OF_TEXT_ID)
        penultimate = self.big_g.penultimate(big_g_ids)
        return torch.cat([hidden, penultimate], dim=-1), self.big_g.pooled(penultimate, big_g_ids.to(self.device))

    def vector(self, pooled: torch.Tensor, original_size: torch.Tensor, crop_top_left: torch.Tensor,
               target_size: torch.Tensor) -> torch.Tensor:
        """The UNet's `y` [B x P + 1536]: pooled [B x P], then the size embeddings (each size [B x 2])."""
        return torch.cat([pooled, size_embeddings(original_size, crop_top_left, target_size).to(pooled)], dim=1)


def clip_l_layer_index(config_yaml: Mapping | None) -> int:
    """`layer_idx` of the conditioner's first embedder in an sgm yaml (sd_xl_base.yaml: 11)."""
    try:
        embedders = config_yaml["model"]["params"]["conditioner_config"]["params"]["emb_models"]
        return int(embedders[0]["params"].get("layer_idx", 11))
    except (KeyError, TypeError, IndexError):
        return 11


def load_sdxl_text_encoders(state_dict: Mapping[str, torch.Tensor], config_yaml: Mapping | None,
                            checkpoint_name: str = "checkpoint",
                            search_dirs: Sequence = ()) -> SdxlTextEncoders:
    """The two encoders of an SDXL checkpoint (float32, CPU, frozen).

    :raises CheckpointError: either encoder is missing or does not match its config (the message names it).
    """
    clip_l = {key[len("conditioner.embedders.0."):]: value for key, value in state_dict.items()
              if key.startswith(CLIP_L_PREFIX)}
    big_g = {key[len(BIG_G_PREFIX):]: value for key, value in state_dict.items() if key.startswith(BIG_G_PREFIX)}
    if not clip_l or not big_g:
        raise CheckpointError(f"{checkpoint_name}: an SDXL checkpoint holds both text encoders "
                              f"({CLIP_L_PREFIX}* and {BIG_G_PREFIX}*); found "
                              f"{'CLIP-L' if clip_l else 'no CLIP-L'} and {'bigG' if big_g else 'no bigG'}")
    embedders = ((config_yaml or {}).get("model", {}).get("params", {}).get("conditioner_config", {})
                 .get("params", {}).get("emb_models", []))
    version = embedders[0].get("params", {}).get("version") if embedders else None
    clip_l_yaml = {"model": {"params": {"cond_stage_config": {"params": {"version": version}}}}} if version else None
    clip_l_model = load_text_encoder({"cond_stage_model." + key: value for key, value in clip_l.items()},
                                     clip_l_yaml, checkpoint_name=checkpoint_name, search_dirs=search_dirs)
    big_g_model = load_open_clip_text_encoder(big_g, checkpoint_name)
    return SdxlTextEncoders(clip_l_model, big_g_model, clip_l_layer_index(config_yaml)).eval()
