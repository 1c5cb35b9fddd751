"""SABW weights files: `.safetensors` whose metadata carries what is needed to rebuild and bind the aggregator.

Metadata (all values are strings, as safetensors requires):
    afa_format_version  "3"
    afa_config          AggregatorConfig as JSON
    afa_members         JSON list of {"name", "sha256"[, "unet"]}, in the order the aggregator's weights refer to
                        them; "unet" is the member's UNet fingerprint (afa.hashing.unet_fingerprint), recorded
                        since ComfyUI support (an optional key: older readers ignore it, older files lack it)
    afa_training        JSON object of training facts (steps, dataset size, date, ...), may be "{}"

Format 2 added the config fields of the paper design, the text conditioning and the CLIP skip; a format 1 file
lacks them and loads with their defaults, which describe what every format 1 file was (the fast design, one shared
text encoding, CLIP skip 1). Format 3 added the members' family (`unet` or `flux`) and FLUX's fields; format 1 and 2
files are all `unet`. A file of one family offered to members of the other is refused (`check_family`).

Loading is strict: every key and shape is checked against the config, a newer format is refused, and a file trained
for other members is refused with both member lists in the message. Listing files reads only the metadata.
"""

from __future__ import annotations

import json
import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .aggregator import Aggregator, AggregatorConfig, check_family
from .errors import MembersMismatchError, WeightsFileError
from .hashing import shorthash
from .members import MemberRef, describe_difference, owned_tensor
from .modes import Mode, trained_mode

FORMAT_VERSION = 3


@dataclass
class WeightsInfo:
    """What a weights file says about itself (its metadata), readable without loading tensors."""

    path: Path
    format_version: int
    config: AggregatorConfig
    members: list[MemberRef]
    training: dict = field(default_factory=dict)

    @property
    def mode(self) -> Mode:
        """The SABW mode these weights were trained for (SABW, or LAST_BLOCK)."""
        return trained_mode(self.config.only_last_block)


def save_weights(path: str | Path, aggregator: Aggregator, members: Sequence[MemberRef],
                 training: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Writes the aggregator's weights with their metadata; written to a temporary name, then renamed, so an
    interrupted save never leaves a truncated file. `dtype` (e.g. torch.float16) casts the stored tensors."""
    path = Path(path)
    if len(members) != aggregator.config.num_members:
        raise ValueError(f"{len(members)} member names for an aggregator of {aggregator.config.num_members} members")
    tensors = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).cpu().contiguous()
               for k, v in aggregator.state_dict().items()}
    metadata = {
        "afa_format_version": str(FORMAT_VERSION),
        "afa_config": json.dumps(aggregator.config.to_dict()),
        "afa_members": json.dumps([{"name": m.name, "sha256": m.sha256, **({"unet": m.unet} if m.unet else {})}
                                   for m in members]),
        "afa_training": json.dumps(training or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file(tensors, str(temporary), metadata=metadata)
    os.replace(temporary, path)
    return path


def _open(path: Path):
    if not path.is_file():
        raise WeightsFileError(f"{path}: weights file not found")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as error:
        raise WeightsFileError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") from None


def _parse_metadata(path: Path, metadata: dict | None) -> WeightsInfo:
    metadata = metadata or {}
    if "afa_format_version" not in metadata:
        raise WeightsFileError(f"{path}: not an AFA weights file (no afa_format_version in its metadata)")
    try:
        version = int(metadata["afa_format_version"])
    except ValueError:
        raise WeightsFileError(f"{path}: bad afa_format_version {metadata['afa_format_version']!r}") from None
    if version > FORMAT_VERSION:
        raise WeightsFileError(f"{path}: weights format version {version} is newer than this AFA supports "
                               f"({FORMAT_VERSION}); update the extension")
    try:
        config = AggregatorConfig.from_dict(json.loads(metadata["afa_config"]), source=str(path))
        members = [MemberRef(str(m["name"]), str(m["sha256"]), str(m["unet"]) if m.get("unet") else None)
                   for m in json.loads(metadata["afa_members"])]
        training = json.loads(metadata.get("afa_training", "{}"))
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, WeightsFileError):
            raise
        raise WeightsFileError(f"{path}: damaged AFA metadata ({type(error).__name__}: {error})") from None
    if len(members) != config.num_members:
        raise WeightsFileError(f"{path}: lists {len(members)} members for an aggregator of {config.num_members}")
    return WeightsInfo(path, version, config, members, training)


def read_weights_info(path: str | Path) -> WeightsInfo:
    """The metadata of a weights file (no tensors are read)."""
    path = Path(path)
    with _open(path) as handle:
        return _parse_metadata(path, handle.metadata())


def bound_by_fingerprint_only(info: WeightsInfo) -> bool:
    """Whether a file names its members by UNet fingerprint alone (trained in ComfyUI, where a MODEL has no file:
    each member's "sha256" is its fingerprint)."""
    return all(m.unet and m.sha256 == m.unet for m in info.members)


def check_members_match(info: WeightsInfo, members: Sequence[MemberRef],
                        fingerprints_of: Callable[[], Sequence[str]] | None = None) -> list[MemberRef]:
    """Refuses members other than those the file was trained for: compared by sha256, in order. A file trained in
    ComfyUI (`bound_by_fingerprint_only`) is compared by UNet fingerprint instead: the members' own (`MemberRef.unet`)
    or, when they carry none, `fingerprints_of()` (which reads their UNets), in order.

    Returns:
        `members`, with their fingerprints when they were compared by them (what `load_weights` checks again).
    """
    expected = [m.sha256 for m in info.members]
    given = [m.sha256 for m in members]
    if expected == given:
        return list(members)
    if bound_by_fingerprint_only(info) and (fingerprints_of is not None or all(m.unet for m in members)):
        fingerprints = ([m.unet for m in members] if all(m.unet for m in members) else list(fingerprints_of()))
        check_member_fingerprints(info, fingerprints, [m.name for m in members])  # raises naming both lists
        return [dataclasses.replace(m, unet=fingerprint) for m, fingerprint in zip(members, fingerprints)]
    expected_text = ", ".join(str(m) for m in info.members)
    given_text = ", ".join(str(m) for m in members)
    if sorted(expected) == sorted(given):
        raise MembersMismatchError(f"{info.path}: these weights are for the same members in another order; give them "
                                   f"as: {expected_text} (given: {given_text})")
    raise MembersMismatchError(f"{info.path}: these weights were trained for {len(expected)} other members.\n"
                               f"  expected: {expected_text}\n  given:    {given_text}")


def check_member_fingerprints(info: WeightsInfo, fingerprints: Sequence[str], given_names: Sequence[str]) -> bool:
    """Refuses members whose UNet fingerprints (in order) are not those the file records. Returns False, checking
    nothing, when the file records none (written before fingerprints were recorded): the caller says so."""
    if len(fingerprints) != len(info.members):
        raise MembersMismatchError(f"{info.path.name}: these weights are for {len(info.members)} members "
                                   f"({', '.join(m.name for m in info.members)}); {len(fingerprints)} were given")
    if not all(m.unet for m in info.members):
        return False
    expected = [m.unet for m in info.members]
    if list(fingerprints) == expected:
        return True
    found = [f"{name} [{shorthash(fingerprint)}]" for name, fingerprint in zip(given_names, fingerprints)]
    wanted = [f"{m.name} [{shorthash(m.unet)}]" for m in info.members]
    if sorted(fingerprints) == sorted(expected):
        order = [f"member {index + 1}: {m.name}" for index, m in enumerate(info.members)]
        raise MembersMismatchError(f"{info.path.name}: these weights are for the same members in another order; "
                                   f"connect them as {', '.join(order)} (given: {', '.join(found)})")
    raise MembersMismatchError(f"{info.path.name}: these weights were trained for other members (UNet "
                               f"fingerprints differ).\n  expected: {', '.join(wanted)}\n  given:    {', '.join(found)}")


def check_weights_fit(info: WeightsInfo, block_channels: Sequence[int], context_dim: int | None,
                      num_members: int, family: str = "unet") -> None:
    """Refuses a weights file whose aggregator does not fit these members (family, block layout, text width, how
    many): what binds a file whose members cannot be identified (one written before UNet fingerprints, in
    ComfyUI)."""
    config = info.config
    check_family(config, family, info.path.name)
    problems = []
    if config.num_members != num_members:
        problems.append(f"{config.num_members} members, {num_members} given")
    if list(config.block_channels) != list(block_channels):
        kind = "transformers" if family == "flux" else "UNets"
        problems.append(f"{kind} of {len(config.block_channels)} blocks with channels "
                        f"{_short_list(config.block_channels)}, the members have {len(block_channels)} blocks with "
                        f"channels {_short_list(block_channels)}")
    elif context_dim is not None and config.context_dim != context_dim:
        problems.append(f"text conditioning {config.context_dim} wide, the members read {context_dim}")
    if problems:
        raise MembersMismatchError(f"{info.path.name} does not fit these members: it was trained for "
                                   + "; for ".join(problems))


def _short_list(values: Sequence[int]) -> str:
    values = list(values)
    return str(values) if len(values) <= 8 else f"[{', '.join(map(str, values[:6]))}, ..., {values[-1]}]"


def load_weights(path: str | Path, members: Sequence[MemberRef] | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> tuple[Aggregator, WeightsInfo]:
    """Rebuilds the aggregator of a weights file.

    Args:
        members: when given, the file must have been trained for exactly these members (by sha256, in order).
        dtype: cast the aggregator to this dtype (None keeps the stored dtype).
    Returns:
        (aggregator in eval mode, its WeightsInfo).
    """
    path = Path(path)
    with _open(path) as handle:
        info = _parse_metadata(path, handle.metadata())
        if members is not None:
            check_members_match(info, members)
        with torch.device("meta"):
            aggregator = Aggregator(info.config)
        expected = {k: tuple(v.shape) for k, v in aggregator.state_dict().items()}
        found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        describe_difference(expected, found, what=f"{path}: tensors do not match its aggregator config",
                            expected_label="the config", found_label="the file", error=WeightsFileError)
        state_dict = {k: owned_tensor(handle.get_tensor(k), dtype) for k in handle.keys()}
    aggregator.load_state_dict(state_dict, strict=True, assign=True)
    return aggregator.to(device).eval(), info
