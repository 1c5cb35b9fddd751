"""The ensembled forward inside ComfyUI: a `DIFFUSION_MODEL` wrapper on the ensemble MODEL that runs the members'
UNets block by block through the core's `EnsembleUNet` (FLUX transformers through `EnsembleFlux`: below), with a
block runner that runs `comfy.ldm`'s UNet pieces as ComfyUI's own `UNetModel._forward` does (transformer options and
their patches, ControlNet residuals, the upsampling output shapes), so that identical members give the base model's
prediction bit for bit.

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
from afa.flux import EnsembleFlux, FluxBlockRunner, unpatchify
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
    """The `DIFFUSION_MODEL` wrapper of an ensemble MODEL of UNets (`FluxEnsembleForward`: of FLUX transformers).

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

    def _members(self, first: nn.Module) -> list[nn.Module]:
        """The members' diffusion models; `first` is member 1's (the wrapped call's `executor.class_obj`)."""
        return [first] + [first if model is None else model.diffusion_model for model in self.other_members]

    def _member_text(self, kwargs: dict, count: int) -> tuple[list | None, torch.Tensor | None]:
        """(each member's text tokens N x [B x L x D] or None, their pooled embeddings [B x N x P] or None), taken
        out of `kwargs` (the model conditions of AFA Text Encode)."""
        member_context = kwargs.pop(MEMBER_CONTEXT, None)
        member_pooled = kwargs.pop(MEMBER_POOLED, None)
        if member_context is None:
            return None, None
        if member_context.shape[1] != count:
            raise AfaError(f"the prompt was encoded for {member_context.shape[1]} members (AFA Text Encode "
                           f"with {member_context.shape[1]} CLIPs), but the ensemble has {count}: connect "
                           f"one CLIP per member, in the members' order, or a single CLIP for all")
        return list(member_context.unbind(1)), member_pooled

    def _aggregator(self, x: torch.Tensor):
        aggregator = self.aggregator_patcher.model if self.aggregator_patcher is not None else None
        if aggregator is not None and next(aggregator.parameters()).device != x.device:
            # ComfyUI loads modules without comfy.ops casting only while they fit its low-VRAM budget and leaves the
            # rest on the offload device; SABW is small (~2% of a member), so it runs where the features are
            aggregator.to(x.device)
        return aggregator

    def _observer(self, transformer_options: dict):
        return self.maps.observer(transformer_options) if self.maps is not None else None

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None, transformer_options={},
                 **kwargs):
        """x [B x C x H x W] as ComfyUI's BaseModel passes it (already in the model's compute dtype); returns the
        ensembled prediction [B x C_out x H x W]."""
        first = executor.class_obj
        members = self._members(first)
        member_contexts, member_pooled = self._member_text(kwargs, len(members))
        member_vectors = None
        if member_pooled is not None and y is not None:
            # SDXL's y is [pooled text embedding | size embeddings]: each member reads its own pooled part
            width = member_pooled.shape[-1]
            member_vectors = [torch.cat([pooled.to(y.dtype), y[:, width:]], dim=1)
                              for pooled in member_pooled.unbind(1)]
        ensemble = EnsembleUNet(members, self._aggregator(x), mode=self.mode,
                                observer=self._observer(transformer_options))
        runner = ComfyBlockRunner(x, control, transformer_options, kwargs,
                                  getattr(first, "default_num_video_frames", None))
        return ensemble(x, timesteps, context, y, member_contexts=member_contexts, member_vectors=member_vectors,
                        runner=runner)


class ComfyFluxRunner(FluxBlockRunner):
    """Runs the pieces of `comfy.ldm.flux`'s Flux as its `forward_orig` does, for one call of the ensemble: the
    transformer options and attention mask reach every block, a block replacement (`patches_replace["dit"]`, e.g.
    skip-layer guidance) replaces that block of every member, ControlNet residuals are added to the mixed image
    tokens, and fp16 tokens are cleaned of infinities before the single blocks, as ComfyUI does."""

    def __init__(self, control: dict | None, transformer_options: dict, attn_mask: torch.Tensor | None):
        self.control = control
        self.options = transformer_options
        self.replace = transformer_options.get("patches_replace", {}).get("dit", {})
        self.attn_mask = attn_mask

    def input_dtype(self, first_member: nn.Module, img: torch.Tensor) -> torch.dtype:
        return img.dtype  # ComfyUI's BaseModel already cast x to the dtype the model computes in

    def double_block(self, index, block, img, txt, vec, pe):
        if ("double_block", index) not in self.replace:
            return block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=self.attn_mask,
                         transformer_options=self.options)

        def original(args):
            out_img, out_txt = block(img=args["img"], txt=args["txt"], vec=args["vec"], pe=args["pe"],
                                     attn_mask=args.get("attn_mask"), transformer_options=args.get(
                                         "transformer_options"))
            return {"img": out_img, "txt": out_txt}

        out = self.replace[("double_block", index)](
            {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": self.attn_mask,
             "transformer_options": self.options}, {"original_block": original})
        return out["img"], out["txt"]

    def after_double(self, index, img):
        residuals = self.control.get("input") if self.control is not None else None
        if residuals is not None and index < len(residuals) and residuals[index] is not None:
            img[:, :residuals[index].shape[1]] += residuals[index]
        return img

    def join_streams(self, txt, img):
        if img.dtype == torch.float16:
            img = torch.nan_to_num(img, nan=0.0, posinf=65504, neginf=-65504)
        return torch.cat((txt, img), dim=1)

    def single_block(self, index, block, x, vec, pe):
        if ("single_block", index) not in self.replace:
            return block(x, vec=vec, pe=pe, attn_mask=self.attn_mask, transformer_options=self.options)

        def original(args):
            return {"img": block(args["img"], vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"),
                                 transformer_options=args.get("transformer_options"))}

        return self.replace[("single_block", index)](
            {"img": x, "vec": vec, "pe": pe, "attn_mask": self.attn_mask, "transformer_options": self.options},
            {"original_block": original})["img"]

    def after_single(self, index, x, text_tokens):
        residuals = self.control.get("output") if self.control is not None else None
        if residuals is not None and index < len(residuals) and residuals[index] is not None:
            x[:, text_tokens:text_tokens + residuals[index].shape[1], ...] += residuals[index]
        return x


class FluxEnsembleForward(EnsembleForward):
    """The `DIFFUSION_MODEL` wrapper of an ensemble MODEL of FLUX transformers: ComfyUI's `Flux._forward`
    (patchify, ids, unpatchify) around the core's `EnsembleFlux` instead of one transformer's `forward_orig`."""

    def __call__(self, executor, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None,
                 transformer_options={}, **kwargs):
        """x [B x 16 x H x W] in the model's compute dtype, timestep [B] (sigma), context [B x L x 4096] T5
        tokens, y [B x 768] pooled CLIP-L, guidance [B] (FluxGuidance's value); returns [B x 16 x H x W]."""
        if ref_latents is not None:
            raise AfaError("reference latents (FLUX Kontext, ReferenceLatent) are not supported by the AFA ensemble "
                           "yet: remove them from the conditioning")
        first = executor.class_obj
        members = self._members(first)
        member_contexts, member_pooled = self._member_text(kwargs, len(members))
        member_vectors = None if member_pooled is None else [p.to(x.dtype) for p in member_pooled.unbind(1)]
        height, width = x.shape[-2:]
        img, img_ids = first.process_img(x)
        patch = first.patch_size
        grid = ((height + patch // 2) // patch, (width + patch // 2) // patch)
        text_tokens = (member_contexts[0] if member_contexts else context).shape[1]
        txt_ids = torch.zeros((x.shape[0], text_tokens, 3), device=x.device, dtype=x.dtype)
        ensemble = EnsembleFlux(members, self._aggregator(x), mode=self.mode,
                                observer=self._observer(transformer_options))
        runner = ComfyFluxRunner(control, transformer_options, kwargs.get("attention_mask"))
        out = ensemble.forward_tokens(img, img_ids, None if member_contexts else context, txt_ids, timestep, y,
                                      guidance, grid, member_contexts, member_vectors, runner)
        return unpatchify(out, grid, height, width)
