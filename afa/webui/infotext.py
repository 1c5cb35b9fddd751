"""The `AFA` infotext entry and pasting it back into the accordion.

Format (one `p.extra_generation_params` entry; the WebUI quotes it because it contains commas and colons):

    AFA: "members=tiny-a [0123456789], tiny-b [abcdef0123]; weights=pair [4567890abc]; mode=SABW"

Members and weights are `<name> [<shorthash>]` (the WebUI's short title; `weights=none` without a weights file);
`mode` is one of SABW, SABW (last block), Block average, Noise average. The entry is written only for images the
ensemble actually produced. When AFA was requested but not applied (to the whole job or to one sampling pass), a
second entry says why: `AFA not applied: "<reason>"`.

Pasting (PNG Info, "Send to", the paste button) restores the accordion: enabled iff the `AFA` entry is present,
members and weights resolved against what is installed now, the mode.
"""

from __future__ import annotations

import re

import gradio as gr

from . import folders
from .request import MODE_LAST_BLOCK, MODE_SABW, EnsemblePlan, mode_label
from .ui import current_title

KEY = "AFA"
_HASHED = re.compile(r"\[[0-9a-fA-F]{6,64}\]$")


def format_value(plan: EnsemblePlan) -> str:
    return f"members={', '.join(plan.member_labels)}; weights={plan.weights_label}; mode={plan.mode_label}"


def parse_value(text: str) -> dict:
    """{"members": [names], "weights": name or "", "mode": label} from an `AFA` infotext value."""
    fields = {}
    for part in str(text).split(";"):
        key, _, value = part.partition("=")
        fields[key.strip().lower()] = value.strip()
    members = split_members(fields.get("members", ""))
    weights = fields.get("weights", "")
    return {"members": members, "weights": "" if folders.is_no_weights(weights) else weights,
            "mode": fields.get("mode", MODE_SABW)}


def split_members(text: str) -> list[str]:
    """Member names from `a [hash], b [hash]`; a name may itself contain ", " when every name ends in a hash."""
    pieces = [piece.strip() for piece in text.split(",")]
    if not any(_HASHED.search(piece) for piece in pieces):
        return [piece for piece in pieces if piece]
    names, pending = [], []
    for piece in pieces:
        pending.append(piece)
        if _HASHED.search(piece):
            names.append(", ".join(pending))
            pending = []
    return names + [piece for piece in pending if piece]


# -- paste ---------------------------------------------------------------------------------------------------------

def _parsed(params: dict) -> dict | None:
    return parse_value(params[KEY]) if KEY in params else None


def paste_enabled(params: dict) -> bool:
    return KEY in params


def paste_members(params: dict):
    parsed = _parsed(params)
    if parsed is None:
        return gr.update()
    # the installed checkpoints' current titles, as the dropdown lists them; an unknown name is kept, and the job
    # then says that it is not installed
    return gr.update(value=[current_title(name) for name in parsed["members"]])


def paste_weights(params: dict):
    parsed = _parsed(params)
    if parsed is None:
        return gr.update()
    if not parsed["weights"]:
        return gr.update(value=folders.NO_WEIGHTS)
    try:
        path = folders.resolve_weights(parsed["weights"])
        return gr.update(value=folders.weights_name(path))
    except Exception:  # not installed here: keep the name, the job will say so
        return gr.update(value=parsed["weights"])


def paste_mode(params: dict):
    parsed = _parsed(params)
    if parsed is None:
        return gr.update()
    try:
        label = mode_label(parsed["mode"])
    except Exception:
        return gr.update()
    return gr.update(value=MODE_SABW if label == MODE_LAST_BLOCK else label)


def infotext_fields(enabled, members, weights, mode) -> list:
    """`Script.infotext_fields` for the accordion's components."""
    return [(enabled, paste_enabled), (members, paste_members), (weights, paste_weights), (mode, paste_mode)]
