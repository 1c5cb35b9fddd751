"""Stand-in of crowsonkb/k-diffusion (the `repositories/k-diffusion` the WebUI puts on sys.path): the parts A1111's
k-diffusion samplers use — `sampling` (Euler, Euler a, DPM++ 2M, schedules) and `external` (CompVis denoisers)."""

from . import sampling, external, utils  # noqa: F401
