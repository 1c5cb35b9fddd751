#!/usr/bin/env python
"""AFA end to end on a CPU in minutes, offline: two expert checkpoints, SABW trained on them, and the evaluation.

    python training/demo.py --output demo-output           # `make demo`
    python training/demo.py --output demo-quick --quick    # the reduced run the tests use

Stages, each timed:
  1. data     synthetic 32 px images of circles and squares in warm (red, orange, yellow) and cool (blue, cyan, green)
              colours, with captions naming colour, shape and position, written as PNG + .txt (kohya style): a
              warm-only set, a cool-only set, and two-shape images (often one warm and one cool shape) for SABW
              training and for the held-out evaluation.
  2. VAE      a tiny autoencoder (SD1's VAE architecture, 32 px images -> 4 x 16 x 16 latents), trained briefly so
              latents carry the images (colours included); its latent scale factor is measured as SD's 0.18215 was.
  3. members  a base UNet (the tiny SD1-style preset) trained on both palettes, then two fine-tunes of it, like
              CivitAI fine-tunes of SD 1.5: an expert on warm-coloured shapes and an expert on cool-coloured ones (all
              UNet weights, the ordinary denoising loss, 10% caption dropout). Each is written as a WebUI checkpoint
              with the same VAE and the same random but fixed tiny text encoder.
  4. SABW     training/train.py, run as a user runs it, on the two-shape images, once per SABW preset: "paper" (the
              authors' aggregator) and "fast" (AFA's cheaper one), in parallel processes. The fast one ends first,
              and its core then runs what needs no paper weights: evaluate.py --merges-only (the weighted merge
              and MBW, their weights chosen on a validation set) and the images: held-out prompts sampled with DDIM
              at 50, 20 and 10 steps by the best merge (the lower validation error), block averaging, each member
              and AFA (fast).
  5. results  training/evaluate.py on held-out two-shape images with those merges (--merges): the table of
              denoising errors (each member, the weighted merge, MBW, block averaging, noise averaging, "AFA
              (paper)", "AFA (fast)") and the figures (per-pixel winners, each preset's aggregation maps). Each
              expert is better on its own colours, so an image holding both is best denoised by different members
              in different regions: what SABW's per-pixel weights learn. Then the image table: each image scored by
              whether it shows what its caption asks (each named shape in its quadrant, in its colour and kind,
              nothing elsewhere), a measurement checked first on the real held-out images (the paper's Tables 7 and
              8 at the demo's scale).

Everything is seeded. Each process computes with `--threads` threads (default 1), so the numbers do not depend on
the machine's core count; the two experts train in parallel processes, and so do the two SABW presets.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

if __name__ == "__main__":  # `python training/demo.py` puts training/ on the path; afa/ and training/ sit one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from afa import AfaError  # noqa: E402
from afa.unet import PRESETS, UNET_KEY_PREFIX, build_unet  # noqa: E402
from training import data as datasets  # noqa: E402
from training.cli import run  # noqa: E402
from training.evaluate import MERGES_FILE, RESULTS_FILE  # noqa: E402
from training.diffusion import NoiseSchedule, draw_for_samples, squared_error  # noqa: E402
from training.sd_checkpoint import (TEXT_ENCODER_PREFIX, TINY_TEXT_ENCODER_FOLDER_NAME, TINY_VAE_DDCONFIG,  # noqa: E402
                                    VAE_PREFIX, Vae, build_tiny_text_encoder, schedule_buffers, tiny_sd_config,
                                    write_webui_checkpoint)
from training.text_encoder import encode, tokenize  # noqa: E402

TRAINING_DIR = Path(__file__).resolve().parent
MARKER = ".afa-demo"  # marks a folder this demo wrote, so a rerun may replace it
RESOLUTION = 32


@dataclass(frozen=True)
class Settings:
    """The sizes of one demo run (steps are optimizer steps; batches are images per step)."""

    expert_images: int  # images in each expert's set (warm, cool); the base UNet trains on both sets
    mixed_images: int  # two-shape images SABW trains on
    held_out_images: int  # two-shape images of the evaluation, seen by no model
    vae_steps: int
    vae_batch: int  # small: for a few hundred steps, more updates beat bigger batches
    base_steps: int  # base UNet on both palettes
    expert_steps: int  # each fine-tune of the base
    unet_batch: int  # base and experts
    unet_learning_rate: float  # AdamW, base and experts
    sabw_steps: int  # training/train.py --max-steps
    sabw_batch: int  # training/train.py --batch-size
    sabw_learning_rate: float  # AdamW; 10x the paper's 1e-4, for a run of a few hundred steps
    # training/train.py --hidden-channels of both presets (the tiny UNet's widest block has 64 channels). Not 32: SABW's
    # GroupNorm has 32 groups, which at width 32 normalise every channel on its own and so cancel the per-channel
    # time embedding the ResNet layer adds.
    sabw_hidden: int
    evaluation_draws: int  # timestep/noise draws per held-out image in the table
    figure_draws: int  # Monte-Carlo noise draws per pixel in the denoising-capability figure
    validation_images: int  # two-shape images the merges' weights are chosen on, seen by no model
    validation_draws: int  # timestep/noise draws per validation image
    image_prompts: int  # held-out captions sampled by each model at each step count of IMAGE_STEPS
    guidance_scale: float  # classifier-free guidance of the sampled images


# Sized for a fresh CPU machine: the full run in about 25 minutes, the quick one in about 5 (2 cores, 1 thread each).
FULL = Settings(expert_images=768, mixed_images=768, held_out_images=128, vae_steps=400, vae_batch=8, base_steps=300,
                expert_steps=400, unet_batch=16, unet_learning_rate=1e-3, sabw_steps=250, sabw_batch=16,
                sabw_learning_rate=1e-3, sabw_hidden=64, evaluation_draws=8, figure_draws=32, validation_images=32,
                validation_draws=1, image_prompts=16, guidance_scale=3.0)
QUICK = Settings(expert_images=256, mixed_images=256, held_out_images=32, vae_steps=100, vae_batch=8, base_steps=40,
                 expert_steps=80, unet_batch=16, unet_learning_rate=1e-3, sabw_steps=40, sabw_batch=16,
                 sabw_learning_rate=1e-3, sabw_hidden=64, evaluation_draws=4, figure_draws=8, validation_images=16,
                 validation_draws=1, image_prompts=8, guidance_scale=3.0)
SABW_PRESETS = ("paper", "fast")  # trained on the same data, evaluated side by side


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", default="demo-output", help="folder for everything the demo writes (replaced "
                        "if an earlier demo run wrote it)")
    parser.add_argument("--quick", action="store_true", help="the reduced run the tests use (a few minutes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, of every model and of every draw")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process; 1 keeps the numbers "
                        "identical on every machine")
    group = parser.add_argument_group("sizes (each overrides the preset --quick chooses)")
    names = [field.name for field in dataclasses.fields(Settings)]
    for field in dataclasses.fields(Settings):
        # SUPPRESS: an option not given stays out of the namespace, so the preset's value applies.
        group.add_argument("--" + field.name.replace("_", "-"), type={"int": int, "float": float}[field.type],
                           default=argparse.SUPPRESS, help=f"{field.name.replace('_', ' ')} (full run: "
                           f"{getattr(FULL, field.name)}, quick run: {getattr(QUICK, field.name)})")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.settings = dataclasses.replace(preset, **{name: value for name, value in vars(args).items() if name in names})
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


# -- 1. data -------------------------------------------------------------------------------------------------------

# The experts split the data by colour: one is fine-tuned on warm-coloured shapes, the other on cool-coloured ones.
# Colour survives into every latent pixel of a shape, so which expert is better differs from region to region of
# an image that holds both kinds -- what SABW's per-pixel weights are for (paper Figure 1).
WARM = {"red": (220, 50, 40), "orange": (245, 140, 30), "yellow": (235, 215, 50)}
COOL = {"blue": (50, 90, 235), "cyan": (40, 200, 220), "green": (40, 190, 70)}
COLOURS = {**WARM, **COOL}
KINDS = ("circle", "square")
QUADRANTS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
SUPERSAMPLING = 4  # shapes are drawn at 4x and downsampled, for anti-aliased edges

Shape = tuple[str, str, str]  # (kind, colour, quadrant)


def draw_shapes(shapes: list[Shape], rng: np.random.Generator) -> Image.Image:
    """A 32 px image of shapes on black, one per quadrant; sizes and offsets jitter."""
    scale = SUPERSAMPLING
    image = Image.new("RGB", (RESOLUTION * scale, RESOLUTION * scale), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    half = RESOLUTION // 2
    for kind, colour, quadrant in shapes:
        size = rng.uniform(9, 13)
        column, row = QUADRANTS[quadrant]
        centre_x = column * half + half / 2 + rng.uniform(-1.5, 1.5)
        centre_y = row * half + half / 2 + rng.uniform(-1.5, 1.5)
        box = [scale * (centre_x - size / 2), scale * (centre_y - size / 2),
               scale * (centre_x + size / 2), scale * (centre_y + size / 2)]
        (draw.ellipse if kind == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)


def caption(shapes: list[Shape]) -> str:
    """E.g. "an orange circle at the top left and a blue square at the bottom right"."""
    return " and ".join(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {kind} at the {quadrant}"
                        for kind, colour, quadrant in shapes)


def random_shapes(palettes: list[dict], rng: np.random.Generator) -> list[Shape]:
    """One shape per palette, of a random kind and a random colour of that palette, in distinct quadrants."""
    quadrants = rng.choice(list(QUADRANTS), size=len(palettes), replace=False)
    return [(str(rng.choice(KINDS)), str(rng.choice(list(palette))), str(quadrant))
            for palette, quadrant in zip(palettes, quadrants)]


def write_image_set(folder: Path, count: int, palettes_of_image, rng: np.random.Generator) -> Path:
    """Writes `count` PNG + .txt pairs; palettes_of_image(index) gives the palette of each shape of image `index`."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        shapes = random_shapes(palettes_of_image(index), rng)
        draw_shapes(shapes, rng).save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(caption(shapes) + "\n", encoding="utf-8")
    return folder


def make_datasets(root: Path, settings: Settings, seed: int) -> dict[str, Path]:
    """The five image sets. An expert's set holds one or two shapes of its colours; the two-shape sets (SABW
    training, held-out evaluation, the merges' validation) hold a warm and a cool shape in half of the images and
    two shapes of one temperature in the rest, so SABW has to pick experts per region and per prompt. (The
    validation set is drawn last, so adding it left the other sets as they were.)"""
    rng = np.random.default_rng(seed)

    def one_palette(palette):
        return lambda index: [palette] * int(rng.integers(1, 3))

    def two_shapes(index):
        pairs = [[WARM, COOL], [COOL, WARM], [WARM, WARM], [COOL, COOL]]
        # The first images (the figures' rows) always hold one shape of each expert's colours.
        return pairs[index % 2] if index < 4 else pairs[int(rng.integers(0, 4))]

    return {
        "warm": write_image_set(root / "warm", settings.expert_images, one_palette(WARM), rng),
        "cool": write_image_set(root / "cool", settings.expert_images, one_palette(COOL), rng),
        "two-shapes": write_image_set(root / "two-shapes", settings.mixed_images, two_shapes, rng),
        "held-out": write_image_set(root / "held-out", settings.held_out_images, two_shapes, rng),
        "validation": write_image_set(root / "validation", settings.validation_images, two_shapes, rng),
    }


def load_image_set(folder: Path) -> tuple[torch.Tensor, list[str]]:
    """Reads a set back through the trainer's data code: (images [N x 3 x 32 x 32] in [-1, 1], captions)."""
    report = datasets.SkipReport()
    dataset = datasets.ImageCaptionDataset(datasets.index_captioned_images(folder, report), RESOLUTION)
    items = [dataset[index] for index in range(len(dataset))]
    if report.total or any(isinstance(item, datasets.SkippedItem) for item in items):
        raise RuntimeError(f"{folder}: the demo's own images did not load:\n{report.summary()}")
    return torch.stack([item["pixel_values"] for item in items]), [item["caption"] for item in items]


# -- 2. VAE --------------------------------------------------------------------------------------------------------

# The tiny SD1 VAE at one width (32 channels at both levels): trains twice as fast as the tests' tiny VAE and still
# turns 32 px images into 4 x 16 x 16 latents.
DEMO_VAE_DDCONFIG = {**TINY_VAE_DDCONFIG, "ch_mult": [1, 1]}


def train_vae(images: torch.Tensor, steps: int, batch_size: int, seed: int) -> Vae:
    """The demo's VAE trained on images [N x 3 x 32 x 32] in [-1, 1]; returns it with `scale_factor` set so that
    latents have unit standard deviation (how SD's 0.18215 was chosen).

    It is trained as a plain autoencoder of the posterior mean, which is what `Vae.encode` returns: with a few hundred
    steps, the KL-VAE's sampling noise (std 1 at initialisation) would drown the latents the decoder learns from.
    """
    torch.manual_seed(seed)
    vae = Vae(DEMO_VAE_DDCONFIG, embed_dim=4, scale_factor=1.0)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = images[torch.randint(0, images.shape[0], (batch_size,), generator=generator)]
        loss = (vae.decode(vae.encode(batch)) - batch).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    vae.eval().requires_grad_(False)
    vae.scale_factor = 1.0 / encode_images(vae, images).std().item()
    return vae


@torch.no_grad()
def encode_images(vae: Vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    return torch.cat([vae.encode(images[start:start + batch_size]) for start in range(0, len(images), batch_size)])


# -- 3. members ----------------------------------------------------------------------------------------------------

@dataclass
class DenoisingSet:
    """What a UNet trains on: latents [N x 4 x 16 x 16], text contexts [N x 77 x 32], the empty prompt's context
    [1 x 77 x 32] (caption dropout)."""

    latents: torch.Tensor
    contexts: torch.Tensor
    empty_context: torch.Tensor


def train_unet(unet: torch.nn.Module, data: DenoisingSet, steps: int, batch_size: int, learning_rate: float,
               seed: int, threads: int, caption_dropout: float = 0.1) -> tuple[dict, list[float]]:
    """Trains all weights of `unet` on the ordinary denoising loss (eps target, timesteps uniform, 10% of captions
    dropped); returns (its state dict, the loss of every step). Every sample's draws are seeded by (seed, step,
    index) with the trainer's `draw_for_samples`."""
    torch.set_num_threads(threads)
    schedule = NoiseSchedule(schedule_buffers()["alphas_cumprod"])
    optimizer = torch.optim.AdamW(unet.parameters(), lr=learning_rate, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    order, position, losses = torch.randperm(len(data.latents), generator=generator), 0, []
    unet.train()
    for step in range(steps):
        if position + batch_size > len(order):  # a new epoch: a new permutation
            order, position = torch.randperm(len(data.latents), generator=generator), 0
        indices = order[position:position + batch_size]
        position += batch_size
        draws = draw_for_samples(indices.tolist(), seed, step, tuple(data.latents.shape[1:]),
                                 schedule.num_timesteps, caption_dropout)
        latents = data.latents[indices]
        context = torch.where(draws.drop_caption[:, None, None], data.empty_context, data.contexts[indices])
        noisy = schedule.add_noise(latents, draws.noise, draws.timesteps)
        loss = squared_error(unet(noisy, draws.timesteps, context), draws.noise).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return unet.state_dict(), losses


def _train_expert(base_state: dict, data: DenoisingSet, settings: Settings, seed: int, threads: int) \
        -> tuple[dict, list[float]]:
    """One fine-tune of the base UNet (runs in a worker process)."""
    unet = build_unet(PRESETS["tiny"])
    unet.load_state_dict(base_state)
    return train_unet(unet, data, settings.expert_steps, settings.unet_batch, settings.unet_learning_rate, seed,
                      threads)


def train_experts(base_state: dict, sets: list[DenoisingSet], settings: Settings, seed: int, threads: int) \
        -> list[tuple[dict, list[float]]]:
    """Fine-tunes one copy of the base per set, in parallel processes (the result does not depend on it: each
    process computes with `threads` threads and its own seeds)."""
    context = multiprocessing.get_context("spawn")  # fork after torch has started threads is unsafe
    with concurrent.futures.ProcessPoolExecutor(max_workers=len(sets), mp_context=context) as pool:
        futures = [pool.submit(_train_expert, base_state, data, settings, seed + 1 + index, threads)
                   for index, data in enumerate(sets)]
        return [future.result() for future in futures]


def write_member(path: Path, unet_state: dict, vae: Vae, text_encoder: torch.nn.Module) -> Path:
    """A WebUI checkpoint (UNet, VAE, text encoder, schedule) with its ldm yaml, which records the VAE's scale and
    names the tiny text encoder folder beside the checkpoint (`tiny-clip-text/`), so a real WebUI loads it."""
    state_dict = {UNET_KEY_PREFIX + key: value for key, value in unet_state.items()}
    state_dict.update({VAE_PREFIX + key: value for key, value in vae.parts.state_dict().items()})
    state_dict.update({TEXT_ENCODER_PREFIX + key: value for key, value in text_encoder.state_dict().items()})
    state_dict.update(schedule_buffers())
    config = tiny_sd_config(path.parent / TINY_TEXT_ENCODER_FOLDER_NAME)
    config["model"]["params"]["scale_factor"] = vae.scale_factor
    config["model"]["params"]["first_stage_config"]["params"]["ddconfig"] = dict(DEMO_VAE_DDCONFIG)
    return write_webui_checkpoint(path, state_dict, config)


# -- images: does a sampled image show what its caption asks? -----------------------------------------------------

IMAGE_STEPS = (50, 20, 10)  # the paper's Table 8 steps, down to its fewest
# The AFA preset whose images are sampled: at the demo's size the paper design's SABW (self-attention over every
# latent pixel of every block) costs about 5 times block averaging per step, the fast one under twice; both presets
# have their row in the denoising table.
IMAGE_PRESET = "fast"
CAPTION_SHAPE = re.compile(r"an? (\w+) (circle|square) at the (top left|top right|bottom left|bottom right)")
# A quadrant holds a shape when at least MIN_SHAPE_PIXELS of its pixels have a brightest channel above FOREGROUND (the
# background is black, every palette colour has a channel above 200; the smallest shape, 9 px across, covers about
# 64 pixels). The shape is then the pixels brighter than SHAPE_LEVEL of the quadrant's brightest, and its core those
# brighter than CORE_LEVEL (its colour, away from the blurred edge).
FOREGROUND = 100
MIN_SHAPE_PIXELS = 20
SHAPE_LEVEL, CORE_LEVEL = 0.35, 0.6


class CaptionCheck(NamedTuple):
    """How far an image shows its caption: `shown` (every named shape is in its quadrant with the named colour and
    kind, and the other quadrants are empty); of the `named` shapes, how many have their colour and kind in their
    quadrant; and, wherever the shapes are, whether the image's shapes have exactly the caption's colours
    (`colours_anywhere`) and its palettes (`palettes`: as many warm and as many cool shapes as the caption names,
    what the two experts' data differ by)."""

    shown: bool
    colours: int
    kinds: int
    named: int
    colours_anywhere: bool
    palettes: bool


def caption_shapes(text: str) -> dict[str, tuple[str, str]]:
    """quadrant -> (kind, colour) of each shape a caption names ("a red circle at the top left and ...")."""
    return {quadrant: (kind, colour) for colour, kind, quadrant in CAPTION_SHAPE.findall(text)}


def quadrants(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """An image [32 x 32 x 3] cut into its four quadrants [16 x 16 x 3], by name."""
    half = RESOLUTION // 2
    return {name: pixels[row * half:(row + 1) * half, column * half:(column + 1) * half]
            for name, (column, row) in QUADRANTS.items()}


def shape_features(quadrant: np.ndarray) -> tuple[np.ndarray, float] | None:
    """(colour, corners) of the shape in a quadrant [16 x 16 x 3] uint8, None when it is empty: colour [3] the mean
    RGB of its core, corners the brightness of its bounding box's corners relative to its centre (about 0 for a
    disc, about 1 for a square; blurred images fall between)."""
    brightness = quadrant.max(axis=2).astype(np.float64)
    if (brightness > FOREGROUND).sum() < MIN_SHAPE_PIXELS:
        return None
    peak = brightness.max()
    colour = quadrant[brightness > CORE_LEVEL * peak].astype(np.float64).mean(axis=0)
    rows, columns = np.nonzero(brightness > SHAPE_LEVEL * peak)
    box = brightness[rows.min():rows.max() + 1, columns.min():columns.max() + 1]
    height, width = box.shape
    side = max(1, min(height, width) // 5)  # corner patches of a fifth of the box
    corners = np.concatenate([box[:side, :side].ravel(), box[:side, -side:].ravel(), box[-side:, :side].ravel(),
                              box[-side:, -side:].ravel()])
    centre = box[height // 2 - side:height // 2 + side, width // 2 - side:width // 2 + side]
    return colour, float(corners.mean() / centre.mean())


@dataclass(frozen=True)
class ShapeReader:
    """Reads a quadrant's shape: its colour is the nearest colour prototype, its kind "square" when its corners are
    above `square_corners`. Fitted on the demo's own captioned images (`fit`), checked on held-out ones before it
    scores generated images (`fit_caption_check`)."""

    prototypes: tuple[tuple[str, tuple[float, float, float]], ...]
    square_corners: float

    @classmethod
    def fit(cls, image_sets: list[np.ndarray], captions: list[str]) -> "ShapeReader":
        """From images [N x 32 x 32 x 3] uint8 (e.g. real ones and their VAE reconstructions, which every generated
        image comes through) sharing `captions`: a prototype per palette colour (the palette's RGB) and per colour
        and image set (the mean core colour of its shapes there), and the corner threshold that tells the most
        circles from squares."""
        prototypes = [(name, tuple(float(value) for value in rgb)) for name, rgb in COLOURS.items()]
        corners: dict[str, list[float]] = {kind: [] for kind in KINDS}
        for images in image_sets:
            colours: dict[str, list[np.ndarray]] = {}
            for pixels, text in zip(images, captions):
                cut = quadrants(pixels)
                for quadrant, (kind, colour) in caption_shapes(text).items():
                    features = shape_features(cut[quadrant])
                    if features is not None:
                        colours.setdefault(colour, []).append(features[0])
                        corners[kind].append(features[1])
            prototypes += [(name, tuple(float(value) for value in np.mean(values, axis=0)))
                           for name, values in colours.items()]
        values = np.sort(np.concatenate([corners["circle"], corners["square"]]))
        thresholds = (values[1:] + values[:-1]) / 2
        errors = [np.sum(np.asarray(corners["circle"]) > threshold) + np.sum(np.asarray(corners["square"]) <= threshold)
                  for threshold in thresholds]
        return cls(tuple(prototypes), float(thresholds[int(np.argmin(errors))]))

    def read(self, quadrant: np.ndarray) -> tuple[str, str] | None:
        """(kind, colour) of the shape in a quadrant [16 x 16 x 3] uint8, None when it is empty."""
        features = shape_features(quadrant)
        if features is None:
            return None
        colour, corners = features
        name = min(self.prototypes, key=lambda prototype: np.square(colour - np.asarray(prototype[1])).sum())[0]
        return ("square" if corners > self.square_corners else "circle"), name


def check_caption(reader: ShapeReader, pixels: np.ndarray, text: str) -> CaptionCheck:
    """Whether an image [32 x 32 x 3] uint8 shows its caption (CaptionCheck)."""
    named = caption_shapes(text)
    shown, colours, kinds, found_colours = True, 0, 0, []
    for quadrant, cut in quadrants(pixels).items():
        found, wanted = reader.read(cut), named.get(quadrant)
        if found is not None:
            found_colours.append(found[1])
        if wanted is None:
            shown = shown and found is None
            continue
        colour_right = found is not None and found[1] == wanted[1]
        kind_right = found is not None and found[0] == wanted[0]
        colours, kinds = colours + colour_right, kinds + kind_right
        shown = shown and colour_right and kind_right
    named_colours = [colour for _, colour in named.values()]
    return CaptionCheck(shown, colours, kinds, len(named), sorted(found_colours) == sorted(named_colours),
                        sorted(map(palette_of, found_colours)) == sorted(map(palette_of, named_colours)))


def palette_of(colour: str) -> str:
    return "warm" if colour in WARM else "cool"


def caption_scores(reader: ShapeReader, images: np.ndarray, captions: list[str]) -> dict[str, float]:
    """Percentages over images [P x 32 x 32 x 3] uint8: of the images, "shown" (showing their caption), "colours
    anywhere" (their shapes have the caption's colours, wherever they are) and "palettes" (as many warm and cool
    shapes as the caption names); of the named shapes, "colour" and "kind" (in their quadrant with their colour;
    with their kind)."""
    checks = [check_caption(reader, image, text) for image, text in zip(images, captions)]
    named = sum(check.named for check in checks)
    return {"shown": 100.0 * sum(check.shown for check in checks) / len(checks),
            "colours anywhere": 100.0 * sum(check.colours_anywhere for check in checks) / len(checks),
            "palettes": 100.0 * sum(check.palettes for check in checks) / len(checks),
            "colour": 100.0 * sum(check.colours for check in checks) / named,
            "kind": 100.0 * sum(check.kinds for check in checks) / named}


def to_pixels(images: torch.Tensor) -> np.ndarray:
    """images [N x 3 x H x W] in about [-1, 1] -> [N x H x W x 3] uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def fit_caption_check(fit_images: torch.Tensor, fit_captions: list[str], held_out: torch.Tensor,
                      held_out_captions: list[str], vae: Vae) -> tuple[ShapeReader, dict]:
    """The caption check, fitted on the two-shape training images [N x 3 x 32 x 32] in [-1, 1] and their VAE
    reconstructions, and its accuracy on the real held-out images before it scores generated ones: "real" and
    "reconstructed" (caption_scores of the held-out images and of their VAE reconstructions, the decoder every
    generated image comes through, against their own captions: every measure should be near 100) and "other
    captions" (caption_scores of the held-out images against the next image's caption: how often each measure
    accepts what was not asked)."""
    def reconstructed(images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return to_pixels(vae.decode(encode_images(vae, images)))

    reader = ShapeReader.fit([to_pixels(fit_images), reconstructed(fit_images)], fit_captions)
    real = to_pixels(held_out)
    shifted = held_out_captions[1:] + held_out_captions[:1]
    return reader, {"real": caption_scores(reader, real, held_out_captions),
                    "reconstructed": caption_scores(reader, reconstructed(held_out), held_out_captions),
                    "other captions": caption_scores(reader, real, shifted)}


BEST_MERGE = "the best merge"  # an ImageJob's row until merges.json names it


def best_merge_of(merges_file: Path) -> dict:
    """The summary (training/merge_search.py's Merge.summary) of the merge with the lowest validation error in an
    evaluate.py merges.json: chosen before any held-out image is seen (MBW's search starts from the weighted merge's
    weights and keeps only improvements, so it is MBW unless no block improved)."""
    return min(json.loads(merges_file.read_text(encoding="utf-8"))["merges"],
               key=lambda merge: merge["validation_error"])


@dataclass(frozen=True)
class ImageJob:
    """One model's images (runs in a worker process): `row` is its table row, "block average", an "AFA (...)" row
    (its one weights file in `weights`: the other preset's may not be written yet) or BEST_MERGE (its weights read
    from `merges_file` when the job runs)."""

    row: str
    members: tuple[str, ...]
    captions: tuple[str, ...]
    settings: Settings
    seed: int
    threads: int
    weights: str = ""
    merges_file: str = ""


def sample_images(job: ImageJob) -> tuple[str, dict[int, np.ndarray], float]:
    """(row, {steps: images [P x 32 x 32 x 3] uint8}, seconds): the job's model sampling its captions with DDIM at
    each of IMAGE_STEPS, from the same seeded noise per caption (training/sampling.py). The row is the merge's own
    ("MBW", "weighted merge (r=...)") for BEST_MERGE."""
    from afa.merge import MergedModel
    from training.evaluate import display_names, trained_ensembles
    from training.merge_search import text_merge_for
    from training.metrics import encode_for_members, ensemble_reading, member_alone
    from training.sampling import ddim_sample, initial_noise
    from training.sd_checkpoint import load_frozen_models

    started = time.time()
    torch.set_num_threads(job.threads)
    frozen = load_frozen_models(list(job.members), device="cpu")
    names = display_names([ref.name for ref in frozen.member_refs])
    text_encoders = list(frozen.text_encoders)
    row = job.row
    if row in names:
        model = member_alone(frozen.members[names.index(row)], names.index(row))
    elif row == "block average":
        from afa import EnsembleUNet
        from afa.modes import AVERAGE
        model = ensemble_reading(EnsembleUNet(frozen.members, None, AVERAGE), "per_member")
    elif job.weights:
        entry, = trained_ensembles([job.weights], frozen.members, frozen.member_refs, torch.device("cpu"))
        model = ensemble_reading(entry.ensemble, entry.info.config.text_conditioning)
    else:
        merge = best_merge_of(Path(job.merges_file))
        row, merge_weights = merge["row"], merge["weights"]
        unet = MergedModel.of_unets(frozen.members)
        unet.set_weights(merge_weights[:unet.num_groups])
        text = text_merge_for(frozen.text_encoders)
        if text is not None:
            text.set_weights(merge_weights[unet.num_groups])
        text_encoders.append(text.model if text is not None else text_encoders[0])
        model = member_alone(unet.model, len(frozen.members))
    contexts, _ = encode_for_members(text_encoders, tokenize(list(job.captions)))
    empty, _ = encode_for_members(text_encoders, tokenize([""] * len(job.captions)))
    noise = torch.stack([initial_noise(job.seed, index, (4, RESOLUTION // 2, RESOLUTION // 2))
                         for index in range(len(job.captions))])
    images = {}
    for steps in IMAGE_STEPS:
        latents = ddim_sample(model, noise, contexts, empty, frozen.schedule, steps, job.settings.guidance_scale)
        with torch.no_grad():
            images[steps] = to_pixels(frozen.vae.decode(latents))
    return row, images, time.time() - started


IMAGE_MEASURES = ("shown", "colours anywhere", "palettes")  # the image table's columns per step count, strictest first


def format_measures(scores: dict[str, float]) -> str:
    """E.g. "100 / 100 / 100": IMAGE_MEASURES' percentages."""
    return " / ".join(f"{scores[measure]:3.0f}" for measure in IMAGE_MEASURES)


def format_image_table(scores: dict[str, dict[int, dict[str, float]]], prompts: int) -> str:
    """The image-level table: per model and step count, IMAGE_MEASURES' percentages."""
    width = max(len(row) for row in scores) + 2
    lines = [f"images that show their caption, {prompts} held-out prompts, DDIM: % of images showing the caption "
             f"(each shape in its place, colour and kind) / its colours anywhere / its palettes (as many warm and "
             f"cool shapes)",
             f"{'model':<{width}}" + "".join(f"{f'{steps} steps':>20}" for steps in IMAGE_STEPS)]
    for row, by_steps in scores.items():
        lines.append(f"{row:<{width}}" + "".join(format_measures(by_steps[steps]).rjust(20) for steps in IMAGE_STEPS))
    return "\n".join(lines)


def render_image_grid(images: dict[str, dict[int, np.ndarray]], captions: list[str], real: np.ndarray,
                      count: int) -> Image.Image:
    """A figure: a row per prompt (the first `count`), its real held-out image [32 x 32 x 3] uint8 (from `real`
    [P x 32 x 32 x 3]) with its caption, then each model's image at each step count."""
    from afa.maps import render_grid

    rows = [[(captions[index], real[index])] + [(f"{row}\n{steps} steps", by_steps[steps][index])
                                                for row, by_steps in images.items() for steps in IMAGE_STEPS]
            for index in range(min(count, len(captions)))]
    return render_grid(rows, [], cell_size=64, label_lines=6, title="Held-out prompts sampled with DDIM by each "
                       "model, the same noise per prompt; first column: the real held-out image")


def evaluate_arguments(members: list[Path], folders: dict[str, Path], evaluation: Path, settings: Settings,
                       seed: int) -> list[str]:
    """training/evaluate.py's arguments in the demo: the merges' search (with --merges-only) and the table (with
    --merges and the weights files) take the same."""
    return ["--members", *map(str, members), "--data", str(folders["held-out"]),
            "--validation-data", str(folders["validation"]), "--validation-samples", "0",
            "--validation-draws", str(settings.validation_draws),
            "--resolution", str(RESOLUTION), "--samples", "0", "--draws", str(settings.evaluation_draws),
            "--seed", str(seed), "--batch-size", "32", "--figure-images", "4", "--figure-draws",
            str(settings.figure_draws), "--cell-size", "96", "--device", "cpu", "--output-dir", str(evaluation)]


def search_merges_alone(arguments: list[str], log: Path, threads: int) -> None:
    """training/evaluate.py --merges-only (in FreedCoreWork's worker, which waits while it runs), its output into
    `log`.

    Raises:
        subprocess.CalledProcessError: when it fails (after printing its log).
    """
    command = [sys.executable, str(TRAINING_DIR / "evaluate.py"), *arguments, "--merges-only"]
    with open(log, "w", encoding="utf-8") as log_file:
        code = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT,
                              env=_script_environment(threads)).returncode
    if code:
        print(log.read_text(encoding="utf-8"), flush=True)
        raise subprocess.CalledProcessError(code, command)


class FreedCoreWork:
    """The results' work that needs at most one SABW preset, on one worker process that starts when the first
    train.py ends: the core it frees would idle while the slower preset trains on (the full run: paper 13 minutes,
    fast 6).
    In the worker's order: evaluate.py --merges-only (training/merge_search.py's search, into merges.json), the
    images of the best merge, block averaging and the members, and AFA's (IMAGE_PRESET) once its weights are
    written. With settings.image_prompts 0, the search alone."""

    def __init__(self, worker: concurrent.futures.Executor, members: list[Path], weights: dict[str, Path],
                 arguments: list[str], evaluation: Path, prompts: tuple[str, ...], settings: Settings, seed: int,
                 threads: int):
        self.worker, self.weights, self.arguments, self.threads = worker, weights, arguments, threads
        self.merges_file, self.search_log = evaluation / MERGES_FILE, evaluation / "merge-search.log"
        self.prompts = prompts
        self.common = dict(members=tuple(map(str, members)), captions=prompts, settings=settings, seed=seed,
                           threads=threads)
        self.search: concurrent.futures.Future | None = None
        self.image_futures: list[concurrent.futures.Future] = []

    def preset_trained(self, preset: str) -> None:
        """Queues what `preset`'s weights (and a free core) allow: called as each train.py ends."""
        if self.search is None:
            print(f"   {preset} trained: its core now searches the merges ({self.search_log}) and samples images",
                  flush=True)
            self.merges_file.parent.mkdir(parents=True, exist_ok=True)
            self.merges_file.unlink(missing_ok=True)
            self.search = self.worker.submit(search_merges_alone, self.arguments, self.search_log, self.threads)
            if self.prompts:
                self.image_futures += [self.worker.submit(sample_images, job) for job in [
                    ImageJob(BEST_MERGE, merges_file=str(self.merges_file), **self.common),
                    ImageJob("block average", **self.common),
                    *(ImageJob(Path(member).stem, **self.common) for member in self.common["members"])]]
        if preset == IMAGE_PRESET and self.prompts:
            self.image_futures.append(self.worker.submit(sample_images, ImageJob(
                afa_row(IMAGE_PRESET), weights=str(self.weights[IMAGE_PRESET]), **self.common)))

    def searched_merges(self) -> Path:
        """merges.json, once the search has ended (raises its error if it failed)."""
        self.search.result()
        lines = self.search_log.read_text(encoding="utf-8").splitlines()
        print("-- " + str(self.search_log) + ":\n" + "\n".join(line.split("\r")[-1] for line in lines
                                                                if line.strip()), flush=True)
        return self.merges_file

    def images(self) -> dict[str, tuple[dict[int, np.ndarray], float]]:
        """{row: ({steps: images [P x 32 x 32 x 3] uint8}, seconds)} of every model, once sampled."""
        return {row: (by_steps, seconds) for row, by_steps, seconds in (future.result()
                                                                        for future in self.image_futures)}


def evaluate_and_score(members: list[Path], loaded: dict[str, tuple[torch.Tensor, list[str]]], vae: Vae,
                       evaluation: Path, settings: Settings, freed_core: FreedCoreWork, threads: int) -> dict:
    """training/evaluate.py (the denoising table, with the merges FreedCoreWork searched) and the image table of the
    images it sampled, scored by the caption check (validated first on the real held-out images). Returns
    evaluation.json's content."""
    images, captions = loaded["held-out"]
    reader, validation = fit_caption_check(*loaded["two-shapes"], images, captions, vae)
    print(f"   caption check (fitted on the {len(loaded['two-shapes'][1])} two-shape training images; % of images "
          f"showing their caption / its colours anywhere / its palettes): the {len(captions)} real held-out images "
          f"{format_measures(validation['real'])}, their VAE reconstructions "
          f"{format_measures(validation['reconstructed'])}; against another image's caption (what the check accepts "
          f"that was not asked) {format_measures(validation['other captions'])}", flush=True)
    merges_file = freed_core.searched_merges()
    process = start_script("evaluate.py", [*freed_core.arguments, "--merges", str(merges_file), "--weights",
                                           *(str(freed_core.weights[preset]) for preset in SABW_PRESETS)], threads)
    if process.wait():
        raise subprocess.CalledProcessError(process.returncode, process.args)
    results = json.loads((evaluation / RESULTS_FILE).read_text(encoding="utf-8"))
    prompts = list(freed_core.prompts)
    if not prompts:
        return results
    sampled = freed_core.images()
    best_merge = best_merge_of(merges_file)["row"]
    order = [path.stem for path in members] + [best_merge, "block average", afa_row(IMAGE_PRESET)]
    scores = {row: {steps: caption_scores(reader, sampled[row][0][steps], prompts) for steps in IMAGE_STEPS}
              for row in order}
    print("\n" + format_image_table(scores, len(prompts)))
    print("seconds per model (all step counts, on the core the first SABW preset freed): "
          + ", ".join(f"{row} {sampled[row][1]:.0f}" for row in order))
    render_image_grid({row: sampled[row][0] for row in order}, prompts, to_pixels(images), 4).save(
        evaluation / "images.png")
    summary = {"prompts": len(prompts), "steps": list(IMAGE_STEPS), "guidance_scale": settings.guidance_scale,
               "sampler": "DDIM, eta 0", "caption_check_validation": validation,
               "merge": {"row": best_merge, "chosen_by": "the lowest validation error"}, "scores": {
                   row: {str(steps): value for steps, value in by_steps.items()} for row, by_steps in scores.items()},
               "seconds": {row: round(sampled[row][1], 1) for row in order}}
    (evaluation / "images.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return results


# -- the run -------------------------------------------------------------------------------------------------------

class Stages:
    """Runs the demo's stages in order, printing each one's number, name and time."""

    count = 5

    def __init__(self):
        self.started = time.time()
        self.times: dict[str, float] = {}

    def run(self, name: str, description: str, function, *args):
        title = f"{len(self.times) + 1}/{self.count} {name}: {description}"
        print(f"\n== {title}", flush=True)
        started = time.time()
        result = function(*args)
        self.times[name] = time.time() - started
        print(f"== {title}: {self.times[name]:.0f} s", flush=True)
        return result


def prepare_output(folder: Path) -> None:
    """Empties a folder an earlier demo run wrote; refuses any other non-empty folder."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise AfaError(f"--output {folder}: the folder exists and was not written by the demo; choose a new "
                           f"or empty folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("written by training/demo.py; a rerun replaces this folder\n", encoding="utf-8")


def _script_environment(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def start_script(script: str, arguments: list[str], threads: int) -> subprocess.Popen:
    """Starts a training/ script as a user would, with the demo's thread count; its output goes to the demo's."""
    command = [sys.executable, str(TRAINING_DIR / script), *arguments]
    print("$ " + " ".join(command[1:]), flush=True)
    return subprocess.Popen(command, env=_script_environment(threads))


def run_scripts_in_parallel(jobs: list[tuple[str, list[str], Path]], threads: int,
                            on_finished: Callable[[int], None] | None = None) -> None:
    """Runs training/ scripts at the same time, each as `start_script` starts one, given as (script, arguments, log
    file). Each one's output goes to its log file, printed when it ends (interleaved progress bars would be
    unreadable); then `on_finished(its index in jobs)` when it succeeded.

    Raises:
        subprocess.CalledProcessError: for the first script that failed (after every log is printed).
    """
    running = []
    for script, arguments, log in jobs:
        command = [sys.executable, str(TRAINING_DIR / script), *arguments]
        print("$ " + " ".join(command[1:]) + f"  > {log}", flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(log, "w", encoding="utf-8")
        running.append((command, log, log_file, subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                                                 env=_script_environment(threads))))
    failures, pending = [], list(range(len(running)))
    while pending:
        ended = [index for index in pending if running[index][3].poll() is not None]
        for index in ended:
            pending.remove(index)
            command, log, log_file, process = running[index]
            log_file.close()
            # A progress bar rewrites its line with carriage returns: print each line as it last read.
            lines = [line.split("\r")[-1] for line in log.read_text(encoding="utf-8").splitlines()]
            print(f"-- {log}:\n" + "\n".join(line for line in lines if line.strip()), flush=True)
            if process.returncode:
                failures.append(subprocess.CalledProcessError(process.returncode, command))
            elif on_finished is not None:
                on_finished(index)
        if pending and not ended:
            time.sleep(0.5)
    if failures:
        raise failures[0]


def train_sabw_presets(members: list[Path], data: Path, output: Path, settings: Settings, seed: int,
                       threads: int, on_trained: Callable[[str], None] | None = None) -> dict[str, Path]:
    """training/train.py once per SABW preset, on the same data with the same settings, in parallel processes;
    `on_trained(preset)` as each one ends. Returns the weights file of each preset."""
    weights = sabw_weights_files(output)
    jobs = [("train.py", [
        "--members", *map(str, members), "--data", str(data), "--val-split", "0", "--preset", preset,
        # The demo's images are exactly --resolution square, so there is nothing to crop, and its VAE is trained as
        # a plain autoencoder of the posterior mean (train_vae): posterior samples would be noise around it. Both
        # say so explicitly; --cache-latents needs --crop center anyway.
        "--resolution", str(RESOLUTION), "--crop", "center", "--latents", "mean", "--cache-latents",
        "--batch-size", str(settings.sabw_batch), "--max-steps", str(settings.sabw_steps),
        "--learning-rate", str(settings.sabw_learning_rate), "--hidden-channels", str(settings.sabw_hidden),
        "--num-workers", "0", "--save-every", "1000000", "--save-dtype", "fp32", "--seed", str(seed),
        "--output", str(weights[preset]), "--run-dir", str(output / f"sabw-run-{preset}"), "--device", "cpu",
    ], output / f"sabw-run-{preset}.log") for preset in SABW_PRESETS]
    run_scripts_in_parallel(jobs, threads, None if on_trained is None
                            else lambda index: on_trained(SABW_PRESETS[index]))
    return weights


def sabw_weights_files(output: Path) -> dict[str, Path]:
    """Where train_sabw_presets writes each preset's weights."""
    return {preset: output / f"afa-warm-cool-{preset}.safetensors" for preset in SABW_PRESETS}


def build_members(output: Path, loaded: dict[str, tuple[torch.Tensor, list[str]]], vae: Vae, settings: Settings,
                  seed: int, threads: int) -> list[Path]:
    """Trains the base UNet on both palettes, fine-tunes the warm and cool experts from it, and writes them as WebUI
    checkpoints sharing the VAE and a random but fixed tiny text encoder. Returns the checkpoint paths."""
    torch.manual_seed(seed)
    text_encoder = build_tiny_text_encoder().eval().requires_grad_(False)
    empty_context = encode(text_encoder, tokenize([""]))

    def denoising_set(name: str) -> DenoisingSet:
        images, captions = loaded[name]
        contexts = torch.cat([encode(text_encoder, tokenize(captions[start:start + 256]))
                              for start in range(0, len(captions), 256)])
        return DenoisingSet(encode_images(vae, images), contexts, empty_context)

    expert_sets = [denoising_set("warm"), denoising_set("cool")]
    both = DenoisingSet(torch.cat([data.latents for data in expert_sets]),
                        torch.cat([data.contexts for data in expert_sets]), empty_context)
    started = time.time()
    torch.manual_seed(seed)
    base_state, base_losses = train_unet(build_unet(PRESETS["tiny"]), both, settings.base_steps, settings.unet_batch,
                                         settings.unet_learning_rate, seed, threads)
    print(f"   base UNet: {settings.base_steps} steps on both palettes, final loss {mean_tail(base_losses):.4f} "
          f"({time.time() - started:.0f} s)", flush=True)

    started = time.time()
    paths = []
    for name, (state, losses) in zip(("warm-expert", "cool-expert"),
                                      train_experts(base_state, expert_sets, settings, seed, threads)):
        paths.append(write_member(output / "checkpoints" / f"{name}.safetensors", state, vae, text_encoder))
        print(f"   {name}: {settings.expert_steps} steps on its palette, final loss {mean_tail(losses):.4f} -> "
              f"{paths[-1]}")
    print(f"   both experts fine-tuned (in parallel) in {time.time() - started:.0f} s")
    return paths


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings, seed, threads = args.settings, args.seed, args.threads
    torch.set_num_threads(threads)
    output = Path(args.output)
    prepare_output(output)
    stages = Stages()
    print(f"AFA demo ({'quick' if args.quick else 'full'} run) into {output}: "
          f"{json.dumps(dataclasses.asdict(settings))}")

    folders = stages.run("data", "synthetic captioned images", make_datasets, output / "data", settings, seed)
    for name, folder in folders.items():
        print(f"   {folder}: {len(list(folder.glob('*.png')))} images, e.g. "
              f"\"{(folder / '00000.txt').read_text(encoding='utf-8').strip()}\"")

    loaded = {name: load_image_set(folder) for name, folder in folders.items()}
    # The held-out images stay unseen by every model, the VAE included.
    training_images = torch.cat([loaded[name][0] for name in ("warm", "cool", "two-shapes")])
    vae = stages.run("VAE", "a tiny autoencoder", train_vae, training_images, settings.vae_steps, settings.vae_batch,
                     seed)
    held_out = loaded["held-out"][0]
    error = (vae.decode(encode_images(vae, held_out)) - held_out).abs().mean().item()
    print(f"   held-out reconstruction error {error:.3f} (mean absolute, pixels in [-1, 1]); latent scale factor "
          f"{vae.scale_factor:.4f}")

    members = stages.run("members", "a base UNet and two expert fine-tunes", build_members, output, loaded, vae,
                         settings, seed, threads)

    evaluation = output / "evaluation"
    weights_files = sabw_weights_files(output)
    # One worker process for what the results need of the first trained preset only; its core is free from then.
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) \
            as worker:
        freed_core = FreedCoreWork(worker, members, weights_files, evaluate_arguments(
            members, folders, evaluation, settings, seed), evaluation,
            tuple(loaded["held-out"][1][:settings.image_prompts]), settings, seed, threads)
        stages.run("SABW", f"training/train.py on the two-shape images, presets {' and '.join(SABW_PRESETS)}; when "
                   f"the first ends, on its core: the merges' search (evaluate.py --merges-only) and images",
                   train_sabw_presets, members, folders["two-shapes"], output, settings, seed, threads,
                   freed_core.preset_trained)
        results = stages.run("results", "training/evaluate.py on the held-out images with those merges, and the "
                             "images scored", evaluate_and_score, members, loaded, vae, evaluation, settings,
                             freed_core, threads)

    errors = {name: row["all"] for name, row in results["models"].items()}
    best_member, best_merge = results["best_member"], results["best_merge"]
    print()
    for preset in SABW_PRESETS:
        row = afa_row(preset)
        print(f"{row}'s held-out denoising error is {percent_below(errors[row], errors[best_member])} the best "
              f"member's ({best_member}), {percent_below(errors[row], errors[best_merge])} the best merge's "
              f"({best_merge}) and {percent_below(errors[row], errors['block average'])} block averaging's.")
    print("Timings: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages.times.items())
          + f"; total {time.time() - stages.started:.0f} s")
    print(f"Figures: {evaluation / 'denoising-capability.png'} (paper Figure 1), "
          + ", ".join(str(evaluation / results["figures"][f"aggregation_maps {afa_row(preset)}"])
                      for preset in SABW_PRESETS) + f" (paper Figure 6), {evaluation / 'images.png'} (sampled images)")
    return 0


def afa_row(preset: str) -> str:
    """The evaluation table's row of a preset's weights (training/evaluate.py names several files' rows by design)."""
    return f"AFA ({preset})"


def mean_tail(losses: list[float], fraction: float = 0.2) -> float:
    """The mean loss of the last `fraction` of the steps (single steps are noisy)."""
    tail = losses[-max(1, math.ceil(len(losses) * fraction)):]
    return sum(tail) / len(tail)


def percent_below(value: float, reference: float) -> str:
    change = 100.0 * (1.0 - value / reference)
    return f"{change:.1f}% below" if change >= 0 else f"{-change:.1f}% ABOVE"


if __name__ == "__main__":
    sys.exit(run(main))
