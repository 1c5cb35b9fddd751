"""Pictures of aggregation maps (the paper's Figure 6) and of per-pixel winners (its Figure 1).

An aggregation map is the weights one SABW block gave the members at one call, [N x H x W], summing to one over N at
every pixel. It is drawn by giving every member a fixed colour and painting each pixel with the weight-mixed colour,
so a pixel fully owned by member i shows member i's colour and a 50/50 pixel shows the average of two colours.
Maps are collected from a running ensemble by passing a `WeightMapRecorder` as the `EnsembleUNet`'s observer.

Used by training/evaluate.py, the demo and the WebUI extension; like the rest of `afa/` it never imports the WebUI.
Text uses PIL's built-in bitmap font (`ImageFont.load_default()`), so nothing is downloaded and no font has to be
installed.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .members import unet_shapes
from .unet import block_layout, block_name

# The Okabe-Ito colour-blind-safe palette, reordered so the first two (the common 2-member case) contrast most.
# AFA ensembles at most 6 members; the 7th colour is spare.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0),    # orange
    (0, 114, 178),    # blue
    (0, 158, 115),    # bluish green
    (204, 121, 167),  # reddish purple
    (240, 228, 66),   # yellow
    (86, 180, 233),   # sky blue
    (213, 94, 0),     # vermillion
)
TIE_COLOR = (225, 225, 225)
"""Pixels where several members are exactly equally good (winner maps only): light grey, unlike any mix of the
palette's first two colours."""
TIE = -1
"""The winner index of a tied pixel."""

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (0, 0, 0)
PADDING = 8  # pixels between cells and around the figure
SWATCH = 11  # side of a legend colour square, the height of a line of the default font

CellContent = Union[Image.Image, np.ndarray, None]
"""What a grid cell shows: a PIL image, an RGB array [H x W x 3] (uint8), or nothing."""


def member_colors(count: int) -> list[tuple[int, int, int]]:
    """The colours of members 0..count-1."""
    if not 1 <= count <= len(PALETTE):
        raise ValueError(f"can colour 1 to {len(PALETTE)} members, got {count}")
    return list(PALETTE[:count])


def colorize_weights(weights: torch.Tensor) -> np.ndarray:
    """weights [N x H x W] (each pixel's weights sum to one) -> RGB [H x W x 3] uint8, each pixel the weight-mixed
    member colour."""
    if weights.ndim != 3:
        raise ValueError(f"weights must be [N x H x W], got shape {tuple(weights.shape)}")
    palette = torch.tensor(member_colors(weights.shape[0]), dtype=torch.float32)
    rgb = torch.einsum("nhw,nc->hwc", weights.detach().float().cpu(), palette)
    return rgb.round().clamp(0, 255).to(torch.uint8).numpy()


def colorize_winners(winners: torch.Tensor, num_members: int) -> np.ndarray:
    """winners [H x W] (member index per pixel, `TIE` where members are equally good) -> RGB [H x W x 3] uint8."""
    colors = torch.tensor(member_colors(num_members) + [TIE_COLOR], dtype=torch.uint8)
    winners = winners.detach().long().cpu()
    if winners.numel() and (winners.min() < TIE or winners.max() >= num_members):
        raise ValueError(f"winner indices must be in [0, {num_members}) or TIE ({TIE})")
    # TIE (-1) indexes the last row of `colors`: the tie colour.
    return colors[winners].numpy()


def legend_entries(member_names: Sequence[str]) -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of each member, for `render_grid`'s legend."""
    return list(zip(member_names, member_colors(len(member_names))))


# -- layout --------------------------------------------------------------------------------------------------------

def _font() -> ImageFont.ImageFont:
    return ImageFont.load_default()


def _line_height() -> int:
    return _font().getbbox("Mg")[3] + 2


def _characters_per_line(width: int) -> int:
    # The default font is monospaced (6 px per character); measuring keeps this right if PIL changes it.
    return max(1, int(width // _font().getlength("M")))


def _wrap(label: str, width: int, max_lines: int) -> list[str]:
    """The label's lines within `width` pixels; lines past `max_lines` are cut and marked with '...'."""
    lines = []
    for paragraph in label.split("\n"):
        lines += textwrap.wrap(paragraph, _characters_per_line(width)) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        characters = _characters_per_line(width)
        lines[-1] = lines[-1][:max(0, characters - 3)] + "..."
    return lines


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a figure made by `render_grid` (all sizes in pixels)."""

    num_rows: int
    num_columns: int
    cell_size: int
    label_lines: int
    num_legend_entries: int
    legend_width: int
    title_lines: int = 0

    @property
    def label_height(self) -> int:
        return self.label_lines * _line_height()

    @property
    def title_height(self) -> int:
        return self.title_lines * _line_height() + (PADDING if self.title_lines else 0)

    @property
    def row_height(self) -> int:
        return self.label_height + self.cell_size + PADDING

    @property
    def legend_top(self) -> int:
        return PADDING + self.title_height + self.num_rows * self.row_height

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the figure."""
        grid_width = PADDING + self.num_columns * (self.cell_size + PADDING)
        width = max(grid_width, 2 * PADDING + self.legend_width)
        height = self.legend_top + self.num_legend_entries * (SWATCH + 3) + PADDING
        return width, height

    def cell_origin(self, row: int, column: int) -> tuple[int, int]:
        """Top-left corner of a cell's picture (its label sits just above)."""
        return (PADDING + column * (self.cell_size + PADDING),
                PADDING + self.title_height + row * self.row_height + self.label_height)


def grid_layout(num_rows: int, num_columns: int, cell_size: int, label_lines: int,
                legend: Sequence[tuple[str, tuple[int, int, int]]], title: str | None = None) -> GridLayout:
    """The geometry `render_grid` uses for these arguments (so callers and tests can predict a figure's size)."""
    font = _font()
    legend_width = max((SWATCH + 4 + int(font.getlength(name)) for name, _ in legend), default=0)
    grid_width = num_columns * (cell_size + PADDING) - PADDING
    title_lines = len(_wrap(title, max(grid_width, legend_width), 4)) if title else 0
    return GridLayout(num_rows, num_columns, cell_size, label_lines, len(legend), legend_width, title_lines)


# -- rendering -----------------------------------------------------------------------------------------------------

def _as_image(content: CellContent, size: int) -> Image.Image | None:
    if content is None:
        return None
    image = content if isinstance(content, Image.Image) else Image.fromarray(np.asarray(content, dtype=np.uint8))
    # Nearest neighbour: every weight (or latent pixel) stays a visible square, nothing is invented between them.
    return image.convert("RGB").resize((size, size), Image.Resampling.NEAREST)


def render_grid(rows: Sequence[Sequence[tuple[str, CellContent]]],
                legend: Sequence[tuple[str, tuple[int, int, int]]], cell_size: int = 128, label_lines: int = 2,
                title: str | None = None) -> Image.Image:
    """A figure of labelled square cells in rows, with a legend of colours underneath.

    Args:
        rows: each row a list of (label, content) cells; content is a PIL image or an RGB array [H x W x 3] (uint8),
            scaled to `cell_size` with nearest-neighbour sampling, or None for an empty cell. Rows may differ in
            length.
        legend: (name, RGB colour) entries, drawn one per line as a colour square and the name.
        label_lines: lines of text above each cell; longer labels are wrapped, then cut with '...'.
        title: optional text above the grid.
    Returns:
        an RGB image of size `grid_layout(...).size`.
    """
    num_columns = max((len(row) for row in rows), default=0)
    layout = grid_layout(len(rows), num_columns, cell_size, label_lines, legend, title)
    figure = Image.new("RGB", layout.size, BACKGROUND)
    draw = ImageDraw.Draw(figure)
    font = _font()
    line_height = _line_height()
    if title:
        for line_index, line in enumerate(_wrap(title, layout.size[0] - 2 * PADDING, layout.title_lines)):
            draw.text((PADDING, PADDING + line_index * line_height), line, fill=TEXT_COLOR, font=font)
    for row_index, row in enumerate(rows):
        for column_index, (label, content) in enumerate(row):
            left, top = layout.cell_origin(row_index, column_index)
            for line_index, line in enumerate(_wrap(label, cell_size, label_lines)):
                draw.text((left, top - layout.label_height + line_index * line_height), line, fill=TEXT_COLOR,
                          font=font)
            image = _as_image(content, cell_size)
            if image is not None:
                figure.paste(image, (left, top))
    for entry_index, (name, color) in enumerate(legend):
        top = layout.legend_top + entry_index * (SWATCH + 3)
        draw.rectangle([PADDING, top, PADDING + SWATCH - 1, top + SWATCH - 1], fill=tuple(color), outline=TEXT_COLOR)
        draw.text((PADDING + SWATCH + 4, top), name, fill=TEXT_COLOR, font=font)
    return figure


def render_weight_maps(maps: Sequence[tuple[str, torch.Tensor]], member_names: Sequence[str], cell_size: int = 128,
                       columns: int | None = None, label_lines: int = 2, title: str | None = None) -> Image.Image:
    """Aggregation maps side by side, `columns` per row, with a legend naming each member in its colour.

    Args:
        maps: (label, weights [N x H x W]) pairs, e.g. ("output_blocks.10, step 10/20", weights).
        member_names: the N members, in the ensemble's order.
        columns: cells per row (default: all in one row).
    Returns:
        an RGB PIL image.
    """
    for label, weights in maps:
        if weights.ndim != 3 or weights.shape[0] != len(member_names):
            raise ValueError(f"map {label!r}: weights must be [N x H x W] with N = {len(member_names)} members, "
                             f"got shape {tuple(weights.shape)}")
    cells = [(label, colorize_weights(weights)) for label, weights in maps]
    columns = columns or max(len(cells), 1)
    rows = [cells[start:start + columns] for start in range(0, len(cells), columns)]
    return render_grid(rows, legend_entries(member_names), cell_size, label_lines, title)


# -- collecting maps from a running ensemble -----------------------------------------------------------------------

def blocks_to_show(ensemble, mode) -> list[int]:
    """Block indices drawn by default: for UNets the last output block at each resolution (for SD 1.x:
    output_blocks.1, 4, 7 and 11; the last includes the output head, so it is the mixed prediction); for FLUX
    (one resolution throughout) the last double block and the last single block (with the head: the prediction).
    Modes that mix only the prediction (noise average, last block) have that one block. `ensemble` is an
    EnsembleUNet or EnsembleFlux, `mode` an afa.modes Mode."""
    last = ensemble.num_blocks - 1
    if not mode.mixes_every_block:
        return [last]
    if ensemble.family == "flux":
        return [index for index in (ensemble.num_double_blocks - 1, last) if index >= 0]
    downsampling = block_layout(unet_shapes(ensemble.members[0])).downsampling
    first_output = ensemble.num_input_blocks + 1
    return [index for index in range(first_output, last + 1)
            if index == last or downsampling[index] != downsampling[index + 1]]


def block_indices(names: Iterable[str], num_input_blocks: int) -> list[int]:
    """Block indices (forward order) of ldm block names such as `input_blocks.0`, `middle_block`, `output_blocks.10`
    (`named_block_indices` with a UNet's block names)."""
    return named_block_indices(names, [block_name(index, num_input_blocks)
                                       for index in range(2 * num_input_blocks + 1)])


def named_block_indices(names: Iterable[str], block_names: Sequence[str]) -> list[int]:
    """Block indices (forward order) of block names among the members' `block_names` (forward order: a UNet's
    `input_blocks.0` ... `output_blocks.11`, FLUX's `double_blocks.0` ... `single_blocks.37`).

    Raises:
        ValueError: naming the unknown names and the valid ones.
    """
    valid = {name: index for index, name in enumerate(block_names)}
    names = list(names)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"unknown block {', '.join(map(repr, unknown))}; these members' blocks are "
                         f"{describe_blocks(block_names)}")
    return [valid[name] for name in names]


def describe_blocks(block_names: Sequence[str]) -> str:
    """Block names in ranges: `input_blocks.0-11, middle_block, output_blocks.0-11`."""
    groups: list[list[str]] = []
    for name in block_names:
        group, _, index = name.partition(".")
        if groups and groups[-1][0] == group:
            groups[-1][2] = index
        else:
            groups.append([group, index, index])
    return ", ".join(group if not first else f"{group}.{first}" + (f"-{last}" if last != first else "")
                     for group, first, last in groups)


class WeightMapRecorder:
    """An `EnsembleUNet` observer that keeps a small CPU copy of the weights of chosen blocks at every call.

        recorder = WeightMapRecorder(blocks=[0, 23], batch_index=0)
        ensemble.observer = recorder
        ...  # sample or denoise
        image = render_weight_maps(recorder.labelled_maps(ensemble.num_input_blocks), member_names)

    Args:
        blocks: block indices (forward order, 0 = input_blocks.0) to keep; None keeps every block.
        batch_index: which sample of each batch to keep (with classifier-free guidance the WebUI batches the
            conditional and unconditional passes together); None keeps the whole batch.
        max_size: maps larger than this per side are average-pooled down to it (weights still sum to one), so
            recording a long sampling run at 64 x 64 latents stays small.
    Attributes:
        maps: block index -> one tensor per call, [N x h x w] (or [B x N x h x w] with batch_index None).
    """

    def __init__(self, blocks: Iterable[int] | None = None, batch_index: int | None = 0, max_size: int = 64):
        self.blocks = None if blocks is None else set(int(block) for block in blocks)
        self.batch_index = batch_index
        self.max_size = max_size
        self.maps: dict[int, list[torch.Tensor]] = {}

    def __call__(self, block_index: int, weights: torch.Tensor) -> None:
        """weights [B x N x H x W], as `EnsembleUNet` passes them."""
        if self.blocks is not None and block_index not in self.blocks:
            return
        weights = weights.detach()
        if self.batch_index is not None:
            weights = weights[self.batch_index:self.batch_index + 1]
        height, width = weights.shape[-2:]
        if max(height, width) > self.max_size:
            scale = self.max_size / max(height, width)
            weights = F.adaptive_avg_pool2d(weights.float(), (max(1, round(height * scale)),
                                                              max(1, round(width * scale))))
        weights = weights.float().cpu().clone()
        self.maps.setdefault(block_index, []).append(weights[0] if self.batch_index is not None else weights)

    def clear(self) -> None:
        self.maps.clear()

    def labelled_maps(self, num_input_blocks: int,
                      call_label: Callable[[int, int], str] = lambda call, calls: f"step {call + 1}/{calls}") \
            -> list[tuple[str, torch.Tensor]]:
        """(label, weights [N x h x w]) for every recorded block and call, blocks in forward order, for
        `render_weight_maps`. Labels read "<block name>, <call_label(call, number of calls)>"."""
        if self.batch_index is None:
            raise ValueError("labelled_maps needs one sample per call: record with a batch_index")
        return [(f"{block_name(block, num_input_blocks)}, {call_label(call, len(calls))}", weights)
                for block, calls in sorted(self.maps.items()) for call, weights in enumerate(calls)]
