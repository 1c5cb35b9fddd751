"""afa/maps.py: colouring aggregation maps, the figure layout and legend, and recording maps from an ensemble."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from afa import Aggregator, EnsembleUNet, build_unet, default_config
from afa.maps import (PADDING, PALETTE, SWATCH, TIE, TIE_COLOR, WeightMapRecorder, block_indices, colorize_weights,
                      colorize_winners, grid_layout, legend_entries, render_grid, render_weight_maps)
from afa.members import unet_shapes
from afa.unet import block_layout

from conftest import random_inputs, randomize_

NAMES = ["realisticVision", "dreamshaper", "anything-v5"]


def three_member_weights() -> torch.Tensor:
    """[3 x 4 x 4]: pixel (0, 0) belongs to member 2, pixel (0, 1) to member 0, pixel (1, 0) is 50/50 of 0 and 1,
    the rest uniform."""
    weights = torch.full((3, 4, 4), 1 / 3)
    weights[:, 0, 0] = torch.tensor([0.0, 0.0, 1.0])
    weights[:, 0, 1] = torch.tensor([1.0, 0.0, 0.0])
    weights[:, 1, 0] = torch.tensor([0.5, 0.5, 0.0])
    return weights


def test_a_member_that_owns_a_pixel_shows_its_colour():
    weights = three_member_weights()
    cell_size = 40  # 10 figure pixels per weight
    figure = render_weight_maps([("output_blocks.8, step 10/20", weights)], NAMES, cell_size=cell_size)
    layout = grid_layout(1, 1, cell_size, 2, legend_entries(NAMES))
    assert figure.size == layout.size
    left, top = layout.cell_origin(0, 0)
    pixels = np.asarray(figure)

    def colour_at(row: int, column: int) -> tuple:
        return tuple(pixels[top + row * 10 + 5, left + column * 10 + 5])

    assert colour_at(0, 0) == PALETTE[2]
    assert colour_at(0, 1) == PALETTE[0]
    mixed = tuple(round((a + b) / 2) for a, b in zip(PALETTE[0], PALETTE[1]))
    assert all(abs(int(got) - want) <= 1 for got, want in zip(colour_at(1, 0), mixed))
    assert np.array_equal(colorize_weights(weights)[0, 0], PALETTE[2])


def test_the_legend_names_every_member_next_to_its_colour():
    weights = three_member_weights()
    figure = render_weight_maps([("a", weights), ("b", weights)], NAMES, cell_size=32)
    layout = grid_layout(1, 2, 32, 2, legend_entries(NAMES))
    assert figure.size == layout.size
    font = ImageFont.load_default()
    for index, name in enumerate(NAMES):
        top = layout.legend_top + index * (SWATCH + 3)
        swatch = figure.getpixel((PADDING + SWATCH // 2, top + SWATCH // 2))
        assert swatch == PALETTE[index]
        # The name, drawn alone with the same font, must match the pixels right of the swatch.
        width = int(font.getlength(name))
        reference = Image.new("RGB", (width, SWATCH), (255, 255, 255))
        ImageDraw.Draw(reference).text((0, 0), name, fill=(0, 0, 0), font=font)
        text_left = PADDING + SWATCH + 4
        drawn = figure.crop((text_left, top, text_left + width, top + SWATCH))
        assert np.array_equal(np.asarray(drawn), np.asarray(reference)), name


def test_the_figure_grows_to_fit_a_long_member_name_and_wraps_labels():
    long_name = "a-checkpoint-with-a-very-long-file-name-v1.5-pruned-emaonly"
    weights = torch.full((2, 2, 2), 0.5)
    figure = render_weight_maps([("a label much longer than one line of a small cell", weights)],
                                ["short", long_name], cell_size=24)
    assert figure.size[0] >= ImageFont.load_default().getlength(long_name) + SWATCH


def test_render_weight_maps_refuses_maps_of_another_member_count():
    with pytest.raises(ValueError, match="N = 2 members"):
        render_weight_maps([("block", torch.full((3, 2, 2), 1 / 3))], ["a", "b"])


def test_winner_maps_colour_ties_apart():
    winners = torch.tensor([[0, 1], [TIE, 1]])
    rgb = colorize_winners(winners, 2)
    assert tuple(rgb[0, 0]) == PALETTE[0] and tuple(rgb[0, 1]) == PALETTE[1] and tuple(rgb[1, 0]) == TIE_COLOR
    with pytest.raises(ValueError):
        colorize_winners(torch.tensor([[2]]), 2)


def test_render_grid_places_images_and_rows_of_different_lengths():
    red = np.zeros((4, 4, 3), dtype=np.uint8)
    red[..., 0] = 255
    rows = [[("image", red), ("map", None)], [("only one", Image.fromarray(red))]]
    figure = render_grid(rows, legend_entries(["a", "b"]), cell_size=16, title="a title")
    layout = grid_layout(2, 2, 16, 2, legend_entries(["a", "b"]), "a title")
    assert figure.size == layout.size
    for row in (0, 1):
        left, top = layout.cell_origin(row, 0)
        assert figure.getpixel((left + 8, top + 8)) == (255, 0, 0)


def test_block_indices_resolve_names_and_reject_unknown_ones():
    assert block_indices(["input_blocks.0", "middle_block", "output_blocks.11"], 12) == [0, 12, 24]
    with pytest.raises(ValueError, match="output_blocks.12"):
        block_indices(["output_blocks.12"], 12)


def test_recorder_keeps_a_downsized_cpu_copy_of_chosen_blocks_per_call():
    recorder = WeightMapRecorder(blocks=[3], batch_index=1, max_size=16)
    weights = torch.rand(2, 3, 64, 32).softmax(dim=1)
    recorder(3, weights)
    recorder(3, weights)
    recorder(5, weights)  # not chosen
    assert list(recorder.maps) == [3] and len(recorder.maps[3]) == 2
    kept = recorder.maps[3][0]
    assert kept.shape == (3, 16, 8) and kept.device.type == "cpu"
    torch.testing.assert_close(kept.sum(dim=0), torch.ones(16, 8))  # average pooling keeps weights summing to one
    assert [label for label, _ in recorder.labelled_maps(12)] == ["input_blocks.3, step 1/2",
                                                                    "input_blocks.3, step 2/2"]
    whole_batch = WeightMapRecorder(batch_index=None)
    whole_batch(0, weights[:, :, :8, :8])
    assert whole_batch.maps[0][0].shape == (2, 3, 8, 8)


def test_recorder_as_the_observer_of_an_ensemble(tiny_params):
    members = [randomize_(build_unet(tiny_params), seed).requires_grad_(False) for seed in (1, 2)]
    layout = block_layout(unet_shapes(members[0]))
    aggregator = randomize_(Aggregator(default_config(layout, 2, tiny_params["context_dim"], hidden_channels=32)), 3)
    recorder = WeightMapRecorder(blocks=[0, 23])
    ensemble = EnsembleUNet(members, aggregator, "sabw", observer=recorder)
    x, timesteps, context = random_inputs(batch=2, size=16)
    with torch.no_grad():
        ensemble(x, timesteps, context)
        ensemble(x, timesteps, context)
    assert sorted(recorder.maps) == [0, 23]
    assert all(len(calls) == 2 and calls[0].shape == (2, 16, 16) for calls in recorder.maps.values())
    maps = recorder.labelled_maps(ensemble.num_input_blocks)
    assert [label for label, _ in maps][:1] == ["input_blocks.0, step 1/2"]
    figure = render_weight_maps(maps, ["a", "b"], cell_size=32, columns=2)
    assert figure.size == grid_layout(2, 2, 32, 2, legend_entries(["a", "b"])).size
