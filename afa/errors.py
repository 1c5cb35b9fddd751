"""Typed errors for what a user can get wrong. Each message names the file and what is wrong with it.

The core raises these; only the glue (`afa/webui/`, `training/`, the CLI) decides how they reach the user.
All derive from `AfaError` (a `ValueError`), so callers can catch one type.
"""


class AfaError(ValueError):
    """Base class of every user-facing AFA error."""


class CheckpointError(AfaError):
    """A member checkpoint is missing, unreadable, unsafe to load, or not a Stable Diffusion UNet."""


class IncompatibleMembersError(AfaError):
    """Members cannot be ensembled: too few, or their UNet architectures differ."""


class WeightsFileError(AfaError):
    """An aggregator weights file is missing, corrupt, of a newer format, or does not match its config."""


class MembersMismatchError(WeightsFileError):
    """A weights file was trained for other members than the ones given."""
