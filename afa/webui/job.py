"""The per-job state: which ensemble the running job asked for, and what happened to it.

`sd_unet`'s `create_unet()` gets no processing object, so the request of the running job has to live somewhere
explicit: `current`. It is set by the script's `before_process` for a job that enables AFA, cleared at the start of
every job (enabled or not), in `postprocess`, and when the extension unloads. A job that raises skips
`postprocess`; its leftover `current` is then replaced by the next job's `before_process`, and in the meantime
`active()` ignores it once the WebUI has dropped that job's processing object.
"""

from __future__ import annotations

import weakref

from modules import shared

from . import infotext, settings
from .request import EnsemblePlan


class Job:
    """One `process_images()` run with AFA enabled (every X/Y/Z plot cell is a job of its own)."""

    def __init__(self, p, plan: EnsemblePlan, maps=None):
        self.processing = weakref.ref(p)
        self.plan = plan
        self.maps = maps  # AggregationMaps when the request shows maps, else None
        self.map_images: list = []  # one per generated image, appended after every batch
        self.notes: list[str] = []  # why AFA was not applied to a sampling pass, in order, without repeats
        self.ensemble_calls = 0  # UNet calls the ensemble answered in the current batch (reset per batch)
        self.text_conditioning: str | None = None  # "per_member" or "shared", once the ensemble is built
        self.text_remarks: list[str] = []
        self.unmatched_text_chunks = 0

    def note(self, text: str) -> None:
        """Records that AFA was not applied: the console gets the message as it is, the infotext and the note under
        the gallery get its public form (`infotext.public_text`)."""
        print(f"AFA not applied: {text}")
        text = infotext.public_text(text)
        if text in self.notes:
            return
        self.notes.append(text)
        p = self.processing()
        if p is not None:
            p.comment(f"{infotext.NOT_APPLIED_KEY}: {text}")

    # Infotext values are callables: create_infotext() evaluates them per image after each batch has been sampled,
    # so they report what actually happened (processing.py v1.10, create_infotext).

    def entry_value(self, key: str):
        def value(**_) -> str | None:
            return infotext.entries(self.plan).get(key) if self.ensemble_calls > 0 else None
        return value

    def text_encoders_value(self, **_) -> str | None:
        if self.ensemble_calls == 0 or self.text_conditioning is None:
            return None
        return settings.TEXT_PER_MEMBER if self.text_conditioning == "per_member" else settings.TEXT_SHARED

    def text_notes_value(self, **_) -> str | None:
        if self.ensemble_calls == 0:
            return None
        notes = list(self.text_remarks)
        if self.unmatched_text_chunks:
            notes.append(f"{self.unmatched_text_chunks} prompt chunks were not among the members' encodings "
                         f"(another extension changed the conditioning?) and kept the loaded model's")
        return infotext.public_text("; ".join(notes)) if notes else None

    def not_applied_value(self, **_) -> str | None:
        return "; ".join(self.notes) or None

    def settle_infotext(self, p) -> None:
        """At the end of the job: the notes as a plain value. The API returns `extra_generation_params` as JSON, in
        which a callable reads null, so a job that made no image (interrupted while members loaded) would otherwise
        carry no word of why AFA did not run."""
        if self.notes:
            p.extra_generation_params[infotext.NOT_APPLIED_KEY] = self.not_applied_value()


current: Job | None = None

claimed_overrides: dict | None = None
"""The `override_settings` dict in which AFA last set the SD Unet override (X/Y/Z plot cells share one)."""


def start(p, plan: EnsemblePlan, maps=None) -> Job:
    global current
    current = Job(p, plan, maps)
    for key in (infotext.MODE_KEY, infotext.MEMBERS_KEY, infotext.WEIGHTS_KEY):
        p.extra_generation_params[key] = current.entry_value(key)
    p.extra_generation_params[infotext.TEXT_ENCODERS_KEY] = current.text_encoders_value
    p.extra_generation_params[infotext.TEXT_NOTES_KEY] = current.text_notes_value
    p.extra_generation_params[infotext.NOT_APPLIED_KEY] = current.not_applied_value
    return current


def clear() -> None:
    global current
    current = None
    shared.state.textinfo = None


def active() -> Job | None:
    """The running job's state, or None when no job enabled AFA (or the job that did has ended)."""
    if current is not None and current.processing() is None:
        return None
    return current


def forget_infotext(p) -> None:
    """Removes AFA's infotext entries from `p` (they belong to the job that wrote them)."""
    for key in (infotext.MODE_KEY, infotext.MEMBERS_KEY, infotext.WEIGHTS_KEY, infotext.TEXT_ENCODERS_KEY,
                infotext.TEXT_NOTES_KEY, infotext.NOT_APPLIED_KEY):
        p.extra_generation_params.pop(key, None)


def refuse(p, message: str) -> None:
    """A job that enabled AFA runs without it: say so in the infotext, under the gallery and on the console."""
    print(f"AFA not applied: {message}")
    message = infotext.public_text(message)
    p.comment(f"{infotext.NOT_APPLIED_KEY}: {message}")
    p.extra_generation_params[infotext.NOT_APPLIED_KEY] = message
