"""The "AFA ensemble" accordion of txt2img and img2img.

`build_accordion()` runs inside `Script.ui()`, which the WebUI calls once per tab and the API calls again to harvest
default values: it only reads (settings, the checkpoint list, the weights folder) and creates components and their
event handlers; it loads, hashes and writes nothing.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Callable

import gradio as gr

from modules import sd_models, shared
from modules.ui_components import FormRow, InputAccordion, ToolButton

from afa.errors import AfaError
from afa.modes import AVERAGE, CHOICES, SABW
from afa.weights import read_weights_info

from . import folders, settings
from .request import members_of_weights

REFRESH_SYMBOL = "\U0001f504"  # 🔄, the WebUI's refresh button


@dataclass
class AccordionControls:
    enabled: gr.Checkbox
    members: gr.Dropdown
    weights: gr.Dropdown
    mode: gr.Dropdown
    show_maps: gr.Checkbox

    @property
    def args(self) -> list:
        """The components in the script's argument order (request.ARG_NAMES)."""
        return [self.enabled, self.members, self.weights, self.mode, self.show_maps]


def default_values() -> dict:
    """The accordion's initial values, from the "AFA Ensemble" settings."""
    weights = shared.opts.afa_default_weights
    if folders.is_no_weights(weights) or weights not in folders.list_weights():
        weights = folders.NO_WEIGHTS
    return {
        "members": [current_title(name) for name in shared.opts.afa_default_members or []],
        "weights": weights,
        "mode": AVERAGE.label if weights == folders.NO_WEIGHTS else SABW.label,
        "show_maps": settings.maps_default(),
    }


def current_title(name: str) -> str:
    """A checkpoint's title as the dropdown lists it now (a title saved before the file was hashed lacks the
    [hash]); the name itself if it is not installed."""
    info = sd_models.get_closet_checkpoint_match(name)
    return info.title if info is not None else name


# The accordions of the UI being built, by tab ("txt2img", "img2img"): the training tab's "Use these weights" fills
# them. (Only the ones built for the page: the training tab, built after them, wires to what is here then.)
ACCORDIONS: dict[str, AccordionControls] = {}


def build_accordion(elem_id: Callable[[str], str], tab: str | None = None) -> AccordionControls:
    defaults = default_values()
    with InputAccordion(False, label="AFA ensemble", elem_id=elem_id("enabled")) as enabled:
        with FormRow():
            members_dropdown = gr.Dropdown(
                label="Ensemble members", choices=shared.list_checkpoint_tiles(False), value=defaults["members"],
                multiselect=True, elem_id=elem_id("members"))
            refresh = ToolButton(value=REFRESH_SYMBOL, elem_id=elem_id("refresh"))
        with FormRow():
            weights = gr.Dropdown(label="SABW weights", choices=folders.weights_choices(), value=defaults["weights"],
                                  elem_id=elem_id("weights"))
            mode = gr.Dropdown(label="Ensemble mode", choices=[mode.label for mode in CHOICES], value=defaults["mode"],
                               elem_id=elem_id("mode"))
        show_maps = gr.Checkbox(label="Show aggregation maps", value=defaults["show_maps"],
                                elem_id=elem_id("show_maps"))
        status = gr.HTML("", elem_id=elem_id("status"))

    refresh.click(fn=refreshed_choices, inputs=[], outputs=[members_dropdown, weights], show_progress=False)
    weights.input(fn=weights_chosen, inputs=[weights, members_dropdown, mode],
                  outputs=[members_dropdown, mode, status], show_progress=False)
    mode.input(fn=mode_chosen, inputs=[weights, mode], outputs=[status], show_progress=False)
    controls = AccordionControls(enabled, members_dropdown, weights, mode, show_maps)
    if tab is not None:
        ACCORDIONS[tab] = controls
    return controls


# -- event handlers --------------------------------------------------------------------------------------------------

def _status(message: str) -> str:
    return f"<p class='afa-status'>{html.escape(message)}</p>" if message else ""


def refreshed_choices():
    shared.refresh_checkpoints()
    return (gr.update(choices=shared.list_checkpoint_tiles(False)),
            gr.update(choices=folders.weights_choices()))


def weights_chosen(weights_name: str, current_members: list, mode: str):
    """A weights file records its members: choosing one fills them in (and selects SABW)."""
    if folders.is_no_weights(weights_name):
        new_mode = AVERAGE.label if mode == SABW.label else mode
        return gr.update(), gr.update(value=new_mode), _status("")
    try:
        path = folders.resolve_weights(weights_name)
        infos = members_of_weights(read_weights_info(path))
    except AfaError as error:  # not in the folder any more, unreadable, members not installed
        return gr.update(), gr.update(), _status(str(error))
    return gr.update(value=[info.title for info in infos]), gr.update(value=SABW.label), _status("")


def mode_chosen(weights_name: str, mode: str):
    if mode == SABW.label and folders.is_no_weights(weights_name):
        return _status("SABW needs a weights file; without one choose Block average or Noise average")
    return _status("")

