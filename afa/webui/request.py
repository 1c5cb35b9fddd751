"""What a job asks AFA for, and its resolution against the installed checkpoints and weights files.

`EnsembleRequest` is the script's arguments as the UI, the API (`alwayson_scripts`, positional, documented order
`[enabled, members, weights, mode, show_maps]`) or an X/Y/Z plot cell gives them, parsed leniently. `plan()` turns
an enabled request into an `EnsemblePlan` — resolved checkpoints, weights file, the core's mode — or raises an
`AfaError` whose message tells the user what to change. Nothing here loads a model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from afa.errors import AfaError
from afa.members import MAX_MEMBERS, MIN_MEMBERS, MemberRef
from afa.modes import AVERAGE, LAST_BLOCK, NOISE, SABW, Mode, parse_mode
from afa.weights import WeightsInfo, check_members_match, read_weights_info

from . import checkpoints, folders

ARG_NAMES = ("enabled", "members", "weights", "mode", "show_maps")
"""The order of the script's arguments (`ui()`'s components, the API's `args`). Append only; never reorder."""


def _as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes", "on")
    return bool(value)


def _as_names(value) -> tuple[str, ...]:
    """Member names from a list (UI, API) or a comma-separated string (API convenience, XYZ)."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = value.split(",")
    return tuple(str(name).strip() for name in value if str(name).strip())


@dataclass(frozen=True)
class EnsembleRequest:
    enabled: bool = False
    members: tuple[str, ...] = ()
    weights: str = ""
    mode: str = SABW.label
    show_maps: bool = False

    @classmethod
    def from_args(cls, args) -> "EnsembleRequest":
        """From the script's positional arguments (missing trailing ones take the defaults above)."""
        values = dict(zip(ARG_NAMES, args))
        return cls(
            enabled=_as_bool(values.get("enabled", False)),
            members=_as_names(values.get("members")),
            weights="" if folders.is_no_weights(values.get("weights")) else str(values["weights"]).strip(),
            mode=str(values.get("mode") or SABW.label),
            show_maps=_as_bool(values.get("show_maps", False)),
        )

    def with_overrides(self, overrides: dict | None) -> "EnsembleRequest":
        """This request with an X/Y/Z plot cell's values (`p.afa_xyz`, see xyz.py) applied."""
        if not overrides:
            return self
        changes = dict(overrides)
        if "enabled" in changes:
            changes["enabled"] = _as_bool(changes["enabled"])
        if "members" in changes:
            changes["members"] = _as_names(changes["members"])
        if "weights" in changes and folders.is_no_weights(changes["weights"]):
            changes["weights"] = ""
        # a weights cell implies its mode (xyz.apply_weights) unless a mode axis chose one
        implied_mode = changes.pop("implied_mode", None)
        if implied_mode is not None and "mode" not in changes:
            changes["mode"] = implied_mode
        return replace(self, **changes)


@dataclass
class EnsemblePlan:
    """A resolved request: what the SdUnet will build when the job's sampling starts."""

    members: list  # CheckpointInfo of each member, in the ensemble's (and the weights file's) order
    mode: Mode
    weights_path: Path | None  # only for the SABW modes
    weights_label: str  # `<name> [<shorthash>]`, or "none"
    member_refs: list[MemberRef] | None  # the members as the weights file records them (SABW modes)
    show_maps: bool

    @property
    def mode_label(self) -> str:
        return self.mode.label

    @property
    def member_labels(self) -> list[str]:
        return [checkpoints.label(info) for info in self.members]


def plan(request: EnsembleRequest) -> EnsemblePlan:
    """Resolves an enabled request; raises AfaError (with a message for the user) if it cannot run.

    The weights file is only looked at when the job needs it: for the SABW modes, or for its members when none are
    given. A weights name left in the accordion from an earlier choice never refuses a mode that needs no weights."""
    mode = parse_mode(request.mode)
    weights_path = None
    if mode.needs_weights or not request.members:
        weights_path = folders.resolve_weights(request.weights)
    weights_info = read_weights_info(weights_path) if weights_path is not None else None  # metadata only, read once
    if mode.needs_weights and weights_path is None:
        raise AfaError(f"mode {SABW.label} needs a SABW weights file: choose one in 'SABW weights' (files in "
                       f"{folders.describe_weights_dir()}), or use {AVERAGE.label} or {NOISE.label}, which need none")

    if request.members:
        infos = checkpoints.resolve_members(request.members)
    elif weights_info is not None:
        infos = members_of_weights(weights_info)
    else:
        raise AfaError("no ensemble members given: choose 2 or more checkpoints in 'Ensemble members' "
                       "(or a weights file, which brings its own members)")
    if len(infos) > MAX_MEMBERS:
        raise AfaError(f"AFA ensembles {MIN_MEMBERS} to {MAX_MEMBERS} members, got {len(infos)}")
    for info in infos:
        checkpoints.ensure_hashed(info)  # the infotext names members with their shorthash (cached by the WebUI)

    refs = None
    if mode.needs_weights:
        refs = [checkpoints.member_ref(checkpoint) for checkpoint in infos]
        # MembersMismatchError naming both lists; a file trained in ComfyUI binds by the members' UNet fingerprints
        refs = check_members_match(weights_info, refs, lambda: [checkpoints.unet_fingerprint(info) for info in infos])
        if mode is LAST_BLOCK and weights_info.mode is not LAST_BLOCK:
            raise AfaError(f"{weights_path.name} was trained for mode SABW (every block), not for the last block "
                           f"only; use mode {SABW.label}")
        mode = weights_info.mode  # "SABW" runs a last-block weights file the way it was trained
    else:
        weights_path = None  # a weights file left selected in a mode that needs none is not used

    weights_label = folders.weights_label(weights_path) if weights_path is not None else "none"
    return EnsemblePlan(infos, mode, weights_path, weights_label, refs, request.show_maps)


def members_of_weights(info: WeightsInfo) -> list:
    """The installed checkpoints a weights file was trained for; AfaError naming those not installed."""
    found, missing = checkpoints.checkpoints_for(info.members)
    if missing:
        raise AfaError(f"{info.path.name} was trained for {', '.join(str(ref) for ref in info.members)}; "
                       f"not installed: {', '.join(str(ref) for ref in missing)}")
    return found
