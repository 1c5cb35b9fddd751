"""The SABW weights folder: `--afa-dir` (preload.py), default `<models>/AFA`.

Weights are named by their path relative to the folder (`pair.safetensors`, `anime/trio.safetensors`); a name may
also be given without the suffix or as `<stem> [<shorthash>]` (the infotext form). Names are only ever looked up in
the folder's listing, so a path (absolute, or with `..`) can never reach a file outside it; such names are refused
with a message saying so.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modules import hashes, paths, shared

from afa.errors import AfaError, WeightsFileError

NO_WEIGHTS = "None"
WEIGHTS_SUFFIX = ".safetensors"
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]\s*$")


def weights_dir() -> Path:
    return Path(getattr(shared.cmd_opts, "afa_dir", None) or os.path.join(paths.models_path, "AFA"))


def describe_weights_dir() -> str:
    return "--afa-dir" if getattr(shared.cmd_opts, "afa_dir", None) else "models/AFA"


def refresh() -> None:
    """Nothing is cached: every listing reads the folder. (Used as the Settings page's refresh callback.)"""


def list_weights() -> list[str]:
    """Names of the weights files in the folder (relative POSIX paths, sorted); [] if the folder does not exist."""
    root = weights_dir()
    if not root.is_dir():
        return []
    return sorted(path.relative_to(root).as_posix() for path in root.rglob(f"*{WEIGHTS_SUFFIX}") if path.is_file())


def weights_choices() -> list[str]:
    return [NO_WEIGHTS] + list_weights()


def is_no_weights(name) -> bool:
    return name is None or str(name).strip().lower() in ("", "none")


def refuse_paths(name: str, what: str) -> None:
    """Raises AfaError for names that are paths out of a folder: absolute, drive-qualified or containing `..`."""
    text = str(name)
    parts = re.split(r"[\\/]", text)
    if os.path.isabs(text) or re.match(r"^[A-Za-z]:", text) or ".." in parts or "\0" in text:
        raise AfaError(f"{what} {text!r} is a path; give a name as listed by the WebUI (paths are not accepted)")


def _strip_hash(name: str) -> str:
    return _HASH_SUFFIX.sub("", name)


def resolve_weights(name) -> Path | None:
    """The weights file a name denotes, or None for "no weights". Raises WeightsFileError if it is not listed."""
    if is_no_weights(name):
        return None
    text = str(name).strip()
    refuse_paths(text, "weights")
    listed = list_weights()
    wanted = _strip_hash(text)
    for candidate in (text, wanted, wanted + WEIGHTS_SUFFIX):
        if candidate in listed:
            return weights_dir() / candidate
    available = ", ".join(listed) or "none"
    raise WeightsFileError(f"weights {text!r} not found in the weights folder ({describe_weights_dir()}; "
                           f"available: {available})")


def weights_name(path: Path) -> str:
    return path.relative_to(weights_dir()).as_posix()


def weights_sha256(path: Path) -> str | None:
    """The weights file's sha256 through the WebUI's hash cache (None with --no-hashing)."""
    return hashes.sha256(str(path), f"afa/{weights_name(path)}")


def weights_label(path: Path) -> str:
    """`<name without suffix> [<shorthash>]`, the infotext form."""
    stem = weights_name(path)[:-len(WEIGHTS_SUFFIX)]
    sha256 = weights_sha256(path)
    return f"{stem} [{sha256[:10]}]" if sha256 else stem
