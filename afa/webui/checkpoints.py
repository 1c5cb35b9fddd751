"""Member names -> the WebUI's installed checkpoints (CheckpointInfo), their sha256, shapes and labels.

Names resolve exactly like the WebUI's own checkpoint lookup (`sd_models.get_closet_checkpoint_match`: title,
file name, name without extension, old hash, shorthash or sha256, then the shortest title containing the text), so
only installed checkpoints can ever be members; text that is a path (absolute, or with `..`) is refused outright.

Hashes come from the WebUI's CheckpointInfo (`calculate_shorthash()`, kept in the WebUI's hash cache), so a file
the WebUI already hashed is never hashed again and the loaded checkpoint is recognised as a member by its sha256.
"""

from __future__ import annotations

import functools
import os

from modules import sd_models, shared

from afa.errors import AfaError, CheckpointError, MembersMismatchError
from afa.members import MAX_MEMBERS, MIN_MEMBERS, MemberRef, read_unet_shapes, unet_fingerprint_of_file

from . import folders


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
    if len(infos) < MIN_MEMBERS:
        raise AfaError(f"an ensemble needs at least {MIN_MEMBERS} members, got {len(infos)}"
                       + (f" ({', '.join(label(i) for i in infos)})" if infos else "")
                       + "; choose them in the accordion or pick a weights file")
    if len(infos) > MAX_MEMBERS:
        raise AfaError(f"AFA ensembles {MIN_MEMBERS} to {MAX_MEMBERS} members, got {len(infos)}")
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


def unet_fingerprint(info) -> str:
    """The UNet fingerprint of an installed checkpoint (afa.hashing.unet_fingerprint), what binds weights trained in
    ComfyUI; read from the file once per file version (its sha256)."""
    return _unet_fingerprint(info.filename, ensure_hashed(info))


@functools.lru_cache(maxsize=32)
def _unet_fingerprint(filename: str, sha256: str | None) -> str:
    return unet_fingerprint_of_file(filename)


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


def loaded_base():
    """The WebUI's loaded model, without triggering a load (`shared.sd_model` would load one if none is)."""
    return sd_models.model_data.sd_model if hasattr(sd_models, "model_data") else shared.sd_model
