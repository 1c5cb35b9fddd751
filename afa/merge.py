"""Weight merging: the members' weights averaged into one model, the static baselines AFA is compared with.

A merge costs one UNet at inference instead of N (SuperMerger, Model Mixer, ComfyUI's merge nodes, the MBW tools;
the paper's "Weighted Merging" and "MBW", Tables 2 and 8). Two kinds, both computed here:

* weighted merge: every tensor theta = sum_i w_i theta_i with one weight vector w over the N members (summing to 1).
  For two members this is the merge tools' ratio r: (1 - r) theta_A + r theta_B, w = (1 - r, r).
* MBW (merge block weighted): one weight vector per MBW block. The blocks are kohya's merge_block_weighted ones,
  which bbc-mc's MBW GUI, SuperMerger and auto-MBW use: one per ldm UNet block, IN00..IN11, M00, OUT00..OUT11 for
  SD 1.x/2.x (25), IN00..IN08, M00, OUT00..OUT08 for SDXL (19), in the forward order of `afa.unet.block_layout`
  (IN<k> is `input_blocks.<k>`, M00 `middle_block`, OUT<k> `output_blocks.<k>`), plus BASE, the text encoder's
  ratio (a separate model here: `MergedModel` of the text encoders, one group). Keys outside the blocks go with
  the block next to them, as kohya's script assigns them: `time_embed.*` with IN00 ("before input blocks"), the
  output head `out.*` with the last output block ("after output blocks"; AFA's layout counts the head in that
  block too). SDXL's `label_emb.*` (the pooled text and size embedding, added to the time embedding) goes with
  IN00 like the time embedding; SuperMerger keeps both from model A for SDXL (ratio 0 for them) and ComfyUI's
  ModelMergeSDXL gives them sliders of their own.

Memory: a `MergedModel` is one copy of a member, allocated once; every merge is written into its tensors in place,
re-merging only the groups (MBW blocks) whose weights changed, so a search over many merges costs one extra model.
Nothing here reads a file or imports a host.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.")
# Keys of the UNet's top level that belong to no ldm block, and the MBW block kohya's script merges them with.
FIRST_BLOCK_PREFIXES = ("time_embed.", "label_emb.")
LAST_BLOCK_PREFIXES = ("out.",)

Weights = tuple[float, ...]
"""One weight per member, summing to 1."""


def mbw_block_names(num_input_blocks: int) -> tuple[str, ...]:
    """The MBW blocks in forward order: IN00.., M00, OUT00.. (25 for SD 1.x/2.x's 12 input blocks, 19 for SDXL's 9)."""
    return (tuple(f"IN{index:02d}" for index in range(num_input_blocks)) + ("M00",)
            + tuple(f"OUT{index:02d}" for index in range(num_input_blocks)))


def mbw_block_index(key: str, num_input_blocks: int) -> int:
    """The MBW block of a UNet state-dict key (without `model.diffusion_model.`): its index in `mbw_block_names`,
    which is the ldm block's index in forward order (afa.unet.block_name).

    Raises:
        ValueError: the key is in no block of a UNet with `num_input_blocks` input blocks.
    """
    match = _BLOCK_KEY.match(key)
    if match:
        index = int(match.group(2))
        if index >= num_input_blocks:
            raise ValueError(f"{key}: block {index} of a UNet with {num_input_blocks} input and output blocks")
        return index if match.group(1) == "input_blocks" else num_input_blocks + 1 + index
    if key.startswith("middle_block."):
        return num_input_blocks
    if key.startswith(FIRST_BLOCK_PREFIXES):
        return 0
    if key.startswith(LAST_BLOCK_PREFIXES):
        return 2 * num_input_blocks
    raise ValueError(f"{key}: not a key of an ldm UNet block, its time or label embedding or its output head")


def count_input_blocks(keys: Iterable[str]) -> int:
    """The number of input blocks of a UNet state dict's keys (12 for SD 1.x/2.x, 9 for SDXL)."""
    indices = {int(match.group(2)) for key in keys if (match := _BLOCK_KEY.match(key)) and match.group(1) ==
               "input_blocks"}
    if not indices:
        raise ValueError("not a UNet state dict: no input_blocks.* keys")
    return max(indices) + 1


def mbw_block_map(keys: Iterable[str], num_input_blocks: int | None = None) -> dict[str, int]:
    """key -> MBW block index for every key of a UNet state dict (each key in exactly one block)."""
    keys = list(keys)
    if num_input_blocks is None:
        num_input_blocks = count_input_blocks(keys)
    return {key: mbw_block_index(key, num_input_blocks) for key in keys}


def check_weights(weights: Sequence[float], num_members: int) -> Weights:
    """`weights` as a tuple of floats, after checking there is one per member and that they sum to 1 (a merge of
    models, not a rescaling of one).

    Raises:
        ValueError: otherwise.
    """
    weights = tuple(float(weight) for weight in weights)
    if len(weights) != num_members:
        raise ValueError(f"{len(weights)} merge weights for {num_members} members")
    if not all(math.isfinite(weight) for weight in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ValueError(f"merge weights must be finite and sum to 1, got {weights}")
    return weights


def ratio_weights(ratio: float) -> Weights:
    """Two members merged at the merge tools' ratio r: (1 - r) of the first, r of the second."""
    return (1.0 - float(ratio), float(ratio))


@torch.no_grad()
def merge_tensor_(target: torch.Tensor, sources: Sequence[torch.Tensor], weights: Weights) -> None:
    """target <- sum_i weights[i] * sources[i], in place. target and every source have one shape.

    Members with weight 0 are skipped, and a member with weight 1 (all others 0) is copied, so a 0/1 merge equals
    that member bit for bit (-0.0 and all). A floating-point target of less than 32 bits is summed in float32 and
    rounded once. Integer tensors (e.g. a text encoder's position ids) are the first member's.
    """
    if not target.is_floating_point():
        target.copy_(sources[0])
        return
    terms = [(weight, source) for weight, source in zip(weights, sources) if weight != 0.0]
    if len(terms) == 1 and terms[0][0] == 1.0:
        target.copy_(terms[0][1])
        return
    wide = target.dtype in (torch.float32, torch.float64)
    accumulator = target if wide else torch.empty(target.shape, dtype=torch.float32, device=target.device)
    (weight, source), rest = terms[0], terms[1:]
    torch.mul(source.to(accumulator.dtype), weight, out=accumulator)
    for weight, source in rest:
        accumulator.add_(source.to(accumulator.dtype), alpha=weight)
    if not wide:
        target.copy_(accumulator)


class MergedModel:
    """A merge of N members of one architecture, held in one preallocated copy of the first member (`model`) whose
    tensors are rewritten in place by `set_weights`.

    Args:
        members: modules with identical state-dict keys and shapes (UNets, or text encoders).
        groups: key -> group index for groups merged with their own weights (MBW blocks: `mbw_block_map`); None:
            one group, every key.
    Attributes:
        model: the merged module (frozen, eval mode), on the first member's device and dtype. It holds the first
            member's weights until the first `set_weights`.
        weights: each group's current weights (None before the first merge).
    """

    def __init__(self, members: Sequence[nn.Module], groups: Mapping[str, int] | None = None):
        if len(members) < 2:
            raise ValueError(f"a merge needs at least 2 members, got {len(members)}")
        self.num_members = len(members)
        self.model = copy.deepcopy(members[0]).eval().requires_grad_(False)
        self._target = self.model.state_dict()  # tensors sharing the model's storage: writes go into the model
        self._sources = [member.state_dict() for member in members]
        for index, source in enumerate(self._sources[1:], start=2):
            shapes = {key: tuple(value.shape) for key, value in source.items()}
            if shapes != {key: tuple(value.shape) for key, value in self._target.items()}:
                raise ValueError(f"member {index} has other tensors than member 1: only members of one "
                                 f"architecture can be merged")
        if groups is None:
            groups = dict.fromkeys(self._target, 0)
        missing = [key for key in self._target if key not in groups]
        if missing:
            raise ValueError(f"{len(missing)} keys have no merge group, e.g. {', '.join(missing[:3])}")
        self.num_groups = max(groups.values()) + 1
        self._keys_of_group: list[list[str]] = [[] for _ in range(self.num_groups)]
        for key in self._target:
            self._keys_of_group[groups[key]].append(key)
        self.weights: list[Weights] | None = None

    @classmethod
    def of_unets(cls, members: Sequence[nn.Module]) -> "MergedModel":
        """A merge of UNets with one group per MBW block (25 for SD 1.x/2.x, 19 for SDXL)."""
        return cls(members, mbw_block_map(members[0].state_dict().keys()))

    @property
    def nbytes(self) -> int:
        """The memory the merged copy holds (what a merge costs on top of the members)."""
        return sum(tensor.numel() * tensor.element_size() for tensor in self._target.values())

    def set_weights(self, weights: Sequence[float] | Sequence[Sequence[float]]) -> int:
        """Merges with one weight vector for every group (a weighted merge), or a list of one per group (MBW).
        Only the groups whose weights changed are re-merged; returns how many tensors were rewritten."""
        if all(isinstance(weight, (int, float)) for weight in weights):
            weights = [weights] * self.num_groups
        if len(weights) != self.num_groups:
            raise ValueError(f"{len(weights)} weight vectors for {self.num_groups} merge groups")
        checked = [check_weights(group_weights, self.num_members) for group_weights in weights]
        rewritten = 0
        for group, group_weights in enumerate(checked):
            if self.weights is not None and self.weights[group] == group_weights:
                continue
            for key in self._keys_of_group[group]:
                merge_tensor_(self._target[key], [source[key] for source in self._sources], group_weights)
                rewritten += 1
        self.weights = checked
        return rewritten
