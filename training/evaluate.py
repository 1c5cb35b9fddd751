#!/usr/bin/env python
"""Held-out denoising error of each member, the best merges, block averaging, noise averaging and AFA, and the
paper's figures.

    python training/evaluate.py --members A.safetensors B.safetensors --weights afa.safetensors --data held-out/

Every model sees identical (x_t, t, noise, caption) for every sample (training/metrics.py), so the differences in the
table are the models' and not the draws'. Members, their text encoders, VAE and schedule are loaded as
training/train.py loads them. Each member alone reads the prompt as its own text encoder encodes it; block and noise
averaging read it per --text-conditioning; AFA runs as its weights file was trained: in its mode (sabw or
last-block) and with its text conditioning (the file's config). Several weights files (e.g. the paper and the fast
preset) give one AFA row each, "AFA (paper)", "AFA (fast)" (their designs, or their file names when the designs
repeat), on the same draws. `--data` takes the trainer's formats (a captioned image folder, or a JSONL/CSV manifest).

The merge baselines -- what a user gets from merging the members into one UNet instead (training/merge_search.py):
"weighted merge (r=...)", its weights the best of a few on validation data (--validation-data; without it, the
evaluated images with other draws, which favours the merges), and "MBW", one weight vector per MBW block found by
coordinate descent on the same validation draws. Each merge reads the prompt through the members' text encoders
merged with its weights (the shared encoder when they have one). The table's last columns compare each row's error
over all timesteps with the best member's ("vs best member") and with the lower of the two merges' ("vs best
merge"); how each merge was searched, in how long, and the memory it holds are printed under it.

Writes into --output-dir:

  evaluation.json           the table (mean squared error of the eps/v prediction, overall and per timestep range)
  merges.json               the members, the merges' weights and validation errors, written as soon as their search
                            ends (before the table), so other work can start on them; --merges-only writes it alone
                            and --merges reuses it for the same members instead of searching again (the demo
                            searches while its slower SABW preset still trains, then samples the best merge's images)
  denoising-capability.png  the paper's Figure 1: for a few images, at several timesteps, which member has the lowest
                            denoising error at each latent pixel (squared error averaged over Monte-Carlo noise draws)
  aggregation-maps.png      with --weights: SABW's weight maps for the same images (the paper's Figure 6);
                            aggregation-maps-<label>.png for each of several weights files

FLUX.1 members (transformer files, with --vae, --clip-l, --t5 and --t5-tokenizer as training/train.py takes them):
the table is the held-out flow-matching error (MSE of the predicted velocity, t uniform in [0, 1), per quarter of t)
of each member, block averaging, noise averaging and each AFA file, all reading the run's --guidance. The merge
baselines and the figures are not made for FLUX members (the merges are searched over UNet blocks; the figures
draw UNet blocks at DDPM timesteps): a line says so.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

if __name__ == "__main__":  # `python training/evaluate.py` puts training/ on the path; afa/ and training/ sit one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

from afa import AfaError, EnsembleUNet, WeightsInfo, load_weights  # noqa: E402
from afa.comparison import AFA, BLOCK_AVERAGE, MBW, NOISE_AVERAGE, percent_change  # noqa: E402
from afa.flux import EnsembleFlux  # noqa: E402
from afa.hashing import shorthash  # noqa: E402
from afa.maps import (TIE, TIE_COLOR, WeightMapRecorder, block_indices, colorize_weights,  # noqa: E402
                      colorize_winners, legend_entries, render_grid)
from afa.members import MAX_MEMBERS, MIN_MEMBERS  # noqa: E402
from afa.modes import AVERAGE, NOISE  # noqa: E402
from afa.unet import block_name  # noqa: E402
from training import data as datasets  # noqa: E402
from training import flux_training  # noqa: E402
from training.cli import run  # noqa: E402
from training.diffusion import NoiseSchedule, squared_error  # noqa: E402
from training.merge_search import (DEFAULT_MBW_RATIOS, DEFAULT_RATIOS, MERGE_BASELINES, Merge,  # noqa: E402
                                   ValidationScorer, describe_merge, merged_text_encoders,
                                   prepare_validation_batches, restore_merges, search_merges)
from training.metrics import (FLOW_TIMESTEP_RANGES, TIMESTEP_RANGES, RememberedPrediction,  # noqa: E402
                              denoising_errors, encode_for_members, ensemble_reading, member_alone, noise_average_of,
                              range_label)
from training.sd_checkpoint import load_frozen_models, native_resolution  # noqa: E402
from training.text_encoder import tokenize  # noqa: E402

RESULTS_FILE = "evaluation.json"
MERGES_FILE = "merges.json"
CAPABILITY_FIGURE = "denoising-capability.png"
MAPS_FIGURE = "aggregation-maps.png"
FIGURE_LABEL_LINES = 4
FIGURE_NOISE_KEY = 1  # keeps the figures' noise apart from the table's per-sample draws
CAPABILITY_TITLE = ("Which member denoises each latent pixel best: lowest squared error of its prediction, averaged "
                    "over {draws} noise draws (paper Figure 1)")
MAPS_TITLE = "SABW aggregation maps: each pixel coloured by the weights the members get there (paper Figure 6)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("models and data")
    group.add_argument("--members", nargs="+", required=True, help="2 to 6 member checkpoints (.safetensors/.ckpt), "
                       "in the order the weights were trained for")
    group.add_argument("--config", help="ldm yaml of the members (default: <name>.yaml beside each, else inferred)")
    group.add_argument("--components", help="a full checkpoint of the members' family whose text encoder, VAE and "
                       "config serve members whose files hold a UNet only (ComfyUI's models/diffusion_models); "
                       "members with a text encoder of their own keep reading it")
    group.add_argument("--weights", nargs="+", default=[], help="SABW weights files trained for exactly these "
                       "members; each adds an AFA row and its aggregation maps")
    group.add_argument("--data", required=True, help="held-out images: a folder of images with .txt captions or "
                       "WebUI PNGs, or a JSONL/CSV manifest of image path + caption")
    group.add_argument("--resolution", type=int, help="images are resized and center-cropped to this (default: the "
                       "first member's native size: 512 SD 1.x and SD 2.x base, 768 SD 2.x-v, 1024 SDXL)")
    group.add_argument("--text-conditioning", choices=["per-member", "shared"], default="per-member",
                       help="how block and noise averaging read the prompt: member i its own text encoder's encoding, "
                       "or every member the first member's (AFA rows read it as their weights file says)")
    group.add_argument("--clip-skip", type=int, help="CLIP skip of every model's text encodings (default: the one "
                       "the weights files were trained with, else 1)")
    group.add_argument("--samples", type=int, default=256, help="images evaluated, a seeded random subset of --data "
                       "when it has more (0 = all)")
    group.add_argument("--draws", type=int, default=4, help="timestep and noise draws per image (more draws, less "
                       "noise in the table)")
    group.add_argument("--seed", type=int, default=0, help="seed of the subset, the draws and the figures' noise")
    group.add_argument("--batch-size", type=int, default=8, help="samples per model call")
    group.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")

    group = parser.add_argument_group("merge baselines (a weighted merge and MBW, weights chosen on validation data)")
    group.add_argument("--merge-baselines", choices=MERGE_BASELINES, default="all",
                       help="the merge rows: all (the weighted merge and MBW), weighted (the weighted merge), none")
    group.add_argument("--validation-data", help="images the merges' weights are chosen on, in --data's formats "
                       "(default: the --data images, with draws of their own: the merges then see the evaluated "
                       "images, which favours them)")
    group.add_argument("--validation-samples", type=int, default=32, help="validation images, a seeded random "
                       "subset (0 = all)")
    group.add_argument("--validation-draws", type=int, default=2, help="timestep and noise draws per validation "
                       "image")
    group.add_argument("--merge-ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS),
                       help="two members: the ratios r of (1-r)·first + r·second the weighted merge tries (more "
                       "members: the uniform and each leave-one-out average)")
    group.add_argument("--mbw-ratios", type=float, nargs="+", default=list(DEFAULT_MBW_RATIOS),
                       help="two members: the ratios each MBW block tries (more members: uniform, leave-one-out, "
                       "each member alone)")
    group.add_argument("--mbw-sweeps", type=int, default=1, help="coordinate-descent passes over the MBW blocks")
    reuse = group.add_mutually_exclusive_group()
    reuse.add_argument("--merges", metavar="MERGES_JSON", help=f"the merges of an earlier run's {MERGES_FILE} (same "
                       "members, same order) instead of searching them again; the flags above are then unused")
    reuse.add_argument("--merges-only", action="store_true", help=f"search the merges, write {MERGES_FILE} and stop "
                       "(no table, no figures): the search can run apart, e.g. beside other work, and --merges "
                       "reuses it")

    group = parser.add_argument_group("figures")
    group.add_argument("--output-dir", default="evaluation", help=f"where {RESULTS_FILE} and the PNGs go")
    group.add_argument("--figure-images", type=int, default=4, help="images (rows) in each figure; the first ones "
                       "of the evaluated subset (0 = no figures)")
    group.add_argument("--timesteps", type=int, nargs="+", default=[900, 700, 500, 300, 100],
                       help="timesteps (columns) of the figures")
    group.add_argument("--figure-draws", type=int, default=16, help="Monte-Carlo noise draws averaged per pixel in "
                       "the denoising-capability figure")
    group.add_argument("--map-blocks", nargs="+", help="UNet blocks whose aggregation maps are drawn (default: the "
                       "first and the penultimate, as the paper shows them: input_blocks.0 and output_blocks.10 for "
                       "SD 1.x/2.x, output_blocks.7 for SDXL); blocks without a SABW block (last-block weights) are "
                       "left out")
    group.add_argument("--cell-size", type=int, default=112, help="pixels per figure cell")
    flux_training.add_flux_arguments(parser, training=False)
    args = parser.parse_args(argv)

    if not MIN_MEMBERS <= len(args.members) <= MAX_MEMBERS:
        parser.error(f"--members takes {MIN_MEMBERS} to {MAX_MEMBERS} checkpoints, got {len(args.members)}")
    from training.train import members_family  # the trainer's check: mixtures and other FLUX layouts refused
    args.family = members_family(args.members, parser.error)
    flux_training.check_flux_flags(args, args.family, parser.error)
    if args.resolution is None:
        args.resolution = (flux_training.FLUX_RESOLUTION if args.family == "flux"
                           else native_resolution(args.members[0], args.config, args.components))
    for flag in ("samples", "figure_images", "validation_samples"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag.replace('_', '-')} must be 0 or more")
    for flag in ("draws", "figure_draws", "batch_size", "resolution", "cell_size", "validation_draws", "mbw_sweeps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.clip_skip is not None and args.clip_skip < 1:
        parser.error("--clip-skip must be at least 1")
    for flag in ("merge_ratios", "mbw_ratios"):
        if not all(0.0 <= ratio <= 1.0 for ratio in getattr(args, flag)):
            parser.error(f"--{flag.replace('_', '-')} are between 0 and 1")
    if (args.merges or args.merges_only) and args.family == "flux":
        parser.error("--merges and --merges-only: FLUX members have no merge baselines")
    if (args.merges or args.merges_only) and args.merge_baselines == "none":
        parser.error("--merges and --merges-only need merge baselines (--merge-baselines all or weighted)")
    if args.merges and not Path(args.merges).is_file():
        parser.error(f"--merges {args.merges}: no such file")
    args.text_conditioning = args.text_conditioning.replace("-", "_")  # as AggregatorConfig spells it
    return args


# -- models --------------------------------------------------------------------------------------------------------

def display_names(names: Sequence[str]) -> list[str]:
    """Member names for the table, made unique ("a", "a (2)") when a checkpoint name repeats."""
    unique = []
    for name in names:
        candidate, count = name, 1
        while candidate in unique or candidate in (BLOCK_AVERAGE, NOISE_AVERAGE, AFA, MBW):
            count += 1
            candidate = f"{name} ({count})"
        unique.append(candidate)
    return unique


class TrainedEnsemble(NamedTuple):
    """One weights file's ensemble: its table row, the file, what it says about itself (afa.WeightsInfo), the
    EnsembleUNet in the file's mode, and its aggregation-maps PNG's name."""

    row: str
    file: str
    info: WeightsInfo
    ensemble: EnsembleUNet
    figure: str


def trained_ensembles(weights_files: Sequence[str], members: Sequence[torch.nn.Module], member_refs,
                      device: torch.device) -> list[TrainedEnsemble]:
    """An EnsembleUNet per weights file, each refused unless trained for exactly these members. One file is the row
    "AFA"; several are "AFA (<design>)", or "AFA (<file name>)" when designs repeat."""
    loaded = [(str(path), *load_weights(path, member_refs, device)) for path in weights_files]
    designs = [info.config.design for _, _, info in loaded]
    labels = designs if len(set(designs)) == len(designs) else display_names([Path(path).stem
                                                                              for path, _, _ in loaded])
    single = len(loaded) == 1
    return [TrainedEnsemble(AFA if single else f"{AFA} ({label})", path, info,
                            EnsembleUNet(members, aggregator, info.mode),
                            MAPS_FIGURE if single else f"{Path(MAPS_FIGURE).stem}-{_file_label(label)}.png")
            for (path, aggregator, info), label in zip(loaded, labels)]


def _file_label(label: str) -> str:
    return "".join(character if character.isalnum() or character in "-_." else "_" for character in label)


def comparison_models(members: Sequence[torch.nn.Module], member_names: Sequence[str],
                      trained: Sequence[TrainedEnsemble] = (), text_conditioning: str = "per_member",
                      merges: Sequence[Merge] = ()) -> dict[str, Callable]:
    """The table's rows as metrics.ModelCall's: each member reading its own text encoder's encoding, each merge
    reading its merged text encoder's (the contexts after the members', in `merges` order: see
    merge_search.merged_text_encoders), block averaging and noise averaging reading the prompt per
    `text_conditioning`, and each trained ensemble reading it as its weights file was trained."""
    member_calls = [RememberedPrediction(member_alone(member, index)) for index, member in enumerate(members)]
    models: dict[str, Callable] = dict(zip(member_names, member_calls))
    for index, merge in enumerate(merges):
        models[merge.row] = member_alone(merge.unet.model, len(members) + index)
    models[BLOCK_AVERAGE] = ensemble_reading(EnsembleUNet(list(members), None, AVERAGE), text_conditioning)
    # Per member, noise averaging is the mean of the member rows' predictions, so it reuses them (a pass per member
    # less); "shared" feeds every member the first encoding, which only the ensemble does.
    models[NOISE_AVERAGE] = (noise_average_of(member_calls) if text_conditioning == "per_member"
                             else ensemble_reading(EnsembleUNet(list(members), None, NOISE), text_conditioning))
    for entry in trained:
        conditioning = entry.ensemble.aggregator.config.text_conditioning
        models[entry.row] = ensemble_reading(entry.ensemble, conditioning)
    return models


def evaluation_clip_skip(given: int | None, trained: Sequence[TrainedEnsemble]) -> int:
    """--clip-skip, else the CLIP skip the weights files were trained with (1 without weights files).

    Raises:
        AfaError: weights files trained with different CLIP skips and no --clip-skip.
    """
    trained_skips = sorted({entry.info.config.clip_skip for entry in trained})
    if given is not None:
        for entry in trained:
            if entry.info.config.clip_skip != given:
                print(f"note: {entry.file} was trained with CLIP skip {entry.info.config.clip_skip}; evaluating it "
                      f"at --clip-skip {given}")
        return given
    if len(trained_skips) > 1:
        raise AfaError(f"the weights files were trained with CLIP skips {trained_skips}: give --clip-skip, or "
                       f"evaluate them separately")
    return trained_skips[0] if trained_skips else 1


# -- data ----------------------------------------------------------------------------------------------------------

def select_records(records: list, samples: int, seed: int) -> list:
    """A seeded random subset of `samples` records, kept in their listing order (all when samples is 0 or more than
    there are)."""
    if not samples or samples >= len(records):
        return list(records)
    chosen = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[:samples]
    return [records[index] for index in sorted(chosen.tolist())]


class RepeatedDraws(torch.utils.data.Dataset):
    """Each image `draws` times in a row: position i is image i // draws with "index" i, so every repetition has its
    own draw key and gets its own timestep and noise. Items as training/data.py's `collate` takes them."""

    def __init__(self, dataset, draws: int):
        self.dataset, self.draws = dataset, draws

    def __len__(self) -> int:
        return len(self.dataset) * self.draws

    def __getitem__(self, index: int) -> dict | datasets.SkippedItem:
        item = self.dataset[index // self.draws]
        return item if isinstance(item, datasets.SkippedItem) else {**item, "index": index}


# -- the table -----------------------------------------------------------------------------------------------------

def best_row(errors: dict[str, dict[str, float]], names: Sequence[str]) -> str | None:
    """The row among `names` with the lowest error over all timesteps (None without such rows)."""
    present = [name for name in names if name in errors]
    return min(present, key=lambda name: errors[name]["all"]) if present else None


def format_table(errors: dict[str, dict[str, float]], member_names: Sequence[str] | None = None,
                 merge_rows: Sequence[str] = (), ranges: Sequence[tuple] = TIMESTEP_RANGES,
                 title: str = "held-out denoising MSE (lower is better)") -> str:
    """The errors as a fixed-width text table. Every row but the members' ends with its change over all timesteps
    against the best member ("vs best member") and, with merge rows, against the best merge ("vs best merge");
    lines under the table say which rows those are. The members are `member_names`, by default every row that is
    not a merge, an average or an AFA row. `ranges` and `title`: FLUX's (FLOW_TIMESTEP_RANGES, flow matching)."""
    columns = ["all"] + [range_label(low, high) for low, high in ranges]
    columns = [column for column in columns if any(column in row for row in errors.values())]
    if member_names is None:
        member_names = [name for name in errors if name not in (BLOCK_AVERAGE, NOISE_AVERAGE, AFA, *merge_rows)
                        and not name.startswith(f"{AFA} (")]
    best_member, best_merge = best_row(errors, member_names), best_row(errors, merge_rows)
    references = [("vs best member", best_member)] + ([("vs best merge", best_merge)] if best_merge else [])
    name_width = max(len(name) for name in errors) + 2
    lines = [title,
             f"{'model':<{name_width}}" + "".join(f"{column:>12}" for column in columns)
             + "".join(f"{label:>16}" for label, _ in references)]
    for name, row in errors.items():
        changes = "" if name in member_names else "".join(
            f"{'-' if name == reference else percent_change(row['all'], errors[reference]['all']):>16}"
            for _, reference in references)
        lines.append(f"{name:<{name_width}}" + "".join(f"{row[column]:>12.5f}" if column in row else f"{'-':>12}"
                                                       for column in columns) + changes)
    lines.append(f"vs best member: the change of the error over all timesteps against the best member alone, "
                 f"{best_member}")
    if best_merge:
        lines.append(f"vs best merge: the same against the lower of the merges' errors, {best_merge} (one UNet, "
                     f"its weights chosen on validation data)")
    return "\n".join(lines)


# -- the figures: Figure 1 (which member denoises each pixel best) and Figure 6 (aggregation maps) -----------------

class FigureImage(NamedTuple):
    """One figure row's image: caption, RGB pixels [H x W x 3] uint8, latents [1 x C x h x w], member_contexts
    N x [1 x L x D] (the caption as each member's own text encoder encodes it) and, for SDXL members, their
    member_vectors N x [1 x adm] (`y`), else None."""

    caption: str
    pixels: np.ndarray
    latents: torch.Tensor
    member_contexts: list[torch.Tensor]
    member_vectors: list[torch.Tensor] | None = None


@torch.no_grad()
def prepare_figure_image(item: dict, vae, text_encoders: Sequence[torch.nn.Module], device: torch.device,
                         clip_skip: int = 1) -> FigureImage:
    """A dataset item ({"pixel_values": [3 x H x W] in [-1, 1], "sizes": [6], "caption"}) ready for the figures;
    text_encoders: each member's (FrozenModels.text_encoders)."""
    pixel_values = item["pixel_values"]
    pixels = ((pixel_values.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    latents = vae.encode(pixel_values[None].to(device))
    contexts, vectors = encode_for_members(text_encoders, tokenize([item["caption"]]), clip_skip,
                                           item["sizes"][None])
    return FigureImage(item["caption"], pixels, latents, contexts, vectors)


def figure_noise(seed: int, image_number: int, draws: int, latent_shape: Sequence[int]) -> torch.Tensor:
    """[draws x C x h x w] Monte-Carlo noise for the figures' image `image_number`, seeded by (seed, image number)."""
    # SeedSequence, as training/diffusion.py seeds per-sample draws: well-mixed seeds from a tuple of integers.
    state = np.random.SeedSequence([seed, FIGURE_NOISE_KEY, image_number]).generate_state(1, dtype=np.uint64)
    generator = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.randn((draws, *latent_shape), generator=generator)


@torch.no_grad()
def per_pixel_errors(models: Sequence[Callable], latents: torch.Tensor,
                     context: torch.Tensor | Sequence[torch.Tensor], timesteps: Sequence[int], noise: torch.Tensor,
                     schedule: NoiseSchedule, batch_size: int,
                     vectors: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """Each model's squared denoising error at every latent pixel, averaged over channels and noise draws.

    Args:
        models: callables (x_t [B x C x h x w], timesteps [B], context [B x L x D], y=[B x adm] or None) ->
            prediction (eps or v).
        latents: [1 x C x h x w], one image; context: [1 x L x D], its caption's, which every model reads, or one
            such context per model (members alone: each its own text encoder's).
        vectors: SDXL members' `y` [1 x adm], one per model (each its own encoders'); None for SD 1.x/2.x.
        timesteps: T timesteps.
        noise: [M x C x h x w] Monte-Carlo draws, the same ones at every timestep and for every model.
    Returns:
        [num_models x T x h x w] float32 on the CPU. Identical models give bit-identical maps: every model gets the
        same inputs in the same batches.
    """
    num_draws = noise.shape[0]
    device = latents.device
    steps = torch.tensor(list(timesteps), dtype=torch.long, device=device).repeat_interleave(num_draws)  # [T*M]
    noise = noise.to(device).repeat(len(timesteps), 1, 1, 1)  # [T*M x C x h x w], draw index fastest
    clean = latents.expand(noise.shape[0], -1, -1, -1)
    noisy, target = schedule.add_noise(clean, noise, steps), schedule.target(clean, noise, steps)
    contexts = [context] * len(models) if isinstance(context, torch.Tensor) else list(context)
    vectors = list(vectors) if vectors is not None else [None] * len(models)
    maps = []
    for model, context, vector in zip(models, contexts, vectors):
        squared = []
        for start in range(0, noisy.shape[0], batch_size):
            batch = slice(start, start + batch_size)
            count = noisy[batch].shape[0]
            y = vector.expand(count, -1) if vector is not None else None
            prediction = model(noisy[batch], steps[batch], context.expand(count, -1, -1), y=y)
            squared.append(squared_error(prediction, target[batch]).mean(dim=1).cpu())
        per_sample = torch.cat(squared)  # [T*M x h x w]
        maps.append(per_sample.view(len(timesteps), num_draws, *per_sample.shape[1:]).mean(dim=1))
    return torch.stack(maps)


def winner_maps(errors: torch.Tensor) -> torch.Tensor:
    """The index of the model with the lowest error at each position, `TIE` where several share the lowest.

    errors [N x ...] -> long [...]. Ties are found by exact equality, so identical members (equal error maps) give
    `TIE` everywhere rather than a winner that depends on the order they were given in.
    """
    best = errors.min(dim=0).values
    winners = errors.argmin(dim=0)
    winners[(errors == best).sum(dim=0) > 1] = TIE
    return winners


def win_shares(winners: torch.Tensor, num_members: int) -> str:
    """"wins 60/40%": the share of pixels each member wins alone (ties count for nobody)."""
    shares = [100.0 * (winners == member).float().mean().item() for member in range(num_members)]
    return "wins " + "/".join(f"{share:.0f}" for share in shares) + "%"


def render_denoising_capability(members: Sequence[torch.nn.Module], member_names: Sequence[str],
                                images: Sequence[FigureImage], noises: Sequence[torch.Tensor],
                                timesteps: Sequence[int], schedule: NoiseSchedule, batch_size: int,
                                cell_size: int) -> tuple[Image.Image, list[torch.Tensor]]:
    """The paper's Figure 1: a row per image (the image, then the per-pixel winner at each timestep).

    Returns:
        (the figure, the winner maps of each image [T x h x w]).
    """
    rows, winners_per_image = [], []
    for image, noise in zip(images, noises):
        winners = winner_maps(per_pixel_errors(members, image.latents, image.member_contexts, timesteps, noise,
                                               schedule, batch_size, image.member_vectors))
        winners_per_image.append(winners)
        rows.append([(image.caption, image.pixels)] + [
            (f"t = {step}\n{win_shares(winners[index], len(members))}", colorize_winners(winners[index], len(members)))
            for index, step in enumerate(timesteps)])
    legend = legend_entries(member_names) + [("tie (equal error)", TIE_COLOR)]
    title = CAPABILITY_TITLE.format(draws=noises[0].shape[0] if noises else 0)
    return render_grid(rows, legend, cell_size, label_lines=FIGURE_LABEL_LINES, title=title), winners_per_image


@torch.no_grad()
def render_aggregation_maps(ensemble: EnsembleUNet, member_names: Sequence[str], images: Sequence[FigureImage],
                            noises: Sequence[torch.Tensor], timesteps: Sequence[int], blocks: Sequence[int],
                            schedule: NoiseSchedule, cell_size: int) -> Image.Image:
    """SABW's weight maps (paper Figure 6): a row per image, a cell per (block, timestep), computed on that image
    noised to the timestep with its first figure noise draw, the prompt read as the weights were trained."""
    num_input_blocks = ensemble.num_input_blocks
    model = ensemble_reading(ensemble, ensemble.aggregator.config.text_conditioning)
    recorder = WeightMapRecorder(blocks, batch_index=0)
    ensemble.observer = recorder
    rows = []
    try:
        for image, noise in zip(images, noises):
            recorder.clear()
            for step in timesteps:
                step_tensor = torch.tensor([step], device=image.latents.device)
                noisy = schedule.add_noise(image.latents, noise[:1].to(image.latents.device), step_tensor)
                model(noisy, step_tensor, image.member_contexts, image.member_vectors)
            rows.append([(image.caption, image.pixels)] + [
                (f"{block_name(block, num_input_blocks)}\nt = {step}", colorize_weights(recorder.maps[block][index]))
                for block in blocks for index, step in enumerate(timesteps)])
    finally:
        ensemble.observer = None
    return render_grid(rows, legend_entries(member_names), cell_size, label_lines=FIGURE_LABEL_LINES,
                       title=MAPS_TITLE)


def map_blocks(names: Sequence[str], ensemble: EnsembleUNet) -> list[int]:
    """The indices of the --map-blocks that have a SABW block (the last block only, for last-block weights); no
    names: the first block and the penultimate."""
    config = ensemble.aggregator.config
    if not names:
        names = ["input_blocks.0", f"output_blocks.{config.num_input_blocks - 2}"]
    try:
        blocks = block_indices(names, config.num_input_blocks)
    except ValueError as error:
        raise AfaError(f"--map-blocks: {error}") from None
    return [block for block in blocks if block in config.aggregated_blocks] or [config.aggregated_blocks[-1]]


# -- the merge baselines -------------------------------------------------------------------------------------------

def find_merges(args: argparse.Namespace, frozen, member_names: Sequence[str], clip_skip: int,
                device: torch.device) -> tuple[list[Merge], dict]:
    """The weighted merge and MBW, their weights searched on the validation images (--validation-data, else the
    evaluated ones) with the search's own draws; and what the validation data was (for evaluation.json)."""
    report = datasets.SkipReport()
    source = args.validation_data or args.data
    records = select_records(datasets.index_captioned_images(source, report), args.validation_samples,
                             args.seed + 1)
    if not records:
        raise AfaError(f"no usable validation images in {source}\n{report.summary()}")
    note = "" if args.validation_data else " (the evaluated images, other draws: this favours the merges)"
    loader = torch.utils.data.DataLoader(
        RepeatedDraws(datasets.ImageCaptionDataset(records, args.resolution), args.validation_draws),
        batch_size=args.batch_size, collate_fn=datasets.collate, num_workers=0)
    batches = prepare_validation_batches(loader, frozen.vae, frozen.text_encoders, frozen.schedule, args.seed,
                                         device, clip_skip)
    scorer = ValidationScorer(batches, clip_skip)
    print(f"choosing the merges' weights on {len(records)} images x {args.validation_draws} draws of {source}{note}",
          flush=True)
    merges = list(search_merges(frozen.members, frozen.text_encoders, member_names, scorer, args.merge_baselines,
                                args.merge_ratios, args.mbw_ratios, args.mbw_sweeps))
    return merges, {"data": str(source), "images": len(records), "draws_per_image": args.validation_draws,
                             "samples": scorer.samples, "same_images_as_the_table": not args.validation_data}


def member_entries(member_names: Sequence[str], paths: Sequence[str], member_refs) -> list[dict]:
    """What evaluation.json and merges.json say of the members: name, checkpoint path and sha256 of each."""
    return [{"name": name, "checkpoint": str(path), "sha256": ref.sha256}
            for name, path, ref in zip(member_names, paths, member_refs)]


def reused_merges(path: str, frozen) -> tuple[list[Merge], dict]:
    """--merges: the merges of an earlier run's merges.json rebuilt on these members, and what their validation data
    was (with the file's path, for evaluation.json).

    Raises:
        AfaError: a file that is not a merges.json, or one searched for other members (names what it was searched
            for and what was given).
    """
    try:
        written = json.loads(Path(path).read_text(encoding="utf-8"))
        summaries, validation = written["merges"], dict(written["validation"])
        searched_for = [(entry["name"], entry["sha256"]) for entry in written["members"]]
    except (OSError, ValueError, KeyError, TypeError) as error:  # JSONDecodeError and UnicodeDecodeError too
        raise AfaError(f"--merges {path}: not a {MERGES_FILE} of this evaluate.py ({error!r}); search the merges "
                       f"again without --merges") from error
    if [sha256 for _, sha256 in searched_for] != [ref.sha256 for ref in frozen.member_refs]:
        searched = ", ".join(f"{name} [{shorthash(sha256)}]" for name, sha256 in searched_for)
        raise AfaError(f"--merges {path} was searched for the members {searched}, not for these: "
                       f"{', '.join(map(str, frozen.member_refs))}; search the merges again without --merges")
    try:
        merges = restore_merges(summaries, frozen.members, frozen.text_encoders)
    except AfaError:
        raise
    except (KeyError, TypeError, ValueError) as error:  # a hand-edited file: a field missing, weights not summing to 1
        raise AfaError(f"--merges {path}: a merge it holds cannot be rebuilt ({error!r})") from error
    print(f"merges from {path} (searched for these members there): {', '.join(merge.row for merge in merges)}",
          flush=True)
    return merges, {**validation, "merges_file": str(path)}


# -- the run -------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.family == "flux":
        return evaluate_flux(args, device, started)

    frozen = load_frozen_models(args.members, args.config, device, components=args.components)
    member_names = display_names([ref.name for ref in frozen.member_refs])
    vae, schedule = frozen.vae, frozen.schedule
    trained = trained_ensembles(args.weights, frozen.members, frozen.member_refs, device)
    blocks = {entry.row: map_blocks(args.map_blocks, entry.ensemble) for entry in trained}
    invalid = [step for step in args.timesteps if not 0 <= step < schedule.num_timesteps]
    if invalid:
        raise AfaError(f"--timesteps {invalid}: the members' schedule has timesteps 0 to {schedule.num_timesteps - 1}")
    clip_skip = evaluation_clip_skip(args.clip_skip, trained)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    members_json = member_entries(member_names, args.members, frozen.member_refs)
    if args.merges:
        merges, validation = reused_merges(args.merges, frozen)
    elif args.merge_baselines != "none":
        merges, validation = find_merges(args, frozen, member_names, clip_skip, device)
        # Written whole (renamed into place): a reader never sees half a file.
        temporary = output_dir / (MERGES_FILE + ".tmp")
        temporary.write_text(json.dumps({"members": members_json, "merges": [merge.summary() for merge in merges],
                                         "validation": validation}, indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, output_dir / MERGES_FILE)
        if args.merges_only:
            for merge in merges:
                print(describe_merge(merge))
            print(f"wrote {output_dir / MERGES_FILE} ({time.time() - started:.0f} s)")
            return 0
    else:
        merges, validation = [], None
    models = comparison_models(frozen.members, member_names, trained, args.text_conditioning, merges)
    print(f"loaded {len(frozen.members)} members ({', '.join(map(str, frozen.member_refs))}) on {device}, "
          f"{frozen.distinct_text_encoders} distinct text encoders; averages read the prompt "
          f"{args.text_conditioning.replace('_', '-')}; CLIP skip {clip_skip}"
          + "".join(f"; {entry.row}: {entry.file} ({entry.info.config.design} design, mode {entry.info.mode}, text "
                    f"conditioning {entry.info.config.text_conditioning})" for entry in trained))

    report = datasets.SkipReport()
    records = select_records(datasets.index_captioned_images(args.data, report), args.samples, args.seed)
    if not records:
        raise AfaError(f"no usable images in {args.data}\n{report.summary()}")
    dataset = datasets.ImageCaptionDataset(records, args.resolution)
    loader = torch.utils.data.DataLoader(RepeatedDraws(dataset, args.draws), batch_size=args.batch_size,
                                         collate_fn=datasets.collate, num_workers=0)

    def batches():
        for batch in tqdm(loader, desc="evaluating", dynamic_ncols=True):
            report.add_items(batch["skipped"])
            yield batch

    table_started = time.time()
    errors = denoising_errors(models, batches(), vae, merged_text_encoders(frozen.text_encoders, merges), schedule,
                              args.seed, device, clip_skip=clip_skip)
    table_seconds = time.time() - table_started
    merge_rows = [merge.row for merge in merges]
    print(format_table(errors, member_names, merge_rows))
    for merge in merges:
        print(describe_merge(merge))
    if report.total:
        print(report.summary())

    figures = {}
    if args.figure_images:
        figure_items = [dataset[index] for index in range(min(args.figure_images, len(dataset)))]
        images = [prepare_figure_image(item, vae, frozen.text_encoders, device, clip_skip) for item in figure_items
                  if not isinstance(item, datasets.SkippedItem)]
        noises = [figure_noise(args.seed, number, args.figure_draws, image.latents.shape[1:])
                  for number, image in enumerate(images)]
        capability, _ = render_denoising_capability(frozen.members, member_names, images, noises, args.timesteps,
                                                    schedule, args.batch_size, args.cell_size)
        capability.save(output_dir / CAPABILITY_FIGURE)
        figures["denoising_capability"] = CAPABILITY_FIGURE
        for entry in trained:
            maps = render_aggregation_maps(entry.ensemble, member_names, images, noises, args.timesteps,
                                           blocks[entry.row], schedule, args.cell_size)
            maps.save(output_dir / entry.figure)
            figures["aggregation_maps" if len(trained) == 1 else f"aggregation_maps {entry.row}"] = entry.figure

    results = {
        "models": errors,
        "members": members_json,
        "weights": [{"row": entry.row, "file": entry.file, "mode": entry.info.mode.name,
                     "design": entry.info.config.design, "text_conditioning": entry.info.config.text_conditioning,
                     "clip_skip": entry.info.config.clip_skip, "training": entry.info.training}
                    for entry in trained],
        "averages_text_conditioning": args.text_conditioning, "clip_skip": clip_skip,
        "data": str(args.data), "images": len(records), "skipped": report.total, "draws_per_image": args.draws,
        "seed": args.seed, "resolution": args.resolution,
        "timestep_ranges": [range_label(low, high) for low, high in TIMESTEP_RANGES],
        "figures": figures,
        "merges": [merge.summary() for merge in merges], "merge_validation": validation,
        "best_member": best_row(errors, member_names), "best_merge": best_row(errors, merge_rows),
        "table_seconds": round(table_seconds, 1),
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output_dir / RESULTS_FILE}" + "".join(f", {output_dir / name}" for name in figures.values())
          + f" ({time.time() - started:.0f} s)")
    return 0


# -- FLUX members --------------------------------------------------------------------------------------------------

FLUX_TABLE_TITLE = "held-out flow-matching MSE (velocity, t uniform in [0, 1); lower is better)"


def flux_trained_ensembles(weights_files: Sequence[str], members: Sequence[torch.nn.Module], member_refs,
                           device: torch.device) -> list[tuple[str, str, WeightsInfo, EnsembleFlux]]:
    """(row, file, info, EnsembleFlux) per weights file, each refused unless trained for exactly these members and
    for FLUX members; rows named as `trained_ensembles` names them."""
    from afa.aggregator import check_family

    loaded = [(str(path), *load_weights(path, member_refs, device)) for path in weights_files]
    for path, _, info in loaded:
        check_family(info.config, "flux", Path(path).name)
    designs = [info.config.design for _, _, info in loaded]
    labels = designs if len(set(designs)) == len(designs) else display_names([Path(path).stem
                                                                              for path, _, _ in loaded])
    return [(AFA if len(loaded) == 1 else f"{AFA} ({label})", path, info, EnsembleFlux(members, aggregator, info.mode))
            for (path, aggregator, info), label in zip(loaded, labels)]


def evaluate_flux(args: argparse.Namespace, device: torch.device, started: float) -> int:
    """`main` for FLUX members: the flow-matching table of the members, block and noise averaging and each AFA file
    (training/flux_training.py), on identical draws; writes evaluation.json."""

    report = datasets.SkipReport()
    records = select_records(datasets.index_captioned_images(args.data, report), args.samples, args.seed)
    if not records:
        raise AfaError(f"no usable images in {args.data}\n{report.summary()}")
    frozen = flux_training.load_frozen_flux(
        args, [record.caption for record in records], device, None, flux_training.text_encoder_dtype(device, True),
        cache_dir=args.text_cache_dir or Path(args.output_dir) / "text-cache")
    member_names = display_names([ref.name for ref in frozen.member_refs])
    trained = flux_trained_ensembles(args.weights, frozen.members, frozen.member_refs, device)
    if args.merge_baselines != "none":
        print("merge baselines: not made for FLUX members (training/merge_search.py merges UNets block by block)")
    if args.figure_images:
        print("figures: not drawn for FLUX members (they show UNet blocks at DDPM timesteps)")
    guidance = frozen.guidance
    models = {name: flux_training.flux_member_alone(member, guidance)
              for name, member in zip(member_names, frozen.members)}
    models[BLOCK_AVERAGE] = flux_training.flux_ensemble_reading(EnsembleFlux(frozen.members, None, AVERAGE), guidance)
    models[NOISE_AVERAGE] = flux_training.flux_ensemble_reading(EnsembleFlux(frozen.members, None, NOISE), guidance)
    for row, _, _, ensemble in trained:
        models[row] = flux_training.flux_ensemble_reading(ensemble, guidance)
    print(f"loaded {len(frozen.members)} FLUX members ({', '.join(map(str, frozen.member_refs))}) on {device}; "
          f"guidance {guidance}" + "".join(f"; {row}: {path} ({info.config.design} design, mode {info.mode})"
                                           for row, path, info, _ in trained))

    loader = torch.utils.data.DataLoader(RepeatedDraws(datasets.ImageCaptionDataset(records, args.resolution),
                                                       args.draws),
                                         batch_size=args.batch_size, collate_fn=datasets.collate, num_workers=0)

    def batches():
        for batch in tqdm(loader, desc="evaluating", dynamic_ncols=True):
            report.add_items(batch["skipped"])
            yield batch

    table_started = time.time()
    errors = flux_training.flux_denoising_errors(models, batches(), frozen, args.seed, device)
    table_seconds = time.time() - table_started
    print(format_table(errors, member_names, ranges=FLOW_TIMESTEP_RANGES, title=FLUX_TABLE_TITLE))
    if report.total:
        print(report.summary())
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "family": "flux", "objective": "rectified flow (velocity)", "models": errors,
        "members": member_entries(member_names, args.members, frozen.member_refs),
        "weights": [{"row": row, "file": path, "mode": info.mode.name, "design": info.config.design,
                     "training": info.training} for row, path, info, _ in trained],
        "guidance": guidance, "t5_max_length": args.t5_max_length,
        "data": str(args.data), "images": len(records), "skipped": report.total, "draws_per_image": args.draws,
        "seed": args.seed, "resolution": args.resolution,
        "timestep_ranges": [range_label(low, high) for low, high in FLOW_TIMESTEP_RANGES],
        "figures": {}, "merges": [], "best_member": best_row(errors, member_names),
        "table_seconds": round(table_seconds, 1),
    }
    (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {output_dir / RESULTS_FILE} ({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
