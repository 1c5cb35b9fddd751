"""Captioned image datasets for the trainer: indexing `--data`, loading images, a validation split, a latent cache.

`--data` is one of:
  * a folder of images (.png .jpg .jpeg .webp .bmp, searched recursively; folders whose name starts with "." are
    skipped) with captions beside them. An image's caption is its same-named `.txt` file (kohya style); an image
    without a non-empty `.txt` falls back to the prompt in its `parameters` PNG text chunk (the infotext the WebUI
    writes into every PNG it saves), then to the positive prompt of the ComfyUI workflow in its `prompt` (or
    `workflow`) PNG text chunk (`caption_from_comfyui_metadata`). A folder may mix these kinds.
  * a manifest: a `.jsonl` file (one JSON object per line) or a `.csv` file (with a header row), each row naming an
    image (column `image`, `file_name`, `path`, `img_path` or `image_path`; relative to the manifest's folder, or
    absolute) and its caption (`caption`, `text` or `prompt`). JourneyDB's JSONL (`img_path`, `prompt`) and the
    Hugging Face imagefolder `metadata.jsonl` (`file_name`, `text`) are both such manifests.

Bad data is skipped and counted, never fatal (`SkipReport`). What can be known cheaply is checked while indexing:
a missing file, a missing or empty caption, a malformed manifest row, and a PNG that cannot even be opened to read
its infotext. Whether an image decodes is only known by decoding it, which is the expensive part of loading; doing
it twice (once to validate, e.g. with PIL's `verify()`, which does not even decode JPEG data, and once to train)
would double the cost of the first pass over a large folder. So decoding failures are found at load time: the
dataset returns a `SkippedItem` instead of an example, and `collate` drops it from the batch and hands it back in
`batch["skipped"]`. Because the skip travels inside the batch, it reaches the main process from DataLoader
worker processes without any shared state; the trainer adds it to its `SkipReport` (`report.add_items(...)`).

Images are loaded as diffusers' train_text_to_image prepares them: Resize of the shorter side with Lanczos, then a
crop to a square, then scaling to [-1, 1]. The crop is the centre (`crop="center"`, the trainer's `--crop center`),
or, as the authors' `transforms.RandomCrop` (`--crop random`), a position drawn uniformly from a generator seeded by
(seed, epoch, dataset index) (training/diffusion.py's `sample_generator`), so a resumed run, another DataLoader
worker or another rank crops a sample exactly as the uninterrupted run did. With centre crops an image's tensor is a
pure function of the file and the resolution: that is what makes caching its VAE latents (`LatentCache`) exact, and
why the cache serves centre crops only.
"""

from __future__ import annotations

import csv
import enum
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from afa.errors import AfaError

from .diffusion import CROP_STREAM, sample_generator

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_SUFFIXES = (".jsonl", ".csv")
# Manifest column names, in order of preference.
IMAGE_COLUMNS = ("image", "file_name", "path", "img_path", "image_path")
CAPTION_COLUMNS = ("caption", "text", "prompt")
CROPS = ("center", "random")


class SkipReason(str, enum.Enum):
    """Why an image or manifest row is not used for training."""

    UNREADABLE_IMAGE = "unreadable image"
    MISSING_CAPTION = "no caption (.txt file, PNG infotext or ComfyUI prompt)"
    EMPTY_CAPTION = "empty caption"
    MISSING_IMAGE = "image file not found"
    MALFORMED_ROW = "malformed manifest row"


class SkippedItem(NamedTuple):
    """One skipped file or row: `source` is its path (or `manifest:line`), `detail` a short explanation."""

    reason: SkipReason
    source: str
    detail: str = ""


@dataclass
class SkipReport:
    """What was skipped, per reason, with a few example sources each.

    A source is counted once per reason however often it is skipped, so a corrupt image that fails in every epoch
    is still one skipped image.
    """

    examples_per_reason: int = 3
    _skipped: dict[SkipReason, dict[str, str]] = field(default_factory=dict, init=False)  # reason -> {source: detail}

    def add(self, reason: SkipReason, source: str | Path, detail: str = "") -> None:
        self._skipped.setdefault(SkipReason(reason), {}).setdefault(str(source), detail)

    def add_items(self, items: Iterable[SkippedItem]) -> None:
        """Records skipped items, e.g. `batch["skipped"]` of an `ImageCaptionDataset` batch."""
        for item in items:
            self.add(item.reason, item.source, item.detail)

    def merge(self, other: "SkipReport") -> None:
        for reason, sources in other._skipped.items():
            for source, detail in sources.items():
                self.add(reason, source, detail)

    def counts(self) -> dict[SkipReason, int]:
        return {reason: len(sources) for reason, sources in self._skipped.items()}

    def sources(self, reason: SkipReason) -> list[str]:
        return list(self._skipped.get(SkipReason(reason), {}))

    @property
    def total(self) -> int:
        return sum(self.counts().values())

    def summary(self) -> str:
        """A few lines for the end of a training run: one per reason, with examples."""
        if not self.total:
            return "Skipped nothing."
        lines = [f"Skipped {self.total} images or rows:"]
        for reason, sources in self._skipped.items():
            examples = [f"{source} ({detail})" if detail else source
                        for source, detail in list(sources.items())[:self.examples_per_reason]]
            more = f", and {len(sources) - len(examples)} more" if len(sources) > len(examples) else ""
            lines.append(f"  {len(sources)} {reason.value}: {'; '.join(examples)}{more}")
        return "\n".join(lines)

    __str__ = summary


@dataclass(frozen=True)
class CaptionedImage:
    """One training example before loading: the image file, its caption, and a stable name for it.

    `key` is the image's path relative to the `--data` folder (or as the manifest writes it), so it is the same on
    every machine; the validation split hashes it.
    """

    image_path: Path
    caption: str
    key: str


# -- captions ------------------------------------------------------------------------------------------------------

# A "key: value" pair of the infotext's last line (the WebUI's `re_param_code` in modules/infotext_utils.py).
_INFOTEXT_PARAMETER = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def caption_from_infotext(infotext: str) -> str:
    """The prompt of a WebUI infotext (the `parameters` PNG chunk).

    The infotext is the prompt (possibly several lines), then optionally `Negative prompt: ...` lines, then one line
    of settings (`Steps: 20, Sampler: ..., ...`). As in the WebUI's `parse_generation_parameters`, the last line is
    the settings line when it holds at least 3 `key: value` pairs, and the prompt is every line before
    `Negative prompt:`.
    """
    *lines, last_line = infotext.strip().split("\n")
    if len(_INFOTEXT_PARAMETER.findall(last_line)) < 3:
        lines.append(last_line)
    prompt_lines = []
    for line in lines:
        if line.strip().startswith("Negative prompt:"):
            break
        prompt_lines.append(line.strip())
    return "\n".join(prompt_lines).strip()


def _png_infotext(path: Path) -> str | None:
    """The `parameters` text chunk of a PNG (None for other formats or when absent). Opening a PNG parses its header
    and the text chunks before the pixel data, where the WebUI writes them, without decoding pixels."""
    return _png_text_chunks(path).get("parameters")


def _png_text_chunks(path: Path) -> dict[str, str]:
    """The text chunks of a PNG ({} for other formats), read without decoding pixels."""
    if path.suffix.lower() != ".png":
        return {}
    with Image.open(path) as image:
        return {key: value for key, value in image.info.items() if isinstance(value, str)}


# -- ComfyUI's PNG metadata ----------------------------------------------------------------------------------------
#
# ComfyUI's SaveImage writes two text chunks: `prompt`, the executed graph in the API format ({node id: {"class_type",
# "inputs": {name: a value, or [source node id, output index] for a link}}}), and `workflow`, the editor's graph
# ({"nodes": [{"id", "type", "inputs": [{"name", "link"}], "widgets_values"}], "links": [[id, from node, from slot,
# to node, to slot, type]]}). The caption is the positive prompt: the text of the text-encode node that feeds a
# sampler's `positive` input, followed back through the graph.

# Text encoders whose text is the prompt, and the input that holds it (CLIPTextEncodeSDXL: its G prompt).
COMFYUI_TEXT_ENCODERS = {"CLIPTextEncode": "text", "AFATextEncode": "text", "CLIPTextEncodeSDXL": "text_g",
                         "CLIPTextEncodeSDXLRefiner": "text", "CLIPTextEncodeFlux": "t5xxl",
                         "CLIPTextEncodeSD3": "t5xxl"}
# Inputs that carry the conditioning on through other nodes (ConditioningSetArea, ConditioningCombine,
# ControlNetApplyAdvanced, CFGGuider, ...), tried in this order: the first that leads to a text encoder wins.
COMFYUI_CONDITIONING_INPUTS = ("positive", "conditioning", "conditioning_1", "conditioning_to", "cond",
                               "conditioning_2", "conditioning_from")
# Inputs of string nodes (PrimitiveString, PrimitiveStringMultiline, StringConcatenate's first part, ...) that a
# text encoder's text may be linked to.
COMFYUI_STRING_INPUTS = ("value", "text", "string", "string_a", "prompt")
_MAX_LINKS_FOLLOWED = 64


def caption_from_comfyui_metadata(chunks: dict[str, str]) -> str:
    """The positive prompt of the ComfyUI graph a PNG's text chunks hold ("" when there is none).

    Which text counts: the samplers are the nodes with a `positive` input that is linked (KSampler,
    KSamplerAdvanced, SamplerCustom, CFGGuider, ...), taken in the order of their node ids; from each, the link is
    followed back through nodes that pass conditioning on (their inputs `conditioning`, `conditioning_1`,
    `conditioning_to`, ..., in that order) to the first text-encode node (CLIPTextEncode, AFA Text Encode,
    CLIPTextEncodeSDXL's `text_g`, ...). Its text is the caption; a text linked from a string node is that node's
    value. The first sampler whose positive prompt is found gives the caption. The `prompt` chunk (the graph that
    ran) is read first, the `workflow` chunk (the editor's graph) when `prompt` is absent or gives nothing.
    """
    for key, reader in (("prompt", _caption_from_api_graph), ("workflow", _caption_from_editor_graph)):
        text = chunks.get(key)
        if not text:
            continue
        try:
            graph = json.loads(text)
        except ValueError:
            continue
        if not isinstance(graph, dict):
            continue
        try:
            caption = reader(graph)
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            caption = ""
        if caption and caption.strip():
            return caption.strip()
    return ""


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _node_order(node_id) -> tuple:
    text = str(node_id)
    return (0, int(text), "") if text.isdigit() else (1, 0, text)


def _caption_from_api_graph(graph: dict) -> str:
    nodes = {str(node_id): node for node_id, node in graph.items() if isinstance(node, dict)}

    def text_of(node_id: str, seen: set) -> str:
        node = nodes.get(node_id)
        if node is None or node_id in seen or len(seen) > _MAX_LINKS_FOLLOWED:
            return ""
        seen.add(node_id)
        inputs = node.get("inputs") or {}
        text_input = COMFYUI_TEXT_ENCODERS.get(node.get("class_type"))
        if text_input is not None:
            return string_of(inputs.get(text_input), seen)
        for name in COMFYUI_CONDITIONING_INPUTS:
            if _is_link(inputs.get(name)):
                found = text_of(str(inputs[name][0]), seen)
                if found:
                    return found
        return ""

    def string_of(value, seen: set) -> str:
        if isinstance(value, str):
            return value
        if not _is_link(value) or len(seen) > _MAX_LINKS_FOLLOWED:
            return ""
        node = nodes.get(str(value[0])) or {}
        inputs = node.get("inputs") or {}
        for name in COMFYUI_STRING_INPUTS:
            if name in inputs:
                seen.add(str(value[0]))
                return string_of(inputs[name], seen)
        return ""

    for node_id in sorted(nodes, key=_node_order):
        positive = (nodes[node_id].get("inputs") or {}).get("positive")
        if _is_link(positive):
            caption = text_of(str(positive[0]), set())
            if caption.strip():
                return caption
    return ""


def _caption_from_editor_graph(graph: dict) -> str:
    nodes = {node["id"]: node for node in graph.get("nodes", []) if isinstance(node, dict) and "id" in node}
    links = {link[0]: link for link in graph.get("links", []) if isinstance(link, list) and len(link) >= 5}

    def source(node: dict, name: str):
        for slot in node.get("inputs") or []:
            if isinstance(slot, dict) and slot.get("name") == name and slot.get("link") in links:
                return nodes.get(links[slot["link"]][1])
        return None

    def text_of(node, seen: set) -> str:
        if node is None or node["id"] in seen or len(seen) > _MAX_LINKS_FOLLOWED:
            return ""
        seen.add(node["id"])
        node_type = node.get("type")
        if node_type in COMFYUI_TEXT_ENCODERS:
            linked = source(node, COMFYUI_TEXT_ENCODERS[node_type])
            if linked is not None:  # a string node's value
                values = linked.get("widgets_values") or []
                return values[0] if values and isinstance(values[0], str) else ""
            values = node.get("widgets_values") or []
            return values[0] if values and isinstance(values[0], str) else ""
        for name in COMFYUI_CONDITIONING_INPUTS:
            found = text_of(source(node, name), seen)
            if found:
                return found
        return ""

    for node_id in sorted(nodes, key=_node_order):
        positive = source(nodes[node_id], "positive")
        if positive is not None:
            caption = text_of(positive, set())
            if caption.strip():
                return caption
    return ""


def _read_caption_file(path: Path) -> str:
    # utf-8-sig drops the BOM some editors write; undecodable bytes become U+FFFD rather than failing the file.
    return path.read_text(encoding="utf-8-sig", errors="replace").strip()


# -- indexing ------------------------------------------------------------------------------------------------------

def index_captioned_images(source: str | Path, report: SkipReport) -> list[CaptionedImage]:
    """The captioned images of one `--data` source (a folder, or a .jsonl/.csv manifest), in a stable order.

    Files and rows that cannot be used are recorded in `report` and left out. Images are not decoded here.

    :raises AfaError: when `source` does not exist, or is a file of another kind.
    """
    source = Path(source)
    if source.is_dir():
        return _index_folder(source, report)
    if source.is_file() and source.suffix.lower() in MANIFEST_SUFFIXES:
        return _index_manifest(source, report)
    if not source.exists():
        raise AfaError(f"--data {source}: no such folder or manifest")
    raise AfaError(f"--data {source}: expected a folder of images or a {'/'.join(MANIFEST_SUFFIXES)} manifest")


def _index_folder(folder: Path, report: SkipReport) -> list[CaptionedImage]:
    image_paths = []
    for directory, subdirectories, filenames in os.walk(folder):
        # Hidden folders hold tool state (.ipynb_checkpoints, a latent cache), not training data.
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        image_paths += [Path(directory) / name for name in filenames if name.lower().endswith(IMAGE_SUFFIXES)]

    records = []
    for image_path in sorted(image_paths):
        caption_path = image_path.with_suffix(".txt")
        caption = _read_caption_file(caption_path) if caption_path.is_file() else ""
        if not caption:
            try:
                chunks = _png_text_chunks(image_path)
            except Exception as error:  # noqa: BLE001 - PIL raises many types on corrupt files; any means unreadable
                report.add(SkipReason.UNREADABLE_IMAGE, image_path, f"{type(error).__name__}: {error}")
                continue
            infotext = chunks.get("parameters")
            caption = caption_from_infotext(infotext) if infotext else ""
            comfyui = "prompt" in chunks or "workflow" in chunks
            if not caption and comfyui:
                caption = caption_from_comfyui_metadata(chunks)
            if not caption:
                reason = SkipReason.EMPTY_CAPTION if caption_path.is_file() or infotext else SkipReason.MISSING_CAPTION
                report.add(reason, image_path, "its ComfyUI workflow has no sampler with a positive text prompt"
                           if comfyui and not caption_path.is_file() else "")
                continue
        records.append(CaptionedImage(image_path, caption, image_path.relative_to(folder).as_posix()))
    return records


def _manifest_rows(manifest: Path, report: SkipReport) -> Iterable[tuple[str, dict]]:
    """(source, row) for each row of a manifest, with column names lower-cased; malformed rows are reported."""
    with manifest.open(encoding="utf-8-sig", newline="") as file:
        if manifest.suffix.lower() == ".csv":
            reader = csv.DictReader(file)
            for row in reader:
                # line_num counts the physical lines read so far: this row's (last) line.
                yield f"{manifest}:{reader.line_num}", {str(key).strip().lower(): value for key, value in row.items()
                                                        if key is not None}  # key None: surplus cells of a row
            return
        for line_number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            source = f"{manifest}:{line_number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                report.add(SkipReason.MALFORMED_ROW, source, f"invalid JSON: {error.msg}")
                continue
            if not isinstance(row, dict):
                report.add(SkipReason.MALFORMED_ROW, source, "not a JSON object")
                continue
            yield source, {str(k).strip().lower(): v for k, v in row.items()}


def _index_manifest(manifest: Path, report: SkipReport) -> list[CaptionedImage]:
    records = []
    for source, row in _manifest_rows(manifest, report):
        image_value = next((row[name] for name in IMAGE_COLUMNS if row.get(name) not in (None, "")), None)
        caption_column = next((name for name in CAPTION_COLUMNS if name in row), None)
        if not isinstance(image_value, str) or caption_column is None:
            report.add(SkipReason.MALFORMED_ROW, source,
                       f"needs an image ({'/'.join(IMAGE_COLUMNS)}) and a caption ({'/'.join(CAPTION_COLUMNS)})")
            continue
        caption = row[caption_column]
        if caption is not None and not isinstance(caption, str):
            report.add(SkipReason.MALFORMED_ROW, source, f"{caption_column} is not a string")
            continue
        image_path = Path(image_value) if Path(image_value).is_absolute() else manifest.parent / image_value
        if not image_path.is_file():
            report.add(SkipReason.MISSING_IMAGE, image_path, f"named by {source}")
            continue
        caption = (caption or "").strip()
        if not caption:
            report.add(SkipReason.EMPTY_CAPTION, source)
            continue
        records.append(CaptionedImage(image_path, caption, image_value))
    return records


def split_for_validation(records: Sequence[CaptionedImage], fraction: float, seed: int = 0) \
        -> tuple[list[CaptionedImage], list[CaptionedImage]]:
    """A deterministic (train, validation) split holding out `round(fraction * N)` images (at least one when
    fraction > 0 and N > 1).

    Each image is ranked by a hash of (seed, its key), so the split depends only on the seed and the image names:
    not on listing order, not on the machine, and adding images to a dataset moves few existing ones across. Records
    of the same image (several captions of it in a manifest) always land on the same side. Both lists keep the input
    order.
    """
    if not 0.0 <= fraction < 1.0:
        raise AfaError(f"--val-split must be in [0, 1), got {fraction}")
    keys = sorted({record.key for record in records},
                  key=lambda key: hashlib.sha256(f"{seed}\0{key}".encode("utf-8")).hexdigest())
    held_out_count = round(fraction * len(keys))
    if fraction > 0 and held_out_count == 0 and len(keys) > 1:
        held_out_count = 1
    held_out = set(keys[:held_out_count])
    train = [record for record in records if record.key not in held_out]
    validation = [record for record in records if record.key in held_out]
    return train, validation


# -- loading -------------------------------------------------------------------------------------------------------

def load_image(path: str | Path, resolution: int, crop_generator: torch.Generator | None = None) -> torch.Tensor:
    """An image file as a training tensor (`load_image_and_sizes` without the sizes): float32 [3 x R x R] in
    [-1, 1]."""
    return load_image_and_sizes(path, resolution, crop_generator)[0]


def load_image_and_sizes(path: str | Path, resolution: int, crop_generator: torch.Generator | None = None) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """An image file as a training tensor, prepared like diffusers' train_text_to_image (torchvision's
    Resize(resolution, LANCZOS) + CenterCrop(resolution) + Normalize(0.5, 0.5)), and its size conditioning.

    EXIF orientation is applied first, so phone photos are upright. Transparency is dropped (RGB only).

    :param crop_generator: None for the centre crop; else the crop's position is drawn from it as torchvision's
        RandomCrop(resolution) draws it (top, then left, each uniform over every position that fits).
    :return: (float32 tensor [3 x resolution x resolution] in [-1, 1], int64 `sizes` [6]: the image's original
        height and width, the crop's top and left in the resized image, and the crop's height and width -- SDXL's
        original-size, crop and target-size conditioning, as diffusers' train_text_to_image_sdxl computes them).
    :raises Exception: whatever PIL raises for a file it cannot decode.
    """
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL warns when a palette with transparency goes straight to RGB
        image = image.convert("RGB")

    # Shorter side to `resolution`, the longer one scaled and truncated, as torchvision's Resize(int) does.
    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    image = image.resize(size, Image.Resampling.LANCZOS)
    if crop_generator is None:
        left = int(round((size[0] - resolution) / 2.0))
        top = int(round((size[1] - resolution) / 2.0))
    else:
        top = int(torch.randint(0, size[1] - resolution + 1, (1,), generator=crop_generator))
        left = int(torch.randint(0, size[0] - resolution + 1, (1,), generator=crop_generator))
    image = image.crop((left, top, left + resolution, top + resolution))

    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    sizes = torch.tensor([height, width, top, left, resolution, resolution], dtype=torch.int64)
    return pixels.float() / 127.5 - 1.0, sizes


class ImageCaptionDataset(Dataset):
    """Loads `CaptionedImage`s. Use with `DataLoader(dataset, collate_fn=collate, ...)`.

    An item is {"pixel_values": [3 x R x R] in [-1, 1], "sizes": [6] (`load_image_and_sizes`), "caption": str,
    "index": int}, or a `SkippedItem` when the image cannot be decoded (see the module docstring for why that is
    found here and not while indexing).

    `crop="random"` crops each item where the generator of (seed, epoch, index) says (see the module docstring);
    `for_epoch(epoch)` gives the dataset of an epoch's crops.
    """

    def __init__(self, records: Sequence[CaptionedImage], resolution: int, crop: str = "center", seed: int = 0,
                 epoch: int = 0):
        if crop not in CROPS:
            raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        self.records = list(records)
        self.resolution, self.crop, self.seed, self.epoch = resolution, crop, seed, epoch

    def for_epoch(self, epoch: int) -> "ImageCaptionDataset":
        """This dataset with the crops of `epoch` (a new object: DataLoader workers get a copy of it with the epoch
        already set, and loaders of other epochs are left alone)."""
        return ImageCaptionDataset(self.records, self.resolution, self.crop, self.seed, epoch)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | SkippedItem:
        record = self.records[index]
        crop_generator = (sample_generator(self.seed, self.epoch, index, CROP_STREAM) if self.crop == "random"
                          else None)
        try:
            pixel_values, sizes = load_image_and_sizes(record.image_path, self.resolution, crop_generator)
        except Exception as error:  # noqa: BLE001 - any decoding failure means "skip this image", never a crash
            return SkippedItem(SkipReason.UNREADABLE_IMAGE, str(record.image_path), f"{type(error).__name__}: {error}")
        return {"pixel_values": pixel_values, "sizes": sizes, "caption": record.caption, "index": index}


def collate(items: list[dict | SkippedItem]) -> dict:
    """The DataLoader batch of every dataset here: the items that loaded, stacked, and the skipped ones.

    Items are {"pixel_values" [3 x R x R], "latents" [C x h x w] or "moments" [2C x h x w] (a VAE posterior's mean
    and standard deviation stacked, as a `LatentCache` of moments serves them), "sizes" [6] (SDXL's size
    conditioning, `load_image_and_sizes`), "caption": str, "index": int} (the index is the item's position in its
    dataset: the key of its random draws, training/diffusion.py), or `SkippedItem`s.

    :return: {"pixel_values", "latents" or "moments", "sizes": [B x ...] (absent when B is 0), "captions": B str,
        "indices": B int, "skipped": the SkippedItems}.
    """
    loaded = [item for item in items if not isinstance(item, SkippedItem)]
    batch = {"skipped": [item for item in items if isinstance(item, SkippedItem)],
             "indices": [item["index"] for item in loaded], "captions": [item["caption"] for item in loaded]}
    for key in ("latents", "moments", "pixel_values", "sizes"):
        if loaded and key in loaded[0]:
            batch[key] = torch.stack([item[key] for item in loaded])
    return batch


# -- latent cache --------------------------------------------------------------------------------------------------


LATENT_CACHE_FORMAT = 2  # 2: the images' size conditioning ("sizes")


class LatentCache(Dataset):
    """VAE latents of a dataset's images, encoded once and stored on disk; serves {"latents", "sizes", "caption",
    "index"} items (see `collate`).

    Layout: `<cache_dir>/<key>/latents.safetensors` holds one tensor "latents" [N x C x h x w], a row per unique
    image file, and `<cache_dir>/<key>/index.json` maps each image path to its row (and its size conditioning,
    `load_image_and_sizes`), or records why it was skipped.
    The key is a hash of the format version, the resolution, the caller's VAE identity (e.g. the checkpoint's
    sha256), and each image file's path, size and modification time, so editing, adding or removing an image, or
    changing VAE or resolution, selects a new cache folder; a stale cache is never reused. Captions are not part of
    the key: they come from the current records when serving, so editing captions needs no re-encoding.

    A cache is written into a temporary folder and renamed to `<key>` when complete, so an interrupted build leaves
    nothing that looks complete. Build it from one process (rank 0 under DDP) before the others open it.

    Opening a cache loads all its latents into memory (N x C x h x w values: 32 KiB per 512 px image in fp16, so
    3.2 GB for 100k images). Serving is then indexing a tensor: no DataLoader workers are needed, and with forked
    workers the memory is shared copy-on-write. (Reading single rows lazily out of the file would need safetensors'
    slicing, which in the pinned safetensors 0.4.2 relies on a torch indexing form that torch deprecates.)

    What "latents" are is up to `encode` (a sample, the distribution's mean, or mean and std stacked): the cache
    stores whatever tensor it returns, in its dtype, and its items name it `item_key` ("latents", or "moments" for
    mean and std stacked, which training/metrics.py's `prepare_batch` samples from). The images are centre crops
    (the latents of random crops would differ every epoch).
    """

    def __init__(self, folder: str | Path, records: Sequence[CaptionedImage], item_key: str = "latents"):
        """Opens a complete cache folder for `records` (the records it was built from, captions may differ)."""
        self.folder = Path(folder)
        self.item_key = item_key
        index = json.loads((self.folder / "index.json").read_text(encoding="utf-8"))
        if index.get("format") != LATENT_CACHE_FORMAT:
            raise AfaError(f"{self.folder}: latent cache format {index.get('format')}, expected "
                           f"{LATENT_CACHE_FORMAT}; delete the folder to rebuild it")
        self.skip_report = SkipReport()  # images that could not be decoded when the cache was built
        for path, reason, detail in index["skipped"]:
            self.skip_report.add(reason, path, detail)
        rows = index["rows"]  # image path -> row of "latents"
        sizes = index["sizes"]  # image path -> its size conditioning
        self.latents = load_file(str(self.folder / "latents.safetensors"))["latents"] if rows else None
        # Records of skipped images are left out; several records of one image share its row.
        self.items = [(rows[str(record.image_path)], torch.tensor(sizes[str(record.image_path)]), record.caption)
                      for record in records if str(record.image_path) in rows]

    @staticmethod
    def key(records: Sequence[CaptionedImage], resolution: int, vae_identity: str) -> str:
        """The cache key (20 hex digits) of a dataset's image files at a resolution for one VAE."""
        image_files = []
        for path in _unique_image_paths(records):
            stat = path.stat()
            image_files.append([str(path), stat.st_size, stat.st_mtime_ns])
        identity = json.dumps({"format": LATENT_CACHE_FORMAT, "resolution": resolution, "vae": vae_identity,
                               "images": image_files})
        return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:20]

    @classmethod
    def open_or_build(cls, records: Sequence[CaptionedImage], *, resolution: int, vae_identity: str,
                      encode: Callable[[torch.Tensor], torch.Tensor], cache_dir: str | Path, batch_size: int = 8,
                      num_workers: int = 0, item_key: str = "latents") -> "LatentCache":
        """The cache of `records`, encoding each unique image file once if no complete cache exists yet.

        :param encode: images [B x 3 x R x R] in [-1, 1] (float32, CPU) -> latents [B x C x R/f x R/f]; called
            under torch.no_grad. It moves the images to its device and scales the latents as the trainer needs.
        :param vae_identity: names the VAE and everything else `encode` depends on (e.g. checkpoint sha256 plus the
            latent scale factor); a different identity never reuses these latents.
        :param num_workers: DataLoader workers decoding images while building.
        :param item_key: the name items give the stored tensor ("latents", or "moments" for a posterior's mean and
            std stacked); it is part of what `encode` returns, so give it its own `vae_identity` too.
        """
        folder = Path(cache_dir) / cls.key(records, resolution, vae_identity)
        if not (folder / "index.json").is_file():
            _build_latent_cache(folder, records, resolution, encode, batch_size, num_workers)
        return cls(folder, records, item_key)

    def for_epoch(self, epoch: int) -> "LatentCache":
        """The same cache: its items do not depend on the epoch (see ImageCaptionDataset.for_epoch)."""
        return self

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        """{item_key: [C x h x w] ("latents") or [2C x h x w] ("moments"), "sizes": [6], "caption": str,
        "index": index}."""
        row, sizes, caption = self.items[index]
        return {self.item_key: self.latents[row], "sizes": sizes, "caption": caption, "index": index}


def _unique_image_paths(records: Sequence[CaptionedImage]) -> list[Path]:
    return list(dict.fromkeys(record.image_path for record in records))


def _build_latent_cache(folder: Path, records: Sequence[CaptionedImage], resolution: int,
                        encode: Callable[[torch.Tensor], torch.Tensor], batch_size: int, num_workers: int) -> None:
    """Encodes every unique image file of `records` once and writes the cache folder (see `LatentCache`)."""
    image_paths = _unique_image_paths(records)
    # Captions are irrelevant here; one record per image file keeps an image with several captions from being
    # encoded more than once.
    dataset = ImageCaptionDataset([CaptionedImage(path, "", str(path)) for path in image_paths], resolution)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate)
    rows, sizes, skipped, latent_batches = {}, {}, [], []
    for batch in loader:
        skipped += [[item.source, item.reason.value, item.detail] for item in batch["skipped"]]
        if not batch["indices"]:
            continue
        with torch.no_grad():
            latents = encode(batch["pixel_values"]).detach().cpu()
        if latents.shape[0] != len(batch["indices"]):
            raise ValueError(f"encode returned {latents.shape[0]} latents for {len(batch['indices'])} images")
        for image_index, image_sizes in zip(batch["indices"], batch["sizes"].tolist()):
            rows[str(image_paths[image_index])] = len(rows)
            sizes[str(image_paths[image_index])] = image_sizes
        latent_batches.append(latents)

    temporary = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    temporary.mkdir(parents=True, exist_ok=True)
    if latent_batches:
        save_file({"latents": torch.cat(latent_batches).contiguous()}, str(temporary / "latents.safetensors"))
    index = {"format": LATENT_CACHE_FORMAT, "resolution": resolution, "rows": rows, "sizes": sizes,
             "skipped": skipped}
    (temporary / "index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
    try:
        os.replace(temporary, folder)
    except OSError:
        # Another process completed the same cache first (the target exists and is not empty): use theirs.
        if not (folder / "index.json").is_file():
            raise
        shutil.rmtree(temporary)
