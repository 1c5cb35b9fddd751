"""Captioned image datasets: the three `--data` formats, image preparation (centre and seeded random crops), skipping
bad data (also inside DataLoader workers), the validation split, and the latent cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch.utils.data import DataLoader

from afa.errors import AfaError
from training.data import (CaptionedImage, ImageCaptionDataset, LatentCache, SkipReason, SkipReport,
                           caption_from_infotext, collate, index_captioned_images, load_image, split_for_validation)
from training.diffusion import CROP_STREAM, sample_generator

INFOTEXT = ("a castle on a hill,\nsunset, dramatic sky\nNegative prompt: blurry, lowres\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model: member1")


def write_image(path: Path, size=(24, 16), color=(200, 30, 60), infotext: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color)
    if infotext is not None:
        info = PngInfo()
        info.add_text("parameters", infotext)
        image.save(path, pnginfo=info)
    else:
        image.save(path)
    return path


def write_caption(image_path: Path, caption: str) -> None:
    image_path.with_suffix(".txt").write_text(caption, encoding="utf-8")


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"this is not an image at all")
    return path


def index(source) -> tuple[list[CaptionedImage], SkipReport]:
    report = SkipReport()
    return index_captioned_images(source, report), report


# -- the three formats ---------------------------------------------------------------------------------------------

def test_folder_with_txt_captions_is_searched_recursively(tmp_path):
    write_caption(write_image(tmp_path / "b.png"), "  a red square \n")
    write_caption(write_image(tmp_path / "sub" / "deeper" / "a.JPG"), "a deep photo")
    write_caption(write_image(tmp_path / "sub" / "c.webp"), "a webp")
    write_caption(write_image(tmp_path / "d.bmp"), "a bitmap")
    write_caption(write_image(tmp_path / ".hidden" / "e.png"), "ignored: hidden folder")
    (tmp_path / "notes.md").write_text("not data")

    records, report = index(tmp_path)
    assert [(record.key, record.caption) for record in records] == [
        ("b.png", "a red square"), ("d.bmp", "a bitmap"), ("sub/c.webp", "a webp"),
        ("sub/deeper/a.JPG", "a deep photo")]
    assert records[0].image_path == tmp_path / "b.png"
    assert report.total == 0


def test_webui_pngs_are_captioned_from_their_infotext_and_txt_wins(tmp_path):
    write_image(tmp_path / "00001-1234.png", infotext=INFOTEXT)
    write_caption(write_image(tmp_path / "00002-1235.png", infotext=INFOTEXT), "my own caption")
    write_caption(write_image(tmp_path / "00003-1236.png", infotext=INFOTEXT), "   ")  # empty .txt: infotext

    records, report = index(tmp_path)
    assert [record.caption for record in records] == [
        "a castle on a hill,\nsunset, dramatic sky", "my own caption", "a castle on a hill,\nsunset, dramatic sky"]
    assert report.total == 0


@pytest.mark.parametrize("infotext, prompt", [
    (INFOTEXT, "a castle on a hill,\nsunset, dramatic sky"),
    ("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7", "a cat"),  # no negative prompt
    ("a cat, Steps: 20", "a cat, Steps: 20"),  # one line with < 3 parameters is all prompt
    ("a cat\nNegative prompt: dog\nmore negative\nSteps: 20, Sampler: Euler, Seed: 1", "a cat"),
    ("Negative prompt: dog\nSteps: 20, Sampler: Euler, Seed: 1", ""),
])
def test_caption_from_infotext(infotext, prompt):
    assert caption_from_infotext(infotext) == prompt


def test_jsonl_manifest_journeydb_style(tmp_path):
    write_image(tmp_path / "imgs" / "x.jpg")
    absolute = write_image(tmp_path / "elsewhere" / "y.png")
    rows = [
        {"img_path": "./imgs/x.jpg", "prompt": "a journeydb prompt", "Task1": {"style": []}},
        {"image": str(absolute), "caption": "an absolute path"},
        {"img_path": "./imgs/missing.jpg", "prompt": "points to nothing"},
        {"img_path": "./imgs/x.jpg", "prompt": "   "},
        {"img_path": "./imgs/x.jpg"},
    ]
    lines = [json.dumps(row) for row in rows[:2]] + ["", "{not json"] + [json.dumps(row) for row in rows[2:]]
    manifest = tmp_path / "annotations.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")

    records, report = index(manifest)
    assert [(record.image_path, record.caption, record.key) for record in records] == [
        (tmp_path / "imgs" / "x.jpg", "a journeydb prompt", "./imgs/x.jpg"),
        (absolute, "an absolute path", str(absolute))]
    assert report.counts() == {SkipReason.MALFORMED_ROW: 2, SkipReason.MISSING_IMAGE: 1,
                               SkipReason.EMPTY_CAPTION: 1}
    assert report.sources(SkipReason.MISSING_IMAGE) == [str(tmp_path / "imgs" / "missing.jpg")]
    assert report.sources(SkipReason.MALFORMED_ROW) == [f"{manifest}:4", f"{manifest}:7"]


def test_csv_manifest_with_bom_and_imagefolder_columns(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text("\ufefffile_name,text\na.png,first caption\nb.png,\"second, quoted\"\n"
                                           "c.png,missing file\n", encoding="utf-8")
    records, report = index(tmp_path / "metadata.csv")
    assert [(record.key, record.caption) for record in records] == [("a.png", "first caption"),
                                                                    ("b.png", "second, quoted")]
    assert report.counts() == {SkipReason.MISSING_IMAGE: 1}


def test_unknown_sources_are_errors(tmp_path):
    with pytest.raises(AfaError, match="no such folder or manifest"):
        index(tmp_path / "nowhere")
    (tmp_path / "data.parquet").write_bytes(b"")
    with pytest.raises(AfaError, match="manifest"):
        index(tmp_path / "data.parquet")


# -- images --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(40, 24), (24, 40), (16, 16), (7, 9)])
def test_load_image_shape_dtype_and_range(tmp_path, size):
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator, dtype=torch.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(pixels.numpy()).save(path)
    image = load_image(path, 16)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32
    assert image.min() >= -1.0 and image.max() <= 1.0


def test_load_image_center_crops_and_scales_to_minus_one_one(tmp_path):
    # Wide 48x16 image: black, white, black thirds. The shorter side is already 16, so the crop is the white middle.
    image = Image.new("RGB", (48, 16), (0, 0, 0))
    image.paste((255, 255, 255), (16, 0, 32, 16))
    image.save(tmp_path / "wide.png")
    assert torch.equal(load_image(tmp_path / "wide.png", 16), torch.ones(3, 16, 16))
    # Tall, with transparency and a palette: still RGB; the black middle third of 16x48 is -1.
    tall = Image.new("RGB", (16, 48), (255, 255, 255))
    tall.paste((0, 0, 0), (0, 16, 16, 32))
    tall.convert("P").save(tmp_path / "tall.png", transparency=0)
    assert torch.equal(load_image(tmp_path / "tall.png", 16), -torch.ones(3, 16, 16))


def test_random_crops_are_drawn_per_sample_and_epoch_reproducibly(tmp_path):
    """A 64x16 horizontal ramp (column c has value 4c) at resolution 16: the shorter side needs no resize, so a crop
    at left offset L starts with the value 4L, and the offsets must be the ones torchvision's RandomCrop would draw
    from the sample's generator (top, then left)."""
    ramp = np.tile((np.arange(64, dtype=np.uint8) * 4)[None, :, None], (16, 1, 3))
    for number in range(6):
        Image.fromarray(ramp).save(tmp_path / f"{number}.png")
        write_caption(tmp_path / f"{number}.png", f"ramp {number}")
    records, _ = index(tmp_path)
    dataset = ImageCaptionDataset(records, 16, crop="random", seed=3)

    def crops(epoch, data=dataset):
        return [data.for_epoch(epoch)[number]["pixel_values"] for number in range(len(records))]

    epoch_zero = crops(0)
    for number, crop in enumerate(epoch_zero):
        generator = sample_generator(3, 0, number, CROP_STREAM)
        assert int(torch.randint(0, 1, (1,), generator=generator)) == 0  # the top: the height fits exactly
        left = int(torch.randint(0, 64 - 16 + 1, (1,), generator=generator))
        assert crop.shape == (3, 16, 16) and crop[0, 0, 0].item() == pytest.approx(4 * left / 127.5 - 1)
    assert len({crop[0, 0, 0].item() for crop in epoch_zero}) > 1  # the samples' offsets differ
    # Reproducible: a new dataset object, DataLoader workers; another epoch or seed crops elsewhere.
    assert all(torch.equal(a, b) for a, b in zip(epoch_zero, crops(0, ImageCaptionDataset(records, 16, "random", 3))))
    loader = DataLoader(dataset.for_epoch(0), batch_size=2, num_workers=2, collate_fn=collate)
    assert torch.equal(torch.cat([batch["pixel_values"] for batch in loader]), torch.stack(epoch_zero))
    assert any(not torch.equal(a, b) for a, b in zip(epoch_zero, crops(1)))
    assert any(not torch.equal(a, b) for a, b in zip(epoch_zero, crops(0, ImageCaptionDataset(records, 16, "random",
                                                                                                4))))
    # The centre crop does not depend on the epoch, and is the default.
    center = ImageCaptionDataset(records, 16)
    assert center.crop == "center"
    assert all(torch.equal(center.for_epoch(5)[number]["pixel_values"], load_image(record.image_path, 16))
               for number, record in enumerate(records))
    assert center[0]["pixel_values"][0, 0, 0].item() == pytest.approx(4 * 24 / 127.5 - 1)
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageCaptionDataset(records, 16, crop="left")


# -- skipping ------------------------------------------------------------------------------------------------------

def make_folder_with_bad_data(root: Path) -> None:
    write_caption(write_image(root / "good1.png"), "good one")
    write_caption(write_image(root / "good2.jpg"), "good two")
    write_image(root / "webui.png", infotext=INFOTEXT)
    write_caption(write_corrupt(root / "corrupt.png"), "a caption for a file that is not an image")  # load time
    write_corrupt(root / "corrupt_no_caption.png")  # cannot be opened to read its infotext: indexing time
    write_image(root / "no_caption.jpg")
    write_caption(write_image(root / "empty_caption.png"), "")


def test_bad_data_is_skipped_and_counted_by_reason(tmp_path):
    make_folder_with_bad_data(tmp_path)
    records, report = index(tmp_path)
    assert [record.key for record in records] == ["corrupt.png", "good1.png", "good2.jpg", "webui.png"]
    assert report.counts() == {SkipReason.UNREADABLE_IMAGE: 1, SkipReason.MISSING_CAPTION: 1,
                               SkipReason.EMPTY_CAPTION: 1}
    assert report.sources(SkipReason.MISSING_CAPTION) == [str(tmp_path / "no_caption.jpg")]

    dataset = ImageCaptionDataset(records, 16)
    skipped = dataset[0]
    assert skipped.reason == SkipReason.UNREADABLE_IMAGE and skipped.source == str(tmp_path / "corrupt.png")
    batch = collate([dataset[0]])
    assert "pixel_values" not in batch and batch["captions"] == [] and batch["indices"] == []
    report.add_items(batch["skipped"])
    assert report.counts()[SkipReason.UNREADABLE_IMAGE] == 2
    summary = report.summary()
    assert "2 unreadable image" in summary and "corrupt.png" in summary and "1 empty caption" in summary


def test_dataloader_workers_survive_a_corrupt_image_and_report_it(tmp_path):
    make_folder_with_bad_data(tmp_path)
    records, report = index(tmp_path)
    dataset = ImageCaptionDataset(records, 16)
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate, shuffle=True)
    loaded_captions = []
    for _epoch in range(2):
        for batch in loader:
            report.add_items(batch["skipped"])
            assert batch["pixel_values"].shape[1:] == (3, 16, 16)
            assert len(batch["captions"]) == batch["pixel_values"].shape[0] == len(batch["indices"])
            loaded_captions += batch["captions"]
    assert sorted(loaded_captions) == sorted(["good one", "good two", "a castle on a hill,\nsunset, dramatic sky"] * 2)
    # The corrupt image failed in both epochs and in a worker process; it is one skipped image (plus the one found
    # while indexing).
    assert report.counts()[SkipReason.UNREADABLE_IMAGE] == 2
    assert str(tmp_path / "corrupt.png") in report.sources(SkipReason.UNREADABLE_IMAGE)


# -- validation split ----------------------------------------------------------------------------------------------

def fake_records(count: int) -> list[CaptionedImage]:
    return [CaptionedImage(Path(f"/data/{number:03d}.png"), f"caption {number}", f"{number:03d}.png")
            for number in range(count)]


def test_validation_split_is_deterministic_disjoint_and_sized():
    records = fake_records(50)
    train, validation = split_for_validation(records, 0.2, seed=7)
    assert (train, validation) == split_for_validation(records, 0.2, seed=7)
    assert len(validation) == 10 and len(train) == 40
    assert {record.key for record in train}.isdisjoint(record.key for record in validation)
    assert sorted(train + validation, key=lambda record: record.key) == records
    # Independent of listing order; different seeds hold out different images.
    _, validation_reversed = split_for_validation(records[::-1], 0.2, seed=7)
    assert {record.key for record in validation_reversed} == {record.key for record in validation}
    assert split_for_validation(records, 0.2, seed=8)[1] != validation


def test_validation_split_edge_cases():
    records = fake_records(5)
    assert split_for_validation(records, 0.0) == (records, [])
    assert len(split_for_validation(records, 0.01)[1]) == 1
    # Several captions of one image stay on one side.
    duplicated = records + [CaptionedImage(records[0].image_path, "another caption", records[0].key)]
    train, validation = split_for_validation(duplicated, 0.4, seed=1)
    assert sum(record.key == records[0].key for record in train) in (0, 2)
    with pytest.raises(ValueError):
        split_for_validation(records, 1.0)


# -- latent cache --------------------------------------------------------------------------------------------------

class CountingEncoder:
    """A stand-in VAE encoder: images [B x 3 x R x R] -> [B x 4 x R/2 x R/2] (pooled RGB plus their mean)."""

    def __init__(self):
        self.images_encoded = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images_encoded += images.shape[0]
        pooled = torch.nn.functional.avg_pool2d(images, 2)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1)


def test_latent_cache_encodes_each_image_once_and_serves_the_same_latents(tmp_path):
    data = tmp_path / "data"
    for number in range(5):
        write_caption(write_image(data / f"{number}.png", color=(number * 40, 10, 200)), f"caption {number}")
    write_caption(write_corrupt(data / "corrupt.png"), "not an image")
    records, _ = index(data)
    records.append(CaptionedImage(records[1].image_path, "a second caption of image 1", records[1].key))
    encoder = CountingEncoder()

    cache = LatentCache.open_or_build(records, resolution=16, vae_identity="vae-a", encode=encoder,
                                      cache_dir=tmp_path / "cache", batch_size=2)
    assert encoder.images_encoded == 5  # 5 readable unique images; the duplicate and the corrupt one are not encoded
    assert len(cache) == 6  # every record of a readable image, the duplicate included
    assert cache.skip_report.sources(SkipReason.UNREADABLE_IMAGE) == [str(data / "corrupt.png")]
    first_pass = [cache[index] for index in range(len(cache))]
    for item, record in zip(first_pass, [record for record in records if record.key != "corrupt.png"]):
        assert item["caption"] == record.caption
        assert torch.equal(item["latents"], encoder(load_image(record.image_path, 16)[None])[0])
        assert item["latents"].shape == (4, 8, 8)

    encoder.images_encoded = 0
    reopened = LatentCache.open_or_build(records, resolution=16, vae_identity="vae-a", encode=encoder,
                                         cache_dir=tmp_path / "cache")
    assert encoder.images_encoded == 0
    second_pass = [reopened[index] for index in range(len(reopened))]
    assert all(torch.equal(a["latents"], b["latents"]) and a["caption"] == b["caption"]
               for a, b in zip(first_pass, second_pass))
    batch = next(iter(DataLoader(reopened, batch_size=4)))
    assert batch["latents"].shape == (4, 4, 8, 8) and len(batch["caption"]) == 4
    assert not any(".tmp-" in name for name in os.listdir(tmp_path / "cache"))  # the build folder was renamed


def test_a_cache_of_moments_serves_them_under_their_name(tmp_path):
    for number in range(3):
        write_caption(write_image(tmp_path / "data" / f"{number}.png", color=(number * 60, 10, 200)), f"c {number}")
    records, _ = index(tmp_path / "data")
    encoder = CountingEncoder()

    def moments(images):  # a posterior's mean and std stacked, [B x 2C x h x w]
        mean = encoder(images)
        return torch.cat([mean, mean.abs() + 0.1], dim=1)

    cache = LatentCache.open_or_build(records, resolution=16, vae_identity="vae-a moments", encode=moments,
                                      cache_dir=tmp_path / "cache", item_key="moments")
    assert cache.for_epoch(3) is cache
    item = cache[0]
    assert set(item) == {"moments", "sizes", "caption", "index"} and item["moments"].shape == (8, 8, 8)
    batch = collate([cache[index] for index in range(3)])
    assert batch["moments"].shape == (3, 8, 8, 8) and "latents" not in batch


def test_latent_cache_is_rebuilt_for_another_vae_resolution_or_changed_image(tmp_path):
    for number in range(3):
        write_caption(write_image(tmp_path / "data" / f"{number}.png"), f"caption {number}")
    records, _ = index(tmp_path / "data")
    encoder = CountingEncoder()
    build = dict(encode=encoder, cache_dir=tmp_path / "cache")
    LatentCache.open_or_build(records, resolution=16, vae_identity="vae-a", **build)
    LatentCache.open_or_build(records, resolution=16, vae_identity="vae-b", **build)
    LatentCache.open_or_build(records, resolution=8, vae_identity="vae-a", **build)
    assert encoder.images_encoded == 9
    write_image(records[0].image_path, size=(32, 32))  # a changed file (size, mtime): a new cache
    cache = LatentCache.open_or_build(records, resolution=16, vae_identity="vae-a", **build)
    assert encoder.images_encoded == 12 and len(cache) == 3
    assert len(os.listdir(tmp_path / "cache")) == 4
