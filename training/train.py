#!/usr/bin/env python
"""Train SABW weights for a set of member checkpoints (paper section 3.4; defaults from section 4.1).

    python training/train.py --members A.safetensors B.safetensors --data my-captioned-images/

Members, VAE and text encoders are frozen; only the aggregator trains, on the ordinary denoising loss of the
ensembled UNet. The VAE and noise schedule come from the first member. By default (`--text-conditioning per-member`,
the authors' code) each member reads the prompt as its own checkpoint's text encoder encodes it and SABW reads the
mean of those encodings; members with identical text encoders share one, which runs once per batch. The defaults
follow the authors' training: the paper SABW design (`--preset paper`), latents sampled from the VAE posterior
(`--latents sample`), random crops (`--crop random`). The result is a weights file for the WebUI extension, bound to
the members by their sha256 (by default into the WebUI's `models/AFA/` when this extension sits in a WebUI, else
`--output`); its config records the design, the text conditioning and the CLIP skip.

FLUX.1 members (transformer-only files in BFL's layout, ComfyUI's `models/diffusion_models`) train the same way on
FLUX's rectified-flow objective (training/flux_training.py): the components they share come from --vae, --clip-l,
--t5 and --t5-tokenizer, every caption is encoded once before training (T5-XXL is freed before the members load),
and the weights file is of family "flux" (afa.flux.EnsembleFlux; the ComfyUI node runs it).

Runs unchanged under `torchrun --nproc_per_node K` (DDP; gloo on CPU, nccl on GPU). `--batch-size` is the global
batch per optimizer step, split over ranks and `--gradient-accumulation` micro-steps; every sample's timestep, noise,
caption dropout, posterior noise and crop are drawn from its own seeded generator (training/diffusion.py), so the
number of processes and resuming do not change the result. `--resume latest` continues a run where it stopped; it
refuses flags that would change the result from the ones the run was started with (RESULT_SETTINGS), and takes a
larger --max-steps or --epochs to train longer.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # `python training/train.py` puts training/ on the path; afa/ and training/ sit one up
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm import tqdm  # noqa: E402

from afa import (DEFAULT_PRESET, SABW_PRESETS, AfaError, Aggregator, AggregatorConfig, EnsembleUNet,  # noqa: E402
                 MemberRef, default_config, save_weights)
from afa.errors import IncompatibleMembersError  # noqa: E402
from afa.flux import FLUX_BLOCKS, EnsembleFlux, flux_preset_config  # noqa: E402
from afa.ensemble import LDM_BLOCKS  # noqa: E402
from afa.hashing import file_sha256  # noqa: E402
from afa.host import find_webui  # noqa: E402
from afa.members import MAX_MEMBERS, MIN_MEMBERS  # noqa: E402
from afa.modes import AVERAGE, LAST_BLOCK, SABW, parse_mode, trained_mode  # noqa: E402
from training import data as datasets  # noqa: E402
from training.cli import run  # noqa: E402
from training.diffusion import per_sample_mse  # noqa: E402
from training import flux_training  # noqa: E402
from training.merge_search import (MERGE_BASELINES, ValidationScorer, describe_merge,  # noqa: E402
                                   merged_text_encoders, prepare_validation_batches, search_merges)
from training.metrics import denoising_errors, ensemble_reading, member_alone, prepare_batch  # noqa: E402
from training.sd_checkpoint import FrozenModels, load_frozen_models, native_resolution  # noqa: E402

STATE_FORMAT = 1


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser = parser_class(description=__doc__.split("\n\n")[0],
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("members and data")
    group.add_argument("--members", nargs="+", required=True, help="2 to 6 member checkpoints (.safetensors/.ckpt)")
    group.add_argument("--config", help="ldm yaml of the members (default: <name>.yaml beside each, else inferred)")
    group.add_argument("--components", help="a full checkpoint of the members' family whose text encoder, VAE and "
                       "config serve members whose files hold a UNet only (ComfyUI's models/diffusion_models); "
                       "members with a text encoder of their own keep reading it")
    group.add_argument("--data", required=True, help="folder of images with .txt captions or WebUI PNGs, or a "
                       "JSONL/CSV manifest of image path + caption")
    group.add_argument("--val-data", help="held-out data in the same formats (default: --val-split of --data)")
    group.add_argument("--val-split", type=float, default=0.05, help="fraction of --data held out for validation "
                       "when --val-data is not given")
    group.add_argument("--resolution", type=int, help="images are resized (shorter side) and cropped to this square "
                       "(--crop); default: the first member's native size (512 SD 1.x and SD 2.x base, 768 SD 2.x-v, "
                       "1024 SDXL)")
    group.add_argument("--crop", choices=["random", "center"], default="random", help="the square crop: a position "
                       "drawn per sample and epoch (the authors' RandomCrop) or the centre; validation images are "
                       "always centre-cropped")
    group.add_argument("--latents", choices=["sample", "mean"], default="sample", help="train on a sample of the "
                       "VAE posterior, drawn per sample and epoch (the authors' latent_dist.sample()), or on its mean; "
                       "validation uses the mean")
    group.add_argument("--cache-latents", action="store_true", help="encode every image with the VAE once and "
                       "train on cached latents (the posterior's mean and std with --latents sample); needs "
                       "--crop center")
    group.add_argument("--latent-cache-dir", help="where cached latents go (default: <run-dir>/latent-cache)")

    group = parser.add_argument_group("text conditioning")
    group.add_argument("--text-conditioning", choices=["per-member", "shared"], default="per-member",
                       help="per-member: each member reads the prompt as its own checkpoint's text encoder encodes "
                       "it and SABW their mean (the authors' code; one frozen text encoder per distinct encoder, "
                       "123M parameters each for SD1); shared: every member reads the first member's encoding")
    group.add_argument("--clip-skip", type=int, default=1, help="CLIP skip of the text encodings (1 = the last "
                       "layer); recorded in the weights file")

    group = parser.add_argument_group("aggregator (paper ablations as flags)")
    group.add_argument("--preset", choices=list(SABW_PRESETS), default=DEFAULT_PRESET,
                       help="SABW design: paper (the authors' aggregator: a ResNet layer and 2 transformer blocks "
                       "with self-attention at every block's full resolution, width 128) or fast (AFA's cheaper "
                       "block: cross-attention only, features pooled to 32x32, width 160)")
    group.add_argument("--mode", choices=[SABW.name, LAST_BLOCK.name], default=SABW.name,
                       help="SABW after every block, or only on the members' predictions")
    group.add_argument("--no-spatial", action="store_true", help="one weight per member per block, no maps")
    group.add_argument("--no-timestep", action="store_true", help="SABW without the timestep embedding")
    group.add_argument("--no-text", action="store_true", help="SABW without cross-attention to the prompt")
    # SUPPRESS: not given means the preset's value (parse_args fills it in), not a fixed number.
    group.add_argument("--hidden-channels", type=int, default=argparse.SUPPRESS,
                       help="SABW width, a multiple of 32 (default: the preset's; paper "
                       f"{SABW_PRESETS['paper']['hidden_channels']}, fast {SABW_PRESETS['fast']['hidden_channels']})")
    group.add_argument("--max-resolution", type=int, default=argparse.SUPPRESS,
                       help="SABW computes weights on features pooled to at most this size, 0 = full size (default: "
                       "the preset's; paper full size, fast "
                       f"{SABW_PRESETS['fast']['max_resolution']})")

    group = parser.add_argument_group("optimisation (paper defaults)")
    group.add_argument("--learning-rate", type=float, default=1e-4, help="AdamW learning rate")
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    group.add_argument("--epochs", type=int, default=10, help="passes over the training data")
    group.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    group.add_argument("--batch-size", type=int, default=8, help="global batch per optimizer step (all ranks and "
                       "accumulation steps together)")
    group.add_argument("--gradient-accumulation", type=int, default=1, help="micro-steps per optimizer step")
    group.add_argument("--caption-dropout", type=float, default=0.1, help="probability of training a sample with "
                       "the empty prompt (keeps classifier-free guidance working)")
    group.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no", help="frozen members in "
                       "this dtype under autocast; SABW master weights stay fp32 (fp16 uses a GradScaler)")
    group.add_argument("--gradient-checkpointing", action="store_true", help="recompute member blocks in the "
                       "backward pass instead of storing their activations")
    group.add_argument("--seed", type=int, default=0, help="seed of the data order and of every random draw")
    group.add_argument("--num-workers", type=int, default=2, help="DataLoader worker processes per rank")
    group.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")

    group = parser.add_argument_group("output, checkpoints and logs")
    group.add_argument("--output", help="the weights file (default: <WebUI>/models/AFA/<run name>.safetensors "
                       "inside a WebUI, else ./<run name>.safetensors)")
    group.add_argument("--run-dir", help="training state and logs (default: runs/<output name>)")
    group.add_argument("--save-every", type=int, default=500, help="write the training state every N steps")
    group.add_argument("--validate-every", type=int, default=0, help="also validate every N steps (0: at the end "
                       "of each epoch and of the run only); validation reads no random state of training, so it "
                       "never changes the result")
    group.add_argument("--merge-baselines", choices=MERGE_BASELINES, default="all", help="the validation also "
                       "shows what merging the members would give (one UNet at inference instead of N): all (a "
                       "weighted merge and MBW), weighted (the weighted merge) or none. Their weights are searched "
                       "once, at the first validation, on the validation images with draws of their own (which "
                       "favours the merges); the search holds one extra UNet (and text encoder) while it runs")
    group.add_argument("--keep-checkpoints", type=int, default=3, help="training states kept (oldest deleted)")
    group.add_argument("--resume", help="'latest' (the run dir's newest state) or a state file; give the run's "
                       "flags again (a larger --max-steps or --epochs trains longer)")
    group.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the weights file")
    group.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    flux_training.add_flux_arguments(parser)
    return parser


class UsageError(AfaError):
    """A flag refused by `parse_args(..., exit_on_error=False)` (what argparse would print before exiting)."""


class RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors raise UsageError instead of printing the usage and exiting (for callers that
    are not a command line: the WebUI's training tab and its API)."""

    def error(self, message):
        raise UsageError(message)


def parse_args(argv: list[str] | None = None, exit_on_error: bool = True) -> argparse.Namespace:
    """The command line, checked. With `exit_on_error=False` a refused flag raises UsageError (argparse's message)
    instead of exiting."""
    parser = build_parser(argparse.ArgumentParser if exit_on_error else RaisingParser)
    args = parser.parse_args(argv)

    if not MIN_MEMBERS <= len(args.members) <= MAX_MEMBERS:
        parser.error(f"--members takes {MIN_MEMBERS} to {MAX_MEMBERS} checkpoints, got {len(args.members)}")
    args.family = members_family(args.members, parser.error)
    flux_training.check_flux_flags(args, args.family, parser.error)
    if args.resolution is None:
        args.resolution = (flux_training.FLUX_RESOLUTION if args.family == "flux"
                           else native_resolution(args.members[0], args.config, args.components))
    for flag in ("batch_size", "gradient_accumulation", "save_every", "resolution"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.validate_every < 0:
        parser.error("--validate-every must be 0 or more")
    if args.batch_size % args.gradient_accumulation:
        parser.error("--batch-size must be a multiple of --gradient-accumulation")
    if not 0 <= args.val_split < 1:
        parser.error("--val-split must be in [0, 1)")
    if not 0 <= args.caption_dropout <= 1:
        parser.error("--caption-dropout must be in [0, 1]")
    if args.max_steps is None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.max_steps is not None and args.max_steps < 1:
        # 0 would silently mean --epochs (`max_steps or ...`), a negative count a run that ends before its first step
        parser.error(f"--max-steps must be at least 1, got {args.max_steps}")
    if args.clip_skip < 1:
        parser.error("--clip-skip must be at least 1")
    if args.cache_latents and args.crop == "random":
        parser.error("--cache-latents stores one latent per image, its centre crop, so it cannot serve --crop "
                     "random: add --crop center, or drop --cache-latents")
    preset = SABW_PRESETS[args.preset]
    if getattr(args, "hidden_channels", None) is None:
        args.hidden_channels = preset["hidden_channels"]
    max_resolution = getattr(args, "max_resolution", None)
    args.max_resolution = preset["max_resolution"] if max_resolution is None else (max_resolution or None)
    run_name = Path(args.output).stem if args.output else f"afa-{len(args.members)}members"
    if args.output is None:
        webui = find_webui()
        folder = webui.models_dir / "AFA" if webui is not None else Path.cwd()
        args.output = str(folder / f"{run_name}.safetensors")
    args.run_dir = Path(args.run_dir or Path("runs") / run_name)
    return args


def members_family(paths: list[str], error) -> str:
    """"flux" or "unet" (training/flux_training.py `member_family`), refusing (`error`) members that mix them or
    FLUX members of different layouts, from the files' headers, before anything loads. Unreadable files count as
    UNet checkpoints here: loading them says what is wrong."""
    try:
        family = flux_training.member_family(paths)
        if family == "flux":
            flux_training.check_flux_members(paths)
        return family
    except IncompatibleMembersError as refused:
        error(str(refused))
    except (AfaError, OSError):
        return "unet"


# -- setup --------------------------------------------------------------------------------------------------------

class Distributed:
    """Rank and world from torchrun's environment; a single process when launched directly."""

    def __init__(self, device_arg: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
        if use_cuda:
            self.device = torch.device(f"cuda:{local_rank}" if device_arg in ("auto", "cuda") else device_arg)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.world_size > 1:
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        self.is_main = self.rank == 0

    def print_main(self, message: str) -> None:
        """Prints on the main process only."""
        if self.is_main:
            print(message)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def precision(mixed_precision: str, device: torch.device) -> tuple[torch.dtype, contextlib.AbstractContextManager,
                                                                   bool]:
    """(members' dtype, autocast context, use GradScaler) for --mixed-precision."""
    if mixed_precision == "no":
        return torch.float32, contextlib.nullcontext(), False
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    if device.type != "cuda":
        if dtype == torch.float16:
            raise AfaError("--mixed-precision fp16 needs a CUDA device; use bf16 or no on the CPU")
        # CPU autocast has no fp32 policy for ldm's GroupNorm with half weights: keep members fp32, compute in bf16.
        return torch.float32, torch.autocast("cpu", dtype=dtype), False
    return dtype, torch.autocast("cuda", dtype=dtype), dtype == torch.float16


def text_encoder_dtype(member_dtype: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The frozen text encoders' dtype: on a GPU the members' (half precision under --mixed-precision, as the WebUI
    runs text encoders, and diffusers' trainers: SDXL's pair takes 1.6 GB instead of 3.3 GB per distinct member
    encoder); float32 (None) on the CPU, whose autocast keeps the members in float32 too (`precision`)."""
    return member_dtype if device.type == "cuda" else None


def grad_scaler(enabled: bool) -> torch.cuda.amp.GradScaler:
    """fp16's loss scaler (a pass-through when disabled)."""
    with warnings.catch_warnings():  # torch.amp.GradScaler("cuda") is the new spelling, but needs torch >= 2.3
        warnings.simplefilter("ignore", FutureWarning)
        return torch.cuda.amp.GradScaler(enabled=enabled)


def index_records(args) -> tuple[list, list, datasets.SkipReport]:
    """(training records, validation records, skip report) of --data and --val-data / --val-split."""
    report = datasets.SkipReport()
    records = datasets.index_captioned_images(args.data, report)
    if args.val_data:
        train_records, val_records = records, datasets.index_captioned_images(args.val_data, report)
    else:
        train_records, val_records = datasets.split_for_validation(records, args.val_split, args.seed)
    if not train_records:
        raise AfaError(f"no usable training images in {args.data}\n{report.summary()}")
    return train_records, val_records, report


def build_datasets(args, distributed: Distributed, vae, vae_identity: str, records: tuple | None = None):
    """(train dataset, validation dataset, skip report). Items are {"pixel_values" | "latents" | "moments",
    "caption", "index"} (training/data.py's `collate` batches them; "moments" are the cached posterior mean and std
    of --latents sample). Training images are cropped per --crop, validation images at the centre. `records`:
    `index_records(args)` when already read."""
    train_records, val_records, report = records or index_records(args)
    if not args.cache_latents:
        return (datasets.ImageCaptionDataset(train_records, args.resolution, crop=args.crop, seed=args.seed),
                datasets.ImageCaptionDataset(val_records, args.resolution), report)

    cache_dir = Path(args.latent_cache_dir or args.run_dir / "latent-cache")
    # --latents sample draws a new posterior sample every epoch: cache the posterior (mean and std), not a sample.
    cache_moments = args.latents == "sample"
    item_key = "moments" if cache_moments else "latents"
    if cache_moments:
        vae_identity += " posterior mean and std"

    def encode_images(images):
        images = images.to(distributed.device, next(vae.parameters()).dtype)
        if cache_moments:
            return torch.cat(vae.posterior(images), dim=1).float()  # [B x 2C x h x w]
        return vae.encode(images).float()

    caches = []
    for split_records in (train_records, val_records):
        if distributed.is_main:  # one process encodes; the others open the finished cache
            datasets.LatentCache.open_or_build(split_records, resolution=args.resolution, encode=encode_images,
                                               vae_identity=vae_identity, cache_dir=cache_dir,
                                               num_workers=args.num_workers, item_key=item_key)
        distributed.barrier()
        cache = datasets.LatentCache.open_or_build(split_records, resolution=args.resolution, encode=encode_images,
                                                   vae_identity=vae_identity, cache_dir=cache_dir,
                                                   item_key=item_key)
        report.merge(cache.skip_report)
        caches.append(cache)
    return caches[0], caches[1], report


class EpochBatches:
    """The global batches of an epoch: a seeded permutation cut into `batch_size` slices (the tail that does not
    fill a batch is dropped). Each global batch is split into accumulation micro-steps, and each micro-step into
    one contiguous shard per rank."""

    def __init__(self, dataset_size: int, batch_size: int, accumulation: int, rank: int, world_size: int,
                 seed: int):
        if batch_size % (accumulation * world_size):
            raise AfaError(f"--batch-size {batch_size} must be a multiple of --gradient-accumulation x processes "
                           f"({accumulation} x {world_size})")
        self.dataset_size, self.batch_size, self.accumulation = dataset_size, batch_size, accumulation
        self.rank, self.world_size, self.seed = rank, world_size, seed

    def __len__(self) -> int:
        return self.dataset_size // self.batch_size

    def rank_micro_batches(self, epoch: int, start_batch: int = 0):
        """Yields this rank's index lists, `accumulation` per global batch, from global batch `start_batch` on."""
        order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch))
        micro = self.batch_size // self.accumulation
        shard = micro // self.world_size
        for batch in range(start_batch, len(self)):
            indices = order[batch * self.batch_size:(batch + 1) * self.batch_size].tolist()
            for step in range(self.accumulation):
                micro_indices = indices[step * micro:(step + 1) * micro]
                yield micro_indices[self.rank * shard:(self.rank + 1) * shard]


def aggregator_config(args, frozen: FrozenModels) -> AggregatorConfig:
    """A new run's aggregator: the --preset's architecture with the width, pooling and ablation flags, and the text
    conditioning and CLIP skip it is trained with (so that inference can feed it the same way). FLUX members: the
    layout's SABW (afa.flux.flux_preset_config), every member reading the one shared encoding ("shared")."""
    try:
        if getattr(frozen, "family", "unet") == "flux":
            return flux_preset_config(args.preset, len(frozen.members), frozen.layout,
                                      hidden_channels=args.hidden_channels, max_resolution=args.max_resolution,
                                      spatial=not args.no_spatial, use_timestep=not args.no_timestep,
                                      use_text=not args.no_text,
                                      only_last_block=parse_mode(args.mode) is LAST_BLOCK,
                                      text_conditioning="shared", text_mixing=args.text_mixing)
        return default_config(frozen.layout, len(frozen.members), frozen.text_encoder.config.hidden_size,
                              preset=args.preset, hidden_channels=args.hidden_channels,
                              max_resolution=args.max_resolution, spatial=not args.no_spatial,
                              use_timestep=not args.no_timestep, use_text=not args.no_text,
                              only_last_block=parse_mode(args.mode) is LAST_BLOCK,
                              text_conditioning=text_conditioning(args), clip_skip=args.clip_skip)
    except ValueError as error:  # e.g. a --hidden-channels the preset's heads do not divide
        raise AfaError(f"--preset {args.preset}: {error}") from None


def text_conditioning(args) -> str:
    """--text-conditioning as AggregatorConfig spells it ("per_member" or "shared")."""
    return args.text_conditioning.replace("-", "_")


def build_ensemble(config: AggregatorConfig, members: list[torch.nn.Module], seed: int,
                   gradient_checkpointing: bool, distributed: Distributed, runner=None) \
        -> tuple[Aggregator, EnsembleUNet | EnsembleFlux, torch.nn.Module]:
    """(the aggregator, the ensemble of the frozen members with it -- an EnsembleFlux for a config of family
    "flux" --, the model to train: the ensemble, wrapped in DDP when there are several processes). `runner`: how the
    members' blocks run (None: ldm's, or BFL's interface for FLUX)."""
    torch.manual_seed(seed)  # the same initial aggregator on every rank
    aggregator = Aggregator(config).to(distributed.device)
    if config.family == "flux":
        ensemble = EnsembleFlux(members, aggregator, trained_mode(config.only_last_block),
                                runner=runner or FLUX_BLOCKS)
    else:
        ensemble = EnsembleUNet(members, aggregator, trained_mode(config.only_last_block),
                                runner=runner or LDM_BLOCKS)
    ensemble.gradient_checkpointing = gradient_checkpointing
    if distributed.world_size == 1:
        return aggregator, ensemble, ensemble
    # Only SABW trains; keep DDP from broadcasting the frozen members' gigabytes at start-up.
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        ensemble, [f"members.{name}" for name, _ in ensemble.members.named_parameters()])
    device_ids = [distributed.device.index] if distributed.device.type == "cuda" else None
    return aggregator, ensemble, DistributedDataParallel(ensemble, device_ids=device_ids)


def epoch_loader(train_set, batches: EpochBatches, epoch: int, start_batch: int,
                 num_workers: int) -> torch.utils.data.DataLoader:
    """This rank's micro-batches of an epoch (with the epoch's random crops), from global batch `start_batch` on."""
    return torch.utils.data.DataLoader(train_set.for_epoch(epoch), collate_fn=datasets.collate,
                                       num_workers=num_workers,
                                       batch_sampler=list(batches.rank_micro_batches(epoch, start_batch)))


# -- the training step --------------------------------------------------------------------------------------------

class MicroBatchLoss:
    """The loss of one rank's micro-batch: the sum of its samples' denoising MSEs, scaled by processes /
    --batch-size, so that DDP's gradient average over ranks and the sum over accumulation micro-steps give the mean
    over the global batch.

    Each member reads the prompt per the aggregator's `text_conditioning` (its own encoder's encoding, or the first
    member's) at its `clip_skip`; the latents are the VAE posterior's mean or a sample of it (`sample_latents`)."""

    def __init__(self, frozen: FrozenModels, config: AggregatorConfig, sample_latents: bool, seed: int,
                 caption_dropout: float, batch_size: int, autocast: contextlib.AbstractContextManager,
                 distributed: Distributed):
        self.frozen, self.seed, self.caption_dropout, self.batch_size = frozen, seed, caption_dropout, batch_size
        self.text_encoders = frozen.text_encoders_for(config.text_conditioning)
        self.clip_skip, self.sample_latents = config.clip_skip, sample_latents
        self.autocast, self.device, self.world_size = autocast, distributed.device, distributed.world_size

    def __call__(self, model: torch.nn.Module, batch: dict, epoch: int) -> torch.Tensor | None:
        """The scalar loss of a `collate` batch under `model` with the draws of `epoch`; None when the batch is
        empty (every image of it was unreadable)."""
        if not batch["indices"]:
            return None
        frozen = self.frozen
        inputs = prepare_batch(batch, frozen.vae, self.text_encoders, frozen.schedule, self.seed, self.device, epoch,
                               self.caption_dropout, clip_skip=self.clip_skip, sample_latents=self.sample_latents)
        with self.autocast:
            prediction = model(inputs["noisy"], inputs["timesteps"], member_contexts=inputs["member_contexts"],
                               member_vectors=inputs["member_vectors"])
        return per_sample_mse(prediction, inputs["target"]).sum() * self.world_size / self.batch_size


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler, micro_batches: list[dict],
               micro_batch_loss: MicroBatchLoss, epoch: int, distributed: Distributed) -> float:
    """One optimizer step on a global batch, given as this rank's `--gradient-accumulation` micro-batches.

    Returns:
        the global batch's mean per-sample loss (over every rank).
    """
    loss_sum = torch.zeros((), device=distributed.device)
    for number, batch in enumerate(micro_batches):
        # DDP averages the gradients over ranks in the backward pass; only the last micro-step needs to.
        last = number == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or distributed.world_size == 1 else model.no_sync()
        with sync:
            loss = micro_batch_loss(model, batch, epoch)
            if loss is None:  # every image of this micro-batch was unreadable: a zero loss keeps DDP's reducer in step
                loss = sum(parameter.sum() * 0.0 for group in optimizer.param_groups for parameter in group["params"])
            scaler.scale(loss).backward()
        loss_sum += loss.detach()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if distributed.world_size > 1:
        dist.all_reduce(loss_sum)
        loss_sum /= distributed.world_size
    return loss_sum.item()


@torch.no_grad()
def validate(ensemble: EnsembleUNet, val_set, frozen: FrozenModels, batch_size: int, seed: int,
             device: torch.device, autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """Held-out denoising MSE of every member (reading its own text encoder's encoding), of block averaging and of
    the current AFA (reading the prompt per the run's text conditioning), on the same draws (posterior means)."""
    ensemble.eval()
    config = ensemble.aggregator.config
    if config.family == "flux":
        return validate_flux(ensemble, val_set, frozen, batch_size, seed, device, autocast)
    models = {ref.name: member_alone(member, index)
              for index, (ref, member) in enumerate(zip(frozen.member_refs, ensemble.members))}
    models["block average"] = ensemble_reading(EnsembleUNet(list(ensemble.members), None, AVERAGE,
                                                            runner=ensemble.runner), config.text_conditioning)
    models["AFA"] = ensemble_reading(ensemble, config.text_conditioning)
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, collate_fn=datasets.collate, num_workers=0)
    with autocast:
        errors = denoising_errors(models, loader, frozen.vae, frozen.text_encoders, frozen.schedule, seed, device,
                                  clip_skip=config.clip_skip)
    return {name: result["all"] for name, result in errors.items()}


@torch.no_grad()
def validate_flux(ensemble: EnsembleFlux, val_set, frozen, batch_size: int, seed: int, device: torch.device,
                  autocast: contextlib.AbstractContextManager) -> dict[str, float]:
    """`validate` for FLUX members: held-out flow-matching MSE (velocity) of every member, block averaging and the
    current AFA, on the same draws (t uniform in [0, 1), posterior means) with the run's guidance."""
    models = {ref.name: flux_training.flux_member_alone(member, frozen.guidance)
              for ref, member in zip(frozen.member_refs, ensemble.members)}
    models["block average"] = flux_training.flux_ensemble_reading(
        EnsembleFlux(list(ensemble.members), None, AVERAGE, runner=ensemble.runner), frozen.guidance)
    models["AFA"] = flux_training.flux_ensemble_reading(ensemble, frozen.guidance)
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, collate_fn=datasets.collate, num_workers=0)
    with autocast:
        errors = flux_training.flux_denoising_errors(models, loader, frozen, seed, device)
    return {name: result["all"] for name, result in errors.items()}


@torch.no_grad()
def merge_baseline_errors(frozen: FrozenModels, val_set, baselines: str, batch_size: int, seed: int,
                          device: torch.device, autocast: contextlib.AbstractContextManager, clip_skip: int,
                          log=print) -> dict[str, float]:
    """Held-out denoising MSE of the merge baselines (training/merge_search.py) on `validate`'s draws, so their
    rows stand beside the members' and AFA's. Their weights are chosen on the same validation images (a run holds
    no other held-out images) with the search's own draws, which favours the merges. Each merge is let go before
    the next is searched: the search holds one extra UNet, and text encoder when the members' differ, at a time."""
    if baselines == "none":  # nothing to search: do not encode the validation images for it
        return {}
    if getattr(frozen, "family", "unet") == "flux":  # the merges are searched over UNet (MBW) blocks
        log("merge baselines: not measured for FLUX members (training/merge_search.py merges UNets block by block)")
        return {}
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size, collate_fn=datasets.collate, num_workers=0)
    member_names = [ref.name for ref in frozen.member_refs]
    errors = {}
    with autocast:
        scorer = ValidationScorer(prepare_validation_batches(loader, frozen.vae, frozen.text_encoders,
                                                             frozen.schedule, seed, device, clip_skip), clip_skip)
        for merge in search_merges(frozen.members, frozen.text_encoders, member_names, scorer, baselines):
            models = {merge.row: member_alone(merge.unet.model, len(frozen.members))}
            result = denoising_errors(models, loader, frozen.vae, merged_text_encoders(frozen.text_encoders, [merge]),
                                      frozen.schedule, seed, device, clip_skip=clip_skip)
            errors[merge.row] = result[merge.row]["all"]
            log(describe_merge(merge))
            del merge, models
    return errors


# -- logs ---------------------------------------------------------------------------------------------------------

class RunLog:
    """The run's log, written by the main process only: one JSON object per line in `<run dir>/log.jsonl`, and its
    numbers as TensorBoard scalars with --tensorboard."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.file, self.tensorboard = None, None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "log.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                print("--tensorboard: tensorboard is not installed; logging to log.jsonl only")

    def write(self, record: dict) -> None:
        """Appends a record, {"step": int, ...}."""
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# -- training states (checkpoints) and resuming -------------------------------------------------------------------

# The flags that decide what a run computes. A resumed run must be given their saved values, else it would not end
# as the uninterrupted run would. The architecture flags are among them: the architecture comes from the saved
# state, and a different value given would be silently ignored. Every other flag may change on resume: --max-steps
# and --epochs (to train longer), outputs and logs, --num-workers, --device, and how the same steps are computed --
# the number of processes, --gradient-accumulation, --gradient-checkpointing and --cache-latents, which change the
# result by rounding only (the tests compare those runs to the plain one).
RESULT_SETTINGS = ("config", "components", "data", "val_data", "val_split", "resolution", "batch_size", "seed",
                   "learning_rate", "weight_decay", "caption_dropout", "mixed_precision", "mode", "no_spatial", "no_timestep",
                   "no_text", "preset", "hidden_channels", "max_resolution", "text_conditioning", "clip_skip",
                   "latents", "crop", "vae", "clip_l", "t5", "t5_tokenizer", "t5_max_length", "guidance",
                   "timestep_sampling", "text_mixing", "rope_axes")
# What the result settings added later were before they had a flag: a state saved then ran with these.
SETTINGS_BEFORE_THEIR_FLAGS = {"preset": "fast", "text_conditioning": "shared", "clip_skip": 1, "latents": "mean",
                               "crop": "center", "components": None, "vae": None, "clip_l": None, "t5": None,
                               "t5_tokenizer": None, "t5_max_length": None, "guidance": None,
                               "timestep_sampling": None, "text_mixing": None, "rope_axes": None}


@dataclass
class Progress:
    """How far a run is: optimizer steps done, the current epoch (from 0), and the global batches of it done."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def vars_for_state(args) -> dict:
    """The command line, JSON-safe (stored with each training state; resuming compares its RESULT_SETTINGS)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def training_state(aggregator: Aggregator, optimizer: torch.optim.Optimizer, scaler, progress: Progress,
                   member_refs: list[MemberRef], args) -> dict:
    """Everything a resumed run needs to continue exactly: weights, optimizer, scaler, RNG, progress, config,
    members and the command line."""
    return {"format": STATE_FORMAT, "aggregator": aggregator.state_dict(), "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_states(), "step": progress.step, "epoch": progress.epoch,
            "batch_in_epoch": progress.batch_in_epoch, "config": aggregator.config.to_dict(),
            "members": [{"name": m.name, "sha256": m.sha256} for m in member_refs], "args": vars_for_state(args)}


# A training state is a safetensors file: its tensors, and everything else as JSON in its metadata, where each
# tensor is {"__tensor__": its key}. No pickle: the WebUI replaces torch.load with a checker that refuses the zip
# layout of newer torch versions, and a state file should be as safe to open as a weights file. (States written as
# torch .pt files by earlier versions still resume, through torch.load(weights_only=True).)
STATE_SUFFIX = ".safetensors"
STATE_METADATA_KEY = "afa_training_state"


def encode_state(value, tensors: dict):
    """`value` as JSON-safe data; its tensors go into `tensors`, each under a key of its own (t0, t1, ...)."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: encode_state(v, tensors) for k, v in value.items()}
        return {"__items__": [[k, encode_state(v, tensors)] for k, v in value.items()]}  # e.g. Adam's int keys
    if isinstance(value, (list, tuple)):
        items = [encode_state(v, tensors) for v in value]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    return value


def decode_state(value, tensors: dict):
    """The inverse of encode_state."""
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__items__" in value:
            return {k: decode_state(v, tensors) for k, v in value["__items__"]}
        if "__tuple__" in value:
            return tuple(decode_state(v, tensors) for v in value["__tuple__"])
        return {k: decode_state(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_state(v, tensors) for v in value]
    return value


def write_state_file(path: Path, state: dict) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = encode_state(state, tensors)
    save_file(tensors, str(path), metadata={STATE_METADATA_KEY: json.dumps(encoded)})


def read_state_file(path: Path) -> dict:
    """A saved training state (safetensors, or a .pt of earlier versions); {} when it is not one."""
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if STATE_METADATA_KEY not in metadata:
            return {}
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return decode_state(json.loads(metadata[STATE_METADATA_KEY]), tensors)


def save_state(run_dir: Path, state: dict, step: int, keep: int) -> Path:
    """Writes training state N (temporary name, then rename), points `latest.json` at it, deletes old states."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"state-{step:08d}{STATE_SUFFIX}"
    temporary = path.with_name(path.name + ".tmp")
    write_state_file(temporary, state)
    os.replace(temporary, path)
    pointer = folder / "latest.json"
    # the command line too, so that a caller can offer to resume the run without reading the state
    pointer.with_name("latest.json.tmp").write_text(json.dumps({"state": path.name, "step": step,
                                                                "args": state["args"]}))
    os.replace(pointer.with_name("latest.json.tmp"), pointer)
    for old in sorted(folder.glob("state-*" + STATE_SUFFIX))[:-keep]:
        old.unlink()
    return path


def resolve_resume(run_dir: Path, resume: str) -> Path:
    """The state file --resume names: 'latest' is the one the run dir's `latest.json` points at."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_file():
            raise AfaError(f"--resume {path}: no such training state")
        return path
    pointer = run_dir / "checkpoints" / "latest.json"
    if not pointer.is_file():
        raise AfaError(f"--resume latest: no training state in {run_dir / 'checkpoints'}")
    return pointer.parent / json.loads(pointer.read_text())["state"]


def load_resume_state(args) -> tuple[dict, Path]:
    """(the training state --resume names, its path), refused unless this trainer wrote it with the same
    RESULT_SETTINGS as given now."""
    path = resolve_resume(args.run_dir, args.resume)
    try:
        state = read_state_file(path)
    except Exception as error:  # noqa: BLE001 -- a damaged or foreign file
        raise AfaError(f"{path}: not a readable training state ({type(error).__name__}: {error})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise AfaError(f"{path}: not a training state of this trainer (format {state.get('format')})")
    saved, given = {**SETTINGS_BEFORE_THEIR_FLAGS, **state.get("args", {})}, vars_for_state(args)
    # .get: a command line rebuilt from an older state's saved flags (the WebUI's resume) lacks the newer ones
    changed = [f"  --{name.replace('_', '-')}: saved {saved[name]}, given {given.get(name)}"
               for name in RESULT_SETTINGS if name in saved and saved[name] != given.get(name)]
    if changed:
        raise AfaError(f"{path}: resuming with other settings than the run was started with would change its "
                       f"result; give the saved values:\n" + "\n".join(changed))
    return state, path


def check_resumed_members(state: dict, state_path: Path, member_refs: list[MemberRef]) -> None:
    """Refuses to resume a run with other members (by sha256, in order) than it was trained with."""
    saved_members = [MemberRef(**m) for m in state["members"]]
    if [m.sha256 for m in saved_members] != [m.sha256 for m in member_refs]:
        raise AfaError(f"{state_path}: trained with members {', '.join(map(str, saved_members))}, "
                       f"given {', '.join(map(str, member_refs))}")


def restore_training_state(state: dict, aggregator: Aggregator, optimizer: torch.optim.Optimizer,
                           scaler) -> Progress:
    """Loads a saved state into the run's objects and the RNGs; returns where the run stopped."""
    aggregator.load_state_dict(state["aggregator"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    restore_rng_states(state["rng"])
    return Progress(state["step"], state["epoch"], state["batch_in_epoch"])


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]), None))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- the run ------------------------------------------------------------------------------------------------------

class TrainingEvents:
    """What a caller that is not a terminal hears of a run, and how it stops one (the WebUI's training tab; the
    command line uses these defaults, which do nothing). Called on the main process, between optimizer steps.

    A stop is honoured before the next step: the training state of the steps done is saved (a run resumed from it
    ends as the uninterrupted run would) and no weights file is written. Single-process runs only (one rank deciding
    to stop alone would leave the others waiting in DDP)."""

    def started(self, progress: "Progress", total_steps: int, dataset_size: int, skip_report) -> None:
        """The members, data and aggregator are ready; `progress` is where the run starts (resumed or 0)."""

    def stepped(self, progress: "Progress", total_steps: int, loss: float) -> None:
        """An optimizer step is done; `loss` is its batch's mean per-sample loss."""

    def validated(self, progress: "Progress", errors: dict[str, float]) -> None:
        """A validation is done: held-out denoising MSE of each member, each merge baseline ("weighted merge
        (r=...)", "MBW"; --merge-baselines), "block average" and "AFA"."""

    def should_stop(self) -> bool:
        return False


@dataclass
class TrainingOutcome:
    """How a run ended. `output` is the weights file written (None when it was stopped); `state_path` the last
    training state saved (what `--resume latest` continues)."""

    output: Path | None
    state_path: Path | None
    steps: int
    total_steps: int
    stopped: bool
    skip_report: datasets.SkipReport


def main(argv: list[str] | None = None) -> int:
    train(parse_args(argv))
    return 0


def train(args: argparse.Namespace, events: TrainingEvents | None = None,
          members: list[torch.nn.Module | None] | None = None,
          member_refs: list[MemberRef] | None = None, frozen: FrozenModels | None = None) -> TrainingOutcome:
    """Runs the training `args` (from `parse_args`) describe.

    Args:
        events: progress and stop requests (TrainingEvents; None: none).
        members: UNets already in memory for some of `args.members` (None entries are read from their files), e.g.
            the WebUI's loaded and cached ones: they must hold exactly the file's UNet weights (the weights file is
            bound to the files' sha256), and are used in their own dtype and device, frozen.
        member_refs: the member files' names and sha256 when the caller knows them already (the WebUI's hash
            cache), so the files are not hashed again; None: hashed here.
        frozen: the members, VAE, text encoders and schedule already prepared by a host that has no member files
            (ComfyUI's loaded models, afa/comfyui/training.py); `args.members` then only names them, and `members`
            and `member_refs` are not used. None: loaded from `args.members`.
    """
    events = events or TrainingEvents()
    distributed = Distributed(args.device)
    device = distributed.device
    member_dtype, autocast, use_scaler = precision(args.mixed_precision, device)
    state, state_path = load_resume_state(args) if args.resume else (None, None)

    # Members and their text encoders (frozen), and VAE and schedule of the first member.
    records = None
    if frozen is None and getattr(args, "family", "unet") == "flux":
        # FLUX: the captions are encoded (and the encoders freed) before the members load
        records = index_records(args)
        distributed.print_main(f"loading {len(args.members)} FLUX members on {device} ({str(member_dtype)[6:]})")
        frozen = flux_training.load_frozen_flux(
            args, [record.caption for record in records[0] + records[1]], device, member_dtype,
            flux_training.text_encoder_dtype(device, args.mixed_precision != "no"), distributed.is_main,
            distributed.barrier, distributed.print_main, member_refs)
    elif frozen is None:
        distributed.print_main(f"loading {len(args.members)} members on {device} ({str(member_dtype)[6:]})")
        frozen = load_frozen_models(args.members, args.config, device, member_dtype, members=members,
                                    member_refs=member_refs,
                                    text_encoder_dtype=text_encoder_dtype(member_dtype, device),
                                    components=args.components)
    flux = getattr(frozen, "family", "unet") == "flux"
    if state is not None:
        check_resumed_members(state, state_path, frozen.member_refs)

    # the latent cache is keyed by the VAE's file: the first member's, or --components' for a UNet-only member
    # (FLUX: --vae's)
    if flux:
        vae_identity = file_sha256(frozen.vae_file)
    else:
        vae_identity = (file_sha256(frozen.base_checkpoint)
                        if frozen.base_checkpoint not in (None, Path(args.members[0]))
                        else frozen.member_refs[0].sha256)
    train_set, val_set, skip_report = build_datasets(args, distributed, frozen.vae, vae_identity, records)
    batches = EpochBatches(len(train_set), args.batch_size, args.gradient_accumulation, distributed.rank,
                           distributed.world_size, args.seed)
    if len(batches) == 0:
        raise AfaError(f"{len(train_set)} training images do not fill one batch of {args.batch_size}")
    total_steps = args.max_steps or args.epochs * len(batches)

    # The aggregator. Resuming: the architecture comes from the saved state, not from the command line.
    config = (AggregatorConfig.from_dict(state["config"], source=str(state_path)) if state is not None
              else aggregator_config(args, frozen))
    aggregator, ensemble, model = build_ensemble(config, frozen.members, args.seed, args.gradient_checkpointing,
                                                 distributed, frozen.runner)
    if flux:
        distributed.print_main(
            f"SABW: {config.design} design, {sum(p.numel() for p in aggregator.parameters()):,} parameters, "
            f"{config.num_double_blocks} double + {config.num_blocks - config.num_double_blocks} single blocks; "
            f"rectified flow, t {frozen.timestep_sampling} with FLUX's resolution shift, guidance {frozen.guidance}; "
            f"text tokens mixed by {config.text_mixing}; latents: the VAE posterior's {args.latents}; crop: "
            f"{args.crop}")
    else:
        distributed.print_main(
            f"SABW: {config.design} design, {sum(p.numel() for p in aggregator.parameters()):,} parameters; text "
            f"conditioning {config.text_conditioning} ({frozen.distinct_text_encoders} distinct text encoders), CLIP "
            f"skip {config.clip_skip}; latents: the VAE posterior's {args.latents}; crop: {args.crop}")
    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    scaler = grad_scaler(use_scaler)
    progress = Progress()
    if state is not None:
        progress = restore_training_state(state, aggregator, optimizer, scaler)
        distributed.print_main(f"resumed from {state_path} at step {progress.step} (epoch {progress.epoch + 1}, "
                               f"batch {progress.batch_in_epoch})")

    if flux:
        micro_batch_loss = flux_training.FluxMicroBatchLoss(frozen, args.latents == "sample", args.seed,
                                                            args.caption_dropout, args.batch_size, autocast, device,
                                                            distributed.world_size)
    else:
        micro_batch_loss = MicroBatchLoss(frozen, config, args.latents == "sample", args.seed, args.caption_dropout,
                                          args.batch_size, autocast, distributed)
    run_log = RunLog(args.run_dir, distributed.is_main, args.tensorboard)
    bar = tqdm(total=total_steps, initial=progress.step, disable=not distributed.is_main, desc="training SABW",
               dynamic_ncols=True)
    validated_at, merge_errors = None, None

    def run_validation() -> None:
        nonlocal validated_at, merge_errors
        if not (distributed.is_main and len(val_set)) or validated_at == progress.step:
            return
        if merge_errors is None:  # the merges do not change during the run: searched and measured once
            merge_errors = merge_baseline_errors(frozen, val_set, args.merge_baselines, args.batch_size, args.seed,
                                                 device, autocast, config.clip_skip, bar.write)
        errors = validate(ensemble, val_set, frozen, args.batch_size, args.seed, device, autocast)
        members = {ref.name: errors[ref.name] for ref in frozen.member_refs}
        errors = {**members, **merge_errors, **errors}  # the rows in order: members, merges, averages, AFA
        validated_at = progress.step
        run_log.write({"epoch": progress.epoch + 1, "step": progress.step, "validation": errors})
        bar.write(f"step {progress.step} (epoch {progress.epoch + 1}) validation MSE: " + ", ".join(
            f"{name} {value:.5f}" for name, value in errors.items()))
        events.validated(progress, errors)
        aggregator.train()

    def save_training_state() -> Path:
        return save_state(args.run_dir, training_state(aggregator, optimizer, scaler, progress, frozen.member_refs,
                                                       args), progress.step, args.keep_checkpoints)

    events.started(progress, total_steps, len(train_set), skip_report)
    started = time.time()
    aggregator.train()
    loss, stopped, saved_at = None, False, None
    while progress.step < total_steps and not stopped:
        micro_batches = iter(epoch_loader(train_set, batches, progress.epoch, progress.batch_in_epoch,
                                          args.num_workers))
        while progress.batch_in_epoch < len(batches) and progress.step < total_steps:
            if events.should_stop():
                stopped = True
                break
            step_batches = [next(micro_batches) for _ in range(args.gradient_accumulation)]
            for batch in step_batches:
                skip_report.add_items(batch["skipped"])
            loss = train_step(model, optimizer, scaler, step_batches, micro_batch_loss, progress.epoch, distributed)
            progress.step += 1
            progress.batch_in_epoch += 1
            bar.set_postfix(loss=f"{loss:.4f}", epoch=progress.epoch + 1)
            bar.update(1)
            run_log.write({"step": progress.step, "epoch": progress.epoch + 1, "loss": loss,
                           "lr": args.learning_rate, "seconds": round(time.time() - started, 2)})
            events.stepped(progress, total_steps, loss)
            if progress.step % args.save_every == 0 and distributed.is_main:
                state_path, saved_at = save_training_state(), progress.step
            if args.validate_every and progress.step % args.validate_every == 0:
                run_validation()
        if stopped:
            break
        if progress.batch_in_epoch >= len(batches):  # epoch complete: validate, then move on
            run_validation()
            distributed.barrier()
            progress.epoch += 1
            progress.batch_in_epoch = 0
            aggregator.train()
    bar.close()

    output = None
    if distributed.is_main:
        if saved_at != progress.step:
            state_path = save_training_state()
        if stopped:
            print(f"stopped at step {progress.step} of {total_steps}; the training state is {state_path} "
                  f"(--resume latest continues it)")
        else:
            run_validation()  # the end of a run that did not end an epoch
            output = save_weights(args.output, aggregator, frozen.member_refs, training={
                "steps": progress.step, "epochs": round(progress.step / len(batches), 3),
                "dataset_size": len(train_set), "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                "resolution": args.resolution, "latents": args.latents, "crop": args.crop,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "processes": distributed.world_size, "final_loss": loss,
                **({"objective": "rectified flow (velocity)", "guidance": frozen.guidance,
                    "timestep_sampling": frozen.timestep_sampling} if flux else {}),
            }, dtype=torch.float16 if args.save_dtype == "fp16" else torch.float32)
            print(f"wrote {output} ({progress.step} steps)")
        if skip_report.total:
            print(skip_report.summary())
    run_log.close()
    distributed.close()
    return TrainingOutcome(output=output, state_path=state_path, steps=progress.step, total_steps=total_steps,
                           stopped=stopped, skip_report=skip_report)


if __name__ == "__main__":
    sys.exit(run(main))
