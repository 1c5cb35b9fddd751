"""The ways an ensemble can mix its members: one `Mode` per way, parsed in one place.

    mode         name (core, CLI, files)  WebUI label          needs weights  mixes every block
    SABW         sabw                     SABW                 yes            yes
    AVERAGE      average                  Block average        no             yes
    NOISE        noise-average            Noise average        no             no (the predictions only)
    LAST_BLOCK   last-block               SABW (last block)    yes            no (the predictions only)

SABW mixes with learned per-pixel weights after every block; block averaging with equal weights after every block;
noise averaging runs the members independently and averages their predictions; last-block mixes only the
predictions, with SABW weights trained for that (the paper's "only ensembling last block" ablation). A weights file
records which of the two SABW modes it was trained for.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import AfaError


@dataclass(frozen=True)
class Mode:
    name: str  # the core's and the command line's name
    label: str  # what the WebUI shows and writes into the infotext
    needs_weights: bool  # runs SABW, so it needs a weights file trained for it
    mixes_every_block: bool  # False: members run independently and only their predictions are mixed
    aliases: tuple[str, ...] = ()

    def __str__(self) -> str:
        return self.name


SABW = Mode("sabw", "SABW", needs_weights=True, mixes_every_block=True)
AVERAGE = Mode("average", "Block average", needs_weights=False, mixes_every_block=True)
NOISE = Mode("noise-average", "Noise average", needs_weights=False, mixes_every_block=False,
             aliases=("noise average",))
LAST_BLOCK = Mode("last-block", "SABW (last block)", needs_weights=True, mixes_every_block=False,
                  aliases=("last block",))

MODES = (SABW, AVERAGE, NOISE, LAST_BLOCK)
CHOICES = (SABW, AVERAGE, NOISE)
"""What the WebUI offers: LAST_BLOCK is what SABW runs as with a weights file trained for it."""

_BY_TEXT = {text.lower(): mode for mode in MODES for text in (mode.name, mode.label, *mode.aliases)}


def parse_mode(text: Mode | str) -> Mode:
    """The mode a name, label or alias denotes (case-insensitive); AfaError listing the choices otherwise."""
    if isinstance(text, Mode):
        return text
    mode = _BY_TEXT.get(str(text).strip().lower())
    if mode is None:
        raise AfaError(f"unknown AFA mode {text!r}; choose one of {', '.join(mode.label for mode in CHOICES)}")
    return mode


def trained_mode(only_last_block: bool) -> Mode:
    """The SABW mode of weights trained with `AggregatorConfig.only_last_block`."""
    return LAST_BLOCK if only_last_block else SABW
