"""The trainer as a library, for the hosts' training front ends (the WebUI's training tab, ComfyUI's AFA Train node):
the same code as `python training/train.py`, with errors raised instead of printed, the data snapshot a run trains
on, the disk a run needs, and a run's log read back.

`afa/` never imports `training/`: scripts/afa_script.py hands this module to `afa.webui.training_job.use_trainer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import shutil
from typing import Sequence

import torch

from afa import Aggregator, BlockLayout, default_config
from training import data as datasets
from training.curves import read_run_log  # noqa: F401
from training.sd_checkpoint import native_resolution  # noqa: F401
from training.train import (RESULT_SETTINGS, TrainingEvents, TrainingOutcome, UsageError, parse_args,  # noqa: F401
                            precision, train)

__all__ = ["DATA_SNAPSHOT_NAME", "RESULT_SETTINGS", "TrainingEvents", "TrainingOutcome", "UsageError", "disk_shortfall",
           "member_dtype", "native_resolution", "parse_args", "read_run_log", "saved_arguments", "snapshot_data",
           "state_bytes", "train", "training_image_count"]

DATA_SNAPSHOT_NAME = "data.jsonl"


def snapshot_data(sources: list[str | Path], manifest: str | Path) -> tuple[int, datasets.SkipReport]:
    """Indexes every source (folders of captioned images or WebUI PNGs, or manifests: what `--data` takes) with the
    trainer's own indexer and writes what it found as one JSONL manifest (absolute image path and caption per row),
    under a temporary name and then renamed.

    A run trains on this snapshot, so images saved after it started (the WebUI keeps writing into its outputs
    folders) do not change what a resumed run trains on.

    Returns:
        (the number of captioned images written, the report of what was skipped and why).
    """
    report = datasets.SkipReport()
    records = []
    for source in sources:
        if Path(source).exists():
            records += datasets.index_captioned_images(source, report)
    manifest = Path(manifest)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    temporary = manifest.with_name(manifest.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps({"image": str(Path(record.image_path).resolve()), "caption": record.caption}) + "\n")
    os.replace(temporary, manifest)
    return len(records), report


def training_image_count(manifest: str | Path, val_split: float, seed: int) -> int:
    """How many images of a data snapshot (`snapshot_data`'s manifest) a run trains on: its captioned images less
    those train.py holds out for validation with `--val-split` (the WebUI never sets `--val-data`), chosen as
    train.py chooses them (`index_captioned_images`, `split_for_validation`). Reads the manifest and checks that
    each image file exists; decodes no image, so a file that fails to decode is found only when training reads it.
    """
    records = datasets.index_captioned_images(manifest, datasets.SkipReport())
    train_records, _ = datasets.split_for_validation(records, val_split, seed)
    return len(train_records)


def member_dtype(mixed_precision: str, device: torch.device) -> torch.dtype:
    """The dtype train.py holds the members in for --mixed-precision on `device`."""
    return precision(mixed_precision, device)[0]


def saved_arguments(run_dir: str | Path) -> dict | None:
    """The command line (train.py's `vars`, plus "step") of a run's latest training state, from the run's
    `checkpoints/latest.json`; None when the run has no state to resume."""
    pointer = Path(run_dir) / "checkpoints" / "latest.json"
    try:
        latest = json.loads(pointer.read_text(encoding="utf-8"))
        if not (pointer.parent / latest["state"]).is_file():
            return None
        return {**latest["args"], "step": latest["step"]}
    except (OSError, ValueError, KeyError, TypeError):  # no pointer, or one from before it held the arguments
        return None


def state_bytes(args, layout: BlockLayout, num_members: int, context_dim: int) -> int:
    """The disk a run needs: the trainer keeps `--keep-checkpoints` training states (SABW's weights and Adam's two
    moments, float32) and writes one more before deleting the oldest, plus the weights file."""
    config = default_config(layout, num_members, context_dim, preset=args.preset,
                            hidden_channels=args.hidden_channels, max_resolution=args.max_resolution)
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Aggregator(config).parameters())
    return parameters * 4 * 3 * (args.keep_checkpoints + 1) + parameters * 4


def disk_shortfall(needed: int, folders: Sequence[str | Path]) -> str | None:
    """Why the disk of `folders` (or of their nearest existing parents) cannot hold `needed` bytes; None when it can."""
    for folder in folders:
        existing = Path(folder)
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        if free < needed:
            return (f"not enough free disk in {existing} for the training states: {needed / 2**30:.2f} GB needed, "
                    f"{free / 2**30:.2f} GB free")
    return None
