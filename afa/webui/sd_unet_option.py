"""The `[AFA] Ensemble` UNet: A1111's own UNet-replacement seam (modules/sd_unet.py, v1.10) around the core's
EnsembleUNet.

`sd_unet.apply_unet()` (called by processing once per job and by every checkpoint reload) resolves the "SD Unet"
setting, which the script overrides to `AfaUnetOption.label` for AFA jobs; it parks the loaded checkpoint's UNet on
the CPU, calls `create_unet()` and `activate()`. From then on the class-level `UNetModel.forward` that sd_hijack
installed routes every UNet call to `AfaUnet.forward`. `deactivate()` is called by the next `apply_unet()` that
resolves to another option (the end of the job, or a checkpoint reload), or eagerly by `tear_down()`.

A request AFA cannot honour (members incompatible with the loaded checkpoint, a bad weights file, an interrupt
while loading) never fails the job: the AfaUnet then passes every call to the loaded checkpoint's UNet through the
WebUI's original forward, and the job's infotext says AFA was not applied.
"""

from __future__ import annotations

import contextlib

import torch

from modules import devices, errors, sd_hijack, sd_unet, shared

from afa.ensemble import EnsembleUNet
from afa.errors import AfaError

from . import checkpoints, settings
from . import job as jobs
from .build import build_ensemble
from .member_cache import cache

LABEL = "[AFA] Ensemble"


class AfaUnetOption(sd_unet.SdUnetOption):
    label = LABEL
    model_name = None  # never chosen by the "Automatic" SD Unet setting: only the accordion enables AFA

    def create_unet(self) -> "AfaUnet":
        return AfaUnet(jobs.active())


def list_unets(options: list) -> None:
    """`on_list_unets` callback."""
    options.append(AfaUnetOption())


def loaded_unet():
    """The loaded checkpoint's UNet (`shared.sd_model.model.diffusion_model`)."""
    return shared.sd_model.model.diffusion_model


def original_forward(unet):
    """The UNet class's forward from before sd_hijack routed it through sd_unet (ldm, or sgm for SDXL)."""
    if type(unet).__module__.startswith("sgm.") and getattr(sd_hijack, "sgm_original_forward", None) is not None:
        return sd_hijack.sgm_original_forward
    return sd_hijack.ldm_original_forward


def restore_loaded_unet() -> None:
    """Moves the loaded checkpoint's UNet back to the device that `apply_unet()` took it from (sd_unet.py v1.10
    does the same when it deactivates an SdUnet), unless --medvram/--lowvram manage it."""
    model = checkpoints.loaded_base()
    if model is not None and not getattr(model, "lowvram", False):
        unet = model.model.diffusion_model
        if not next(unet.parameters()).is_meta:
            unet.to(devices.device)


class AfaUnet(sd_unet.SdUnet):
    """The SdUnet of one job: the ensemble the job's plan describes, built against the loaded checkpoint.

    Attributes:
        job: the job it serves (None when `create_unet()` ran outside an AFA job: then it only passes through).
        ensemble: the EnsembleUNet while active, else None.
        refusal: why the ensemble could not be built (then every call passes through to the loaded UNet).
    """

    def __init__(self, job):
        super().__init__()
        self.job = job
        self.ensemble: EnsembleUNet | None = None
        self.member_dtype: torch.dtype | None = None
        self.refusal: str | None = None
        self.sd_model = None  # the loaded model the ensemble was built against
        self.text_conditioning = None  # MemberTextConditioning while active, when a member has its own encoder

    def activate(self) -> None:
        self.sd_model = shared.sd_model
        if self.job is None:
            self.refusal = ("the SD Unet setting is '[AFA] Ensemble' but no job enabled the AFA ensemble accordion; "
                            "set SD Unet back to Automatic")
            print(f"AFA: {self.refusal}")
            restore_loaded_unet()
            return
        try:
            self.ensemble, self.text_conditioning = build_ensemble(self.job)
            self.member_dtype = next(self.ensemble.members[0].parameters()).dtype
            if self.text_conditioning is not None:
                self.text_conditioning.install()
        except AfaError as error:
            self.refuse(str(error))
        except Exception as error:  # out of memory, a damaged file the core did not recognise, ...
            errors.report(f"AFA: building the ensemble failed: {error}", exc_info=True)
            self.refuse(f"building the ensemble failed ({type(error).__name__}: {error}); see the console")
        finally:
            shared.state.textinfo = None

    def refuse(self, reason: str) -> None:
        self.ensemble = None
        self.drop_text_conditioning()
        self.refusal = reason
        base = shared.sd_model.sd_checkpoint_info
        self.job.note(f"{reason} (loaded checkpoint: {base.short_title})" if base is not None else reason)
        restore_loaded_unet()

    def forward(self, x, timesteps, context, *args, **kwargs):
        """x [B x C x H x W], timesteps [B], context [B x L x D] (SDXL: y [B x adm] in kwargs) -> [B x C x H x W]."""
        if shared.sd_model is not self.sd_model and self is sd_unet.current_unet:
            replacement = rebuilt_for_loaded_model()
            if replacement is not None:
                return replacement.forward(x, timesteps, context, *args, **kwargs)
        if self.ensemble is None or shared.sd_model is not self.sd_model:
            unet = loaded_unet()
            return original_forward(unet)(unet, x, timesteps, context, *args, **kwargs)
        self.job.ensemble_calls += 1
        member_contexts = member_vectors = None
        y = kwargs.get("y", args[0] if args else None)  # UNetModel.forward(x, timesteps, context, y): SDXL's y
        if self.text_conditioning is not None:
            member_contexts = self.text_conditioning.member_contexts(context)
            member_vectors = self.text_conditioning.member_vectors(y)
            self.job.unmatched_text_chunks = self.text_conditioning.unmatched_chunks
        with member_autocast(self.member_dtype):
            return self.ensemble(x, timesteps, context, y=y, member_contexts=member_contexts,
                                 member_vectors=member_vectors)

    def deactivate(self) -> None:
        """Drops the ensemble; members go back to the cache, off the GPU unless it keeps them in VRAM."""
        self.drop_text_conditioning()
        if self.ensemble is not None:
            self.ensemble = None
            cache.park(settings.cache_policy())
            devices.torch_gc()

    def drop_text_conditioning(self) -> None:
        """Gives the loaded model its own conditioning back."""
        if self.text_conditioning is not None:
            self.text_conditioning.uninstall()
            self.text_conditioning = None


def member_autocast(dtype: torch.dtype):
    """CUDA autocast for members in half precision. ldm's GroupNorm32 normalises in float32 (`x.float()`), which
    only works with half-precision weights under CUDA autocast (it runs group_norm in float32). The WebUI autocasts
    only when its own dtype is half (devices.autocast, v1.10), so fp16/bf16 members under --no-half need their own."""
    if dtype not in (torch.float16, torch.bfloat16) or devices.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def tear_down() -> bool:
    """Deactivates the AFA SdUnet now, if it is the active one, and gives the loaded checkpoint its UNet back.

    Used at the end of a job (`postprocess`), before a job (left over by a job that raised), when another
    extension bypasses the SdUnet (ControlNet), when a model is loaded and when the extension unloads. After it,
    the WebUI is in the state of a job that never used AFA. Returns whether something was torn down."""
    if not isinstance(sd_unet.current_unet, AfaUnet):
        return False
    try:
        # what the WebUI does when the SD Unet setting resolves to none: deactivate, then the loaded checkpoint's UNet
        # back to the device (sd_unet.py v1.10)
        sd_unet.apply_unet("None")
    except Exception:
        errors.report("AFA: deactivating the ensemble failed", exc_info=True)
        restore_loaded_unet()
    return True


def rebuilt_for_loaded_model() -> "AfaUnet | None":
    """The ensemble built again against the model loaded now, as `apply_unet()` would after a checkpoint switch.

    A switch to a checkpoint that is already loaded (Settings > "Maximum number of checkpoints loaded at the same
    time" >= 2; sd_models.reuse_model_from_already_loaded, v1.10) swaps `shared.sd_model` without model_loaded
    callbacks or `apply_unet()`; with "Only keep one model on device" the previous model has just moved to the CPU,
    and the ensemble may hold its UNet as a member. The AfaUnet notices on its next call."""
    print("AFA: the loaded checkpoint changed; building the ensemble against it")
    sd_unet.apply_unet("None")
    sd_unet.apply_unet()
    return sd_unet.current_unet if isinstance(sd_unet.current_unet, AfaUnet) else None
