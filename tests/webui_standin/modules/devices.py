"""Stand-in of modules/devices.py (v1.10): torch device/dtype globals and autocast helpers.

CUDA/MPS/XPU/NPU branches are dropped: on the CI machine `get_optimal_device()` is the CPU, as in the real module
on a machine without accelerators. `shared_init.initialize()` sets `device`/`dtype*` from `cmd_opts` like the real
one (so `--no-half` gives float32, which the real WebUI needs on a CPU as well).
"""

import contextlib
from functools import lru_cache

import torch

from modules import errors, shared


def has_xpu() -> bool:
    return False


def has_mps() -> bool:
    return False


# modules/devices.py (v1.10): get_optimal_device_name / get_optimal_device / get_device_for
def get_optimal_device_name():
    if torch.cuda.is_available():
        return get_cuda_device_string()

    return "cpu"


def get_cuda_device_string():
    if shared.cmd_opts.device_id is not None:
        return f"cuda:{shared.cmd_opts.device_id}"

    return "cuda"


def get_optimal_device():
    return torch.device(get_optimal_device_name())


def get_device_for(task):
    if task in shared.cmd_opts.use_cpu or "all" in shared.cmd_opts.use_cpu:
        return cpu

    return get_optimal_device()


# modules/devices.py (v1.10): torch_gc
def torch_gc():
    if torch.cuda.is_available():
        with torch.cuda.device(get_cuda_device_string()):
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()


cpu: torch.device = torch.device("cpu")
fp8: bool = False
device: torch.device = None
device_interrogate: torch.device = None
device_gfpgan: torch.device = None
device_esrgan: torch.device = None
device_codeformer: torch.device = None
dtype: torch.dtype = torch.float16
dtype_vae: torch.dtype = torch.float16
dtype_unet: torch.dtype = torch.float16
dtype_inference: torch.dtype = torch.float16
unet_needs_upcast = False
force_fp16: bool = False


# modules/devices.py (v1.10): cond_cast_unet / cond_cast_float
def cond_cast_unet(input):
    if force_fp16:
        return input.to(torch.float16)
    return input.to(dtype_unet) if unet_needs_upcast else input


def cond_cast_float(input):
    return input.float() if unet_needs_upcast else input


# modules/devices.py (v1.10): autocast (CUDA/MPS manual-cast branches dropped)
def autocast(disable=False):
    if disable:
        return contextlib.nullcontext()

    if force_fp16:
        # No casting during inference if force_fp16 is enabled.
        # All tensor dtype conversion happens before inference.
        return contextlib.nullcontext()

    if fp8 and device == cpu:
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=True)

    if dtype == torch.float32 or dtype_inference == torch.float32:
        return contextlib.nullcontext()

    if device == cpu or device is None:
        # the real module would return torch.autocast("cuda") here; there is no CUDA on the CI machine
        return contextlib.nullcontext()

    return torch.autocast("cuda")


# modules/devices.py (v1.10): without_autocast
def without_autocast(disable=False):
    return torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled() and not disable else contextlib.nullcontext()


class NansException(Exception):
    pass


# modules/devices.py (v1.10): test_for_nans
def test_for_nans(x, where):
    if shared.cmd_opts.disable_nan_check:
        return

    if not torch.isnan(x[(0, ) * len(x.shape)]):
        return

    if where == "unet":
        message = "A tensor with NaNs was produced in Unet."

        if not shared.cmd_opts.no_half:
            message += " This could be either because there's not enough precision to represent the picture, or because your video card does not support half type. Try setting the \"Upcast cross attention layer to float32\" option in Settings > Stable Diffusion or using the --no-half commandline argument to fix this."

    elif where == "vae":
        message = "A tensor with NaNs was produced in VAE."

        if not shared.cmd_opts.no_half and not shared.cmd_opts.no_half_vae:
            message += " This could be because there's not enough precision to represent the picture. Try adding --no-half-vae commandline argument to fix this."
    else:
        message = "A tensor with NaNs was produced."

    message += " Use --disable-nan-check commandline argument to disable this check."

    raise NansException(message)


# modules/devices.py (v1.10): first_time_calculation
@lru_cache
def first_time_calculation():
    """
    just do any calculation with pytorch layers - the first time this is done it allocates about 700MB of memory and
    spends about 2.7 seconds doing that, at least with NVidia.
    """

    x = torch.zeros((1, 1)).to(device, dtype)
    linear = torch.nn.Linear(1, 1).to(device, dtype)
    linear(x)

    x = torch.zeros((1, 1, 3, 3)).to(device, dtype)
    conv2d = torch.nn.Conv2d(1, 1, (3, 3)).to(device, dtype)
    conv2d(x)


def force_model_fp16():
    """no-op in the stand-in (the real one patches ldm/sgm timestep_embedding for --precision half)"""
    pass


_ = errors
