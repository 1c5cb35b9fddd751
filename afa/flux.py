"""FLUX-layout transformers in AFA: their block layout, and the block-wise ensemble of N of them (paper Appendix J).

A FLUX.1 transformer (BFL's layout, which ComfyUI's `comfy/ldm/flux/model.py` keeps) embeds the patchified latent
(`img_in`), the T5 text tokens (`txt_in`) and one vector `vec` per sample (time `time_in` + guidance `guidance_in` +
pooled CLIP `vector_in`); it runs `double_blocks` (an image and a text stream side by side, with joint attention),
then `single_blocks` on one sequence [text tokens | image tokens], and `final_layer` maps the image tokens to the
prediction (2 x 2 patches of 16 latent channels: 64 per token).

`EnsembleFlux` runs N members of one layout block by block (it never calls a member's forward()):
- every member embeds the inputs itself: its own `vec`, `img_in` and `txt_in`; its first block reads its own
  embeddings (as a UNet member's first block includes its conv_in);
- after every double block the image streams and the text streams are mixed, after every single block the token
  sequences; every member's next block reads the mixed tokens with its own `vec`. The last block includes
  `final_layer`, so its output is the prediction, and noise averaging mixes that one only;
- SABW sees the image tokens as their 2-D grid (h/2 x w/2 patches, [B x C x h' x w'] per member), so the UNet
  aggregator (afa.aggregator) runs unchanged and stays spatial: per-image-token weights. Its time input is the
  members' mean `vec` (paper design; the fast design embeds 1000 x sigma itself) and it cross-attends to the T5 text
  tokens (the mean of the members' encodings when each reads its own);
- the text tokens get one weight per member and sample (`AggregatorConfig.text_mixing`): by default the mean of
  that member's image-token weights ("image-mean"), or 1/N ("average", the ablation). Why: README, "FLUX: how the
  text tokens are mixed".

How a member's pieces run is a `FluxBlockRunner`'s: the default runs BFL-interface modules (BFL's own, ComfyUI's, or
a host-free definition of that layout: the keyword interface of the blocks is the same), ComfyUI's glue supplies one
with its transformer options and block replacements. Nothing here imports a host.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.utils.checkpoint
from einops import rearrange
from torch import nn

from .aggregator import Aggregator, AggregatorConfig, flux_block_names, preset_config
from .ensemble import BlockwiseEnsemble, Observer, mix
from .errors import CheckpointError, IncompatibleMembersError
from .modes import SABW, Mode

FLUX_MARKER_KEY = "double_blocks.0.img_attn.norm.key_norm.scale"
"""A key only FLUX-layout transformers have (with `img_in.weight`; ComfyUI's detection reads the same key)."""
FLUX_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
"""Where a FLUX transformer's keys start: in a full checkpoint, a ComfyUI model's state dict, a transformer file."""
TEXT_WEIGHTS_FROM_IMAGE = "image-mean"
PATCH_SIZE = 2


@dataclass(frozen=True)
class FluxLayout:
    """A FLUX-layout transformer's shape, read off its tensor shapes (`flux_layout`).

    Attributes:
        hidden_size: token width (FLUX.1: 3072).
        num_heads: attention heads (FLUX.1: 24; hidden_size / the QK-norm width).
        num_double_blocks, num_single_blocks: FLUX.1: 19 and 38.
        in_channels: `img_in`'s input width (patch 2 x 2 x 16 latent channels = 64; more for Fill/inpainting).
        out_channels: `final_layer`'s output width per token (64).
        context_dim: the T5 token width `txt_in` reads (4096).
        vec_dim: the pooled CLIP width `vector_in` reads (768).
        guidance_embed: has `guidance_in` (FLUX.1 [dev]; [schnell] has none).
        mlp_hidden: the blocks' MLP width (4 x hidden_size).
    """

    hidden_size: int
    num_heads: int
    num_double_blocks: int
    num_single_blocks: int
    in_channels: int
    out_channels: int
    context_dim: int
    vec_dim: int
    guidance_embed: bool
    mlp_hidden: int

    @property
    def num_blocks(self) -> int:
        return self.num_double_blocks + self.num_single_blocks

    @property
    def names(self) -> list[str]:
        return flux_block_names(self.num_double_blocks, self.num_single_blocks)

    @property
    def channels(self) -> list[int]:
        """The width of each block's output tokens; the last block includes `final_layer` (the prediction)."""
        return [self.hidden_size] * (self.num_blocks - 1) + [self.out_channels]


FLUX1_DEV = FluxLayout(hidden_size=3072, num_heads=24, num_double_blocks=19, num_single_blocks=38, in_channels=64,
                       out_channels=64, context_dim=4096, vec_dim=768, guidance_embed=True, mlp_hidden=12288)
"""FLUX.1 [dev]'s layout (black-forest-labs/flux `configs["flux-dev"]`)."""


def is_flux(shapes: dict[str, tuple]) -> bool:
    """Whether a key -> shape map (any of FLUX_KEY_PREFIXES) is a FLUX-layout transformer's."""
    return any(f"{prefix}{FLUX_MARKER_KEY}" in shapes and f"{prefix}img_in.weight" in shapes
               for prefix in FLUX_KEY_PREFIXES)


def flux_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """The transformer's keys without their prefix (FLUX_KEY_PREFIXES), other keys (VAE, text encoders) dropped."""
    for prefix in FLUX_KEY_PREFIXES:
        if f"{prefix}{FLUX_MARKER_KEY}" in shapes:
            return {key[len(prefix):]: shape for key, shape in shapes.items() if key.startswith(prefix)}
    raise CheckpointError(f"not a FLUX-layout transformer: no {FLUX_MARKER_KEY}")


def flux_layout(shapes: dict[str, tuple]) -> FluxLayout:
    """Reads a FLUX-layout transformer's layout off its shapes (keys with or without a FLUX_KEY_PREFIXES prefix).

    Raises:
        CheckpointError: not a FLUX-layout transformer (e.g. Chroma, which has no `vector_in`), naming what lacks.
    """
    shapes = flux_shapes(shapes)

    def count(group: str) -> int:
        pattern = re.compile(rf"^{group}\.(\d+)\.")
        indices = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
        return max(indices) + 1 if indices else 0

    needed = ("img_in.weight", "time_in.in_layer.weight", "vector_in.in_layer.weight", "txt_in.weight",
              "final_layer.linear.weight", "double_blocks.0.img_mlp.0.weight")
    missing = [key for key in needed if key not in shapes]
    if missing or count("single_blocks") == 0:
        raise CheckpointError(f"not a FLUX.1-layout transformer: lacks {', '.join(missing) or 'single_blocks'}")
    hidden, in_channels = shapes["img_in.weight"]
    head_dim = shapes[FLUX_MARKER_KEY][0]
    return FluxLayout(hidden_size=hidden, num_heads=hidden // head_dim, num_double_blocks=count("double_blocks"),
                      num_single_blocks=count("single_blocks"), in_channels=in_channels,
                      out_channels=shapes["final_layer.linear.weight"][0], context_dim=shapes["txt_in.weight"][1],
                      vec_dim=shapes["vector_in.in_layer.weight"][1],
                      guidance_embed="guidance_in.in_layer.weight" in shapes,
                      mlp_hidden=shapes["double_blocks.0.img_mlp.0.weight"][0])


def flux_timestep_embedding(t: torch.Tensor, dim: int, max_period: int = 10000,
                            time_factor: float = 1000.0) -> torch.Tensor:
    """BFL's sinusoidal embedding of FLUX's timesteps (sigma in 0..1, scaled by 1000). t [B] -> [B x dim]."""
    t = time_factor * t
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32,
                                                                  device=t.device) / half)
    arguments = t[:, None].float() * frequencies[None]
    embedding = torch.cat([torch.cos(arguments), torch.sin(arguments)], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


def patchify(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A latent [B x C x H x W] as FLUX's image tokens, as ComfyUI's `Flux.process_img` makes them: padded
    (circularly) to even H and W, 2 x 2 patches in row-major order.

    Returns:
        (tokens [B x h'w' x 4C], their position ids [B x h'w' x 3] (0, row, column), the grid (h', w')).
    """
    batch, _, height, width = x.shape
    pad = (0, (PATCH_SIZE - width % PATCH_SIZE) % PATCH_SIZE, 0, (PATCH_SIZE - height % PATCH_SIZE) % PATCH_SIZE)
    x = torch.nn.functional.pad(x, pad, mode="circular")
    tokens = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=PATCH_SIZE, pw=PATCH_SIZE)
    rows, columns = (height + PATCH_SIZE // 2) // PATCH_SIZE, (width + PATCH_SIZE // 2) // PATCH_SIZE
    ids = torch.zeros((rows, columns, 3), device=x.device, dtype=x.dtype)
    ids[:, :, 1] = ids[:, :, 1] + torch.linspace(0, rows - 1, steps=rows, device=x.device, dtype=x.dtype)[:, None]
    ids[:, :, 2] = ids[:, :, 2] + torch.linspace(0, columns - 1, steps=columns, device=x.device,
                                                 dtype=x.dtype)[None, :]
    return tokens, ids.reshape(1, rows * columns, 3).expand(batch, -1, -1), (rows, columns)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """The inverse of `patchify`: tokens [B x h'w' x 4C] -> [B x C x height x width] (padding cropped)."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=grid[0], w=grid[1], ph=PATCH_SIZE,
                     pw=PATCH_SIZE)[:, :, :height, :width]


class FluxBlockRunner:
    """How one FLUX member's pieces run, as BFL's `Flux.forward` (and ComfyUI's `forward_orig`) runs them.

    A host whose model code differs (ComfyUI: transformer options, block replacements, ControlNet) subclasses this.
    """

    def begin_pass(self) -> None:
        """Called before each pass through the blocks (one per call; one per member in noise averaging)."""

    def input_dtype(self, first_member: nn.Module, img: torch.Tensor) -> torch.dtype:
        """The dtype the tokens run in (default: the members' parameter dtype)."""
        return first_member.img_in.weight.dtype

    def embed_vector(self, member: nn.Module, timesteps: torch.Tensor, y: torch.Tensor | None,
                     guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The member's `vec` [B x hidden]: time (+ guidance when it embeds guidance and some is given) + pooled
        CLIP y [B x vec_dim] (zeros when None, as ComfyUI does)."""
        vec_dim = member.vector_in.in_layer.in_features
        vec = member.time_in(flux_timestep_embedding(timesteps, 256).to(dtype))
        if not isinstance(member.guidance_in, nn.Identity) and guidance is not None:
            vec = vec + member.guidance_in(flux_timestep_embedding(guidance, 256).to(dtype))
        if y is None:
            y = torch.zeros((timesteps.shape[0], vec_dim), device=vec.device, dtype=dtype)
        return vec + member.vector_in(y[:, :vec_dim])

    def embed_image(self, member: nn.Module, img: torch.Tensor) -> torch.Tensor:
        """img [B x L_img x in_channels] -> [B x L_img x hidden]."""
        return member.img_in(img)

    def embed_text(self, member: nn.Module, txt: torch.Tensor) -> torch.Tensor:
        """txt [B x L_txt x context_dim] -> [B x L_txt x hidden]."""
        return member.txt_in(txt)

    def positions(self, member: nn.Module, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
        """The rotary embedding of [text | image] token ids ([B x L x 3] each); it has no weights, so one member's
        serves all."""
        return member.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

    def double_block(self, index: int, block: nn.Module, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor,
                     pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Double block `index`: (img [B x L_img x D], txt [B x L_txt x D]) -> the same shapes. May write into
        `txt` (ComfyUI's block does): the ensemble passes each member a tensor of its own."""
        return block(img=img, txt=txt, vec=vec, pe=pe)

    def after_double(self, index: int, img: torch.Tensor) -> torch.Tensor:
        """The mixed image stream of double block `index` before the next block reads it."""
        return img

    def join_streams(self, txt: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """The single blocks' sequence [B x (L_txt + L_img) x D] from the last double block's streams."""
        return torch.cat((txt, img), dim=1)

    def single_block(self, index: int, block: nn.Module, x: torch.Tensor, vec: torch.Tensor,
                     pe: torch.Tensor) -> torch.Tensor:
        """Single block `index` on x [B x (L_txt + L_img) x D]. May write into `x`, as double_block into txt."""
        return block(x, vec=vec, pe=pe)

    def after_single(self, index: int, x: torch.Tensor, text_tokens: int) -> torch.Tensor:
        """The mixed sequence of single block `index` (not the last) before the next block reads it."""
        return x

    def head(self, member: nn.Module, img: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        """`final_layer` on the image tokens [B x L_img x D] -> the prediction [B x L_img x out_channels]."""
        return member.final_layer(img, vec)


FLUX_BLOCKS = FluxBlockRunner()

Combine = Callable[[int, list, int, "list | None"], tuple]


class EnsembleFlux(BlockwiseEnsemble):
    """N frozen FLUX-layout transformers of one layout plus an optional trained `Aggregator` (family "flux").

    Args:
        members: transformers with BFL's modules (`img_in`, `time_in`, `guidance_in`, `vector_in`, `txt_in`,
            `pe_embedder`, `double_blocks`, `single_blocks`, `final_layer`), in the order the aggregator was trained
            for.
        aggregator: required for the modes that need weights (afa.modes); its config's family must be "flux".
        mode: an afa.modes Mode, or its name.
        observer: receives (block index, image-token weights as maps [B x N x h' x w']) of every mixed block.
        runner: how the members' pieces run (default BFL's interface); `forward(runner=...)` overrides it.
    """

    family = "flux"

    def __init__(self, members: Sequence[nn.Module], aggregator: Aggregator | None = None, mode: Mode | str = SABW,
                 observer: Observer | None = None, runner: FluxBlockRunner = FLUX_BLOCKS):
        super().__init__(members, aggregator, observer, runner)
        self.num_double_blocks = len(members[0].double_blocks)
        self.num_single_blocks = len(members[0].single_blocks)
        if self.num_single_blocks == 0:
            raise IncompatibleMembersError("these FLUX-layout members have no single blocks")
        self.num_blocks = self.num_double_blocks + self.num_single_blocks
        self.block_names = flux_block_names(self.num_double_blocks, self.num_single_blocks)
        self.set_mode(mode)

    # -- mixing ------------------------------------------------------------------------------------------------------

    def _image_weights(self, block_index: int, image_tokens: list[torch.Tensor], grid: tuple[int, int],
                       context: torch.Tensor | None, time_embedding: torch.Tensor | None) -> torch.Tensor:
        """The weights of the image tokens of one block: [B x N x h' x w'] (SABW) or [B x N x 1 x 1] (equal).
        image_tokens: N x [B x h'w' x C], row-major over the grid."""
        reference = image_tokens[0]
        if not self.mode.needs_weights:
            weights = torch.full((reference.shape[0], len(image_tokens), 1, 1), 1.0 / len(image_tokens),
                                 dtype=torch.float32, device=reference.device)
        else:
            maps = [tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
                    for tokens in image_tokens]
            weights = self.aggregator(block_index, maps, time_embedding, context)
        if self.observer is not None:
            self.observer(block_index, weights.detach().expand(-1, -1, *grid))
        return weights

    def text_weights(self, image_weights: torch.Tensor) -> torch.Tensor:
        """The text tokens' weights [B x N x 1] from the image tokens' [B x N x h' x w'] (or [B x N x 1 x 1]):
        each member's mean image-token weight per sample, or 1/N with `text_mixing` "average"."""
        if not self._text_follows_image():
            return torch.full_like(image_weights[:, :, :1, 0], 1.0 / image_weights.shape[1])
        return image_weights.mean(dim=(2, 3))[..., None]

    def _text_follows_image(self) -> bool:
        return not self.mode.needs_weights or self.aggregator.config.text_mixing == TEXT_WEIGHTS_FROM_IMAGE

    def _combine(self, block_index: int, features: list[torch.Tensor], text_tokens: int,
                 text_features: list[torch.Tensor] | None, grid: tuple[int, int], context: torch.Tensor | None,
                 time_embedding: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mixes one block's member outputs: features N x [B x (text_tokens + h'w') x C] (single blocks; the
        prediction with text_tokens 0) or the image streams N x [B x h'w' x C] with the text streams
        `text_features` N x [B x L_txt x C] (double blocks). Returns (mixed features, mixed text stream or None)."""
        image_weights = self._image_weights(block_index, [f[:, text_tokens:] for f in features], grid, context,
                                            time_embedding)
        token_weights = image_weights.flatten(2)  # [B x N x h'w'] or [B x N x 1]
        if text_tokens or text_features is not None:
            text = self.text_weights(image_weights)
            if text_features is not None:
                return mix(features, token_weights), mix(text_features, text)
            if token_weights.shape[-1] != 1 or not self._text_follows_image():  # else one weight for all tokens
                token_weights = torch.cat([text.expand(-1, -1, text_tokens),
                                           token_weights.expand(-1, -1, features[0].shape[1] - text_tokens)], dim=2)
        return mix(features, token_weights), None

    # -- the blocks --------------------------------------------------------------------------------------------------

    def _run(self, function, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            # Members are frozen, but gradients flow through them to earlier SABW blocks: recompute their
            # activations in the backward pass instead of keeping N transformers' worth of them.
            return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    @staticmethod
    def _own(tensor: torch.Tensor, member_index: int, count: int) -> torch.Tensor:
        """The shared input of a block for one member: blocks write into their input (ComfyUI's), so every member
        but the last gets a copy."""
        return tensor.clone() if member_index < count - 1 else tensor

    def _forward_blocks(self, runner: FluxBlockRunner, members: Sequence[nn.Module], vecs: Sequence[torch.Tensor],
                        img: torch.Tensor, txts: Sequence[torch.Tensor], pe: torch.Tensor,
                        combine: Combine) -> torch.Tensor:
        """Runs `members` block by block, combining their outputs after every block.

        Args:
            img: [B x L_img x in_channels] image tokens; every member embeds them with its own `img_in`.
            txts: member i's text tokens [B x L_txt x context_dim], embedded with its own `txt_in`.
            vecs: member i's `vec` [B x hidden].
            combine: (block index, features, text tokens, text features or None) -> (mixed, mixed text or None).
        Returns:
            the combined prediction [B x L_img x out_channels].
        """
        runner.begin_pass()
        count, last = len(members), self.num_blocks - 1
        imgs = [runner.embed_image(member, img) for member in members]
        txts = [runner.embed_text(member, txt) for member, txt in zip(members, txts)]
        text_tokens = txts[0].shape[1]
        img = txt = None
        for index in range(self.num_double_blocks):
            outputs = [self._run(runner.double_block, index, member.double_blocks[index],
                                 imgs[i] if img is None else img,
                                 txts[i] if txt is None else self._own(txt, i, count), vecs[i], pe)
                       for i, member in enumerate(members)]
            img, txt = combine(index, [out[0] for out in outputs], 0, [out[1] for out in outputs])
            img = runner.after_double(index, img)
        x = None if img is None else runner.join_streams(txt, img)
        for index in range(self.num_single_blocks):
            block_index = self.num_double_blocks + index
            features = []
            for i, member in enumerate(members):
                member_x = runner.join_streams(txts[i], imgs[i]) if x is None else self._own(x, i, count)
                out = self._run(runner.single_block, index, member.single_blocks[index], member_x, vecs[i], pe)
                features.append(out if block_index != last else
                                self._run(runner.head, member, out[:, text_tokens:], vecs[i]))
            x, _ = combine(block_index, features, text_tokens if block_index != last else 0, None)
            if block_index != last:
                x = runner.after_single(index, x, text_tokens)
        return x

    # -- the ensembled forward ---------------------------------------------------------------------------------------

    def forward_tokens(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor | None,
                       txt_ids: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor | None = None,
                       guidance: torch.Tensor | None = None, grid: tuple[int, int] | None = None,
                       member_contexts: Sequence[torch.Tensor] | None = None,
                       member_vectors: Sequence[torch.Tensor] | None = None,
                       runner: FluxBlockRunner | None = None) -> torch.Tensor:
        """The ensembled prediction on tokens (BFL's `Flux.forward` / ComfyUI's `forward_orig` arguments).

        Args:
            img: [B x L_img x in_channels] patchified latent, row-major over `grid` (afa.flux.patchify).
            img_ids, txt_ids: [B x L_img x 3], [B x L_txt x 3] position ids.
            txt: [B x L_txt x context_dim] T5 tokens every member and SABW read, or None with `member_contexts`.
            timesteps: [B] FLUX timesteps (sigma in 0..1).
            y: [B x vec_dim] pooled CLIP embedding (None: zeros).
            guidance: [B] distilled guidance (FLUX.1 [dev]; ignored by members without guidance_in).
            grid: (h', w') with h' * w' = L_img; default: square.
            member_contexts: N x [B x L_txt x context_dim]: member i reads member_contexts[i], SABW their mean.
            member_vectors: N x [B x vec_dim]: member i's pooled embedding. Overrides y.
            runner: how the members' pieces run for this call (default: the ensemble's).
        Returns:
            [B x L_img x out_channels] in img's dtype.
        """
        members = list(self.members)
        runner = runner or self.runner
        if grid is None:
            side = math.isqrt(img.shape[1])
            grid = (side, img.shape[1] // side)
        if grid[0] * grid[1] != img.shape[1]:
            raise ValueError(f"{img.shape[1]} image tokens do not fill a {grid[0]} x {grid[1]} grid")
        dtype = runner.input_dtype(members[0], img)
        contexts, context = self._contexts(txt, member_contexts, len(members), dtype)
        vectors = list(member_vectors) if member_vectors is not None else [y] * len(members)
        if len(vectors) != len(members):
            raise ValueError(f"{len(vectors)} member vectors for {len(members)} members")
        vecs = [runner.embed_vector(member, timesteps, vector, guidance, dtype)
                for member, vector in zip(members, vectors)]
        pe = runner.positions(members[0], txt_ids, img_ids)
        time_embedding = (self.aggregator.embed_time(timesteps * 1000, vecs) if self.mode.needs_weights else None)
        tokens = img.to(dtype)

        def combine(block_index, features, text_tokens, text_features):
            return self._combine(block_index, features, text_tokens, text_features, grid, context, time_embedding)

        if not self.mode.mixes_every_block:
            def alone(_, features, __, text):  # one member per pass: its outputs are the block's
                return features[0], None if text is None else text[0]

            predictions = [self._forward_blocks(runner, [member], [vec], tokens, [member_context], pe, alone)
                           for member, vec, member_context in zip(members, vecs, contexts)]
            return combine(self.num_blocks - 1, predictions, 0, None)[0].to(img.dtype)
        return self._forward_blocks(runner, members, vecs, tokens, contexts, pe, combine).to(img.dtype)

    @staticmethod
    def _contexts(txt: torch.Tensor | None, member_contexts: Sequence[torch.Tensor] | None, count: int,
                  dtype: torch.dtype) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(each member's text tokens, the text SABW reads: theirs, or their mean when they differ)."""
        if member_contexts is None:
            return [txt.to(dtype)] * count, txt.to(dtype)
        if len(member_contexts) != count:
            raise ValueError(f"{len(member_contexts)} member contexts for {count} members")
        cast: dict[int, torch.Tensor] = {}  # a tensor shared by several members stays one tensor
        contexts = [cast.setdefault(id(c), c.to(dtype)) for c in member_contexts]
        if all(c is contexts[0] for c in contexts):
            return contexts, contexts[0]
        return contexts, torch.stack([c.float() for c in contexts]).mean(dim=0).to(dtype)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, guidance: torch.Tensor | None = None,
                member_contexts: Sequence[torch.Tensor] | None = None,
                member_vectors: Sequence[torch.Tensor] | None = None,
                runner: FluxBlockRunner | None = None) -> torch.Tensor:
        """The ensembled prediction on a latent, with the call signature of ComfyUI's `Flux.forward`.

        Args:
            x: [B x C x H x W] latent (FLUX: C = 16).
            timesteps: [B] sigma in 0..1. context: [B x L_txt x context_dim] T5 tokens. y: [B x vec_dim] pooled
            CLIP. guidance: [B]. member_contexts, member_vectors, runner: as in `forward_tokens`.
        Returns:
            [B x C_out x H x W] (the velocity, for FLUX.1).
        """
        tokens, img_ids, grid = patchify(x)
        txt_source = context if context is not None else member_contexts[0]
        txt_ids = torch.zeros((x.shape[0], txt_source.shape[1], 3), device=x.device, dtype=x.dtype)
        out = self.forward_tokens(tokens, img_ids, context, txt_ids, timesteps, y, guidance, grid,
                                  member_contexts, member_vectors, runner)
        return unpatchify(out, grid, x.shape[-2], x.shape[-1])


def flux_preset_config(preset: str, num_members: int, layout: FluxLayout, **overrides) -> AggregatorConfig:
    """The SABW config of a preset ("paper", "fast") for `num_members` FLUX members of `layout`: one SABW block per
    double and single block, the paper design's time input the members' `vec` (hidden_size wide), cross-attention
    to the T5 tokens (context_dim wide); `overrides` as afa.aggregator.preset_config's (e.g. text_mixing)."""
    return preset_config(preset, num_members, layout.channels, layout.context_dim,
                         member_time_embed_dim=layout.hidden_size, family="flux",
                         num_double_blocks=layout.num_double_blocks, **overrides)
