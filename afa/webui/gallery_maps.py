"""Aggregation maps in the gallery (the paper's Figure 6): one extra image per generated image showing, for a few
blocks and sampling steps, each member's weight at every pixel in the member's colour, with a legend.

Collection: the ensemble's observer receives every mixed block's weights [B x N x H x W] at every UNet call. The
WebUI's denoiser (sd_samplers_cfg_denoiser.py v1.10) stacks, for each image, one row per `AND` part of its prompt,
then the unconditional rows, and runs them in one UNet call or, without "batch cond/uncond", in several in that
order. So after each `on_cfg_denoiser` callback the maps follow the rows across the step's UNet calls and record,
for image i, the row of its first prompt part (`image_rows`). Rendering uses afa.maps (colours, layout, legend);
nothing is drawn here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from afa.maps import WeightMapRecorder, blocks_to_show, colorize_weights, legend_entries, render_grid
from afa.modes import Mode
from afa.unet import block_name

CELL_SIZE = 128


@dataclass
class _Pass:
    """The maps of one sampling pass (first pass, hires pass, img2img) for the images of one batch."""

    label: str
    recorders: list[WeightMapRecorder] = field(default_factory=list)  # one per image of the batch
    steps: list[tuple[int, int]] = field(default_factory=list)  # (step, total) of each recorded call


class AggregationMaps:
    """Records a job's weight maps and renders one figure per generated image after each batch.

    Args:
        member_names: the members' labels, in ensemble order (the legend).
        title: figure title (mode and weights file).
        batch_size: images per batch.
        every: draw every N-th step (and the last); None = the last step only.
    """

    def __init__(self, member_names: list[str], title: str, batch_size: int, every: int | None):
        self.member_names = member_names
        self.title = title
        self.batch_size = batch_size
        self.every = every
        self.blocks: list[int] = []
        self.num_input_blocks = 0
        self.first_block = 0  # the first block the observer sees in a UNet call
        self.passes: list[_Pass] = []
        self.pending_step: tuple[int, int] | None = None
        self.pending_rows: list[int] = list(range(batch_size))
        self.image_rows: list[int] = []  # the recorded step's row of each image, over the step's UNet calls
        self.call_offset = 0  # the first row of the current UNet call within the step's rows
        self.call_rows = 0  # rows of the current UNet call
        self.recording = False

    def configure(self, ensemble, mode: Mode) -> None:
        """Called when an ensemble is built (the block layout is the same for every pass of a job)."""
        self.blocks = blocks_to_show(ensemble, mode)
        self.num_input_blocks = ensemble.num_input_blocks
        self.first_block = 0 if mode.mixes_every_block else ensemble.num_blocks - 1

    def begin_pass(self, label: str) -> None:
        self.passes.append(_Pass(label))
        self.pending_step = None
        self.recording = False

    def on_denoiser_step(self, step: int, total: int, prompt_parts: list[int] | None = None) -> None:
        """`on_cfg_denoiser`: the next UNet call starts step `step` (0-based) of `total`; image i's prompt has
        `prompt_parts[i]` `AND` parts (default: one each), so its first row is the sum of those before it."""
        self.pending_step = (step, total)
        parts = prompt_parts or [1] * self.batch_size
        self.pending_rows = [sum(parts[:index]) for index in range(len(parts))]

    def observe(self, block_index: int, weights) -> None:
        """The EnsembleUNet observer: weights [B x N x H x W] of block `block_index`."""
        if block_index == self.first_block:  # a UNet call begins
            if self.pending_step is not None and self.passes:
                self._start_step(self.passes[-1], self.pending_step)
                self.pending_step = None
                self.image_rows = self.pending_rows
                self.call_offset, self.recording = 0, True
            elif self.recording:
                self.call_offset += self.call_rows
            self.call_rows = weights.shape[0]
            if self.recording and self.call_offset > max(self.image_rows, default=-1):
                self.recording = False  # the step's remaining calls hold other prompt parts and the uncond rows
        if not self.recording or block_index not in self.blocks:
            return
        for recorder, row in zip(self.passes[-1].recorders, self.image_rows):
            if self.call_offset <= row < self.call_offset + weights.shape[0]:
                recorder(block_index, weights[row - self.call_offset:row - self.call_offset + 1])

    def _start_step(self, current: _Pass, step: tuple[int, int]) -> None:
        if not current.recorders:
            current.recorders = [WeightMapRecorder(self.blocks, batch_index=0) for _ in range(self.batch_size)]
        if self.every is None:  # only the last step is drawn: keep one
            current.steps.clear()
            for recorder in current.recorders:
                recorder.clear()
        current.steps.append(step)

    def _selected(self, steps: list[tuple[int, int]]) -> list[int]:
        if self.every is None:
            return [len(steps) - 1]
        return [index for index, (step, _) in enumerate(steps)
                if (step + 1) % self.every == 0 or index == len(steps) - 1]

    def render_batch(self) -> list[Image.Image | None]:
        """One figure per image of the batch just sampled (None where nothing was recorded); then forgets it.

        A figure has a row per pass and block, a column per drawn step; with one drawn step per pass, a row per
        pass and a column per block."""
        passes = [current for current in self.passes if current.steps]
        one_step = all(len(self._selected(current.steps)) == 1 for current in passes)
        figures = []
        for image_index in range(self.batch_size):
            rows = []
            for current in passes:
                if image_index >= len(current.recorders):
                    continue
                cells = self._cells(current, current.recorders[image_index], several_passes=len(passes) > 1)
                rows += [[cell for block_cells in cells for cell in block_cells]] if one_step else cells
            rows = [row for row in rows if row]
            figures.append(render_grid(rows, legend_entries(self.member_names), CELL_SIZE, 2, self.title)
                           if rows else None)
        self.passes.clear()
        return figures

    def _cells(self, current: _Pass, recorder: WeightMapRecorder, several_passes: bool) -> list[list]:
        """Per drawn block, the (label, RGB map) cells of the drawn steps."""
        cells = []
        for block in self.blocks:
            recorded = recorder.maps.get(block, [])
            row = []
            for index in self._selected(current.steps):
                if index < len(recorded):
                    step, total = current.steps[index]
                    when = f"{current.label}, step {step + 1}/{total}" if several_passes else \
                        f"step {step + 1}/{total}"
                    row.append((f"{block_name(block, self.num_input_blocks)}\n{when}",
                                colorize_weights(recorded[index])))
            cells.append(row)
        return cells
