"""The ensembled forward inside ComfyUI: a `DIFFUSION_MODEL` wrapper on the ensemble MODEL that runs the members'
UNets block by block through the core's `EnsembleUNet`, with a block runner that runs `comfy.ldm`'s UNet pieces as
ComfyUI's own `UNetModel._forward` does (transformer options and their patches, ControlNet residuals, the upsampling
output shapes), so that identical members give the base model's prediction bit for bit.

The ensemble MODEL is a clone of member 1's `ModelPatcher`; ComfyUI calls member 1's diffusion model, whose forward
hands this wrapper the call (`executor.class_obj` is that diffusion model). The other members' diffusion models are
read from their `BaseModel`s at call time, so object patches ComfyUI applied while loading them are seen.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from comfy.ldm.modules.diffusionmodules.openaimodel import apply_control, forward_timestep_embed
from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

from afa.ensemble import EnsembleUNet, LdmBlockRunner
from afa.errors import AfaError
from afa.modes import Mode

from .maps import SamplingMaps

MEMBER_CONTEXT = "afa_member_context"
"""The model condition that carries each member's own encoding of the prompt, [B x N x L x D] (afa.comfyui.text)."""
MEMBER_POOLED = "afa_member_pooled"
"""The model condition that carries each member's pooled text embedding, [B x N x P] (SDXL)."""


class ComfyBlockRunner(LdmBlockRunner):
    """Runs the pieces of `comfy.ldm`'s UNetModel as its `_forward` does, for one call of the ensemble.

    Per call: the ControlNet residuals (popped once per pass, added to the mixed features as ComfyUI adds them to
    the single model's), the transformer options (the block being run, the transformer index each member's
    attention patches see: the same for every member, as if each were the only model) and the video arguments.
    """

    def __init__(self, x: torch.Tensor, control: dict | None, transformer_options: dict, extra: dict,
                 default_num_video_frames: int | None = None):
        self.control = control
        self.options = transformer_options
        self.patches = transformer_options.get("patches", {})
        self.x_shape = list(x.shape)
        self.extra = extra
        self.num_video_frames = extra.get("num_video_frames", default_num_video_frames)
        self.pending_control: dict | None = None
        self.block_key: tuple | None = None
        self.block_transformer_index = 0

    def begin_pass(self) -> None:
        # apply_control pops the residuals: each pass (one per member in noise averaging) gets its own lists
        self.pending_control = None if self.control is None else \
            {key: list(value) if isinstance(value, list) else value for key, value in self.control.items()}
        self.options["original_shape"] = list(self.x_shape)
        self.options["transformer_index"] = 0
        self.block_key = None

    def input_dtype(self, first_member: nn.Module, x: torch.Tensor) -> torch.dtype:
        return x.dtype  # ComfyUI's BaseModel already cast x to the dtype the model computes in

    def embed(self, member: nn.Module, timesteps: torch.Tensor, y: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
        emb = member.time_embed(timestep_embedding(timesteps, member.model_channels, repeat_only=False).to(dtype))
        for patch in self.patches.get("emb_patch", []):
            emb = patch(emb, member.model_channels, self.options)
        if member.num_classes is not None:
            emb = emb + member.label_emb(y)
        return emb

    def block(self, stage: str, index: int, block: nn.Module, h: torch.Tensor, emb: torch.Tensor,
              context: torch.Tensor | None, output_shape: torch.Size | None) -> torch.Tensor:
        key = (stage, index)
        if key != self.block_key:  # the first member to run this block
            self.block_key = key
            self.block_transformer_index = self.options.get("transformer_index", 0)
        else:  # the next members see the transformer index the first one saw
            self.options["transformer_index"] = self.block_transformer_index
        self.options["block"] = key
        return forward_timestep_embed(block, h, emb, context, self.options, output_shape,
                                      time_context=self.extra.get("time_context"),
                                      num_video_frames=self.num_video_frames,
                                      image_only_indicator=self.extra.get("image_only_indicator"))

    def after_block(self, stage: str, h: torch.Tensor) -> torch.Tensor:
        h = apply_control(h, self.pending_control, stage)
        if stage == "input":
            for patch in self.patches.get("input_block_patch", []):
                h = patch(h, self.options)
        return h

    def after_skip(self, h: torch.Tensor) -> torch.Tensor:
        for patch in self.patches.get("input_block_patch_after_skip", []):
            h = patch(h, self.options)
        return h

    def concat_skip(self, index: int, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        self.options["block"] = ("output", index)
        skip = apply_control(skip, self.pending_control, "output")
        for patch in self.patches.get("output_block_patch", []):
            h, skip = patch(h, skip, self.options)
        return torch.cat([h, skip], dim=1)

    def head(self, member: nn.Module, h: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        return member.out(h.type(x_dtype))


class EnsembleForward:
    """The `DIFFUSION_MODEL` wrapper of an ensemble MODEL.

    Args:
        other_members: the `BaseModel`s of members 2..N in order, an entry None where the member is member 1's
            own model (the same loaded checkpoint connected twice).
        mode: how to mix (afa.modes).
        aggregator_patcher: the `ModelPatcher` of the SABW aggregator (ComfyUI loads it beside the members), or None.
        maps: where the aggregation maps of the latest sampling run are recorded.
    """

    def __init__(self, other_members: Sequence[object | None], mode: Mode, aggregator_patcher=None,
                 maps: SamplingMaps | None = None):
        self.other_members = list(other_members)
        self.mode = mode
        self.aggregator_patcher = aggregator_patcher
        self.maps = maps

    @property
    def num_members(self) -> int:
        return 1 + len(self.other_members)

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                 **kwargs):
        """x [B x C x H x W] as ComfyUI's BaseModel passes it (already in the model's compute dtype); returns the
        ensembled prediction [B x C_out x H x W]."""
        first = executor.class_obj
        members = [first] + [first if model is None else model.diffusion_model for model in self.other_members]
        member_context = kwargs.pop(MEMBER_CONTEXT, None)
        member_pooled = kwargs.pop(MEMBER_POOLED, None)
        member_contexts = member_vectors = None
        if member_context is not None:
            if member_context.shape[1] != len(members):
                raise AfaError(f"the prompt was encoded for {member_context.shape[1]} members (AFA Text Encode "
                               f"with {member_context.shape[1]} CLIPs), but the ensemble has {len(members)}: connect "
                               f"one CLIP per member, in the members' order, or a single CLIP for all")
            member_contexts = list(member_context.unbind(1))
            if member_pooled is not None and y is not None:
                # SDXL's y is [pooled text embedding | size embeddings]: each member reads its own pooled part
                width = member_pooled.shape[-1]
                member_vectors = [torch.cat([pooled.to(y.dtype), y[:, width:]], dim=1)
                                  for pooled in member_pooled.unbind(1)]
        aggregator = self.aggregator_patcher.model if self.aggregator_patcher is not None else None
        if aggregator is not None and next(aggregator.parameters()).device != x.device:
            # ComfyUI loads modules without comfy.ops casting only while they fit its low-VRAM budget and leaves the
            # rest on the offload device; SABW is small (~2% of a member), so it runs where the features are
            aggregator.to(x.device)
        observer = self.maps.observer(transformer_options) if self.maps is not None else None
        ensemble = EnsembleUNet(members, aggregator, mode=self.mode, observer=observer)
        runner = ComfyBlockRunner(x, control, transformer_options, kwargs,
                                  getattr(first, "default_num_video_frames", None))
        return ensemble(x, timesteps, context, y, member_contexts=member_contexts, member_vectors=member_vectors,
                        runner=runner)
