"""Per-member text encoders in ComfyUI: each member reads the prompt as its own CLIP encodes it.

The AFA Text Encode node encodes the prompt with every connected CLIP exactly as `CLIPTextEncode` does
(`clip.tokenize` then `clip.encode_from_tokens_scheduled`) and returns one CONDITIONING: member 1's encoding as the
conditioning every node reads (so the conditioning also works with a single model, area and timestep nodes, hires
passes), plus the members' encodings stacked in model conditions that ComfyUI hands to the diffusion model call
(`afa.comfyui.forward` reads them): `afa_member_context` [B x N x L x D] and, for SDXL, `afa_member_pooled`
[B x N x P].
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from comfy.conds import CONDRegular

from afa.errors import AfaError

from .forward import MEMBER_CONTEXT, MEMBER_POOLED


def encode_for_members(clips: Sequence, text: str) -> list:
    """The CONDITIONING of `text` for members reading clips[i] (CLIP objects; the same object may appear more than
    once and is run once). One distinct CLIP gives exactly CLIPTextEncode's conditioning."""
    encodings: dict[int, list] = {}
    for clip in clips:
        if clip is None:
            raise AfaError("a CLIP input is empty (its checkpoint has no text encoder): connect a CLIP, or leave "
                           "the input unconnected")
        if id(clip) not in encodings:
            encodings[id(clip)] = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    per_member = [encodings[id(clip)] for clip in clips]
    if len(encodings) == 1:
        return per_member[0]
    return stack_member_conditioning(per_member)


def stack_member_conditioning(per_member: Sequence[list]) -> list:
    """One CONDITIONING from N members' (each a list of [cond [B x L x D], options] entries, as CLIPTextEncode
    gives: one entry, or one per scheduled hook)."""
    counts = {len(conditioning) for conditioning in per_member}
    if len(counts) != 1:
        raise AfaError(f"the CLIPs gave different numbers of conditioning entries ({sorted(counts)}): their hooks "
                       f"differ; give every member's CLIP the same hooks")
    out = []
    for entries in zip(*per_member):
        conds = [cond for cond, _ in entries]
        widths = {cond.shape[-1] for cond in conds}
        if len(widths) != 1:
            raise AfaError(f"the CLIPs encode to different widths ({sorted(widths)}): they belong to different model "
                           f"families; connect the CLIP of each member's own checkpoint")
        options = dict(entries[0][1])
        model_conds = dict(options.get("model_conds", {}))
        model_conds[MEMBER_CONTEXT] = CONDRegular(torch.stack(_same_length(conds), dim=1))
        pooled = [entry_options.get("pooled_output") for _, entry_options in entries]
        if all(p is not None for p in pooled):
            model_conds[MEMBER_POOLED] = CONDRegular(torch.stack(pooled, dim=1))
        options["model_conds"] = model_conds
        out.append([conds[0], options])
    return out


def _same_length(conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Token sequences repeated to their least common length (ComfyUI's CONDCrossAttn does the same to batch
    prompts of different lengths: attention over a repeated sequence is the attention over the sequence)."""
    lengths = [cond.shape[1] for cond in conds]
    common = math.lcm(*lengths)
    return [cond.repeat(1, common // cond.shape[1], 1) if cond.shape[1] != common else cond for cond in conds]
