"""Full-file sha256 of checkpoints, computed once and cached -- the WebUI's checkpoint hash; and the fingerprint of a
UNet's own tensors, for hosts where a model does not carry its file (ComfyUI).

The WebUI identifies a checkpoint by the sha256 of the whole file (its "shorthash" is the first 10 hex digits);
weights files record their members by it. Hashing a 2-7 GB checkpoint takes seconds to a minute, so results are
cached in memory and in a JSON file keyed by path, size and modification time (like the WebUI's cache.json).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

import torch

CACHE_ENV = "AFA_HASH_CACHE"
_lock = threading.Lock()
_memory: dict[str, dict] = {}


def shorthash(sha256: str) -> str:
    return sha256[:10]


def _cache_file() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "afa" / "sha256.json")


def _read_disk_cache(cache_file: Path) -> dict:
    try:
        return json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_disk_cache(cache_file: Path, entries: dict) -> None:
    """Best effort: the cache is an optimisation, so an unwritable cache folder is not an error."""
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cache_file.parent, delete=False, suffix=".tmp") as handle:
            json.dump(entries, handle, indent=1, sort_keys=True)
        os.replace(handle.name, cache_file)
    except OSError:
        pass


def file_sha256(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The sha256 hex digest of the whole file, from the cache when the file is unchanged."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = str(path)
    with _lock:
        entry = _memory.get(key)
        if entry is None:
            entry = _read_disk_cache(_cache_file()).get(key)
        if entry is not None and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            _memory[key] = entry
            return entry["sha256"]

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    entry = {**stamp, "sha256": digest.hexdigest()}
    with _lock:
        _memory[key] = entry
        cache_file = _cache_file()
        entries = _read_disk_cache(cache_file)
        entries[key] = entry
        _write_disk_cache(cache_file, entries)
    return entry["sha256"]


FINGERPRINT_SAMPLES = 1024
"""Evenly spaced elements read from each tensor for the UNet fingerprint."""


def unet_fingerprint(names: Iterable[str], get_tensor: Callable[[str], torch.Tensor]) -> str:
    """The sha256 of a UNet's own tensors: each tensor's name (UNet-relative, e.g. `input_blocks.0.0.weight`), shape
    and up to FINGERPRINT_SAMPLES evenly spaced elements, in name order, the elements rounded to float16.

    A ComfyUI MODEL does not carry its file, so the file's sha256 cannot bind it to a weights file; this can, from
    the file (its UNet tensors) and from the loaded model alike. Float16 rounding makes it independent of the
    precision a host loads the model in (an fp16 file loaded as fp32 or the reverse gives the same fingerprint);
    sampling keeps it fast for 12B-parameter models. Fine-tunes change every tensor, so a sample tells them apart.
    Weights cast to fp8 on loading have another fingerprint (the rounding differs). Tensors are read one at a time
    through `get_tensor(name)` (a state dict's `__getitem__`, or a file reader), so a file is never held whole.
    """
    digest = hashlib.sha256()
    for name in sorted(names):
        tensor = get_tensor(name)
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // FINGERPRINT_SAMPLES)
        sample = flat[::step][:FINGERPRINT_SAMPLES].to(device="cpu", dtype=torch.float16)
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()
