"""What AFA does at each step of a WebUI job, and in the WebUI callbacks; `scripts/afa_script.py` calls these.

A job, in the WebUI's order (modules/processing.py v1.10):

    before_process   tear down anything a failed job left; parse the request (+ X/Y/Z overrides); resolve it
                     into a plan (names, weights file, mode) or refuse with a message; override the "SD Unet"
                     setting to `[AFA] Ensemble` for this job only (A1111 restores it in its `finally`)
    (WebUI)          apply_unet() -> AfaUnetOption.create_unet() -> AfaUnet.activate(): build the ensemble
    process_batch    per batch: reset the count of ensemble calls the infotext reports
    before_sampling  per sampling pass (twice with hires fix): detect an extension that bypasses the SdUnet
                     (ControlNet) and stand aside; start a pass of aggregation maps
    on_model_loaded  a checkpoint switch inside the job (hires fix, refiner, X/Y/Z): rebuild the ensemble against
                     the new model, or refuse with a message if the members do not fit it
    postprocess_batch  render that batch's aggregation maps
    postprocess      tear the ensemble down now (members go to the cache), append the maps to the gallery
                     (images and infotexts together), forget the job

A job that raises skips postprocess: the next job's before_process cleans up (and the next apply_unet() would
deactivate the AfaUnet anyway, since the setting is restored).
"""

from __future__ import annotations

from modules import sd_unet, shared

from afa.errors import AfaError

from . import job as jobs
from . import settings
from .gallery_maps import AggregationMaps
from .member_cache import cache
from .request import EnsembleRequest, plan
from .sd_unet_option import LABEL, loaded_unet, tear_down


# -- the job ---------------------------------------------------------------------------------------------------------

def before_process(p, args) -> None:
    if tear_down():
        print("AFA: deactivated the ensemble left by a job that did not finish")
    jobs.clear()
    cache.trim(settings.cache_policy())
    # An X/Y/Z plot cell is a shallow copy of `p` (scripts/xyz_grid.py): its extra_generation_params dict is the
    # previous cell's, which may still hold that cell's AFA entries.
    jobs.forget_infotext(p)

    request = EnsembleRequest.from_args(args).with_overrides(getattr(p, "afa_xyz", None))
    if not request.enabled:
        release_sd_unet_setting(p)
        return
    try:
        refuse_if_setting_frozen()
        job_plan = plan(request)
    except AfaError as error:
        release_sd_unet_setting(p)
        jobs.refuse(p, str(error))
        return

    maps = None
    if job_plan.show_maps:
        weights = job_plan.weights_path.name if job_plan.weights_path is not None else "no weights"
        maps = AggregationMaps(job_plan.member_labels, f"AFA aggregation maps ({job_plan.mode_label}, {weights})",
                               p.batch_size, settings.maps_every())
    jobs.start(p, job_plan, maps)
    claim_sd_unet_setting(p)
    compute_conditioning_afresh(p)


def compute_conditioning_afresh(p) -> None:
    """The members' own encodings are made while the WebUI encodes the prompts (afa.webui.text_conditioning), so an
    AFA job must not take the conditioning from the WebUI's cache of an earlier job. The caches are lists shared by
    every processing object (processing.py v1.10: `self.cached_c = StableDiffusionProcessing.cached_c`); this job
    gets lists of its own instead, so other jobs keep theirs."""
    for name in ("cached_c", "cached_uc", "cached_hr_c", "cached_hr_uc"):
        if hasattr(p, name):
            setattr(p, name, [None, None])


def refuse_if_setting_frozen() -> None:
    """AFA switches the "SD Unet" setting for its jobs (override_settings), which the WebUI's --freeze-settings
    flags forbid (options.py v1.10 asserts in Options.__setattr__ and the whole job would fail)."""
    cmd_opts = shared.cmd_opts
    frozen_sections = [x.strip() for x in (getattr(cmd_opts, "freeze_settings_in_sections", None) or "").split(",")]
    frozen_keys = [x.strip() for x in (getattr(cmd_opts, "freeze_specific_settings", None) or "").split(",")]
    section = getattr(shared.opts.data_labels.get("sd_unet"), "section", None) or (None,)
    if getattr(cmd_opts, "freeze_settings", False) or "sd_unet" in frozen_keys or section[0] in frozen_sections:
        raise AfaError("the WebUI runs with settings frozen (--freeze-settings...), and AFA needs to switch the "
                       "SD Unet setting for its jobs")


def claim_sd_unet_setting(p) -> None:
    """Makes this job use the `[AFA] Ensemble` SdUnet, for this job only."""
    release_stale_setting()
    # process_images (processing.py v1.10) saves, and restores in its `finally`, only overridden settings present
    # in opts.data; on a first start without config.json opts.data is empty and the override would outlive the job.
    # Storing the current (default) value there changes nothing but lets the WebUI restore it.
    if "sd_unet" not in shared.opts.data:
        shared.opts.set("sd_unet", shared.opts.sd_unet, run_callbacks=False)
    p.override_settings["sd_unet"] = LABEL
    jobs.claimed_overrides = p.override_settings


def release_sd_unet_setting(p) -> None:
    """For a job without AFA: no `[AFA] Ensemble` override and no stale setting. The override is AFA's own when an
    earlier X/Y/Z cell set it (cells share one override_settings dict); anyone else's (an API request naming the
    label) is dropped with a word on the console."""
    if p.override_settings.get("sd_unet") == LABEL:
        del p.override_settings["sd_unet"]
        if p.override_settings is not jobs.claimed_overrides:
            print("AFA: ignoring the SD Unet override '[AFA] Ensemble': enable the AFA ensemble script instead")
    release_stale_setting()


def release_stale_setting() -> None:
    """The accordion, not the "SD Unet" setting, enables AFA: a setting left on the AFA label (by an API request with
    override_settings_restore_afterwards=false, or chosen on the Settings page) is set back to Automatic."""
    if shared.opts.sd_unet == LABEL:
        shared.opts.set("sd_unet", "Automatic")
        print("AFA: set SD Unet back to Automatic (it was left on '[AFA] Ensemble')")


def process_batch(p, batch_number: int) -> None:
    job = jobs.active()
    if job is not None:
        job.ensemble_calls = 0


def forward_bypasses_sd_unet(unet) -> bool:
    """Whether another extension installed its own `forward` on the UNet instance, so the class-level forward that
    routes to the SdUnet is never called: sd-webui-controlnet's UnetHook.hook does (scripts/hook.py). Its
    restore() leaves the bound class forward as an instance attribute, which still routes through sd_unet."""
    instance_forward = vars(unet).get("forward")
    if instance_forward is None:
        return False
    return getattr(instance_forward, "__func__", None) is not type(unet).forward


def before_sampling(p) -> None:
    job = jobs.active()
    if job is None:
        return
    is_img2img = hasattr(p, "init_images")
    pass_label = "hires pass" if getattr(p, "is_hr_pass", False) else ("img2img" if is_img2img else "first pass")
    if forward_bypasses_sd_unet(loaded_unet()):
        tear_down()  # its hook runs the loaded UNet, which must be back on the device (cf. TensorRT issue #153)
        job.note(f"{pass_label}: another extension (ControlNet?) replaced the UNet's forward, which bypasses the "
                 f"WebUI's SD Unet; this pass ran without the ensemble")
        return
    if job.maps is not None:
        job.maps.begin_pass(pass_label)


def postprocess_batch(p, batch_number: int) -> None:
    job = jobs.active()
    if job is not None and job.maps is not None:
        job.map_images.extend(job.maps.render_batch())


def postprocess(p, processed) -> None:
    job = jobs.active()
    tear_down()
    if job is not None:
        append_maps(processed, job.map_images)
        job.settle_infotext(p)
    jobs.clear()
    cache.trim(settings.cache_policy())


def append_maps(processed, figures: list) -> None:
    """Adds one aggregation-map figure per generated image to the gallery, each with that image's infotext, so
    `images` and `infotexts` stay aligned ("Send to", PNG Info)."""
    first = processed.index_of_first_image
    generated = len(processed.images) - first
    for index, figure in enumerate(figures[:generated]):
        if figure is None:
            continue
        position = first + index
        infotext = processed.infotexts[position] if position < len(processed.infotexts) else processed.info
        figure.info["parameters"] = infotext
        processed.images.append(figure)
        processed.infotexts.append(infotext)


# -- WebUI callbacks ---------------------------------------------------------------------------------------------------

def on_cfg_denoiser(params) -> None:
    """Tells the maps which sampling step the next UNet call belongs to."""
    job = jobs.active()
    if job is None or job.maps is None:
        return
    denoiser = getattr(params, "denoiser", None)
    step = getattr(denoiser, "step", params.sampling_step)
    total = getattr(denoiser, "total_steps", None) or params.total_sampling_steps
    # the conditioning being sampled (the refiner's or hires pass's when they run): one list of AND parts per image
    extra_args = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None) or {}
    batch = getattr(extra_args.get("cond"), "batch", None)
    job.maps.on_denoiser_step(step, total, [len(parts) for parts in batch] if batch else None)


def on_model_loaded(sd_model) -> None:
    """A model was loaded. An ensemble built against the previous one must go (load_model moves the old model to
    `meta`; reload_model_weights has already deactivated the SdUnet, an extension calling load_model directly has
    not). Inside an AFA job (hires fix or refiner checkpoint, X/Y/Z checkpoint axis), build it against the new
    model: a checkpoint with its own config (yaml, SDXL refiner) is loaded by sd_models.load_model, which (v1.10)
    never calls apply_unet(); after weights loaded into the same model, reload_model_weights calls it right after
    this callback and finds the ensemble already built."""
    tear_down()
    if jobs.active() is not None and shared.opts.sd_unet == LABEL:
        sd_unet.apply_unet()


def on_script_unloaded() -> None:
    """"Reload UI" or shutdown: leave the WebUI as if AFA had never run, and free every cached member."""
    tear_down()
    jobs.clear()
    cache.clear()


def on_cache_setting_changed() -> None:
    policy = settings.cache_policy()
    if jobs.active() is None:
        cache.park(policy)
        cache.trim(policy)
