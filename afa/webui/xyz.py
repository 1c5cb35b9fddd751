"""X/Y/Z plot axes: `[AFA] Enabled`, `[AFA] Mode`, `[AFA] Weights`.

Added from `on_before_ui` to the built-in script's `axis_options` (the pattern of ControlNet and Model Mixer,
scripts/xyz_grid.py v1.7+). Each cell is a shallow copy of `p`, so an axis stores its value in a new dict on the
cell, `p.afa_xyz`, which the script's `before_process` lays over the accordion's values. A `[AFA] Weights` value
brings its own members (the ones the weights file records), so cells with different weights files all run.
"""

from __future__ import annotations

from modules import scripts

from afa.errors import AfaError
from afa.modes import AVERAGE, CHOICES, SABW, parse_mode

from . import folders

AXIS_ENABLED, AXIS_MODE, AXIS_WEIGHTS = "[AFA] Enabled", "[AFA] Mode", "[AFA] Weights"


def xyz_module():
    """The loaded X/Y/Z plot script module (scripts are loaded by path, as "xyz_grid.py"), or None."""
    return next((data.module for data in scripts.scripts_data if data.script_class.__module__ == "xyz_grid.py"), None)


def _override(p, **values) -> None:
    p.afa_xyz = {**getattr(p, "afa_xyz", {}), **values}


def apply_enabled(p, x, xs) -> None:
    _override(p, enabled=str(x).strip().lower() in ("true", "1", "yes", "on"))


def apply_mode(p, x, xs) -> None:
    _override(p, mode=parse_mode(x).label)


def apply_weights(p, x, xs) -> None:
    """What choosing in the accordion does: a weights file runs SABW with the members it was trained for, None runs
    Block average of the accordion's members. The cell enables AFA (a weights axis over disabled cells would plot
    the same image in every cell); an `[AFA] Mode` or `[AFA] Enabled` axis still decides over it."""
    if folders.is_no_weights(x):
        _override(p, weights="", implied_mode=AVERAGE.label, **_implied_enabled(p))
    else:
        _override(p, weights=str(x), members=[], implied_mode=SABW.label, **_implied_enabled(p))


def _implied_enabled(p) -> dict:
    return {} if "enabled" in getattr(p, "afa_xyz", {}) else {"enabled": True}


def confirm_mode(p, xs) -> None:
    for x in xs:
        try:
            parse_mode(x)
        except AfaError as error:
            raise RuntimeError(str(error)) from None


def confirm_weights(p, xs) -> None:
    for x in xs:
        try:
            folders.resolve_weights(x)
        except AfaError as error:
            raise RuntimeError(str(error)) from None


def add_axes() -> None:
    """`on_before_ui` callback: adds the axes once (the callback runs again after "Reload UI")."""
    xyz = xyz_module()
    if xyz is None:
        return
    choice = getattr(xyz, "boolean_choice", None)
    axes = [
        xyz.AxisOption(AXIS_ENABLED, str, apply_enabled,
                       choices=choice(reverse=True) if choice else lambda: ["False", "True"]),
        xyz.AxisOption(AXIS_MODE, str, apply_mode, confirm=confirm_mode,
                       choices=lambda: [mode.label for mode in CHOICES]),
        xyz.AxisOption(AXIS_WEIGHTS, str, apply_weights, confirm=confirm_weights, choices=folders.weights_choices,
                       cost=0.5),  # a weights file may change the members: keep such cells together
    ]
    labels = {axis.label for axis in xyz.axis_options}
    xyz.axis_options.extend(axis for axis in axes if axis.label not in labels)
