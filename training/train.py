#!/usr/bin/env python
"""Train SABW weights for a set of member checkpoints (paper section 3.4; defaults from section 4.1).

    python training/train.py --members A.safetensors B.safetensors --data my-captioned-images/

Members, VAE and text encoder are frozen; only the aggregator trains, on the ordinary denoising loss of the
ensembled UNet. The VAE, text encoder and noise schedule come from the first member. The result is a weights file for
the WebUI extension, bound to the members by their sha256 (by default into the WebUI's `models/AFA/` when this
extension sits in a WebUI, else `--output`).

Runs unchanged under `torchrun --nproc_per_node K` (DDP; gloo on CPU, nccl on GPU). `--batch-size` is the global
batch per optimizer step, split over ranks and `--gradient-accumulation` micro-steps; every sample's timestep, noise
and caption dropout are drawn from its own seeded generator (training/diffusion.py), so the number of processes and
resuming do not change the result.
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
from pathlib import Path

EXTENSION_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(EXTENSION_ROOT))

from afa.host import find_webui  # noqa: E402  (importing afa puts a WebUI's vendored ldm on the path)

WEBUI = find_webui(EXTENSION_ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402
from tqdm import tqdm  # noqa: E402

from afa import AfaError, Aggregator, AggregatorConfig, EnsembleUNet, MemberRef, default_config, save_weights  # noqa: E402
from afa.members import MAX_MEMBERS, MIN_MEMBERS  # noqa: E402
from afa.modes import AVERAGE, LAST_BLOCK, SABW, parse_mode, trained_mode  # noqa: E402
from training import data as datasets  # noqa: E402
from training.metrics import denoising_errors, prepare_batch  # noqa: E402
from training.sd_checkpoint import load_frozen_models  # noqa: E402

STATE_FORMAT = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    group = parser.add_argument_group("members and data")
    group.add_argument("--members", nargs="+", required=True, help="2 to 6 member checkpoints (.safetensors/.ckpt)")
    group.add_argument("--config", help="ldm yaml of the members (default: <name>.yaml beside each, else inferred)")
    group.add_argument("--data", required=True, help="folder of images with .txt captions or WebUI PNGs, or a "
                       "JSONL/CSV manifest of image path + caption")
    group.add_argument("--val-data", help="held-out data in the same formats (default: --val-split of --data)")
    group.add_argument("--val-split", type=float, default=0.05, help="fraction of --data held out for validation "
                       "when --val-data is not given")
    group.add_argument("--resolution", type=int, default=512, help="images are resized and center-cropped to this")
    group.add_argument("--cache-latents", action="store_true", help="encode every image with the VAE once and "
                       "train on cached latents")
    group.add_argument("--latent-cache-dir", help="where cached latents go (default: <run-dir>/latent-cache)")

    group = parser.add_argument_group("aggregator (paper ablations as flags)")
    group.add_argument("--mode", choices=[SABW.name, LAST_BLOCK.name], default=SABW.name, help="SABW after every block, or "
                       "only on the members' predictions")
    group.add_argument("--no-spatial", action="store_true", help="one weight per member per block, no maps")
    group.add_argument("--no-timestep", action="store_true", help="SABW without the timestep embedding")
    group.add_argument("--no-text", action="store_true", help="SABW without cross-attention to the prompt")
    group.add_argument("--hidden-channels", type=int, default=AggregatorConfig.hidden_channels,
                       help="SABW width (multiple of 32)")
    group.add_argument("--max-resolution", type=int, default=AggregatorConfig.max_resolution,
                       help="SABW computes weights on features pooled to at most this size (0 = full size)")

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
    group.add_argument("--keep-checkpoints", type=int, default=3, help="training states kept (oldest deleted)")
    group.add_argument("--resume", help="'latest' (the run dir's newest state) or a state file")
    group.add_argument("--save-dtype", choices=["fp16", "fp32"], default="fp16", help="dtype of the weights file")
    group.add_argument("--tensorboard", action="store_true", help="also log to TensorBoard (if installed)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)

    if not MIN_MEMBERS <= len(args.members) <= MAX_MEMBERS:
        parser.error(f"--members takes {MIN_MEMBERS} to {MAX_MEMBERS} checkpoints, got {len(args.members)}")
    if args.batch_size % args.gradient_accumulation:
        parser.error("--batch-size must be a multiple of --gradient-accumulation")
    if not 0 <= args.caption_dropout <= 1:
        parser.error("--caption-dropout must be in [0, 1]")
    if args.max_steps is None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    args.max_resolution = args.max_resolution or None
    run_name = Path(args.output).stem if args.output else f"afa-{len(args.members)}members"
    if args.output is None:
        folder = WEBUI.models_dir / "AFA" if WEBUI is not None else Path.cwd()
        args.output = str(folder / f"{run_name}.safetensors")
    args.run_dir = Path(args.run_dir or Path("runs") / run_name)
    return args


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

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1:
            dist.destroy_process_group()


def precision(args, device: torch.device) -> tuple[torch.dtype, contextlib.AbstractContextManager, bool]:
    """(members' dtype, autocast context, use GradScaler) for --mixed-precision."""
    if args.mixed_precision == "no":
        return torch.float32, contextlib.nullcontext(), False
    dtype = torch.float16 if args.mixed_precision == "fp16" else torch.bfloat16
    if device.type != "cuda":
        if dtype == torch.float16:
            raise SystemExit("--mixed-precision fp16 needs a CUDA device; use bf16 or no on the CPU")
        # CPU autocast has no fp32 policy for ldm's GroupNorm with half weights: keep members fp32, compute in bf16.
        return torch.float32, torch.autocast("cpu", dtype=dtype), False
    return dtype, torch.autocast("cuda", dtype=dtype), dtype == torch.float16


class EpochBatches:
    """The global batches of an epoch: a seeded permutation cut into `batch_size` slices (the tail that does not
    fill a batch is dropped). Each global batch is split into accumulation micro-steps, and each micro-step into
    one contiguous shard per rank."""

    def __init__(self, dataset_size: int, batch_size: int, accumulation: int, rank: int, world_size: int,
                 seed: int):
        if batch_size % (accumulation * world_size):
            raise SystemExit(f"--batch-size {batch_size} must be a multiple of --gradient-accumulation x processes "
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


def build_datasets(args, distributed: Distributed, vae, member_ref: MemberRef):
    """(train dataset, validation dataset, skip report). Items are {"latents" | "pixel_values", "caption"}."""
    report = datasets.SkipReport()
    records = datasets.index_captioned_images(args.data, report)
    if args.val_data:
        train_records, val_records = records, datasets.index_captioned_images(args.val_data, report)
    else:
        train_records, val_records = datasets.split_for_validation(records, args.val_split, args.seed)
    if not train_records:
        raise SystemExit(f"no usable training images in {args.data}\n{report.summary()}")
    if not args.cache_latents:
        return (datasets.ImageCaptionDataset(train_records, args.resolution),
                datasets.ImageCaptionDataset(val_records, args.resolution), report)

    cache_dir = Path(args.latent_cache_dir or args.run_dir / "latent-cache")

    def encode_images(images):
        return vae.encode(images.to(distributed.device, next(vae.parameters()).dtype)).float()

    caches = []
    for split_records in (train_records, val_records):
        if distributed.is_main:  # one process encodes; the others open the finished cache
            datasets.LatentCache.open_or_build(split_records, resolution=args.resolution, encode=encode_images,
                                               vae_identity=member_ref.sha256, cache_dir=cache_dir,
                                               num_workers=args.num_workers)
        distributed.barrier()
        cache = datasets.LatentCache.open_or_build(split_records, resolution=args.resolution, encode=encode_images,
                                                   vae_identity=member_ref.sha256, cache_dir=cache_dir)
        report.merge(cache.skip_report)
        caches.append(cache)
    return caches[0], caches[1], report


class IndexedItems(torch.utils.data.Dataset):
    """Wraps a dataset so every item carries its index (the key of its random draws); unloadable items stay
    `SkippedItem`s."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        item = self.dataset[index]
        return item if isinstance(item, datasets.SkippedItem) else {**item, "index": index}


def collate(items: list) -> dict:
    """Stacks loaded items; skipped ones travel in "skipped" so worker processes can report them."""
    loaded = [item for item in items if not isinstance(item, datasets.SkippedItem)]
    batch = {"skipped": [item for item in items if isinstance(item, datasets.SkippedItem)],
             "indices": [item["index"] for item in loaded], "captions": [item["caption"] for item in loaded]}
    for key in ("latents", "pixel_values"):
        if loaded and key in loaded[0]:
            batch[key] = torch.stack([item[key] for item in loaded])
    return batch


# -- checkpoints --------------------------------------------------------------------------------------------------

def save_state(run_dir: Path, state: dict, step: int, keep: int) -> Path:
    """Writes training state N (temporary name, then rename), points `latest.json` at it, deletes old states."""
    folder = run_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"state-{step:08d}.pt"
    temporary = path.with_name(path.name + ".tmp")
    torch.save(state, temporary)
    os.replace(temporary, path)
    pointer = folder / "latest.json"
    pointer.with_name("latest.json.tmp").write_text(json.dumps({"state": path.name, "step": step}))
    os.replace(pointer.with_name("latest.json.tmp"), pointer)
    for old in sorted(folder.glob("state-*.pt"))[:-keep]:
        old.unlink()
    return path


def resolve_resume(run_dir: Path, resume: str) -> Path:
    if resume != "latest":
        return Path(resume)
    pointer = run_dir / "checkpoints" / "latest.json"
    if not pointer.is_file():
        raise SystemExit(f"--resume latest: no training state in {run_dir / 'checkpoints'}")
    return pointer.parent / json.loads(pointer.read_text())["state"]


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate((3, tuple(states["python"]), None))
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# -- the run ------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed = Distributed(args.device)
    device = distributed.device
    log = print if distributed.is_main else (lambda *a, **k: None)
    member_dtype, autocast, use_scaler = precision(args, device)

    # Members (frozen), and VAE, text encoder and schedule of the first member.
    log(f"loading {len(args.members)} members on {device} ({str(member_dtype)[6:]})")
    frozen = load_frozen_models(args.members, args.config, device, member_dtype)
    member_refs, members, layout = frozen.member_refs, frozen.members, frozen.layout
    vae, text_encoder, schedule = frozen.vae, frozen.text_encoder, frozen.schedule
    context_dim = text_encoder.config.hidden_size

    train_set, val_set, skip_report = build_datasets(args, distributed, vae, member_refs[0])
    batches = EpochBatches(len(train_set), args.batch_size, args.gradient_accumulation, distributed.rank,
                           distributed.world_size, args.seed)
    if len(batches) == 0:
        raise SystemExit(f"{len(train_set)} training images do not fill one batch of {args.batch_size}")
    total_steps = args.max_steps or args.epochs * len(batches)

    # Resume: the architecture comes from the saved state, not from the command line.
    state = None
    if args.resume:
        state_path = resolve_resume(args.run_dir, args.resume)
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        if state.get("format") != STATE_FORMAT:
            raise SystemExit(f"{state_path}: not a training state of this trainer (format {state.get('format')})")
        saved_members = [MemberRef(**m) for m in state["members"]]
        if [m.sha256 for m in saved_members] != [m.sha256 for m in member_refs]:
            raise SystemExit(f"{state_path}: trained with members {', '.join(map(str, saved_members))}, "
                             f"given {', '.join(map(str, member_refs))}")
        config = AggregatorConfig.from_dict(state["config"], source=str(state_path))
    else:
        config = default_config(layout, len(members), context_dim, hidden_channels=args.hidden_channels,
                                max_resolution=args.max_resolution, spatial=not args.no_spatial,
                                use_timestep=not args.no_timestep, use_text=not args.no_text,
                                only_last_block=parse_mode(args.mode) is LAST_BLOCK)
    torch.manual_seed(args.seed)  # the same initial aggregator on every rank
    aggregator = Aggregator(config).to(device)
    ensemble = EnsembleUNet(members, aggregator, trained_mode(config.only_last_block))
    ensemble.gradient_checkpointing = args.gradient_checkpointing
    model = ensemble
    if distributed.world_size > 1:
        # Only SABW trains; keep DDP from broadcasting the frozen members' gigabytes at start-up.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            ensemble, [f"members.{name}" for name, _ in ensemble.members.named_parameters()])
        model = DistributedDataParallel(ensemble, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(aggregator.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    with warnings.catch_warnings():  # torch.amp.GradScaler("cuda") is the new spelling, but needs torch >= 2.3
        warnings.simplefilter("ignore", FutureWarning)
        scaler = torch.cuda.amp.GradScaler(enabled=use_scaler)

    step, epoch, batch_in_epoch = 0, 0, 0
    if state is not None:
        aggregator.load_state_dict(state["aggregator"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        restore_rng_states(state["rng"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        log(f"resumed from {state_path} at step {step} (epoch {epoch + 1}, batch {batch_in_epoch})")

    args.run_dir.mkdir(parents=True, exist_ok=True)
    log_file = open(args.run_dir / "log.jsonl", "a", encoding="utf-8") if distributed.is_main else None
    tensorboard = None
    if args.tensorboard and distributed.is_main:
        try:
            from torch.utils.tensorboard import SummaryWriter
            tensorboard = SummaryWriter(str(args.run_dir / "tensorboard"))
        except ImportError:
            log("--tensorboard: tensorboard is not installed; logging to log.jsonl only")

    def write_log(record: dict) -> None:
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        if tensorboard is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    tensorboard.add_scalar(key, value, record.get("step", step))

    def training_state() -> dict:
        return {"format": STATE_FORMAT, "aggregator": aggregator.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(), "rng": rng_states(), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "config": config.to_dict(),
                "members": [{"name": m.name, "sha256": m.sha256} for m in member_refs], "args": vars_for_state(args)}

    def micro_step_loss(batch: dict, epoch: int) -> torch.Tensor | None:
        """Sum of the per-sample MSEs of this rank's micro-batch, scaled so that DDP's gradient average over ranks
        and the accumulation over micro-steps give the mean over the global batch."""
        if not batch["indices"]:
            return None
        inputs = prepare_batch(batch, vae, text_encoder, schedule, args.seed, device, epoch, args.caption_dropout)
        with autocast:
            prediction = model(inputs["noisy"], inputs["timesteps"], inputs["context"])
        per_sample = (prediction.float() - inputs["target"].float()).square().mean(dim=(1, 2, 3))
        return per_sample.sum() * distributed.world_size / args.batch_size

    progress = tqdm(total=total_steps, initial=step, disable=not distributed.is_main, desc="training SABW",
                    dynamic_ncols=True)
    started = time.time()
    aggregator.train()
    loss_value = None
    while step < total_steps:
        loader = torch.utils.data.DataLoader(IndexedItems(train_set), collate_fn=collate,
                                             batch_sampler=list(batches.rank_micro_batches(epoch, batch_in_epoch)),
                                             num_workers=args.num_workers)
        micro_batches = iter(loader)
        while batch_in_epoch < len(batches) and step < total_steps:
            loss_sum = torch.zeros((), device=device)
            for micro in range(args.gradient_accumulation):
                batch = next(micro_batches)
                skip_report.add_items(batch["skipped"])
                last_micro = micro == args.gradient_accumulation - 1
                sync = contextlib.nullcontext() if last_micro or distributed.world_size == 1 else model.no_sync()
                with sync:
                    loss = micro_step_loss(batch, epoch)
                    if loss is None:  # every image of this micro-batch was unreadable
                        loss = sum(p.sum() * 0.0 for p in aggregator.parameters())  # keeps DDP's reducer in step
                    scaler.scale(loss).backward()
                loss_sum += loss.detach()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_in_epoch += 1
            if distributed.world_size > 1:
                dist.all_reduce(loss_sum)
                loss_sum /= distributed.world_size
            loss_value = loss_sum.item()
            progress.set_postfix(loss=f"{loss_value:.4f}", epoch=epoch + 1)
            progress.update(1)
            write_log({"step": step, "epoch": epoch + 1, "loss": loss_value, "lr": args.learning_rate,
                       "seconds": round(time.time() - started, 2)})
            if step % args.save_every == 0 and distributed.is_main:
                save_state(args.run_dir, training_state(), step, args.keep_checkpoints)
        if batch_in_epoch >= len(batches):  # epoch complete: validate, then move on
            if distributed.is_main and len(val_set):
                errors = validate(ensemble, val_set, args, vae, text_encoder, schedule, member_refs, device, autocast)
                write_log({"epoch": epoch + 1, "step": step, "validation": errors})
                progress.write(f"epoch {epoch + 1} validation MSE: " + ", ".join(
                    f"{name} {value:.5f}" for name, value in errors.items()))
            distributed.barrier()
            epoch += 1
            batch_in_epoch = 0
            aggregator.train()
    progress.close()

    if distributed.is_main:
        save_state(args.run_dir, training_state(), step, args.keep_checkpoints)
        output = save_weights(args.output, aggregator, member_refs, training={
            "steps": step, "epochs": round(step / len(batches), 3), "dataset_size": len(train_set),
            "batch_size": args.batch_size, "learning_rate": args.learning_rate, "resolution": args.resolution,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "processes": distributed.world_size, "final_loss": loss_value,
        }, dtype=torch.float16 if args.save_dtype == "fp16" else torch.float32)
        log(f"wrote {output} ({step} steps)")
        if skip_report.total:
            log(skip_report.summary())
        if log_file is not None:
            log_file.close()
    distributed.close()
    return 0


def vars_for_state(args) -> dict:
    """The command line, JSON-safe (stored with each training state for reference)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


@torch.no_grad()
def validate(ensemble: EnsembleUNet, val_set, args, vae, text_encoder, schedule, member_refs, device,
             autocast) -> dict[str, float]:
    """Held-out denoising MSE of every member, of block averaging and of the current AFA, on the same draws."""
    ensemble.eval()
    models = {ref.name: member for ref, member in zip(member_refs, ensemble.members)}
    models["block average"] = EnsembleUNet(list(ensemble.members), None, AVERAGE)
    models["AFA"] = ensemble
    loader = torch.utils.data.DataLoader(IndexedItems(val_set), batch_size=args.batch_size, collate_fn=collate,
                                         num_workers=0)
    with autocast:
        errors = denoising_errors(models, loader, vae, text_encoder, schedule, args.seed, device)
    return {name: result["all"] for name, result in errors.items()}


if __name__ == "__main__":
    try:
        sys.exit(main())
    except AfaError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
