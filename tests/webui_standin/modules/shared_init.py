"""Stand-in of modules/shared_init.py (v1.10): fills `shared.opts`, `shared.state`, devices from `cmd_opts`.

The real WebUI calls `initialize()` once, early at startup. The stand-in calls it when `modules.shared` is first
imported; `harness` calls `reinitialize()` per test, which updates the same objects in place (modules hold them
by name: `from modules.shared import opts, state`).
"""

import os

import torch

from modules import shared
from modules.shared import cmd_opts


# modules/shared_init.py (v1.10): initialize (interrogator, memmon, gradio theme omitted)
def initialize():
    """Initializes fields inside the shared module in a controlled manner.

    Should be called early because some other modules you can import mingt need these fields to be already set.
    """

    from modules import options, shared_options
    shared.options_templates = shared_options.options_templates
    shared.opts = options.Options(shared_options.options_templates, shared_options.restricted_opts)
    shared.restricted_opts = shared_options.restricted_opts
    try:
        shared.opts.load(shared.config_filename)
    except FileNotFoundError:
        pass

    init_devices()

    from modules import shared_state
    shared.state = shared_state.State()

    from modules import styles
    shared.prompt_styles = styles.StyleDatabase(shared.styles_filename)

    from modules import shared_total_tqdm
    shared.total_tqdm = shared_total_tqdm.TotalTQDM()


def init_devices():
    from modules import devices
    devices.device, devices.device_interrogate, devices.device_gfpgan, devices.device_esrgan, devices.device_codeformer = \
        (devices.cpu if any(y in cmd_opts.use_cpu for y in [x, 'all']) else devices.get_optimal_device() for x in ['sd', 'interrogate', 'gfpgan', 'esrgan', 'codeformer'])

    devices.dtype = torch.float32 if cmd_opts.no_half else torch.float16
    devices.dtype_vae = torch.float32 if cmd_opts.no_half or cmd_opts.no_half_vae else torch.float16
    devices.dtype_inference = torch.float32 if cmd_opts.precision == 'full' else devices.dtype
    devices.dtype_unet = devices.dtype
    devices.unet_needs_upcast = False
    devices.fp8 = False
    devices.force_fp16 = False

    if cmd_opts.precision == "half":
        msg = "--no-half and --no-half-vae conflict with --precision half"
        assert devices.dtype == torch.float16, msg
        assert devices.dtype_vae == torch.float16, msg
        assert devices.dtype_inference == torch.float16, msg
        devices.force_fp16 = True
        devices.force_model_fp16()

    shared.device = devices.device
    shared.weight_load_location = None if cmd_opts.lowram else "cpu"


def reinitialize():
    """Stand-in helper: the effect of a fresh `initialize()` on the objects that already exist."""
    from modules import shared_options

    shared.config_filename = cmd_opts.ui_settings_file
    shared.styles_filename = cmd_opts.styles_file = cmd_opts.styles_file if len(cmd_opts.styles_file) > 0 else [os.path.join(shared.data_path, 'styles.csv')]
    shared.hide_dirs = {"visible": not cmd_opts.hide_ui_dir_config}

    shared_options.options_templates = shared_options.build_options_templates()
    shared.options_templates = shared_options.options_templates
    shared.opts.data_labels = shared_options.options_templates
    shared.opts.data = {k: v.default for k, v in shared.opts.data_labels.items() if not v.do_not_save}
    try:
        shared.opts.load(shared.config_filename)
    except FileNotFoundError:
        pass

    init_devices()

    vars(shared.state).clear()
    shared.state.__init__()

    shared.prompt_styles.styles.clear()
    shared.total_tqdm.clear()
    shared.parallel_processing_allowed = True
