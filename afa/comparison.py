"""How a validation table's rows compare: each row's error against the best member's and the best merge's.

The trainer's validation (training/train.py), the A1111 training tab and the ComfyUI training node show the same
rows: each member alone (named after its checkpoint), the merge baselines ("weighted merge (r=0.40)", "MBW"; see
training/merge_search.py), "block average", "noise average" and "AFA" (or "AFA (<preset>)"). The two references a
user weighs AFA against are the best member (what they would use without combining) and the best merge (what
merging would give, at one UNet's cost).
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

WEIGHTED_MERGE, MBW = "weighted merge", "MBW"
BLOCK_AVERAGE, NOISE_AVERAGE, AFA = "block average", "noise average", "AFA"


def is_merge_row(name: str) -> bool:
    """Whether a row is a merge baseline: "MBW" or "weighted merge (...)"."""
    return name == MBW or name == WEIGHTED_MERGE or name.startswith(f"{WEIGHTED_MERGE} (")


def is_member_row(name: str) -> bool:
    """Whether a row is a member alone: not a merge, not an average, not an AFA row."""
    return not (is_merge_row(name) or name in (BLOCK_AVERAGE, NOISE_AVERAGE, AFA) or name.startswith(f"{AFA} ("))


def percent_change(value: float, reference: float) -> str:
    """"-12.3%": the change of `value` against `reference` (negative: a lower error)."""
    return f"{100.0 * (value / reference - 1.0):+.1f}%"


class ComparedRow(NamedTuple):
    """A row with its changes against the best member and the best merge ("" for each reference itself, and where
    the table has no such reference)."""

    model: str
    error: float
    vs_best_member: str
    vs_best_merge: str


def compare_rows(errors: Mapping[str, float]) -> tuple[list[ComparedRow], str | None, str | None]:
    """(rows lowest error first, the best member's name, the best merge's name) of {row: error}."""
    members = [name for name in errors if is_member_row(name)]
    merges = [name for name in errors if is_merge_row(name)]
    best_member = min(members, key=errors.__getitem__) if members else None
    best_merge = min(merges, key=errors.__getitem__) if merges else None

    def change(name: str, reference: str | None) -> str:
        if reference is None or name == reference:
            return ""
        return percent_change(errors[name], errors[reference])

    rows = [ComparedRow(name, error, change(name, best_member), change(name, best_merge))
            for name, error in sorted(errors.items(), key=lambda item: item[1])]
    return rows, best_member, best_merge
