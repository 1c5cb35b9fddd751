"""AFA's infotext entries and pasting them back into the accordion.

Entries (in `p.extra_generation_params`; the WebUI quotes a value that contains commas or colons):

    AFA mode: SABW, AFA members: "tiny-a [0123456789], tiny-b [abcdef0123]", AFA weights: pair [4567890abc],
    AFA text encoders: Each member's own

`AFA mode` is one of SABW, SABW (last block), Block average, Noise average; members and weights are
`<name> [<shorthash>]` (the WebUI's short title); `AFA weights` is left out without a weights file; `AFA text
encoders` is the "Members' text encoders" setting, and `AFA text notes` says where the text conditioning differed
from what the SABW weights were trained with or from what was asked. They are written
only for images the ensemble actually produced, so `AFA mode` present means "made by AFA". When AFA was requested
but not applied (to the whole job or to one sampling pass), `AFA not applied: "<reason>"` says why; reasons name
files by their name in their folder, never by a path of the server.

Pasting (PNG Info, the paste button, the API's `infotext`) and "Send to img2img/inpaint" restore the accordion:
enabled iff `AFA mode` is present, members and weights resolved against what is installed now, the mode. Each
accordion component is bound under a label (`InfotextKey`): "Send to" copies the components whose label is in the
script's `paste_field_names` (infotext_utils.connect_paste_params_buttons, v1.10), and the paste paths call the label
to read its value from the parsed infotext.
"""

from __future__ import annotations

import os
import re
from typing import Callable

import gradio as gr

from modules import paths, sd_models, shared

from afa.errors import AfaError
from afa.modes import LAST_BLOCK, SABW, parse_mode

from . import folders, settings
from .request import EnsemblePlan
from .ui import current_title

MODE_KEY = "AFA mode"
MEMBERS_KEY = "AFA members"
WEIGHTS_KEY = "AFA weights"
ENABLED_KEY = "AFA enabled"
"""The enabled checkbox's label for "Send to"; the infotext itself has no such entry (MODE_KEY says it)."""
NOT_APPLIED_KEY = "AFA not applied"
TEXT_ENCODERS_KEY = settings.TEXT_ENCODERS_INFOTEXT
"""The "Members' text encoders" setting the images were made with, under the setting's infotext name (which
infotext_utils v1.10 maps back to the setting when pasting; not tried in a browser)."""
TEXT_NOTES_KEY = "AFA text notes"

_HASHED = re.compile(r"\[[0-9a-fA-F]{6,64}\]$")


class InfotextKey(str):
    """A paste label that also reads its value: a `str` for A1111's name-based bindings ("Send to" compares names
    with `paste_field_names`), callable for its paste paths (connect_paste and the API's apply_infotext call a
    callable key with the parsed infotext before they would look the label up)."""

    def __new__(cls, label: str, read: Callable[[dict], object]):
        key = super().__new__(cls, label)
        key.read = read
        return key

    def __call__(self, params: dict):
        return self.read(params)


# -- writing ---------------------------------------------------------------------------------------------------------

def entries(plan: EnsemblePlan) -> dict[str, str]:
    """The infotext entries of an image the plan's ensemble produced."""
    values = {MODE_KEY: plan.mode_label, MEMBERS_KEY: ", ".join(plan.member_labels)}
    if plan.weights_path is not None:
        values[WEIGHTS_KEY] = plan.weights_label
    return values


def public_text(message: str) -> str:
    """A message as it may travel inside a shared PNG: one line, files named relative to their WebUI folder (the
    weights folder, the checkpoint folders, the models and data folders) instead of by the server's paths."""
    roots = [folders.weights_dir(), sd_models.model_path, getattr(shared.cmd_opts, "ckpt_dir", None),
             paths.models_path, paths.data_path, paths.script_path]
    text = str(message)
    for root in sorted({os.path.abspath(str(root)) for root in roots if root}, key=len, reverse=True):
        for separator in {os.sep, "/"}:
            text = text.replace(root + separator, "")
        text = text.replace(root, os.path.basename(root))
    return " ".join(text.split())


# -- pasting ---------------------------------------------------------------------------------------------------------

def split_members(text: str) -> list[str]:
    """Member names from `a [hash], b [hash]`; a name may itself contain ", " when every name ends in a hash."""
    pieces = [piece.strip() for piece in str(text).split(",")]
    if not any(_HASHED.search(piece) for piece in pieces):
        return [piece for piece in pieces if piece]
    names, pending = [], []
    for piece in pieces:
        pending.append(piece)
        if _HASHED.search(piece):
            names.append(", ".join(pending))
            pending = []
    return names + [piece for piece in pending if piece]


def paste_enabled(params: dict) -> bool:
    return MODE_KEY in params


def paste_members(params: dict):
    if MODE_KEY not in params or MEMBERS_KEY not in params:
        return gr.update()
    # the installed checkpoints' current titles, as the dropdown lists them; an unknown name is kept, and the job
    # then says that it is not installed
    return gr.update(value=[current_title(name) for name in split_members(params[MEMBERS_KEY])])


def paste_weights(params: dict):
    if MODE_KEY not in params:
        return gr.update()
    name = params.get(WEIGHTS_KEY, "")
    if folders.is_no_weights(name):
        return gr.update(value=folders.NO_WEIGHTS)
    try:
        return gr.update(value=folders.weights_name(folders.resolve_weights(name)))
    except AfaError:  # not installed here: keep the name, the job will say so
        return gr.update(value=str(name))


def paste_mode(params: dict):
    if MODE_KEY not in params:
        return gr.update()
    try:
        mode = parse_mode(params[MODE_KEY])
    except AfaError:
        return gr.update()
    return gr.update(value=SABW.label if mode is LAST_BLOCK else mode.label)  # the accordion offers SABW only


PASTE_FIELD_NAMES = [ENABLED_KEY, MEMBERS_KEY, WEIGHTS_KEY, MODE_KEY]
"""`Script.paste_field_names`: what "Send to img2img/inpaint" carries over."""


def infotext_fields(enabled, members, weights, mode) -> list:
    """`Script.infotext_fields` for the accordion's components."""
    return [(enabled, InfotextKey(ENABLED_KEY, paste_enabled)), (members, InfotextKey(MEMBERS_KEY, paste_members)),
            (weights, InfotextKey(WEIGHTS_KEY, paste_weights)), (mode, InfotextKey(MODE_KEY, paste_mode))]
