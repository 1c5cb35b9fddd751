"""The cache of member UNets (and the SABW weights) between jobs, as "Keep members loaded" says.

Members other than the loaded checkpoint are read with the core's `load_member`, which reads only the
`model.diffusion_model.*` tensors, one at a time, each cast to the member precision as it is read, into a UNet built
on the meta device. `sd_models.read_state_dict` would read the whole checkpoint (VAE and text encoder too, often
fp32) before anything could be cast: all ~4.3 GB of an fp32 SD 1.5 file in RAM, for a 1.72 GB fp16 UNet.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch

from modules import devices

from afa.members import MemberRef, config_beside, load_member, read_prefixed_tensors
from afa.weights import load_weights

from .settings import CACHE_NONE, CACHE_VRAM


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
        self.text_encoders: dict[tuple, dict] = {}  # (file, mtime, dtype) -> its cond_stage_model.* tensors

    @staticmethod
    def key(info, dtype: torch.dtype) -> tuple:
        return os.path.abspath(info.filename), os.path.getmtime(info.filename), str(dtype)

    def keep_only(self, keys) -> None:
        """Drops every cached member but `keys` (so switching member sets never accumulates UNets in RAM)."""
        keys = set(keys)
        for key in [k for k in self.unets if k not in keys]:
            del self.unets[key]
        files = {key[:2] for key in keys}
        for key in [k for k in self.text_encoders if k[:2] not in files]:
            del self.text_encoders[key]

    def get(self, info, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """The member's UNet on `device`, from the cache or read from its file."""
        key = self.key(info, dtype)
        unet = self.unets.get(key)
        if unet is None:
            unet = load_member(info.filename, dtype=dtype, device="cpu", config=config_beside(info.filename))
            self.unets[key] = unet
        return unet.to(device)

    def get_text_encoder(self, info, dtype: torch.dtype, prefix: str = "cond_stage_model.") \
            -> dict[str, torch.Tensor]:
        """The member's text-encoder tensors (keys starting with `prefix`: `cond_stage_model.`, SDXL's
        `conditioner.`; full keys, on the CPU, floating point ones cast to `dtype` as they are read); {} when its
        file has none. Kept while the member is: per-member text conditioning reads them in every job."""
        key = self.key(info, dtype) + (prefix,)
        if key not in self.text_encoders:
            for other in [k for k in self.text_encoders if k[:2] == key[:2]]:
                del self.text_encoders[other]  # one precision per member
            self.text_encoders[key] = {prefix + name: tensor for name, tensor
                                       in read_prefixed_tensors(info.filename, prefix, dtype).items()}
        return self.text_encoders[key]

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
        self.text_encoders.clear()
        gc.collect()
        devices.torch_gc()
        return freed

    def stats(self) -> CacheStats:
        modules = list(self.unets.values()) + [aggregator for aggregator, _ in self.aggregators.values()]
        tensors = [t for module in modules for t in module.state_dict().values()]
        tensors += [t for encoder in self.text_encoders.values() for t in encoder.values()]
        return CacheStats(len(self.unets), len(tensors), sum(t.numel() * t.element_size() for t in tensors))


cache = MemberCache()
