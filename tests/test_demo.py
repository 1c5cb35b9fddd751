"""training/demo.py: the reduced demo end to end, and the paper's central claim at small scale.

The end-to-end test runs `python training/demo.py --quick` as a user runs it (a few minutes on two CPU cores) and
fails unless the held-out denoising error of AFA, with either SABW preset ("paper" and "fast", trained on the same
data), is below the best member's, block averaging's and the best merge's (a weighted merge or MBW, the weights
chosen on the demo's validation images) by a margin each.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from afa import (AfaError, Aggregator, MemberRef, default_config, load_member, read_weights_info, save_weights,
                 unet_shapes)
from afa.unet import PRESETS, block_layout, build_unet
from training import demo
from training.data import SkipReport, index_captioned_images

REPO = Path(__file__).resolve().parent.parent
MARGIN = 0.05  # AFA must be at least 5% below each reference, not merely below it
# ... and at least MERGE_MARGIN below the best merge (MBW in every run so far). The reduced demo put AFA (paper / fast)
# 20.6 / 20.8% below it with --seed 1 and 21.4 / 21.0% with --seed 2 (the hand-made weighted merges on seed
# 0: 18-19%); 8% is well under half of the smallest, which leaves room for rounding across CPUs and small changes of
# the training code, and still fails an AFA that is only as good as a merge.
MERGE_MARGIN = 0.08


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    output = tmp_path_factory.mktemp("demo") / "demo-output"
    # The timeout only catches a hang: the run takes about 5 minutes on a quiet 2-core machine, and took 2084 s
    # (before the merges and images were added) on one shared with heavier jobs.
    result = subprocess.run([sys.executable, "training/demo.py", "--output", str(output), "--quick"], cwd=REPO,
                            capture_output=True, text=True, timeout=3600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return output, result


@pytest.mark.parametrize("preset", demo.SABW_PRESETS)
def test_afa_denoises_held_out_images_better_than_every_member_and_block_averaging(quick_demo, preset):
    output, result = quick_demo
    results = json.loads((output / "evaluation" / "evaluation.json").read_text())
    errors = {name: row["all"] for name, row in results["models"].items()}
    members = [member["name"] for member in results["members"]]
    assert members == ["warm-expert", "cool-expert"]
    best_member = min(errors[name] for name in members)
    summary = ", ".join(f"{name} {value:.5f}" for name, value in errors.items())
    row = demo.afa_row(preset)
    assert errors[row] < (1 - MARGIN) * best_member, summary
    assert errors[row] < (1 - MARGIN) * errors["block average"], summary
    merge_rows = [merge["row"] for merge in results["merges"]]
    assert [merge["kind"] for merge in results["merges"]] == ["weighted merge", "MBW"]
    assert results["best_merge"] == min(merge_rows, key=errors.get)
    assert errors[row] < (1 - MERGE_MARGIN) * errors[results["best_merge"]], summary
    # The merges' weights were chosen on the validation images, not on the evaluated ones.
    assert results["merge_validation"]["data"].endswith("validation")
    assert not results["merge_validation"]["same_images_as_the_table"]
    weights, = [entry for entry in results["weights"] if entry["row"] == row]
    assert weights["mode"] == "sabw" and weights["design"] == preset
    # The printed table shows every row.
    for name in (*members, *merge_rows, "block average", "noise average", "AFA (paper)", "AFA (fast)"):
        assert f"\n{name} " in result.stdout
    assert "vs best member" in result.stdout and "vs best merge" in result.stdout
    assert f"{row}'s held-out denoising error is" in result.stdout and "the best merge's" in result.stdout


def test_demo_scores_sampled_images_with_a_caption_check_validated_first(quick_demo):
    output, result = quick_demo
    images = json.loads((output / "evaluation" / "images.json").read_text())
    results = json.loads((output / "evaluation" / "evaluation.json").read_text())
    validation = images["caption_check_validation"]
    assert all(validation["real"][measure] == 100.0 for measure in demo.IMAGE_MEASURES), validation
    # What the check accepts that was not asked: the exact caption hardly ever; the palettes by design often (half of
    # the images hold a warm and a cool shape, a quarter each two of one palette).
    assert validation["other captions"]["shown"] <= 5.0, validation
    assert validation["other captions"]["colours anywhere"] <= 15.0, validation
    # The merge with the lowest validation error (MBW: searched from the weighted merge, keeping improvements only).
    merge = min(results["merges"], key=lambda merge: merge["validation_error"])
    assert merge["kind"] == "MBW" and images["merge"]["row"] == merge["row"]
    rows = ["warm-expert", "cool-expert", merge["row"], "block average", "AFA (fast)"]
    assert list(images["scores"]) == rows and images["prompts"] == demo.QUICK.image_prompts
    for row in rows:
        assert list(images["scores"][row]) == ["50", "20", "10"], row
        assert all(0.0 <= value <= 100.0 for scores in images["scores"][row].values() for value in scores.values())
    assert "images that show their caption" in result.stdout and "caption check" in result.stdout
    assert Image.open(output / "evaluation" / "images.png").size[0] > 600


def test_demo_writes_kohya_data_webui_checkpoints_weights_and_figures(quick_demo):
    output, result = quick_demo
    for name in ("warm", "cool", "two-shapes", "held-out", "validation"):
        report = SkipReport()
        records = index_captioned_images(output / "data" / name, report)
        assert records and not report.total, name
        assert Image.open(records[0].image_path).size == (32, 32)
    members = [output / "checkpoints" / f"{name}.safetensors" for name in ("warm-expert", "cool-expert")]
    assert all(path.is_file() and path.with_suffix(".yaml").is_file() for path in members)
    # The yamls name the text encoder folder beside the checkpoints, so a real WebUI loads them (see tiny_sd_config).
    text_encoder_folder = output / "checkpoints" / "tiny-clip-text"
    for path in members:
        config = yaml.safe_load(path.with_suffix(".yaml").read_text(encoding="utf-8"))
        cond_stage_params = config["model"]["params"]["cond_stage_config"]["params"]
        assert cond_stage_params == {"version": str(text_encoder_folder.resolve())}
    assert (text_encoder_folder / "config.json").is_file() and (text_encoder_folder / "vocab.json").is_file()
    for preset in demo.SABW_PRESETS:
        info = read_weights_info(output / f"afa-warm-cool-{preset}.safetensors")
        assert [member.name for member in info.members] == ["warm-expert", "cool-expert"]
        assert info.config.design == preset and info.config.hidden_channels == demo.QUICK.sabw_hidden == 64
        # Both members carry the same text encoder, so per-member conditioning is exactly the shared one.
        assert info.config.text_conditioning == "per_member" and info.training["latents"] == "mean"
    for figure in ("denoising-capability.png", "aggregation-maps-paper.png", "aggregation-maps-fast.png"):
        assert Image.open(output / "evaluation" / figure).size[0] > 300
    for stage in ("data", "VAE", "members", "SABW", "results"):  # each stage reports its time
        assert f"{stage} " in result.stdout.split("Timings:")[-1]


class RecordingExecutor:
    """An executor that records what is submitted and runs nothing."""

    def __init__(self):
        self.submitted = []

    def submit(self, function, *args):
        self.submitted.append((function, args))
        return concurrent.futures.Future()


@pytest.mark.parametrize("first", demo.SABW_PRESETS)
def test_the_freed_core_searches_first_and_samples_afa_from_its_own_weights_file_alone(checkpoint_factory, tmp_path,
                                                                                       first):
    """The first trained preset frees a core: the merges' search is queued first, then the images that need no SABW
    weights; AFA's images once IMAGE_PRESET's file is written, reading it alone (the other preset may still train)."""
    members = [checkpoint_factory(1, name="warm-expert"), checkpoint_factory(2, name="cool-expert")]
    layout = block_layout(unet_shapes(load_member(members[0])))
    torch.manual_seed(0)
    weights = {preset: tmp_path / f"{preset}.safetensors" for preset in demo.SABW_PRESETS}
    save_weights(weights[demo.IMAGE_PRESET], Aggregator(default_config(layout, 2, 32, preset=demo.IMAGE_PRESET,
                                                                       hidden_channels=32)),
                 [MemberRef.from_file(member) for member in members])
    worker = RecordingExecutor()
    work = demo.FreedCoreWork(worker, members, weights, ["--members", "..."], tmp_path / "evaluation",
                              ("a red circle at the top left",), demo.QUICK, 0, 1)
    second = next(preset for preset in demo.SABW_PRESETS if preset != first)
    work.preset_trained(first)
    assert worker.submitted[0] == (demo.search_merges_alone, (["--members", "..."], work.search_log, 1))
    jobs = [args[0] for function, args in worker.submitted[1:]]
    assert all(function is demo.sample_images for function, _ in worker.submitted[1:])
    rows = [demo.BEST_MERGE, "block average", "warm-expert", "cool-expert"]
    assert [job.row for job in jobs] == rows + ([demo.afa_row(demo.IMAGE_PRESET)] if first == demo.IMAGE_PRESET
                                                else [])
    work.preset_trained(second)
    jobs = [args[0] for function, args in worker.submitted[1:]]
    assert [job.row for job in jobs] == rows + [demo.afa_row(demo.IMAGE_PRESET)]
    assert jobs[0].merges_file == str(tmp_path / "evaluation" / "merges.json")
    row, images, _ = demo.sample_images(jobs[-1])
    assert row == demo.afa_row(demo.IMAGE_PRESET) and list(images) == list(demo.IMAGE_STEPS)
    assert all(batch.shape == (1, 32, 32, 3) and batch.dtype == np.uint8 for batch in images.values())


def test_rerunning_replaces_only_a_demo_folder(tmp_path):
    foreign = tmp_path / "my-files"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(AfaError, match="not written by the demo"):
        demo.prepare_output(foreign)
    assert (foreign / "keep.txt").is_file()
    earlier = tmp_path / "earlier-demo"
    demo.prepare_output(earlier)
    (earlier / "stale.txt").write_text("from an earlier run")
    demo.prepare_output(earlier)
    assert not (earlier / "stale.txt").exists() and (earlier / demo.MARKER).is_file()


def test_data_is_seeded_and_captions_match_the_shapes(tmp_path):
    settings = dataclasses.replace(demo.QUICK, expert_images=6, mixed_images=6, held_out_images=6)
    first = demo.make_datasets(tmp_path / "a", settings, seed=3)
    second = demo.make_datasets(tmp_path / "b", settings, seed=3)
    for name in first:
        for path in sorted(first[name].iterdir()):
            assert path.read_bytes() == (second[name] / path.name).read_bytes()
    warm_captions = [path.read_text() for path in first["warm"].glob("*.txt")]
    assert all(any(colour in text for colour in demo.WARM) and not any(colour in text for colour in demo.COOL)
               for text in warm_captions)
    # The figures' first held-out images hold one shape of each expert's colours.
    for index in range(4):
        text = (first["held-out"] / f"{index:05d}.txt").read_text()
        assert any(colour in text for colour in demo.WARM) and any(colour in text for colour in demo.COOL)
    assert demo.caption([("circle", "orange", "top left")]) == "an orange circle at the top left"


def test_the_caption_check_reads_drawn_shapes_and_refuses_what_was_not_asked():
    rng = np.random.default_rng(0)
    fit = [demo.random_shapes([demo.WARM, demo.COOL], rng) for _ in range(24)]
    reader = demo.ShapeReader.fit([np.stack([np.asarray(demo.draw_shapes(shapes, rng)) for shapes in fit])],
                                  [demo.caption(shapes) for shapes in fit])
    for _ in range(12):
        shapes = demo.random_shapes([demo.WARM, demo.COOL], rng)
        pixels = np.asarray(demo.draw_shapes(shapes, rng))
        assert demo.check_caption(reader, pixels, demo.caption(shapes)) == (True, 2, 2, 2, True, True)
        (kind, colour, quadrant), other = shapes
        # Another colour of the same palette, then one of the other palette.
        same_palette = next(name for name in (demo.WARM if colour in demo.WARM else demo.COOL) if name != colour)
        wrong_colour = [(kind, same_palette, quadrant), other]
        assert demo.check_caption(reader, pixels, demo.caption(wrong_colour)) == (False, 1, 2, 2, False, True)
        other_palette = next(iter(demo.COOL if colour in demo.WARM else demo.WARM))
        wrong_palette = [(kind, other_palette, quadrant), other]
        assert demo.check_caption(reader, pixels, demo.caption(wrong_palette)) == (False, 1, 2, 2, False, False)
        wrong_kind = [("square" if kind == "circle" else "circle", colour, quadrant), other]
        assert demo.check_caption(reader, pixels, demo.caption(wrong_kind)) == (False, 2, 1, 2, True, True)
        # The shapes swapped between their quadrants: the colours and palettes are there, not in their places.
        swapped = [(kind, colour, other[2]), (other[0], other[1], quadrant)]
        check = demo.check_caption(reader, pixels, demo.caption(swapped))
        assert not check.shown and check.colours_anywhere and check.palettes
        # A shape the caption does not name (the other quadrants must be empty)
        check = demo.check_caption(reader, pixels, demo.caption([other]))
        assert not (check.shown or check.colours_anywhere or check.palettes)
    empty = demo.check_caption(reader, np.zeros((32, 32, 3), np.uint8), demo.caption(fit[0]))
    assert not (empty.shown or empty.colours_anywhere or empty.palettes)


def test_unet_training_is_deterministic():
    generator = torch.Generator().manual_seed(0)
    data = demo.DenoisingSet(torch.randn(8, 4, 16, 16, generator=generator),
                             torch.randn(8, 77, 32, generator=generator), torch.zeros(1, 77, 32))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        unet = build_unet(PRESETS["tiny"])
        runs.append(demo.train_unet(unet, data, steps=2, batch_size=4, learning_rate=1e-3, seed=5, threads=1))
    (state_a, losses_a), (state_b, losses_b) = runs
    assert losses_a == losses_b
    assert all(torch.equal(state_a[key], state_b[key]) for key in state_a)
