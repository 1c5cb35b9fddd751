"""Stand-in of modules/sd_hijack_unet.py (v1.10): the dtype cast around LatentDiffusion.apply_model.

The real module installs `apply_model` below with `CondFunc('ldm.models.diffusion.ddpm.LatentDiffusion.apply_model',
...)`; the stand-in patches the stand-in LatentDiffusion class the same way (via modules.patches). The
`TorchHijackForUnet` (`th`) proxy that resizes skip tensors for sizes not divisible by 64, the timestep_embedding
and GroupNorm/GEGLU upcasts are not reproduced (image sizes in tests are multiples of 64, dtype is float32).
"""

import torch

from modules import devices, patches
from modules.standin_ldm import LatentDiffusion


# modules/sd_hijack_unet.py (v1.10): apply_model
def apply_model(orig_func, self, x_noisy, t, cond, **kwargs):
    """Always make sure inputs to unet are in correct dtype."""
    if isinstance(cond, dict):
        for y in cond.keys():
            if isinstance(cond[y], list):
                cond[y] = [x.to(devices.dtype_unet) if isinstance(x, torch.Tensor) else x for x in cond[y]]
            else:
                cond[y] = cond[y].to(devices.dtype_unet) if isinstance(cond[y], torch.Tensor) else cond[y]

    with devices.autocast():
        result = orig_func(self, x_noisy.to(devices.dtype_unet), t.to(devices.dtype_unet), cond, **kwargs)
        if devices.unet_needs_upcast:
            return result.float()
        else:
            return result


def _install():
    original = LatentDiffusion.apply_model

    def apply_model_cast(self, x_noisy, t, cond, **kwargs):
        return apply_model(original, self, x_noisy, t, cond, **kwargs)

    patches.patch(__name__, LatentDiffusion, "apply_model", apply_model_cast)


_install()
