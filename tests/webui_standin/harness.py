"""Test harness around the A1111 1.10 stand-in: start a "WebUI" in a temporary data directory, load extensions the
way the WebUI does at startup, run txt2img jobs like the UI / API, unload, and reset every global between tests.

Typical use (see tests/test_webui_standin.py):

    from harness import webui            # tests/webui_standin must be on sys.path (harness puts it there)

    def test_something(tmp_path):
        with webui(tmp_path, extensions=[EXTENSION_ROOT]) as w:   # startup order: scripts load before the model
            processed = w.txt2img(prompt="a cat", steps=3, script_args={"My script": [True, 0.5]})
            response = w.client().post("/sdapi/v1/txt2img", json={...})

What the startup does, in the real order (modules/initialize.py, webui.py, modules/ui.py):
    preload.py's preload(parser) -> parse cmd_opts -> shared_init -> list_models -> load_scripts (each
    scripts/*.py with the extension root temporarily on sys.path) -> sd_unet.list_unets() -> load the model
    (model_loaded callbacks) -> before_ui callbacks -> ui.create_ui() (ui_settings callbacks, every script's ui()
    inside a real gr.Blocks, args_from/args_to) -> Api(app) (default script args from ui() in a throwaway Blocks)
    -> app_started(None, app) callbacks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Sequence

STANDIN_ROOT = Path(__file__).resolve().parent
REPO_ROOT = STANDIN_ROOT.parents[1]

if str(STANDIN_ROOT) not in sys.path:
    sys.path.insert(0, str(STANDIN_ROOT))
if str(REPO_ROOT) not in sys.path[:2]:
    # the `training` package (checkpoint factory); ahead of site-packages, which has an unrelated `training`
    sys.path.insert(1, str(REPO_ROOT))

import torch  # noqa: E402

import k_diffusion.sampling  # noqa: E402
from modules import (  # noqa: E402
    cache, call_queue, cmd_args, errors, extensions, extra_networks, infotext_utils, launch_utils, lowvram, paths,
    paths_internal, processing, script_callbacks, script_loading, scripts, sd_hijack, sd_models, sd_models_config,
    sd_samplers, sd_unet, sd_vae, shared, shared_cmd_options, shared_init, ui,
)

# The flags the real WebUI's CI server runs with (launch_utils.configure_for_tests + .github/workflows/run_tests.yaml),
# minus the --ckpt to test/test_files/empty.pt (the harness writes real checkpoints instead).
DEFAULT_ARGV = ("--api", "--no-half", "--use-cpu", "all", "--skip-torch-cuda-test", "--disable-opt-split-attention",
                "--api-server-stop")

DEFAULT_CHECKPOINTS = (("tiny-a", 1), ("tiny-b", 2), ("tiny-c", 3))


# ----------------------------------------------------------------------------------------------------------------------
# patches that must not leak between tests

def _patch_points():
    import ldm.modules.diffusionmodules.openaimodel as openaimodel
    from modules.standin_ldm import LatentDiffusion

    points = [(openaimodel.UNetModel, "forward"), (LatentDiffusion, "apply_model"), (LatentDiffusion, "forward")]
    for cls in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.MultiheadAttention,
                torch.nn.Module):
        points += [(cls, "forward"), (cls, "_load_from_state_dict"), (cls, "__call__")]
    return points


_PATCH_SNAPSHOT = {(cls, name): getattr(cls, name, None) for cls, name in _patch_points()}


def leaked_patches() -> list[str]:
    """Class attributes (UNetModel.forward, torch.nn layer forwards, ...) that differ from the WebUI's state at
    startup — what an extension left patched after unloading. (Compared by effective attribute: modules.patches
    restores an inherited method by setting it on the class itself, which is equivalent.)"""
    return [f"{cls.__module__}.{cls.__qualname__}.{name}" for (cls, name), original in _PATCH_SNAPSHOT.items()
            if getattr(cls, name, None) is not original]


# ----------------------------------------------------------------------------------------------------------------------
# checkpoints

_checkpoint_cache_dir: Path | None = None
_checkpoint_cache_lock = threading.Lock()


def _checkpoint_cache() -> Path:
    """The session's folder of generated checkpoints, with the tiny text encoder folder (`tiny-clip-text/`) that
    their yamls and the default config name. Call with _checkpoint_cache_lock held."""
    global _checkpoint_cache_dir
    if _checkpoint_cache_dir is None:
        _checkpoint_cache_dir = Path(tempfile.mkdtemp(prefix="webui-standin-checkpoints-"))
    return _checkpoint_cache_dir


def _tiny_sd_config() -> dict:
    """training/sd_checkpoint.py's tiny_sd_config, naming the text encoder folder in the checkpoint cache."""
    from training.sd_checkpoint import TINY_TEXT_ENCODER_FOLDER_NAME, tiny_sd_config
    return tiny_sd_config(_checkpoint_cache() / TINY_TEXT_ENCODER_FOLDER_NAME)


def tiny_checkpoint_file(seed: int, fmt: str = "safetensors") -> Path:
    """A tiny SD1 WebUI checkpoint (training/sd_checkpoint.py) drawn from `seed`, generated once per session. Its
    yaml names the text encoder folder beside it by absolute path, so copies of the yaml name it too."""
    with _checkpoint_cache_lock:
        path = _checkpoint_cache() / f"seed{seed}.{fmt}"
        if not path.exists():
            from training.sd_checkpoint import tiny_sd_state_dict, write_webui_checkpoint
            state_dict = tiny_sd_state_dict(seed)
            # A freshly initialised text encoder ends in a LayerNorm with zero bias, so its hidden states have a mean
            # of ~0 and the WebUI's "Original" emphasis (z * weights * old_mean / new_mean) divides by ~0. Trained
            # CLIP models have a clearly non-zero mean; give the tiny one a seeded non-zero final bias.
            bias_key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
            generator = torch.Generator().manual_seed(seed)
            state_dict[bias_key] = 0.5 + 0.1 * torch.randn(state_dict[bias_key].shape, generator=generator)
            write_webui_checkpoint(path, state_dict, _tiny_sd_config())
        return path


def family_checkpoint_file(family: str, seed: int) -> Path:
    """A tiny checkpoint of another family with its yaml, drawn from `seed`, generated once per session
    (tests/factories.py, its OpenCLIP tower under the architecture name the stand-in knows): "sd2", a tiny SD 2.x-v
    model (write_tiny_sd2_checkpoint); "sdxl", a tiny SDXL model in sgm's form (write_tiny_sdxl_checkpoint)."""
    import factories

    writers = {"sd2": lambda path: factories.write_tiny_sd2_checkpoint(path, seed, arch=factories.TINY_OPEN_CLIP_ARCH),
               "sdxl": lambda path: factories.write_tiny_sdxl_checkpoint(path, seed)}
    with _checkpoint_cache_lock:
        path = _checkpoint_cache() / f"{family}-seed{seed}.safetensors"
        if not path.exists():
            writers[family](path)
        return path


def default_config_file() -> Path:
    """The stand-in's `configs/v1-inference.yaml`, the config the WebUI builds a checkpoint without a yaml from:
    the tiny architecture (tiny_sd_config), written once per session into the checkpoint cache, because its text
    encoder `version` is the absolute path of the tiny text encoder folder there. `configure_paths` points the
    WebUI's default config at it."""
    import yaml

    with _checkpoint_cache_lock:
        path = _checkpoint_cache() / "configs" / "v1-inference.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            temporary = path.with_name(path.name + ".tmp")
            temporary.write_text(yaml.safe_dump(_tiny_sd_config(), sort_keys=False), encoding="utf-8")
            os.replace(temporary, path)
        return path


def write_checkpoints(directory: Path, checkpoints: Iterable[tuple[str, int]] = DEFAULT_CHECKPOINTS, *,
                      fmt: str = "safetensors", with_yaml: bool = True) -> list[Path]:
    """Copies tiny checkpoints into `directory` as `<name>.<fmt>` (+ `<name>.yaml` beside each if `with_yaml`).
    Each entry is (name, seed) for a tiny SD1 checkpoint, or (name, seed, family) with family "sd2" (a tiny
    SD 2.x-v one) or "sdxl" (a tiny SDXL one; both safetensors)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, seed, *family in checkpoints:
        source = family_checkpoint_file(family[0], seed) if family else tiny_checkpoint_file(seed, fmt)
        target = directory / f"{name}{source.suffix}"
        shutil.copyfile(source, target)
        if with_yaml:
            shutil.copyfile(source.with_suffix(".yaml"), target.with_suffix(".yaml"))
        written.append(target)
    return written


# ----------------------------------------------------------------------------------------------------------------------
# global state

def configure_paths(data_dir: str | os.PathLike) -> None:
    """Points the WebUI's data paths (paths_internal/paths/shared and the modules that copied them) at `data_dir`,
    and its default model config at `default_config_file()`."""
    data_dir = os.path.abspath(data_dir)
    values = dict(
        data_path=data_dir,
        models_path=os.path.join(data_dir, "models"),
        extensions_dir=os.path.join(data_dir, "extensions"),
        default_output_dir=os.path.join(data_dir, "outputs"),
        sd_default_config=str(default_config_file()),
    )
    for module in (paths_internal, paths, shared, extensions, launch_utils, infotext_utils):
        for key, value in values.items():
            if hasattr(module, key):
                setattr(module, key, value)
    sd_models.model_path = os.path.abspath(os.path.join(paths.models_path, sd_models.model_dir))
    sd_models_config.config_default = paths.sd_default_config


def new_parser():
    """A fresh WebUI argument parser (the stand-in's cmd_args.make_parser), installed as the shared one."""
    parser = cmd_args.make_parser()
    cmd_args.parser = parser
    shared_cmd_options.parser = parser
    shared.parser = parser
    return parser


def parse_cmd_opts(argv: Sequence[str] = DEFAULT_ARGV, parser=None, known_only=False):
    """Parses `argv` into the shared `cmd_opts` Namespace (in place: modules hold it by name)."""
    cmd_opts = shared_cmd_options.parse(argv, parser or shared_cmd_options.parser, known_only=known_only)
    launch_utils.args = cmd_opts
    return cmd_opts


def write_config(config: str | dict = "defaults") -> None:
    """Writes `config.json` (shared.config_filename) the way the WebUI saves it, then loads it as at startup.

    "defaults": every built-in setting at its default — what a config saved from the Settings page holds.
    "fresh": no config.json — a first start; the real Options.load() then leaves `opts.data` EMPTY (values come
        from the defaults through `__getattr__`), so `process_images` does not store, and never restores,
        `override_settings` keys that are not in `opts.data` (e.g. `sd_unet`).
    a dict: the defaults updated with these values.
    """
    filename = shared.config_filename
    if config == "fresh":
        if os.path.exists(filename):
            os.remove(filename)
    else:
        shared.opts.data = {k: v.default for k, v in shared.opts.data_labels.items() if not v.do_not_save}
        if isinstance(config, dict):
            shared.opts.data.update(config)
        shared.opts.save(filename)
    shared.opts.load(filename)


def reset(data_dir: str | os.PathLike | None = None, argv: Sequence[str] = DEFAULT_ARGV,
          config: str | dict = "defaults") -> None:
    """Forgets everything a previous test left: callbacks, scripts, extensions, the model, checkpoints, options,
    cmd_opts, state, caches, the active SdUnet; then writes and loads config.json (see `write_config`).
    (Class-level patches an extension left are reported by `leaked_patches()`, not undone.)"""
    if data_dir is not None:
        configure_paths(data_dir)

    script_callbacks.clear_callbacks()
    scripts.scripts_data.clear()
    scripts.postprocessing_scripts_data.clear()
    scripts.scripts_txt2img = scripts.ScriptRunner()
    scripts.scripts_img2img = scripts.ScriptRunner()
    scripts.scripts_current = None
    scripts.current_basedir = paths.script_path
    script_loading.loaded_scripts.clear()
    extensions.reset()
    extra_networks.initialize()
    extra_networks.register_default_extra_networks()
    infotext_utils.reset()
    ui.txt2img_paste_fields = []
    ui.img2img_paste_fields = []
    shared.demo = None

    sd_unet.unet_options.clear()
    sd_unet.current_unet = None
    sd_unet.current_unet_option = None

    sd_models.checkpoints_list.clear()
    sd_models.checkpoint_aliases.clear()
    sd_models.checkpoints_loaded.clear()
    sd_models.model_data = sd_models.SdModelData()
    sd_models.SkipWritingToConfig.skip = False
    sd_vae.base_vae = sd_vae.loaded_vae_file = sd_vae.checkpoint_info = None
    lowvram.module_in_gpu = None

    vars(sd_hijack.model_hijack).clear()
    sd_hijack.model_hijack.__init__()

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
    sd_samplers.get_sampler_and_scheduler.cache_clear()
    k_diffusion.sampling.torch = torch

    cache.caches.clear()
    cache.on_disk.clear()
    errors.exception_records.clear()
    errors.already_displayed.clear()
    launch_utils.pip_calls.clear()

    new_parser()
    parse_cmd_opts(argv, known_only=True)  # extensions' flags are only known after their preload.py ran
    shared_init.reinitialize()
    write_config(config)
    sd_samplers.set_samplers()


BUILTIN_LORA = STANDIN_ROOT / "extensions-builtin" / "Lora"


def forget_builtin_modules():
    """Drops the built-in Lora extension's top-level modules (`networks`, `lora_patches`, ...) from sys.modules so
    the next test imports them afresh. (The real WebUI keeps them for the life of the process.)"""
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None) or ""
        if filename.startswith(str(BUILTIN_LORA)):
            del sys.modules[name]


def lora_network_layer_names(sd_model=None) -> dict:
    """The Lora extension's `network_layer_mapping` of the loaded model (set by its on_model_loaded callback)."""
    return getattr(sd_model or shared.sd_model, "network_layer_mapping", {})


def write_lora(path: str | os.PathLike, layer_names: Iterable[str], *, rank: int = 4, seed: int = 0,
               alpha: float | None = None, scale: float = 0.1) -> Path:
    """Writes a kohya-style LoRA for the loaded model: for each compvis layer name of `network_layer_mapping`
    (e.g. "diffusion_model_input_blocks_1_1_proj_in", "transformer_text_model_encoder_layers_0_mlp_fc1"),
    `lora_unet_*` / `lora_te_*` keys with lora_down/lora_up (random, seeded) and alpha."""
    from safetensors.torch import save_file

    from factories import lora_pair  # tests/ (on the path in a pytest run)

    generator = torch.Generator().manual_seed(seed)
    mapping = lora_network_layer_names()
    tensors = {}
    for name in layer_names:
        module = mapping[name]
        weight = module.weight
        if name.startswith("diffusion_model_"):
            key = "lora_unet_" + name[len("diffusion_model_"):]
        elif name.startswith("transformer_text_model_"):
            key = "lora_te_text_model_" + name[len("transformer_text_model_"):]
        else:
            raise ValueError(f"not a UNet or text encoder layer: {name}")
        pair = lora_pair(weight, rank, scale, generator)
        if alpha is not None:
            pair["alpha"] = torch.tensor(float(alpha))
        tensors.update({f"{key}.{suffix}": tensor for suffix, tensor in pair.items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def xyz_grid_module():
    """The loaded X/Y/Z plot script module, found the way extensions find it."""
    return next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")


def ui_value(component):
    """The value a gradio event handler receives for a component left at its initial value: the browser sends
    `component.value` back and gradio runs `preprocess` on it (e.g. a `type="index"` Dropdown gives the index).
    (The API, by contrast, uses `component.value` as is — see Api.init_default_script_args.)"""
    try:
        return component.preprocess(component.value)
    except Exception:
        return component.value


def ui_script_args(runner: scripts.ScriptRunner, overrides: dict[str, Sequence] | None = None) -> list:
    """The `*args` the UI's Generate button passes for a runner's scripts: the script dropdown index (0 = None)
    followed by the value of every script component (`ui_value`); `overrides` maps script titles to positional
    values (like the API's alwayson_scripts args)."""
    args = [0] + [ui_value(component) for component in runner.inputs[1:]]
    for title, values in (overrides or {}).items():
        script = runner.script(title)
        if script is None:
            raise KeyError(f"no script titled {title!r}")
        for index, value in enumerate(list(values)[:script.args_to - script.args_from]):
            args[script.args_from + index] = value
    return args


class WebUI:
    """One started stand-in WebUI (data directory, checkpoints, loaded extensions, gradio demo, FastAPI app)."""

    def __init__(self, data_dir: Path, checkpoint_files: list[Path]):
        self.data_dir = data_dir
        self.models_dir = Path(sd_models.model_path)
        self.checkpoint_files = checkpoint_files
        self.extension_dirs: list[Path] = []
        self.builtin_dirs: list[Path] = []
        self.demo = None
        self.app = None
        self.api = None

    # -- startup ------------------------------------------------------------------------------------------------------

    def load_extension(self, extension_dir: str | os.PathLike, *, argv: Sequence[str] | None = None,
                       builtin: bool = False):
        """Loads an extension as A1111 does at startup (or on "Reload UI" when the model is already loaded)."""
        if builtin:
            return self.load_extensions([], argv=argv, builtin_dirs=[extension_dir])
        return self.load_extensions([extension_dir], argv=argv)

    def load_extensions(self, extension_dirs: Iterable[str | os.PathLike], *, argv: Sequence[str] | None = None,
                        builtin_dirs: Iterable[str | os.PathLike] = ()):
        extension_dirs = [Path(x).resolve() for x in extension_dirs]
        builtin_dirs = [Path(x).resolve() for x in builtin_dirs]

        # modules/shared_cmd_options.py: preload user extensions, then built-in ones, then parse the command line
        parser = new_parser()
        for extension_dir in self.extension_dirs + extension_dirs + self.builtin_dirs + builtin_dirs:
            script_loading.preload_extensions(str(extension_dir.parent), parser, extension_list=[extension_dir.name])
        argv = list(DEFAULT_ARGV if argv is None else argv)
        parse_cmd_opts(argv, parser)
        shared_init.init_devices()

        # modules/extensions.py: list_extensions (built-in extensions first)
        self.builtin_dirs += builtin_dirs
        self.extension_dirs += extension_dirs
        extensions.reset()
        for extension_dir, is_builtin in [(x, True) for x in self.builtin_dirs] + [(x, False) for x in self.extension_dirs]:
            extensions.register(extensions.Extension(name=extension_dir.name, path=str(extension_dir), enabled=True,
                                                     is_builtin=is_builtin))

        self._start()
        return self

    def _start(self):
        """modules/initialize.py: initialize_rest -> webui.py: webui()/api_only()"""
        from fastapi import FastAPI

        shared.opts.onchange("sd_model_checkpoint", lambda: sd_models.reload_model_weights(), call=False)
        scripts.load_scripts()
        sd_unet.list_unets()
        shared.sd_model  # noqa: B018  (loads the model if it was not loaded yet: model_loaded callbacks run)

        script_callbacks.before_ui_callback()
        self.demo = shared.demo = ui.create_ui()

        self.app = FastAPI()
        if shared.cmd_opts.api or shared.cmd_opts.nowebui:
            from modules.api.api import Api
            self.api = Api(self.app, call_queue.queue_lock)  # webui.py create_api: the shared queue lock
        script_callbacks.app_started_callback(None, self.app)
        return self

    # -- use ----------------------------------------------------------------------------------------------------------

    @property
    def sd_model(self):
        return shared.sd_model

    def client(self):
        from fastapi.testclient import TestClient
        return TestClient(self.app)

    def event(self, component=None, event: str = "click", inputs: list | None = None) -> list:
        """Runs what gradio registered for `event` on `component` (None: the page's "load" events) the way a browser
        request does (gradio's `process_api`: preprocess the inputs, call the function, postprocess its outputs,
        updates included); JavaScript-only handlers are skipped. `inputs` default to the input components'
        current values. Returns each handler's output data, in registration order; raises what gradio raised."""
        import asyncio

        results = []
        for index, dependency in enumerate(self.demo.dependencies):
            targets = dependency["targets"]
            if dependency["trigger"] != event or self.demo.fns[index].fn is None:
                continue
            if (component is None and targets) or (component is not None and component._id not in targets):
                continue
            values = inputs if inputs is not None else [self.demo.blocks[i].value for i in dependency["inputs"]]
            output = asyncio.run(self.demo.process_api(fn_index=index, inputs=list(values), state={}))
            results.append(output["data"])
        return results

    def outputs_of(self, component, event: str = "click") -> list:
        """The components the first Python handler of `event` on `component` writes to, in order."""
        for index, dependency in enumerate(self.demo.dependencies):
            if component._id in dependency["targets"] and dependency["trigger"] == event \
                    and self.demo.fns[index].fn is not None:
                return [self.demo.blocks[i] for i in dependency["outputs"]]
        raise KeyError(f"no {event} handler on {component}")

    def script(self, title: str, is_img2img: bool = False):
        runner = scripts.scripts_img2img if is_img2img else scripts.scripts_txt2img
        return runner.script(title)

    def txt2img_processing(self, *, script_args: dict[str, Sequence] | list | None = None, **fields):
        """A StableDiffusionProcessingTxt2Img built like modules/txt2img.py: txt2img_create_processing (output dirs
        from opts, `p.scripts = scripts_txt2img`, `p.script_args` = the UI's script values with `script_args`
        overrides, which also runs the scripts' setup()). Defaults: 64x64, 3 steps, "Euler"/"Automatic" (what the
        UI's sampler and seed built-in scripts would set), seed 1."""
        defaults = dict(prompt="a photo of a cat", negative_prompt="", width=64, height=64, steps=3, cfg_scale=7.0,
                        sampler_name="Euler", scheduler="Automatic", seed=1, batch_size=1, n_iter=1)
        defaults.update(fields)
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            outpath_samples=shared.opts.outdir_samples or shared.opts.outdir_txt2img_samples,
            outpath_grids=shared.opts.outdir_grids or shared.opts.outdir_txt2img_grids,
            **defaults,
        )
        p.scripts = scripts.scripts_txt2img
        p.script_args = script_args if isinstance(script_args, (list, tuple)) else ui_script_args(scripts.scripts_txt2img, script_args)
        return p

    def txt2img(self, *, script_args: dict[str, Sequence] | list | None = None, **fields):
        """Runs a txt2img job as the UI's Generate button does (modules/txt2img.py: txt2img inside
        call_queue.wrap_gradio_gpu_call: state.begin/end, selectable script or process_images, closing(p))."""
        p = self.txt2img_processing(script_args=script_args, **fields)
        shared.state.begin(job="txt2img")
        try:
            with contextlib.closing(p):
                processed = scripts.scripts_txt2img.run(p, *p.script_args)
                if processed is None:
                    processed = processing.process_images(p)
            shared.total_tqdm.clear()
        finally:
            shared.state.end()
        return processed

    # -- shutdown -----------------------------------------------------------------------------------------------------

    def unload(self):
        """What "Reload UI"/shutdown does to scripts: on_script_unloaded callbacks (last registered first), then
        every callback is dropped (script_callbacks.clear_callbacks, as scripts.load_scripts does)."""
        script_callbacks.script_unloaded_callback()
        script_callbacks.clear_callbacks()
        scripts.scripts_data.clear()
        scripts.scripts_txt2img = scripts.ScriptRunner()
        scripts.scripts_img2img = scripts.ScriptRunner()
        sd_unet.unet_options.clear()
        extensions.reset()
        self.extension_dirs = []
        self.builtin_dirs = []

    def close(self):
        if self.extension_dirs or self.builtin_dirs or script_callbacks.callback_map["callbacks_script_unloaded"]:
            self.unload()
        forget_builtin_modules()
        reset(argv=DEFAULT_ARGV, config="fresh")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()


def webui(tmp_path: str | os.PathLike, *, checkpoints: Iterable[tuple[str, int]] = DEFAULT_CHECKPOINTS,
          checkpoint_format: str = "safetensors", with_yaml: bool = True, argv: Sequence[str] = DEFAULT_ARGV,
          extensions: Iterable[str | os.PathLike] = (), load_model: bool = True,
          config: str | dict = "defaults", builtin_lora: bool = False) -> WebUI:
    """Starts a fresh stand-in WebUI with its data directory in `tmp_path`.

    Writes the tiny checkpoints into `<tmp>/models/Stable-diffusion/`, resets every global, writes config.json
    (`config`, see `write_config`), selects the first checkpoint. With `extensions`, runs the real startup sequence
    with them (their scripts load before the model, so their on_model_loaded callbacks see the first load).
    Without, starts with the built-in scripts only (X/Y/Z plot) if `load_model` — a later `.load_extension()` is
    then the "Reload UI" order (model already loaded) — or does not start at all if not `load_model` (a later
    `.load_extension()` is then the startup order). `builtin_lora` adds the built-in Lora extension stand-in
    (extensions-builtin/Lora; LoRA files go in `<tmp>/webui/models/Lora`, see `write_lora`).
    """
    data_dir = Path(tmp_path) / "webui"
    data_dir.mkdir(parents=True, exist_ok=True)
    reset(data_dir, argv=argv, config=config)

    files = write_checkpoints(Path(sd_models.model_path), checkpoints, fmt=checkpoint_format, with_yaml=with_yaml)
    sd_models.setup_model()
    sd_models.list_models()
    if files:
        first = sd_models.get_closet_checkpoint_match(files[0].name)
        shared.opts.data["sd_model_checkpoint"] = first.title

    instance = WebUI(data_dir, files)
    extension_dirs = list(extensions)
    builtin_dirs = [BUILTIN_LORA] if builtin_lora else []
    if extension_dirs or builtin_dirs:
        instance.load_extensions(extension_dirs, argv=argv, builtin_dirs=builtin_dirs)
    elif load_model:
        instance._start()
    return instance


def load_extension(extension_dir: str | os.PathLike, instance: WebUI | None = None, **kwargs) -> WebUI:
    """Module-level shortcut: loads `extension_dir` into `instance` (which must come from `webui()`)."""
    if instance is None:
        raise ValueError("start the stand-in first: instance = webui(tmp_path)")
    return instance.load_extension(extension_dir, **kwargs)
