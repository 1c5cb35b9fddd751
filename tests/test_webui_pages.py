"""The extension on the WebUI's pages, through the stand-in's copies of A1111 1.10's page mechanics: the Settings
page (every setting's component and the page-load event that pushes `gr.update(value=..., **component_args)` to all
of them), the refresh buttons beside settings, "Send to img2img / inpaint" from the txt2img gallery
(`connect_paste_params_buttons`, which copies the components named in the script's `paste_field_names`), the paste
button, and the X/Y/Z plot's `[AFA] Weights` axis. Events run through gradio's own request processing
(`harness.WebUI.event`), so a component update gradio 3.41 rejects fails here as it fails in the browser.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_standin"))

import harness  # noqa: E402

from modules import infotext_utils, script_callbacks, scripts, sd_models, shared, ui  # noqa: E402

from afa.webui import settings  # noqa: E402

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
TITLE = "AFA ensemble"


@pytest.fixture
def webui(tmp_path):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT]) as instance:
        yield instance
    assert harness.leaked_patches() == []


def component_with_elem_id(instance, elem_id: str):
    return next(block for block in instance.demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def test_settings_page_loads_every_setting_with_the_extension_installed(webui):
    afa_keys = [key for key, info in shared.opts.data_labels.items() if info.section == settings.SECTION]
    assert len(afa_keys) == 8 and all(key in ui.settings.component_dict for key in afa_keys)

    # the page load pushes every setting's value with its component args: one rejected update fails the whole
    # request, and the browser marks every setting (and the checkpoint quicksetting) with an error
    (values,) = webui.event(None, "load")
    assert len(values) == len([k for k in shared.opts.data_labels if k in ui.settings.component_dict])

    # the refresh button beside "Default ensemble members" goes through the same update
    refresh = component_with_elem_id(webui, "refresh_afa_default_members")
    (update,) = webui.event(refresh)
    titles = shared.list_checkpoint_tiles(False)
    assert update[0]["choices"] == titles and len(titles) == 3


def test_settings_exist_before_any_ui_is_built(webui):
    # registered when the script is imported (as the built-in Lora extension does), not from on_ui_settings: an
    # API-only WebUI (--nowebui) and every callback before the UI read them
    assert not any(getattr(callback.callback, "__module__", "").startswith(("afa", "afa_script"))
                   for callback in script_callbacks.callback_map["callbacks_ui_settings"])
    assert shared.opts.afa_member_cache == "RAM" and shared.opts.afa_default_members == []


def test_api_only_webui_has_the_settings_and_runs_afa(tmp_path):
    # (an integration check: in 1.10 the Api builds the script UI itself, so this alone would also pass with
    # on_ui_settings registration; the test above is the one that tells the two apart)
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], argv=harness.DEFAULT_ARGV + ("--nowebui",)) as w:
        client = w.client()
        options = client.get("/sdapi/v1/options").json()
        assert options["afa_member_cache"] == "RAM" and options["afa_maps"] == "Off"
        body = client.post("/sdapi/v1/txt2img", json={
            "prompt": "a cat", "steps": 1, "width": 64, "height": 64,
            "alwayson_scripts": {TITLE: {"args": [True, ["tiny-a", "tiny-b"], "", "Block average"]}}}).json()
        import json
        assert "AFA mode: Block average" in json.loads(body["info"])["infotexts"][0]
    assert harness.leaked_patches() == []


class Accordion:
    """The accordion's components of a tab (Script.controls: what ui() returned, in argument order)."""

    def __init__(self, tabname: str):
        runner = scripts.scripts_img2img if tabname != "txt2img" else scripts.scripts_txt2img
        self.enabled, self.members, self.weights, self.mode, self.show_maps = runner.script(TITLE).controls


accordion = Accordion


@pytest.mark.parametrize("destination", ["img2img", "inpaint"])
def test_send_to_img2img_carries_the_accordion(webui, destination):
    from test_webui_extension import write_weights

    write_weights(webui, "pair.safetensors", ["tiny-b", "tiny-c"])
    sd_models.list_models()
    titles = [sd_models.get_closet_checkpoint_match(name).title for name in ("tiny-b", "tiny-c")]
    source = accordion("txt2img")
    # what the user chose in txt2img (the browser sends the components' current values)
    source.enabled.value, source.members.value = True, titles
    source.weights.value, source.mode.value = "pair.safetensors", "SABW"

    button = ui.send_to_buttons["txt2img"][destination]
    outputs = dict(zip(webui.outputs_of(button), webui.event(button)[0]))
    target = accordion(destination)
    assert outputs[target.enabled] is True
    assert outputs[target.members] == titles
    assert outputs[target.weights] == "pair.safetensors"
    assert outputs[target.mode] == "SABW"
    assert target.show_maps not in outputs  # a viewing choice, not a generation parameter


def test_paste_button_restores_the_accordion_through_gradio(webui):
    processed = webui.txt2img(script_args={TITLE: [True, ["tiny-a", "tiny-c"], "", "Noise average", False]})
    text = processed.infotexts[0]
    button = ui.paste_buttons["txt2img"]
    prompt = next(field.component for field in infotext_utils.paste_fields["txt2img"]["fields"]
                  if field.label == "Prompt")
    results = webui.event(button, inputs=[text])
    outputs = dict(zip(webui.outputs_of(button), results[0]))
    controls = accordion("txt2img")
    titles = [sd_models.get_closet_checkpoint_match(name).title for name in ("tiny-a", "tiny-c")]
    assert outputs[controls.enabled]["value"] is True and outputs[controls.members]["value"] == titles
    assert outputs[controls.mode]["value"] == "Noise average" and outputs[controls.weights]["value"] == "None"
    assert outputs[prompt]["value"] == "a photo of a cat"

    # the API's `infotext` field reads the same labels (api.apply_infotext: the field's function, then its type)
    body = webui.client().post("/sdapi/v1/txt2img", json={
        "infotext": text, "steps": 1, "width": 64, "height": 64}).json()
    import json
    assert "AFA mode: Noise average" in json.loads(body["info"])["infotexts"][0]
