"""AFA ensemble for AUTOMATIC1111's WebUI (1.10): registration only. The work is done in `afa.webui`.

Reads top-down: the script (accordion and job hooks), the settings section, the SD Unet option, callbacks, X/Y/Z
axes, the training tab and the trainer it runs, API routes, the unload handler. Importing this file scans no folder
and loads no model.
"""

from modules import script_callbacks, scripts

from afa.webui import api, hooks, infotext, sd_unet_option, settings, training_job, training_ui, ui, xyz
try:
    from training import service as training_service
except ImportError as error:  # another extension's top-level `training` package came first: no training tab trainer
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
