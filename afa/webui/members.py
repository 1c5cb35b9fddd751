"""Ensemble members in the WebUI: names -> checkpoints, sha256 binding, and the member cache.

Names resolve exactly like the WebUI's own checkpoint lookup (`sd_models.get_closet_checkpoint_match`: title,
file name, name without extension, old hash, shorthash or sha256, then the shortest title containing the text), so
only installed checkpoints can ever be members; text that is a path (absolute, or with `..`) is refused outright.

Hashes come from the WebUI's CheckpointInfo (`calculate_shorthash()`, kept in the WebUI's hash cache), so a file
the WebUI already hashed is never hashed again and the loaded checkpoint is recognised as a member by its sha256.

Memory: members other than the loaded checkpoint are read with the core's `load_member`, which reads only the
`model.diffusion_model.*` tensors, one at a time, each cast to the member precision as it is read, into a UNet built
on the meta device. `sd_models.read_state_dict` would read the whole checkpoint (VAE and text encoder too, often
fp32) before anything could be cast: all ~4.3 GB of an fp32 SD 1.5 file in RAM, for a 1.72 GB fp16 UNet.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from modules import devices, sd_models, shared

from afa.errors import AfaError, CheckpointError, MembersMismatchError
from afa.members import MemberRef, config_beside, load_member, read_unet_shapes
from afa.weights import load_weights

from . import folders
from .settings import CACHE_NONE, CACHE_VRAM

MAX_MEMBERS = 6


class LoadingInterrupted(AfaError):
    """The user pressed Interrupt while members were loading."""


# -- names ---------------------------------------------------------------------------------------------------------

def resolve_checkpoint(name: str):
    """The installed checkpoint (CheckpointInfo) a member name denotes."""
    text = str(name).strip()
    if not text:
        raise AfaError("an empty member name was given")
    folders.refuse_paths(text, "member")
    info = sd_models.get_closet_checkpoint_match(text)
    if info is None:
        raise CheckpointError(f"member {text!r} is not an installed checkpoint (see the checkpoint list; "
                              f"refresh it if the file was just added)")
    return info


def resolve_members(names) -> list:
    """CheckpointInfos for the member names, in order (2 to MAX_MEMBERS)."""
    infos = [resolve_checkpoint(name) for name in names]
    if len(infos) < 2:
        raise AfaError(f"an ensemble needs at least 2 members, got {len(infos)}"
                       + (f" ({', '.join(label(i) for i in infos)})" if infos else "")
                       + "; choose them in the accordion or pick a weights file")
    if len(infos) > MAX_MEMBERS:
        raise AfaError(f"AFA ensembles 2 to {MAX_MEMBERS} members, got {len(infos)}")
    return infos


def ensure_hashed(info) -> str | None:
    """The checkpoint's sha256 (hashing the file once if the WebUI has not yet); None with --no-hashing."""
    if info.sha256 is None:
        info.calculate_shorthash()
    return info.sha256


def label(info) -> str:
    """`<name> [<shorthash>]` (the WebUI's short title) — how the infotext names a member."""
    return info.short_title


def member_ref(info) -> MemberRef:
    """The member as a weights file records it (name and full sha256)."""
    sha256 = ensure_hashed(info)
    if sha256 is None:
        raise MembersMismatchError(f"cannot check which members SABW weights were trained for: the WebUI runs with "
                                   f"--no-hashing, so {info.name} has no sha256. Remove --no-hashing or use a "
                                   f"mode without weights (Block average, Noise average)")
    return MemberRef(info.name_for_extra, sha256)


def checkpoints_for(refs: list[MemberRef]) -> tuple[list, list[MemberRef]]:
    """The installed checkpoints a weights file's member list names, and the members that are not installed.

    Matching is by sha256. Checkpoints the WebUI has hashed are compared first; a not yet hashed checkpoint is only
    hashed when its name matches the recorded name, so looking up a weights file never hashes the whole library."""
    found, missing = [], []
    checkpoints = list(sd_models.checkpoints_list.values())
    for ref in refs:
        match = next((info for info in checkpoints if info.sha256 == ref.sha256), None)
        if match is None:
            for info in checkpoints:
                if info.sha256 is None and ref.name in (info.name_for_extra, info.model_name) \
                        and ensure_hashed(info) == ref.sha256:
                    match = info
                    break
        (found if match is not None else missing).append(match if match is not None else ref)
    return found, missing


def is_loaded_checkpoint(info, base_info) -> bool:
    """Whether a member is the checkpoint the WebUI has loaded (same sha256, or the same file without hashes)."""
    if base_info is None:
        return False
    if info.sha256 and base_info.sha256:
        return info.sha256 == base_info.sha256
    return os.path.abspath(info.filename) == os.path.abspath(base_info.filename)


# -- shapes --------------------------------------------------------------------------------------------------------

_shapes_cache: dict[tuple, dict] = {}
_SHAPES_CACHE_SIZE = 16


def unet_shapes_of(info) -> dict[str, tuple]:
    """The member's UNet key -> shape map (a .safetensors header only; a .ckpt is read whole), cached per file
    version for the last few checkpoints."""
    key = (os.path.abspath(info.filename), os.path.getmtime(info.filename))
    if key not in _shapes_cache:
        while len(_shapes_cache) >= _SHAPES_CACHE_SIZE:
            del _shapes_cache[next(iter(_shapes_cache))]
        _shapes_cache[key] = read_unet_shapes(info.filename)
    return _shapes_cache[key]


# -- cache -----------------------------------------------------------------------------------------------------------

@dataclass
class CacheStats:
    members: int
    tensors: int
    bytes: int


class MemberCache:
    """Member UNets loaded from their files, kept between jobs as the "Keep members loaded" setting says.

    Keyed by (file, modification time, dtype). Never holds the loaded checkpoint's own UNet (that belongs to the
    WebUI, which may move it to `meta` when it loads another model) — only UNets AFA read itself.
    """

    def __init__(self):
        self.unets: dict[tuple, torch.nn.Module] = {}
        self.aggregators: dict[tuple, tuple] = {}  # (file, mtime, members) -> (Aggregator, WeightsInfo)

    @staticmethod
    def key(info, dtype: torch.dtype) -> tuple:
        return os.path.abspath(info.filename), os.path.getmtime(info.filename), str(dtype)

    def keep_only(self, keys) -> None:
        """Drops every cached member but `keys` (so switching member sets never accumulates UNets in RAM)."""
        keys = set(keys)
        for key in [k for k in self.unets if k not in keys]:
            del self.unets[key]

    def get(self, info, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """The member's UNet on `device`, from the cache or read from its file."""
        key = self.key(info, dtype)
        unet = self.unets.get(key)
        if unet is None:
            unet = load_member(info.filename, dtype=dtype, device="cpu", config=config_beside(info.filename))
            self.unets[key] = unet
        return unet.to(device)

    def get_aggregator(self, path, refs: list[MemberRef], device: torch.device):
        """(Aggregator in float32 on `device`, WeightsInfo) of a weights file trained for exactly `refs`."""
        key = (os.path.abspath(path), os.path.getmtime(path), tuple(ref.sha256 for ref in refs))
        for other in [k for k in self.aggregators if k != key]:
            del self.aggregators[other]  # one weights file at a time
        if key not in self.aggregators:
            # SABW is ~2% of the members' compute and trained in fp32: it stays fp32 whatever the member precision
            self.aggregators[key] = load_weights(path, members=refs, device="cpu", dtype=torch.float32)
        aggregator, info = self.aggregators[key]
        return aggregator.to(device), info

    def park(self, policy: str) -> None:
        """After a member set is deactivated: off the GPU unless the policy keeps members in VRAM."""
        if policy != CACHE_VRAM:
            for unet in self.unets.values():
                unet.to(devices.cpu)
            for aggregator, _ in self.aggregators.values():
                aggregator.to(devices.cpu)

    def trim(self, policy: str) -> None:
        """At the end of a job: forget everything if the policy keeps nothing between jobs."""
        if policy == CACHE_NONE:
            self.clear()

    def clear(self) -> CacheStats:
        """Forgets every member; returns what was freed."""
        freed = self.stats()
        self.unets.clear()
        self.aggregators.clear()
        gc.collect()
        devices.torch_gc()
        return freed

    def stats(self) -> CacheStats:
        modules = list(self.unets.values()) + [aggregator for aggregator, _ in self.aggregators.values()]
        tensors = [t for module in modules for t in module.state_dict().values()]
        return CacheStats(len(self.unets), len(tensors), sum(t.numel() * t.element_size() for t in tensors))


cache = MemberCache()


def loaded_base():
    """The WebUI's loaded model, without triggering a load (`shared.sd_model` would load one if none is)."""
    return sd_models.model_data.sd_model if hasattr(sd_models, "model_data") else shared.sd_model
