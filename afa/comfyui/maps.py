"""Aggregation maps of an ensemble MODEL's latest sampling run (the paper's Figure 6), for the AFA Aggregation Maps
node. Recording and drawing are the core's (`afa.maps`); this module only knows how ComfyUI batches a UNet call:
`transformer_options["cond_or_uncond"]` lists the chunks of the batch (0 conditional, 1 unconditional), and
`transformer_options["sample_sigmas"]` / `["sigmas"]` say which step a call belongs to.
"""

from __future__ import annotations

from typing import Sequence

import torch
from PIL import Image

from afa.maps import WeightMapRecorder, named_block_indices, render_weight_maps


class SamplingMaps:
    """The maps of the blocks `blocks` (forward order indices) at every model call of the latest sampling run, for
    the first image's conditional row.

    Args:
        blocks: block indices to keep.
        block_names: the members' block names in forward order (a UNet's `input_blocks.0` ..., FLUX's
            `double_blocks.0` ...).
        member_names: the members' labels, in ensemble order (the legend).
    """

    def __init__(self, blocks: Sequence[int], block_names: Sequence[str], member_names: Sequence[str]):
        self.blocks = list(blocks)
        self.block_names = list(block_names)
        self.member_names = list(member_names)
        self.recorder = WeightMapRecorder(blocks=self.blocks, batch_index=0)
        self.steps: list[tuple[int, int]] = []  # (step, steps) of each recorded call

    def start_run(self) -> None:
        """A new sampling run with this MODEL: forget the previous run's maps."""
        self.recorder.clear()
        self.steps.clear()

    def observer(self, transformer_options: dict):
        """The EnsembleUNet observer for one UNet call, or None when the call has no conditional row (ComfyUI runs
        the unconditional batch alone when conditional and unconditional shapes differ)."""
        chunks = list(transformer_options.get("cond_or_uncond") or [0])
        if 0 not in chunks:
            return None
        self.steps.append(_step_of(transformer_options))
        chunk = chunks.index(0)
        recorder = self.recorder

        def observe(block_index: int, weights: torch.Tensor) -> None:
            """weights [B x N x H x W]: rows in `chunks` equal parts; the first conditional row is kept."""
            recorder.batch_index = chunk * (weights.shape[0] // len(chunks))
            recorder(block_index, weights)

        return observe

    def render(self, blocks: Sequence[str] = (), every: int = 0) -> Image.Image:
        """The figure: one cell per chosen block (names; empty: the recorded default) and step (every `every`-th
        step and the last; 0: the last only)."""
        if not self.steps:
            raise ValueError("no aggregation maps recorded yet: connect this node after a sampler that ran the AFA "
                             "ensemble MODEL")
        chosen = named_block_indices(blocks, self.block_names) if blocks else self.blocks
        missing = [self.block_names[block] for block in chosen if block not in self.blocks]
        if missing:
            recorded = ", ".join(self.block_names[block] for block in self.blocks)
            raise ValueError(f"{', '.join(missing)}: not recorded (this mode mixes {recorded})")
        last_step = max(step for step, _ in self.steps)
        keep = [call for call, (step, _) in enumerate(self.steps)
                if step == last_step or (every > 0 and step % every == 0)]
        keep = [call for call in keep if self.steps.index(self.steps[call]) == call]  # the first call of a step
        maps = [(f"{self.block_names[block]}, step {self.steps[call][0] + 1}/{self.steps[call][1]}",
                 self.recorder.maps[block][call])
                for block in chosen for call in keep if call < len(self.recorder.maps.get(block, []))]
        return render_weight_maps(maps, self.member_names, columns=len(keep), title="AFA aggregation maps")


def _step_of(transformer_options: dict) -> tuple[int, int]:
    """(0-based step, number of steps) of a UNet call, from the sampler's sigmas (the nearest one)."""
    schedule = transformer_options.get("sample_sigmas")
    sigmas = transformer_options.get("sigmas")
    if schedule is None or sigmas is None or len(schedule) < 2:
        return 0, 1
    distance = (schedule[:-1].float().cpu() - float(sigmas.reshape(-1)[0])).abs()
    return int(distance.argmin()), len(schedule) - 1
