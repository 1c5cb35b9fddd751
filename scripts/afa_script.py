"""AFA ensemble for AUTOMATIC1111's WebUI (1.10): registration only. The work is done in `afa.webui`.

Reads top-down: the host check, then the script (accordion and job hooks), the settings section, the SD Unet
option, callbacks, X/Y/Z axes, the training tab and the trainer it runs, API routes, the unload handler. Importing
this file scans no folder and loads no model.

In a WebUI that is not A1111 1.10 (Forge and its forks reForge, Forge Classic and Forge Neo: they route no UNet
through `sd_unet` and ship no `ldm`), this file registers nothing and prints one line. Everything else stays behind
that check: the imports of `afa`, and the Script class (the WebUI registers every Script subclass in this module).
"""

from __future__ import annotations

import importlib.util

from modules import script_callbacks, scripts

NEEDS = "AFA ensemble needs AUTOMATIC1111's WebUI 1.10 or ComfyUI"


def unsupported_host() -> str | None:
    """Why this WebUI cannot run the extension (a few words), or None in A1111 1.10. Only looks for packages
    (`find_spec` imports none): Forge and its forks ship `modules_forge`; the ensemble is built from ldm's UNet."""
    def installed(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken package, or one whose module has no spec
            return False

    if installed("modules_forge"):
        return "this WebUI is Forge or one of its forks (it has modules_forge), which run no UNet through sd_unet"
    if not installed("ldm"):
        return "this WebUI has no ldm package (Stability-AI's stablediffusion repository)"
    return None


HOST_PROBLEM = unsupported_host()
if HOST_PROBLEM is not None:
    print(f"{NEEDS}; {HOST_PROBLEM}: it does nothing here")
else:
    from afa.webui import api, hooks, infotext, sd_unet_option, settings, training_job, training_ui, ui, xyz
    try:
        from training import service as training_service
    except ImportError as error:  # another extension's top-level `training` package came first: no trainer
        training_service = None
        print(f"AFA: the training tab cannot train ({error}); the ensemble works as before")

    class AfaEnsembleScript(scripts.Script):
        """The "AFA ensemble" accordion in txt2img and img2img.

        Arguments (the API's `alwayson_scripts` "args", in this order, append-only):
            enabled (bool), members (list of checkpoint names), weights (file name in the weights folder, or "" for
            none), mode ("SABW", "Block average", "Noise average"), show_maps (bool).
        """

        def title(self):
            return "AFA ensemble"

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            controls = ui.build_accordion(self.elem_id, "img2img" if is_img2img else "txt2img")
            self.infotext_fields = infotext.infotext_fields(controls.enabled, controls.members, controls.weights,
                                                            controls.mode)
            self.paste_field_names = infotext.PASTE_FIELD_NAMES
            return controls.args

        def before_process(self, p, *args):
            hooks.before_process(p, args)

        def process_batch(self, p, *args, batch_number, **kwargs):
            hooks.process_batch(p, batch_number)

        def process_before_every_sampling(self, p, *args, **kwargs):
            hooks.before_sampling(p)

        def postprocess_batch(self, p, *args, batch_number, **kwargs):
            hooks.postprocess_batch(p, batch_number)

        def postprocess(self, p, processed, *args):
            hooks.postprocess(p, processed)

    settings.register(on_cache_change=hooks.on_cache_setting_changed)
    script_callbacks.on_list_unets(sd_unet_option.list_unets)
    script_callbacks.on_cfg_denoiser(hooks.on_cfg_denoiser)
    script_callbacks.on_model_loaded(hooks.on_model_loaded)
    script_callbacks.on_before_ui(xyz.add_axes)
    if training_service is not None:
        training_job.use_trainer(training_service)
    script_callbacks.on_ui_tabs(training_ui.create_tab)
    script_callbacks.on_app_started(lambda demo, app: api.add_routes(app))
    script_callbacks.on_script_unloaded(hooks.on_script_unloaded)
