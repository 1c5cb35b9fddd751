"""Self-tests of the A1111 1.10 stand-in (tests/webui_standin): the mechanisms extensions rely on behave as in
the real WebUI — txt2img jobs and infotexts, the sd_unet switch through the class-level UNet forward,
override_settings restored in `finally`, postprocess skipped when sampling raises, alwayson_scripts argument
mapping, InputAccordion, infotext round trip, X/Y/Z axes added from on_before_ui, hires checkpoint switch, unload.

A small extension (preload.py + scripts/dummy.py, written into tmp_path) exercises the harness end to end.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_standin"))

import harness  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from modules import errors, infotext_utils, processing, script_callbacks, scripts, sd_hijack, sd_models, sd_unet, shared  # noqa: E402
from modules.ui_components import InputAccordion  # noqa: E402

DUMMY_PRELOAD = '''
def preload(parser):
    parser.add_argument("--dummy-flag", type=str, default="default", help="dummy extension flag")
'''

DUMMY_SCRIPT = '''
import gradio as gr

from modules import scripts, script_callbacks, sd_unet, shared, sd_hijack
from modules.ui_components import InputAccordion

EVENTS = []
LABEL = "[Dummy] Unet"
FAIL_IN_UNET = False
FAIL_IN_PROCESS = False


class DummyUnet(sd_unet.SdUnet):
    def __init__(self):
        super().__init__()
        self.base = shared.sd_model.model.diffusion_model

    def activate(self):
        EVENTS.append(("activate", shared.sd_model.sd_checkpoint_info.name_for_extra))

    def deactivate(self):
        EVENTS.append(("deactivate",))

    def forward(self, x, timesteps, context, *args, **kwargs):
        EVENTS.append(("forward", tuple(x.shape), tuple(context.shape)))
        if FAIL_IN_UNET:
            raise RuntimeError("dummy unet failure")
        # the class-level forward is patched: run the base UNet through the original forward
        return sd_hijack.ldm_original_forward(self.base, x, timesteps, context, *args, **kwargs)


class DummyOption(sd_unet.SdUnetOption):
    label = LABEL
    model_name = None

    def create_unet(self):
        EVENTS.append(("create_unet", shared.sd_model.sd_checkpoint_info.name_for_extra))
        return DummyUnet()


def list_unets(options):
    options.append(DummyOption())


def before_ui():
    EVENTS.append(("before_ui",))
    xyz = next(d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py")
    if not any(x.label == "[Dummy] Strength" for x in xyz.axis_options):
        xyz.axis_options.append(xyz.AxisOption("[Dummy] Strength", float, xyz.apply_field("dummy_strength")))


def ui_settings():
    EVENTS.append(("ui_settings",))
    shared.opts.add_option("dummy_option", shared.OptionInfo(3, "Dummy option", section=("dummy", "Dummy")))


def app_started(demo, app):
    EVENTS.append(("app_started", demo is None))

    @app.get("/dummy/ping")
    async def ping():
        return {"sd_unet": shared.opts.sd_unet, "flag": shared.cmd_opts.dummy_flag}


script_callbacks.on_list_unets(list_unets)
script_callbacks.on_model_loaded(lambda m: EVENTS.append(("model_loaded", m.sd_checkpoint_info.name_for_extra)))
script_callbacks.on_before_ui(before_ui)
script_callbacks.on_ui_settings(ui_settings)
script_callbacks.on_app_started(app_started)
script_callbacks.on_script_unloaded(lambda: EVENTS.append(("script_unloaded",)))


class DummyScript(scripts.Script):
    def title(self):
        return "Dummy script"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        EVENTS.append(("ui", is_img2img))
        with InputAccordion(False, label="Dummy ensemble", elem_id=self.elem_id("enabled")) as enabled:
            strength = gr.Slider(minimum=0.0, maximum=1.0, value=0.5, label="Strength", elem_id=self.elem_id("strength"))
            mode = gr.Dropdown(["a", "b"], value="a", label="Mode", elem_id=self.elem_id("mode"))
        self.infotext_fields = [(enabled, lambda d: "Dummy strength" in d), (strength, "Dummy strength")]
        return [enabled, strength, mode]

    def before_process(self, p, enabled, strength, mode):
        EVENTS.append(("before_process", enabled, strength, mode, p.is_api))
        if enabled:
            p.override_settings["sd_unet"] = LABEL
            p.extra_generation_params["Dummy strength"] = strength

    def process(self, p, *args):
        EVENTS.append(("process", shared.opts.sd_unet, getattr(p, "dummy_strength", None)))
        if FAIL_IN_PROCESS:
            raise ValueError("dummy process failure")

    def process_before_every_sampling(self, p, *args, **kwargs):
        EVENTS.append(("process_before_every_sampling", p.is_hr_pass, shared.sd_model.sd_checkpoint_info.name_for_extra,
                       type(sd_unet.current_unet).__name__))

    def before_hr(self, p, *args):
        EVENTS.append(("before_hr", shared.sd_model.sd_checkpoint_info.name_for_extra))

    def postprocess(self, p, processed, *args):
        EVENTS.append(("postprocess", shared.opts.sd_unet, len(processed.images)))
'''


def write_dummy_extension(root: Path) -> Path:
    extension = root / "extensions" / "sd-webui-dummy"
    (extension / "scripts").mkdir(parents=True)
    (extension / "preload.py").write_text(textwrap.dedent(DUMMY_PRELOAD))
    (extension / "scripts" / "dummy.py").write_text(textwrap.dedent(DUMMY_SCRIPT))
    return extension


def dummy_module():
    return next(d.module for d in scripts.scripts_data if d.script_class.__name__ == "DummyScript")


@pytest.fixture
def ui(tmp_path):
    """A stand-in WebUI without extensions (built-in scripts only), model loaded."""
    with harness.webui(tmp_path) as instance:
        yield instance
    assert harness.leaked_patches() == []


@pytest.fixture
def ui_dummy(tmp_path):
    """A stand-in WebUI started with the dummy extension (startup order: scripts, then the model)."""
    with harness.webui(tmp_path, extensions=[write_dummy_extension(tmp_path)]) as instance:
        yield instance
    assert harness.leaked_patches() == []


def test_txt2img_gives_images_and_a_real_infotext(ui):
    processed = ui.txt2img(prompt="a photo of a cat", negative_prompt="blurry", seed=1, steps=3, batch_size=2)

    info = sd_models.get_closet_checkpoint_match("tiny-a")
    assert [image.size for image in processed.images] == [(128, 64), (64, 64), (64, 64)]  # grid first
    assert processed.index_of_first_image == 1
    assert len(processed.infotexts) == 3
    assert processed.infotexts[1] == (
        "a photo of a cat\nNegative prompt: blurry\n"
        f"Steps: 3, Sampler: Euler, Schedule type: Automatic, CFG scale: 7.0, Seed: 1, Size: 64x64, "
        f"Model hash: {info.shorthash}, Model: tiny-a, Version: v1.10.1"
    )
    assert "Seed: 2," in processed.infotexts[2]
    assert processed.images[1].info["parameters"] == processed.infotexts[1]

    again = ui.txt2img(prompt="a photo of a cat", negative_prompt="blurry", seed=1, steps=3, batch_size=1)
    assert list(again.images[0].getdata()) == list(processed.images[1].getdata())  # seeded, deterministic
    assert list(again.images[0].getdata()) != list(processed.images[2].getdata())
    saved = list((ui.data_dir / "outputs" / "txt2img-images").rglob("*.png"))
    assert len(saved) == 3


def test_loaded_model_is_shaped_like_the_webuis_sd1_model(ui):
    import ldm.modules.diffusionmodules.openaimodel as openaimodel

    model = shared.sd_model
    assert isinstance(model.model.diffusion_model, openaimodel.UNetModel)
    assert (model.is_sd1, model.is_sd2, model.is_sdxl, model.lowvram) == (True, False, False, False)
    assert openaimodel.UNetModel.forward is sd_hijack.ldm_patched_forward
    assert type(model.cond_stage_model).__name__ == "FrozenCLIPEmbedderWithCustomWords"
    assert model.get_learned_conditioning(["a", "b"]).shape == (2, 77, 32)
    assert model.get_learned_conditioning(["a " * 80]).shape == (1, 154, 32)  # two 75-token chunks

    info = model.sd_checkpoint_info
    assert (info.name, info.name_for_extra, info.model_name) == ("tiny-a.safetensors", "tiny-a", "tiny-a")
    assert info.title == f"tiny-a.safetensors [{info.sha256[:10]}]" and info.shorthash == info.sha256[:10]
    assert sd_models.get_closet_checkpoint_match("tiny-b").name == "tiny-b.safetensors"
    assert shared.opts.sd_model_checkpoint == info.title
    state_dict = sd_models.read_state_dict(sd_models.get_closet_checkpoint_match("tiny-b").filename, map_location="cpu")
    assert "model.diffusion_model.input_blocks.0.0.weight" in state_dict
    assert "sd_unet" in shared.opts.data_labels and shared.opts.sd_unet == "Automatic"


def test_sd_unet_option_is_used_through_the_class_forward_and_opts_are_restored(ui_dummy):
    module = dummy_module()
    assert module.LABEL in shared.opts.data_labels["sd_unet"].component_args()["choices"]
    assert sd_unet.unet_options[0].label == module.LABEL
    module.EVENTS.clear()

    processed = ui_dummy.txt2img(steps=3, script_args={"Dummy script": [True, 0.25]})

    events = module.EVENTS
    assert events[0] == ("before_process", True, 0.25, "a", False)
    assert ("process", module.LABEL, None) in events  # override applied before scripts.process
    assert ("create_unet", "tiny-a") in events and ("activate", "tiny-a") in events
    forwards = [e for e in events if e[0] == "forward"]
    assert forwards == [("forward", (2, 4, 8, 8), (2, 77, 32))] * 3  # cond + uncond batched, one call per step
    assert events[-1] == ("postprocess", module.LABEL, 1)
    assert shared.opts.sd_unet == "Automatic"  # restored in process_images' finally
    assert "Dummy strength: 0.25" in processed.infotexts[0]

    # the switch is class-level: any UNetModel instance is routed to the active SdUnet
    assert isinstance(sd_unet.current_unet, module.DummyUnet)
    unet = shared.sd_model.model.diffusion_model
    unet(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), context=torch.zeros(1, 77, 32))
    assert module.EVENTS[-1] == ("forward", (1, 4, 8, 8), (1, 77, 32))

    module.EVENTS.clear()
    ui_dummy.txt2img(steps=2)  # disabled: the next job's apply_unet() deactivates the dummy UNet
    assert module.EVENTS[:3] == [("before_process", False, 0.5, "a", False), ("process", "Automatic", None), ("deactivate",)]
    assert sd_unet.current_unet is None
    assert not any(e[0] == "forward" for e in module.EVENTS)


def test_interrupt_returns_the_last_latent_and_still_postprocesses(ui_dummy):
    module = dummy_module()
    steps_seen = []

    def interrupt_after_first_step(params):
        steps_seen.append(params.sampling_step)
        shared.state.interrupt()

    script_callbacks.on_cfg_denoiser(interrupt_after_first_step)
    module.EVENTS.clear()

    processed = ui_dummy.txt2img(steps=4, n_iter=2)

    assert steps_seen == [0]  # the CFG denoiser raises InterruptedException at the start of the next step
    assert len(processed.images) == 1  # the sampler returned its last latent; the second batch never started
    assert module.EVENTS[-1] == ("postprocess", "Automatic", 1)


def test_exception_in_sampling_skips_postprocess_and_restores_opts(ui_dummy):
    module = dummy_module()
    module.FAIL_IN_UNET = True
    module.EVENTS.clear()

    with pytest.raises(RuntimeError, match="dummy unet failure"):
        ui_dummy.txt2img(steps=2, script_args={"Dummy script": [True]})

    assert [e[0] for e in module.EVENTS if e[0] != "forward"] == [
        "before_process", "process", "create_unet", "activate", "process_before_every_sampling"]
    assert shared.opts.sd_unet == "Automatic"
    assert isinstance(sd_unet.current_unet, module.DummyUnet)  # nothing tears it down until the next apply_unet()


def test_hook_exceptions_are_only_reported(ui_dummy):
    module = dummy_module()
    module.FAIL_IN_PROCESS = True
    errors.exception_records.clear()

    processed = ui_dummy.txt2img(steps=2)

    assert len(processed.images) == 1
    assert errors.exception_records[-1]["exception"] == "dummy process failure"
    assert module.EVENTS[-1][0] == "postprocess"


def test_startup_order_callbacks_settings_preload_and_unload(ui_dummy):
    module = dummy_module()
    names = [e[0] for e in module.EVENTS]
    # scripts load before the model: on_model_loaded sees the first load; before_ui precedes the UI; each ui() is
    # called once per tab, then again by the API to harvest defaults; app_started gets demo=None (API-only style)
    assert names[:6] == ["model_loaded", "before_ui", "ui_settings", "ui", "ui", "ui"]
    assert ("app_started", True) in module.EVENTS
    assert shared.opts.dummy_option == 3
    assert shared.cmd_opts.dummy_flag == "default"

    script = ui_dummy.script("Dummy script")
    assert (script.args_to - script.args_from) == 3 and script.alwayson and script.name == "dummy script"
    assert harness.xyz_grid_module().axis_options[-1].label == "[Dummy] Strength"

    response = ui_dummy.client().get("/dummy/ping")
    assert response.json() == {"sd_unet": "Automatic", "flag": "default"}

    ui_dummy.unload()
    assert module.EVENTS[-1] == ("script_unloaded",)
    assert all(not callbacks for callbacks in script_callbacks.callback_map.values())


def test_preload_flag_is_parsed_from_argv(tmp_path):
    extension = write_dummy_extension(tmp_path)
    with harness.webui(tmp_path, extensions=[extension], argv=harness.DEFAULT_ARGV + ("--dummy-flag", "x")):
        assert shared.cmd_opts.dummy_flag == "x"
    assert not hasattr(shared.cmd_opts, "dummy_flag")  # reset between tests


def test_alwayson_scripts_args_are_mapped_like_the_api(ui_dummy):
    module = dummy_module()
    client = ui_dummy.client()
    module.EVENTS.clear()

    payload = dict(prompt="a cat", steps=2, width=64, height=64, sampler_name="Euler", seed=3,
                   alwayson_scripts={"DUMMY SCRIPT": {"args": [True]}})
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    assert module.EVENTS[0] == ("before_process", True, 0.5, "a", True)  # defaults from ui() fill the rest; is_api
    assert len(response.json()["images"]) == 1
    assert "Dummy strength: 0.5" in response.json()["info"]

    module.EVENTS.clear()
    payload["alwayson_scripts"] = {"Dummy script": {"args": [False, 0.75, "b", "ignored", "too"]}}
    assert client.post("/sdapi/v1/txt2img", json=payload).status_code == 200
    assert module.EVENTS[0] == ("before_process", False, 0.75, "b", True)  # extra positions are cut off

    payload["alwayson_scripts"] = {"No such script": {"args": []}}
    assert client.post("/sdapi/v1/txt2img", json=payload).status_code == 422
    payload["alwayson_scripts"] = {"X/Y/Z plot": {"args": []}}  # selectable, not always-on
    assert client.post("/sdapi/v1/txt2img", json=payload).status_code == 422

    payload["alwayson_scripts"] = {}
    payload["override_settings"] = {"sd_unet": module.LABEL}
    payload["override_settings_restore_afterwards"] = False
    assert client.post("/sdapi/v1/txt2img", json=payload).status_code == 200
    assert shared.opts.sd_unet == module.LABEL  # a request may leave the setting behind

    info = client.get("/sdapi/v1/script-info").json()
    dummy = next(x for x in info if x["name"] == "dummy script" and not x["is_img2img"])
    assert [arg["label"] for arg in dummy["args"]] == ["Dummy ensemble", "Strength", "Mode"]
    assert client.get("/sdapi/v1/options").json()["sd_unet"] == module.LABEL


def descendants(block):
    for child in getattr(block, "children", []):
        yield child
        yield from descendants(child)


def test_input_accordion_builds_inside_blocks():
    with gr.Blocks() as demo:
        with InputAccordion(False, label="AFA ensemble", elem_id="afa_enabled") as enabled:
            strength = gr.Slider(0, 1, value=0.5, label="Strength")
            with enabled.extra():
                gr.HTML("extra")

    assert isinstance(enabled, gr.Checkbox) and enabled.value is False and enabled.visible is False
    assert enabled.elem_id == "afa_enabled-checkbox" and enabled.get_block_name() == "checkbox"
    assert isinstance(enabled.accordion, gr.Accordion) and enabled.accordion.elem_id == "afa_enabled"
    assert enabled.accordion.open is False and enabled.accordion.label == "AFA ensemble"
    assert strength in descendants(enabled.accordion)  # (gradio wraps form components in a gr.Form)
    assert "gradio-checkbox" in enabled.elem_classes
    config = demo.get_config_file()
    assert any(c["id"] == enabled._id for c in config["components"])


def test_infotext_round_trip_quotes_values_with_commas_and_brackets(ui):
    p = ui.txt2img_processing(prompt="a (red:1.2) cat,\nsecond line", negative_prompt="ugly, [blurry]", seed=7)
    value = 'tiny-a [0123abcd]: 0.5, tiny-b (x): "0.5"'
    p.extra_generation_params["AFA members"] = value
    p.extra_generation_params["AFA flag"] = "on"
    p.setup_prompts()
    p.all_seeds, p.all_subseeds = [7], [7]
    p.sd_model_name, p.sd_model_hash = "tiny-a", "0123abcd"

    text = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds)
    assert 'AFA members: "tiny-a [0123abcd]: 0.5, tiny-b (x): \\"0.5\\""' in text

    params = infotext_utils.parse_generation_parameters(text)
    assert params["Prompt"] == "a (red:1.2) cat,\nsecond line"
    assert params["Negative prompt"] == "ugly, [blurry]"
    assert params["AFA members"] == value and params["AFA flag"] == "on"
    assert (params["Steps"], params["Seed"], params["Size-1"], params["Size-2"]) == ("3", "7", "64", "64")
    assert params["Clip skip"] == "1" and params["Schedule type"] == "Automatic"


def test_xyz_axis_from_before_ui_drives_cells(ui_dummy):
    module = dummy_module()
    xyz_script = next(s for s in scripts.scripts_txt2img.selectable_scripts if s.title() == "X/Y/Z plot")
    labels = [x.label for x in xyz_script.current_axis_options]
    x_type = labels.index("[Dummy] Strength")
    args = harness.ui_script_args(scripts.scripts_txt2img)
    args[0] = scripts.scripts_txt2img.selectable_scripts.index(xyz_script) + 1
    args[xyz_script.args_from] = x_type
    args[xyz_script.args_from + 1] = "0.1, 0.9"
    module.EVENTS.clear()

    processed = ui_dummy.txt2img(steps=2, script_args=args)

    assert [e[2] for e in module.EVENTS if e[0] == "process"] == [0.1, 0.9]
    assert len(processed.images) == 1  # the grid only (no sub images by default)
    assert "X Type: [Dummy] Strength" in processed.infotexts[0]


def hires_job(instance):
    return instance.txt2img(steps=2, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=1, hr_checkpoint_name="tiny-b",
                            denoising_strength=0.5, script_args={"Dummy script": [True]})


def test_hires_checkpoint_reloads_weights_and_recreates_the_sd_unet(tmp_path):
    # checkpoints without a yaml share the default config: reload_model_weights loads weights into the same model
    with harness.webui(tmp_path, extensions=[write_dummy_extension(tmp_path)], with_yaml=False) as instance:
        module = dummy_module()
        module.EVENTS.clear()

        processed = hires_job(instance)

        events = [e for e in module.EVENTS if e[0] != "forward"]
        first = events.index(("process_before_every_sampling", False, "tiny-a", "DummyUnet"))
        # apply_unet("None") -> weights -> on_model_loaded -> apply_unet() -> create_unet() for the new base
        assert events[first + 1:first + 6] == [("deactivate",), ("model_loaded", "tiny-b"), ("create_unet", "tiny-b"),
                                               ("activate", "tiny-b"), ("before_hr", "tiny-b")]
        assert events[first + 6] == ("process_before_every_sampling", True, "tiny-b", "DummyUnet")
        forwards = [e for e in module.EVENTS if e[0] == "forward"]
        assert forwards[-1] == ("forward", (2, 4, 16, 16), (2, 77, 32))  # the second pass at 2x
        assert processed.images[0].size == (128, 128)
        # (short_title has no [hash] yet: tiny-b's sha256 is first computed when its weights load, after p.init)
        assert "Hires checkpoint: tiny-b, Hires upscale: 2.0, Hires steps: 1" in processed.infotexts[0]
        assert shared.sd_model.sd_checkpoint_info.name_for_extra == "tiny-b"
        assert shared.opts.sd_model_checkpoint.startswith("tiny-a")  # SkipWritingToConfig

        module.EVENTS.clear()
        instance.txt2img(steps=1)  # the next job reloads the selected checkpoint
        assert shared.sd_model.sd_checkpoint_info.name_for_extra == "tiny-a"
        assert ("model_loaded", "tiny-a") in module.EVENTS


def test_hires_checkpoint_with_its_own_yaml_rebuilds_the_model_and_leaves_the_sd_unet_off(ui_dummy):
    # a different config file means load_model(): a new model object, and no apply_unet() until the next job
    module = dummy_module()
    module.EVENTS.clear()
    first_model = shared.sd_model

    hires_job(ui_dummy)

    events = [e for e in module.EVENTS if e[0] != "forward"]
    assert ("process_before_every_sampling", True, "tiny-b", "NoneType") in events
    assert ("create_unet", "tiny-b") not in events
    assert shared.sd_model is not first_model and first_model.model.diffusion_model.out[0].weight.is_meta
    assert shared.opts.sd_unet == "Automatic"


def test_fresh_config_does_not_restore_overrides_missing_from_opts_data(tmp_path):
    # without config.json, opts.data starts empty: process_images stores only overridden keys found in opts.data
    with harness.webui(tmp_path, extensions=[write_dummy_extension(tmp_path)], config="fresh") as instance:
        assert "sd_unet" not in shared.opts.data
        instance.txt2img(steps=1, script_args={"Dummy script": [True]})
        assert shared.opts.sd_unet == dummy_module().LABEL


def test_builtin_lora_merges_into_named_base_layers_only(tmp_path):
    with harness.webui(tmp_path, builtin_lora=True) as instance:
        base = shared.sd_model.model.diffusion_model
        proj_in = base.input_blocks[1][1].proj_in
        layer = "diffusion_model_input_blocks_1_1_proj_in"
        assert harness.lora_network_layer_names()[layer] is proj_in  # named by Lora's on_model_loaded callback
        harness.write_lora(instance.data_dir / "models" / "Lora" / "style.safetensors",
                           [layer, "transformer_text_model_encoder_layers_0_mlp_fc1"])

        # a UNet an extension builds itself (same weights, no network_layer_name) is not touched by LoRA
        from omegaconf import OmegaConf
        unet_config = OmegaConf.to_container(OmegaConf.load(shared.sd_model.used_config).model.params.unet_config)
        member = sd_models.instantiate_from_config(unet_config)
        member.load_state_dict(base.state_dict())
        original = proj_in.weight.detach().clone()

        plain = instance.txt2img(prompt="a cat")
        styled = instance.txt2img(prompt="a cat <lora:style:1>")

        assert list(plain.images[0].getdata()) != list(styled.images[0].getdata())
        assert styled.infotexts[0].startswith("a cat <lora:style:1>\n")
        assert 'Lora hashes: "style: ' in styled.infotexts[0]  # quoted: the value contains a colon
        assert not torch.equal(proj_in.weight, original)  # merged in place, backup kept
        assert torch.equal(proj_in.network_weights_backup, original)
        with torch.no_grad():
            member(torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), context=torch.zeros(1, 77, 32))
        assert torch.equal(member.input_blocks[1][1].proj_in.weight, original)
        assert getattr(member.input_blocks[1][1].proj_in, "network_layer_name", None) is None

        instance.txt2img(prompt="a cat")  # no LoRA: the next forward restores the backup
        assert torch.equal(proj_in.weight, original)
        assert harness.leaked_patches() != []  # torch.nn layers are patched while Lora is loaded
    assert harness.leaked_patches() == []  # ... and restored by its on_script_unloaded callback
