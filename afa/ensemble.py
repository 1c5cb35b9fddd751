"""The ensembled UNet: N ldm UNets driven block by block, their features mixed after every block.

`EnsembleUNet` has the call signature of ldm's `UNetModel.forward(x, timesteps, context, y=None, **kwargs)`, so it
drops into the WebUI (through `sd_unet`), into k-diffusion's denoiser wrappers and into the trainer unchanged.

It never calls a member's `forward()`: the WebUI replaces `UNetModel.forward` on the class with a switch that routes
every UNet call to the active `SdUnet` -- which is this ensemble, so a member's `forward()` would recurse, and in
ComfyUI a member's `forward()` runs the whole UNet. The block loop below is the UNet's forward written out
(guided-diffusion's three phases with the `hs` skip stack); how one member's pieces run (its time embedding, a block,
the skip concatenation, the output head) is the host's: a `BlockRunner`. The default, `LdmBlockRunner`, runs ldm's
(and sgm's) UNetModel as ldm's forward does; ComfyUI's glue supplies one that runs `comfy.ldm`'s as ComfyUI's forward
does (transformer options, ControlNet residuals). Nothing here imports a host or ldm at import time.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from .aggregator import Aggregator, check_family
from .errors import IncompatibleMembersError
from .modes import AVERAGE, NOISE, SABW, Mode, parse_mode, trained_mode
from .unet import block_name

Observer = Callable[[int, torch.Tensor], None]
"""Called as observer(block_index, weights [B x N x H x W]) with the weights a block was mixed with."""


def mix(features: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[:, i] * features[i]. features: N x [B x C x H x W] with weights [B x N x H x W] or
    [B x N x 1 x 1]; or N token sequences [B x L x C] (FLUX) with weights [B x N x L] or [B x N x 1].

    Written as a fixed-order sum (not einsum) so that uniform weights give bit-identical results whichever mode
    produced them. The result has the strides of `features[0]`: in the WebUI, blocks return channels-last tensors,
    and for a 1 x 1 block (the deepest blocks of a small latent) the arithmetic above gives contiguous strides
    instead; the next block then runs other kernels on the same values, with rounding differences that a strong
    LoRA amplified to visible pixels (block averaging of identical members drifting from the member alone in a real
    A1111). With the member's strides, identical members give the member's output bit for bit."""
    weights = weights.to(features[0].dtype)
    if features[0].dim() == 3:  # tokens: member i's weights[:, i] as [B x L x 1], broadcast over C
        weights = weights[..., None]
        member_weights = [weights[:, index] for index in range(len(features))]
    else:  # maps: [B x 1 x H x W], broadcast over C
        member_weights = [weights[:, index:index + 1] for index in range(len(features))]
    mixed = member_weights[0] * features[0]
    for index in range(1, len(features)):
        mixed = mixed + member_weights[index] * features[index]
    if mixed.stride() != features[0].stride():
        # empty_like keeps features[0]'s strides (preserve_format); copy_ keeps the gradient for training SABW
        mixed = torch.empty_like(features[0]).copy_(mixed)
    return mixed


def _parameter_dtype(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def check_mode(mode: Mode | str, aggregator: Aggregator | None, num_members: int, family: str) -> Mode:
    """The mode an ensemble of `num_members` members of `family` ("unet", "flux") runs in: one that needs weights
    needs an aggregator trained for that many members of that family, in that mode."""
    mode = parse_mode(mode)
    if mode.needs_weights:
        if aggregator is None:
            raise ValueError(f"mode {mode} needs SABW weights; without a weights file use {AVERAGE} or {NOISE}")
        config = aggregator.config
        check_family(config, family)
        if config.num_members != num_members:
            raise IncompatibleMembersError(f"the SABW weights are for {config.num_members} members, "
                                           f"the ensemble has {num_members}")
        trained = trained_mode(config.only_last_block)
        if trained is not mode:
            raise ValueError(f"these SABW weights were trained for mode {trained}, not {mode}")
    return mode


class LdmBlockRunner:
    """How one member's pieces run, as ldm's `UNetModel.forward` runs them (also sgm's, which has the same blocks).

    A host whose UNet code differs (ComfyUI's `comfy.ldm`) subclasses this and overrides what it does otherwise.
    ldm's module is looked up at call time, not import time: the WebUI patches `timestep_embedding` (dtype handling)
    and swaps `openaimodel.th` for a proxy whose `cat()` resizes mismatched skips, and the core must import without
    ldm (ComfyUI has none)."""

    @staticmethod
    def _openaimodel():
        from ldm.modules.diffusionmodules import openaimodel
        return openaimodel

    def begin_pass(self) -> None:
        """Called before each pass through the blocks (one per call; one per member in noise averaging)."""

    def input_dtype(self, first_member: nn.Module, x: torch.Tensor) -> torch.dtype:
        """The dtype the features run in (ldm: the members' parameter dtype)."""
        return _parameter_dtype(first_member)

    def embed(self, member: nn.Module, timesteps: torch.Tensor, y: torch.Tensor | None,
              dtype: torch.dtype) -> torch.Tensor:
        """The member's time embedding [B x time_embed_dim] (+ its label embedding of y when it has one, as SDXL)."""
        t_emb = self._openaimodel().timestep_embedding(timesteps, member.model_channels, repeat_only=False)
        emb = member.time_embed(t_emb.to(_parameter_dtype(member.time_embed)))
        if getattr(member, "num_classes", None) is not None:
            emb = emb + member.label_emb(y.to(emb.dtype) if y.is_floating_point() else y)
        return emb

    def block(self, stage: str, index: int, block: nn.Module, h: torch.Tensor, emb: torch.Tensor,
              context: torch.Tensor | None, output_shape: torch.Size | None) -> torch.Tensor:
        """One block (stage "input", "middle" or "output", index within the stage) on h [B x C x H x W].
        `output_shape` is the shape of the skip the next output block will take (None for other blocks)."""
        return block(h, emb, context)

    def after_block(self, stage: str, h: torch.Tensor) -> torch.Tensor:
        """The mixed feature of an input or middle block, before the next block and the skip stack read it."""
        return h

    def after_skip(self, h: torch.Tensor) -> torch.Tensor:
        """The mixed feature of an input block after it was pushed on the skip stack, before the next block."""
        return h

    def concat_skip(self, index: int, h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Output block `index`'s input: [B x (C_h + C_skip) x H x W]."""
        return self._openaimodel().th.cat([h, skip], dim=1)

    def head(self, member: nn.Module, h: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
        """The output head (`out`) on the last block's feature: the member's prediction [B x C_out x H x W]."""
        return member.out(h)


LDM_BLOCKS = LdmBlockRunner()


class BlockwiseEnsemble(nn.Module):
    """What every ensemble of members of one `family` ("unet", "flux") holds: at least 2 frozen members, an optional
    aggregator, the mode (checked against the aggregator by `check_mode`), an optional `Observer`, the members'
    block runner, and whether member blocks are recomputed in the backward pass (gradient checkpointing)."""

    family = ""

    def __init__(self, members: Sequence[nn.Module], aggregator: Aggregator | None, observer: Observer | None,
                 runner):
        super().__init__()
        if len(members) < 2:
            raise IncompatibleMembersError(f"an ensemble needs at least 2 members, got {len(members)}")
        self.members = nn.ModuleList(members)
        self.aggregator = aggregator
        self.observer = observer
        self.runner = runner
        self.gradient_checkpointing = False

    def set_mode(self, mode: Mode | str) -> None:
        self.mode = check_mode(mode, self.aggregator, len(self.members), self.family)


class EnsembleUNet(BlockwiseEnsemble):
    """N frozen UNets of one architecture plus an optional trained `Aggregator`.

    Args:
        members: ldm `UNetModel`s (or sgm's, same block interface) of identical architecture, in the order the
            aggregator was trained for.
        aggregator: required for the modes that need weights (afa.modes).
        mode: an afa.modes Mode, or its name.
        observer: optional `Observer` that receives the weight maps of every mixed block.
        runner: how the members' pieces run (default ldm's); `forward(runner=...)` overrides it for one call.
    """

    family = "unet"

    def __init__(self, members: Sequence[nn.Module], aggregator: Aggregator | None = None, mode: Mode | str = SABW,
                 observer: Observer | None = None, runner: LdmBlockRunner = LDM_BLOCKS):
        super().__init__(members, aggregator, observer, runner)
        self.offload_device: torch.device | None = None
        """Low-VRAM mode: members stay where they are (the CPU) and each member block, time embedding and output
        head is moved to this device only while it runs, one at a time (the members' counterpart of the WebUI's
        --lowvram hooks, which only cover the base model)."""
        self.set_mode(mode)
        first = members[0]
        self.num_input_blocks = len(first.input_blocks)
        self.num_blocks = 2 * self.num_input_blocks + 1
        self.block_names = [block_name(index, self.num_input_blocks) for index in range(self.num_blocks)]

    # -- one block of one member -------------------------------------------------------------------------------

    def _stage(self, block_index: int) -> tuple[str, int]:
        """("input" | "middle" | "output", index within that stage) of a block in forward order."""
        n = self.num_input_blocks
        if block_index < n:
            return "input", block_index
        return ("middle", 0) if block_index == n else ("output", block_index - n - 1)

    def _run_block(self, runner: LdmBlockRunner, member: nn.Module, block_index: int, h: torch.Tensor,
                   emb: torch.Tensor, context: torch.Tensor | None, output_shape: torch.Size | None,
                   x_dtype: torch.dtype) -> torch.Tensor:
        """Block `block_index` of `member` on h [B x C_in x H x W]; the last block includes the output head."""
        stage, index = self._stage(block_index)
        block = {"input": lambda: member.input_blocks[index], "middle": lambda: member.middle_block,
                 "output": lambda: member.output_blocks[index]}[stage]()
        head = member.out if block_index == self.num_blocks - 1 else None  # so its output is the prediction
        modules = [module for module in (block, head) if module is not None]

        def run(h, emb, context):
            with self._visiting(modules):
                if block is not None:  # ComfyUI allows a UNet without a middle block
                    h = runner.block(stage, index, block, h, emb, context, output_shape)
                return h if head is None else runner.head(member, h, x_dtype)

        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Members are frozen, but gradients flow through them to earlier SABW blocks: recompute their
            # activations in the backward pass instead of keeping N UNets' worth of them.
            return torch.utils.checkpoint.checkpoint(run, h, emb, context, use_reentrant=False)
        return run(h, emb, context)

    def _member_embedding(self, runner: LdmBlockRunner, member: nn.Module, timesteps: torch.Tensor,
                          y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The member's own time embedding (+ label embedding when it takes `y`, as SDXL does)."""
        class_conditional = getattr(member, "num_classes", None) is not None
        if class_conditional and y is None:
            raise ValueError("these members are class-conditional (they have label_emb): pass y")
        with self._visiting([member.time_embed] + ([member.label_emb] if class_conditional else [])):
            return runner.embed(member, timesteps, y, dtype)

    @contextlib.contextmanager
    def _visiting(self, modules: list[nn.Module]):
        """Moves `modules` to `offload_device` for the duration of the block (no-op without offloading)."""
        if self.offload_device is None:
            yield
            return
        home = next(modules[0].parameters()).device
        for module in modules:
            module.to(self.offload_device)
        try:
            yield
        finally:
            for module in modules:
                module.to(home)

    def _forward_blocks(self, runner: LdmBlockRunner, members: Sequence[nn.Module],
                        embeddings: Sequence[torch.Tensor], x: torch.Tensor, contexts: Sequence[torch.Tensor | None],
                        combine: Callable[[int, list[torch.Tensor]], torch.Tensor], x_dtype: torch.dtype) \
            -> torch.Tensor:
        """Runs `members` block by block on a shared input, combining their outputs after every block.

        Member i reads embeddings[i] and contexts[i]. Output blocks take the combined feature concatenated with the
        combined output of the matching input block (the skip connection), so skips carry mixed features.
        """
        runner.begin_pass()
        h = x
        skips = []
        for block_index in range(self.num_blocks):
            stage, index = self._stage(block_index)
            output_shape = None
            if stage == "output":
                h = runner.concat_skip(index, h, skips.pop())
                output_shape = skips[-1].shape if skips else None
            features = [self._run_block(runner, member, block_index, h, emb, context, output_shape, x_dtype)
                        for member, emb, context in zip(members, embeddings, contexts)]
            h = combine(block_index, features)
            if stage != "output":
                h = runner.after_block(stage, h)
            if stage == "input":
                skips.append(h)
                h = runner.after_skip(h)
        return h

    # -- the ensembled forward -----------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, member_contexts: Sequence[torch.Tensor] | None = None,
                member_vectors: Sequence[torch.Tensor] | None = None, runner: LdmBlockRunner | None = None,
                **kwargs) -> torch.Tensor:
        """Ensembled noise (or v) prediction.

        Args:
            x: [B x C_in x H x W] noisy latents (C_in = 9 for inpainting members).
            timesteps: [B] diffusion timesteps (may be fractional).
            context: [B x L x context_dim] text conditioning that every member and SABW read, or None when
                `member_contexts` is given.
            y: [B] labels or [B x adm_in_channels] vectors for class-conditional members (SDXL).
            member_contexts: per-member text conditioning, N x [B x L x context_dim]: member i's cross-attention
                reads member_contexts[i] (the prompt as member i's own text encoder encodes it) and SABW reads their
                mean, as in the authors' code. Overrides `context`.
            member_vectors: per-member `y` of class-conditional members, N x [B x adm_in_channels]: member i's label
                embedding reads member_vectors[i] (SDXL: the prompt's pooled embedding from member i's own bigG
                encoder, with the size conditioning). Overrides `y`.
            runner: how the members' pieces run for this call (default: the ensemble's `runner`).
        Returns:
            [B x C_out x H x W] in x's dtype.
        """
        members = list(self.members)
        runner = runner or self.runner
        dtype = runner.input_dtype(members[0], x)
        h = x.to(dtype)
        if member_contexts is not None:
            if len(member_contexts) != len(members):
                raise ValueError(f"{len(member_contexts)} member contexts for {len(members)} members")
            cast: dict[int, torch.Tensor] = {}  # a tensor shared by several members stays one tensor
            contexts = [cast.setdefault(id(c), self._cast(c, dtype)) for c in member_contexts]
            if all(c is contexts[0] for c in contexts):
                context = contexts[0]  # one encoder for all: exactly the shared-context ensemble
            else:
                context = torch.stack([c.float() for c in contexts]).mean(dim=0).to(dtype)
        else:
            context = self._cast(context, dtype)
            contexts = [context] * len(members)
        if member_vectors is not None:
            if len(member_vectors) != len(members):
                raise ValueError(f"{len(member_vectors)} member vectors for {len(members)} members")
            vectors = list(member_vectors)
        else:
            vectors = [y] * len(members)
        embeddings = [self._member_embedding(runner, member, timesteps, vector, dtype)
                      for member, vector in zip(members, vectors)]
        last_block = self.num_blocks - 1

        if not self.mode.mixes_every_block:
            predictions = [self._forward_blocks(runner, [member], [emb], h, [member_context],
                                                lambda _, features: features[0], x.dtype)
                           for member, emb, member_context in zip(members, embeddings, contexts)]
            time_embedding = self._time_embedding(timesteps, embeddings)
            return self._combine(last_block, predictions, context, time_embedding).to(x.dtype)

        time_embedding = self._time_embedding(timesteps, embeddings)
        return self._forward_blocks(
            runner, members, embeddings, h, contexts,
            lambda block_index, features: self._combine(block_index, features, context, time_embedding), x.dtype,
        ).to(x.dtype)

    @staticmethod
    def _cast(context: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        return context.to(dtype) if context is not None and context.is_floating_point() else context

    def _time_embedding(self, timesteps: torch.Tensor, embeddings: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """SABW's time input (None in the modes without weights)."""
        if not self.mode.needs_weights:
            return None
        return self.aggregator.embed_time(timesteps, embeddings)

    def _combine(self, block_index: int, features: list[torch.Tensor], context: torch.Tensor | None,
                 time_embedding: torch.Tensor | None) -> torch.Tensor:
        """Mixes N member features of one block with the current mode's weights."""
        if not self.mode.needs_weights:
            reference = features[0]
            weights = torch.full((reference.shape[0], len(features), 1, 1), 1.0 / len(features),
                                 dtype=torch.float32, device=reference.device)
        else:
            weights = self.aggregator(block_index, features, time_embedding, context)
        if self.observer is not None:
            height, width = features[0].shape[-2:]
            self.observer(block_index, weights.detach().expand(-1, -1, height, width))
        return mix(features, weights)
