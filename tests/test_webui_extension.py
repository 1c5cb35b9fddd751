"""The WebUI extension (scripts/afa_script.py + afa/webui) running in the A1111 1.10 stand-in (tests/webui_standin):
the real script file loaded the way the WebUI loads it, the core's real EnsembleUNet, tiny WebUI-format checkpoints,
the UI built in real gradio 3.41 Blocks, the API through FastAPI's test client.

Checkpoints: tiny-a (loaded), tiny-b, tiny-c, all of one architecture (afa.unet.PRESETS["tiny"]). Jobs are 64x64
images (8x8 latents), 1-3 steps.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_standin"))

import harness  # noqa: E402

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from modules import devices, errors, infotext_utils, script_callbacks, scripts, sd_models, sd_unet, shared  # noqa: E402

from afa import (Aggregator, IncompatibleMembersError, MemberRef, default_config, file_sha256, load_weights,  # noqa: E402
                 save_weights)
from afa.members import unet_fingerprint_of_file  # noqa: E402
from afa.ensemble import EnsembleUNet  # noqa: E402
from afa.members import read_unet_shapes  # noqa: E402
from afa.unet import PRESETS, block_layout  # noqa: E402
from afa.webui import build, checkpoints, job, member_cache, sd_unet_option as afa_unet, xyz  # noqa: E402
from conftest import randomize_  # noqa: E402

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
TITLE = "AFA ensemble"
ARG_LABELS = ["AFA ensemble", "Ensemble members", "SABW weights", "Ensemble mode", "Show aggregation maps"]


# -- helpers ---------------------------------------------------------------------------------------------------------

@pytest.fixture
def webui(tmp_path):
    """A stand-in WebUI started with the extension (startup order); checks that unloading leaves no patches."""
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT]) as instance:
        yield instance
    assert harness.leaked_patches() == []


def afa(enabled=True, members=("tiny-a", "tiny-b"), weights="", mode="Block average", show_maps=False) -> dict:
    """script_args for txt2img: the AFA script's positional args [enabled, members, weights, mode, show_maps]."""
    return {TITLE: [enabled, list(members), weights, mode, show_maps]}


def pixels(image) -> bytes:
    return image.tobytes()


def decoded(base64_png: str) -> bytes:
    """The pixels of an image as the API returns it."""
    from modules.api.api import decode_base64_to_image
    return pixels(decode_base64_to_image(base64_png))


def infotext_params(text: str) -> dict:
    return infotext_utils.parse_generation_parameters(text)


def write_weights(instance, name: str, member_names, seed: int = 0, only_last_block: bool = False,
                  folder: Path | None = None) -> Path:
    """A SABW weights file for installed checkpoints, with random (non-uniform) weights, in `folder` (default
    models/AFA)."""
    infos = [sd_models.get_closet_checkpoint_match(member) for member in member_names]
    refs = [MemberRef(info.name_for_extra, file_sha256(info.filename)) for info in infos]
    layout = block_layout(read_unet_shapes(infos[0].filename))
    config = default_config(layout, len(infos), context_dim=32, hidden_channels=32, num_heads=2,
                            only_last_block=only_last_block)
    torch.manual_seed(seed)
    aggregator = randomize_(Aggregator(config), seed=seed, scale=0.3)
    return save_weights((folder or instance.data_dir / "models" / "AFA") / name, aggregator, refs)


def write_checkpoint(instance, name: str, seed: int, unet_params: dict) -> Path:
    """Another tiny checkpoint (with its yaml) in the checkpoint folder, listed like after a refresh."""
    from training.sd_checkpoint import (TINY_TEXT_ENCODER_FOLDER_NAME, tiny_sd_config, tiny_sd_state_dict,
                                        write_webui_checkpoint)

    state_dict = tiny_sd_state_dict(seed, unet_params)
    bias = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
    state_dict[bias] = torch.full(state_dict[bias].shape, 0.5)  # as harness.tiny_checkpoint_file (emphasis)
    config = tiny_sd_config(instance.models_dir / TINY_TEXT_ENCODER_FOLDER_NAME)
    config["model"]["params"]["unet_config"]["params"] = copy.deepcopy(unet_params)
    path = write_webui_checkpoint(instance.models_dir / f"{name}.safetensors", state_dict, config)
    sd_models.list_models()
    return path


def wide_params() -> dict:
    return {**copy.deepcopy(PRESETS["tiny"]), "channel_mult": [1, 2, 2, 2]}


class Probe:
    """Records, at every sampling step (on_cfg_denoiser), what the WebUI is running."""

    def __init__(self):
        self.steps = []
        script_callbacks.on_cfg_denoiser(self)

    def __call__(self, params):
        current = sd_unet.current_unet
        ensemble = getattr(current, "ensemble", None)
        self.steps.append(dict(
            afa=isinstance(current, afa_unet.AfaUnet), ensemble=ensemble,
            checkpoint=shared.sd_model.sd_checkpoint_info.name_for_extra,
            base=shared.sd_model.model.diffusion_model, sd_unet=shared.opts.sd_unet,
            members=None if ensemble is None else list(ensemble.members),
        ))


def assert_clean():
    """The state of a WebUI that never ran AFA: no SdUnet, setting back, loaded UNet on the device, no job."""
    assert sd_unet.current_unet is None and sd_unet.current_unet_option is None
    assert shared.opts.sd_unet == "Automatic"
    assert next(shared.sd_model.model.diffusion_model.parameters()).device == devices.device
    assert job.current is None


# -- the job ---------------------------------------------------------------------------------------------------------

def test_enabled_job_runs_the_ensemble_in_the_sd_unet_and_differs_from_the_base(webui):
    base = webui.txt2img()
    probe = Probe()
    processed = webui.txt2img(script_args=afa())

    assert probe.steps and all(step["afa"] and step["ensemble"] is not None for step in probe.steps)
    assert all(step["sd_unet"] == afa_unet.LABEL for step in probe.steps)  # overridden for the job only
    # the loaded checkpoint's UNet is reused as member 1 (not loaded twice); tiny-b came from its file
    ensemble_members = probe.steps[0]["members"]
    assert ensemble_members[0] is shared.sd_model.model.diffusion_model
    assert member_cache.cache.stats().members == 1
    assert pixels(processed.images[0]) != pixels(base.images[0])

    params = infotext_params(processed.infotexts[0])
    a, b = (sd_models.get_closet_checkpoint_match(name) for name in ("tiny-a", "tiny-b"))
    assert params["AFA mode"] == "Block average"
    assert params["AFA members"] == f"tiny-a [{a.sha256[:10]}], tiny-b [{b.sha256[:10]}]"
    assert "AFA weights" not in params
    assert "AFA not applied" not in params
    assert_clean()  # torn down eagerly in postprocess


def test_disabled_output_is_bit_identical_to_a_webui_without_the_extension(tmp_path):
    with harness.webui(tmp_path / "plain") as plain:
        reference = plain.txt2img(batch_size=2)
    with harness.webui(tmp_path / "afa", extensions=[EXTENSION_ROOT]) as instance:
        untouched = instance.txt2img(batch_size=2)
        unticked = instance.txt2img(batch_size=2, script_args=afa(enabled=False, show_maps=True))
        assert [pixels(i) for i in untouched.images] == [pixels(i) for i in reference.images]
        assert [pixels(i) for i in unticked.images] == [pixels(i) for i in reference.images]
        assert untouched.infotexts == reference.infotexts == unticked.infotexts
        assert_clean()
    assert harness.leaked_patches() == []


@pytest.mark.parametrize("config", ["defaults", "fresh"])
def test_exception_during_sampling_leaves_the_next_job_clean(tmp_path, monkeypatch, config):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], config=config) as instance:
        reference = instance.txt2img()
        enabled = instance.txt2img(script_args=afa())

        def fail(self, *args, **kwargs):
            raise RuntimeError("CUDA out of memory (simulated)")

        with monkeypatch.context() as patch:
            patch.setattr(EnsembleUNet, "forward", fail)
            with pytest.raises(RuntimeError, match="simulated"):
                instance.txt2img(script_args=afa())
        # process_images restored the setting in its finally (with a fresh config too); postprocess never ran
        assert shared.opts.sd_unet == "Automatic"
        assert isinstance(sd_unet.current_unet, afa_unet.AfaUnet)

        after = instance.txt2img()
        assert pixels(after.images[0]) == pixels(reference.images[0])
        assert "AFA mode" not in after.infotexts[0]
        assert_clean()

        again = instance.txt2img(script_args=afa())  # a new AfaUnet, not the failed job's
        assert pixels(again.images[0]) == pixels(enabled.images[0])
        assert_clean()
    assert harness.leaked_patches() == []


def test_twenty_enable_disable_cycles_keep_memory_flat(webui):
    def live_tensors():
        gc.collect()
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        return len(tensors), sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)

    for enabled in (True, False):  # warm-up: the cache holds tiny-b from here on
        webui.txt2img(steps=1, script_args=afa(enabled=enabled, members=("tiny-a", "tiny-b", "tiny-c")))
    cache_before, tensors_before = member_cache.cache.stats(), live_tensors()
    for cycle in range(20):
        webui.txt2img(steps=1, script_args=afa(enabled=cycle % 2 == 0, members=("tiny-a", "tiny-b", "tiny-c")))
    assert member_cache.cache.stats() == cache_before
    assert cache_before.members == 2  # tiny-b and tiny-c; tiny-a is the loaded checkpoint's own UNet
    assert live_tensors() == tensors_before
    assert_clean()


def test_cache_policy_no_frees_members_after_the_job(webui):
    shared.opts.set("afa_member_cache", "No")
    webui.txt2img(steps=1, script_args=afa())
    assert member_cache.cache.stats().members == 0
    shared.opts.set("afa_member_cache", "RAM")
    webui.txt2img(steps=1, script_args=afa())
    assert member_cache.cache.stats().members == 1
    shared.opts.set("afa_member_cache", "No")  # the setting's onchange frees them now
    assert member_cache.cache.stats().members == 0


def test_sabw_weights_file_runs_with_its_own_members(webui):
    path = write_weights(webui, "pair.safetensors", ["tiny-a", "tiny-b"])
    average = webui.txt2img(script_args=afa(mode="Block average"))
    # members left empty: the weights file's members are used
    sabw = webui.txt2img(script_args=afa(members=(), weights="pair.safetensors", mode="SABW"))

    params = infotext_params(sabw.infotexts[0])
    assert params["AFA weights"] == f"pair [{file_sha256(path)[:10]}]" and params["AFA mode"] == "SABW"
    assert pixels(sabw.images[0]) != pixels(average.images[0])
    assert member_cache.cache.stats().tensors > 0  # the aggregator is cached with the members

    write_weights(webui, "last.safetensors", ["tiny-a", "tiny-b"], only_last_block=True)
    last = webui.txt2img(script_args=afa(weights="last", mode="SABW"))
    assert infotext_params(last.infotexts[0])["AFA mode"] == "SABW (last block)"
    refused = webui.txt2img(script_args=afa(weights="pair", mode="Last block"))
    assert "trained for mode SABW" in infotext_params(refused.infotexts[0])["AFA not applied"]


def test_weights_trained_in_comfyui_bind_the_webuis_checkpoints_by_unet_fingerprint(webui):
    """AFA Train (ComfyUI) names its members model_1, ... with their UNet fingerprint as "sha256" (a ComfyUI MODEL has
    no file): the WebUI reads the chosen checkpoints' fingerprints and runs the file with the members it was trained
    for, as it runs the same aggregator bound by file sha256; other members or another order are refused."""
    by_file = write_weights(webui, "by-file.safetensors", ["tiny-a", "tiny-b"], seed=3)
    fingerprints = [unet_fingerprint_of_file(sd_models.get_closet_checkpoint_match(name).filename)
                    for name in ("tiny-a", "tiny-b")]
    aggregator, _ = load_weights(by_file)
    save_weights(webui.data_dir / "models" / "AFA" / "from-comfyui.safetensors", aggregator,
                 [MemberRef(f"model_{index + 1}", fingerprint, fingerprint)
                  for index, fingerprint in enumerate(fingerprints)])
    expected = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-b"), weights="by-file", mode="SABW"))
    processed = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-b"), weights="from-comfyui", mode="SABW"))
    assert infotext_params(processed.infotexts[0])["AFA mode"] == "SABW", processed.infotexts[0]
    assert pixels(processed.images[0]) == pixels(expected.images[0])

    swapped = webui.txt2img(script_args=afa(members=("tiny-b", "tiny-a"), weights="from-comfyui", mode="SABW"))
    assert "same members in another order" in infotext_params(swapped.infotexts[0])["AFA not applied"]
    other = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-c"), weights="from-comfyui", mode="SABW"))
    message = infotext_params(other.infotexts[0])["AFA not applied"]
    assert "UNet fingerprints differ" in message and "model_2 [" in message and "tiny-c [" in message, message


def test_weights_for_other_members_are_refused_naming_both_lists(webui):
    write_weights(webui, "pair.safetensors", ["tiny-a", "tiny-b"])
    reference = webui.txt2img()
    processed = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-c"), weights="pair.safetensors",
                                              mode="SABW"))

    params = infotext_params(processed.infotexts[0])
    message = params["AFA not applied"]
    assert "AFA mode" not in params and "AFA members" not in params  # never a non-ensemble image labelled AFA
    assert "expected: tiny-a [" in message and "tiny-b [" in message and "given: tiny-a [" in message
    assert "tiny-c [" in message
    assert f"AFA not applied: {message}" in processed.comments
    # the infotext travels in shared PNGs: the weights file by its name in the weights folder, one line, no server
    # paths (the console keeps the full message)
    assert message.startswith("pair.safetensors: these weights were trained for 2 other members")
    assert "\n" not in message and "\\n" not in processed.infotexts[0]
    assert str(webui.data_dir) not in processed.infotexts[0] + processed.comments
    assert pixels(processed.images[0]) == pixels(reference.images[0])  # the job ran, without AFA
    assert_clean()

    no_weights = webui.txt2img(script_args=afa(weights="", mode="SABW"))
    assert "needs a SABW weights file" in infotext_params(no_weights.infotexts[0])["AFA not applied"]
    unknown_mode = webui.txt2img(script_args=afa(mode="Median"))
    assert "unknown AFA mode 'Median'" in infotext_params(unknown_mode.infotexts[0])["AFA not applied"]


@pytest.mark.parametrize("name", ["../tiny-b.safetensors", "/etc/passwd", "C:\\models\\x.safetensors",
                                  "sub/../../tiny-b.safetensors"])
def test_member_and_weights_names_that_are_paths_are_refused(webui, name):
    processed = webui.txt2img(script_args=afa(members=("tiny-a", name)))
    assert "is a path" in infotext_params(processed.infotexts[0])["AFA not applied"]
    processed = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-b"), weights=name, mode="SABW"))
    assert "is a path" in infotext_params(processed.infotexts[0])["AFA not applied"]
    assert_clean()


def test_member_names_resolve_like_the_webuis_checkpoint_lookup(webui):
    info = sd_models.get_closet_checkpoint_match("tiny-b")
    info.calculate_shorthash()
    for name in ("tiny-b", "tiny-b.safetensors", info.title, info.shorthash, info.sha256, f"tiny-b [{info.shorthash}]"):
        assert checkpoints.resolve_checkpoint(name) is info
    processed = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-nope")))
    assert "'tiny-nope' is not an installed checkpoint" in infotext_params(processed.infotexts[0])["AFA not applied"]
    one = webui.txt2img(script_args=afa(members=("tiny-a",)))
    assert "at least 2 members" in infotext_params(one.infotexts[0])["AFA not applied"]


def test_infotext_round_trip_restores_the_accordion(webui):
    write_weights(webui, "pair.safetensors", ["tiny-b", "tiny-c"])
    processed = webui.txt2img(script_args=afa(members=("tiny-b", "tiny-c"), weights="pair", mode="SABW"))
    text = processed.infotexts[0]

    fields = infotext_utils.paste_fields["txt2img"]["fields"]
    with gr.Blocks():
        paste = infotext_utils.connect_paste(gr.Button(), fields, gr.Textbox(), None, "txt2img")
    updates = dict(zip([field[0] for field in fields], paste(text)))
    enabled, member_list, weights, mode, show_maps = webui.script(TITLE).controls
    titles = [sd_models.get_closet_checkpoint_match(name).title for name in ("tiny-b", "tiny-c")]
    assert updates[enabled]["value"] is True
    assert updates[member_list]["value"] == titles
    assert updates[weights]["value"] == "pair.safetensors"
    assert updates[mode]["value"] == "SABW"
    assert show_maps not in updates

    # the restored values reproduce the image
    again = webui.txt2img(script_args={TITLE: [updates[enabled]["value"], updates[member_list]["value"],
                                               updates[weights]["value"], updates[mode]["value"]]})
    assert pixels(again.images[0]) == pixels(processed.images[0]) and again.infotexts[0] == text

    # an image made without AFA (or where it was refused) pastes as "off"
    refused = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-nope")))
    assert paste(refused.infotexts[0])[[f[0] for f in fields].index(enabled)]["value"] is False
    assert webui.script(TITLE).paste_field_names == ["AFA enabled", "AFA members", "AFA weights", "AFA mode"]


def test_xyz_axes_apply_to_cells(webui):
    write_weights(webui, "pair.safetensors", ["tiny-b", "tiny-c"])
    module = harness.xyz_grid_module()
    labels = [axis.label for axis in module.axis_options]
    assert [label for label in labels if label.startswith("[AFA]")] == [xyz.AXIS_ENABLED, xyz.AXIS_MODE,
                                                                        xyz.AXIS_WEIGHTS]
    xyz.add_axes()  # again ("Reload UI"): no duplicates
    assert len(module.axis_options) == len(labels)

    p = webui.txt2img_processing()
    axes = {axis.label: axis for axis in module.axis_options}
    axes[xyz.AXIS_ENABLED].apply(p, "True", [])
    axes[xyz.AXIS_MODE].apply(p, "noise average", [])
    axes[xyz.AXIS_WEIGHTS].apply(p, "pair.safetensors", [])
    assert p.afa_xyz == {"enabled": True, "mode": "Noise average", "weights": "pair.safetensors", "members": [],
                         "implied_mode": "SABW"}
    axes[xyz.AXIS_WEIGHTS].apply(p, "None", [])
    assert p.afa_xyz["weights"] == "" and p.afa_xyz["implied_mode"] == "Block average"
    assert axes[xyz.AXIS_MODE].choices() == ["SABW", "Block average", "Noise average"]
    assert axes[xyz.AXIS_WEIGHTS].choices() == ["None", "pair.safetensors"]
    with pytest.raises(RuntimeError, match="unknown AFA mode"):
        axes[xyz.AXIS_MODE].confirm(p, ["SABW", "Median"])
    with pytest.raises(RuntimeError, match="not found"):
        axes[xyz.AXIS_WEIGHTS].confirm(p, ["nope"])

    # a plot: X = [AFA] Enabled, Y = [AFA] Weights; the accordion itself is off, in mode SABW without weights
    xyz_script = next(s for s in scripts.scripts_txt2img.selectable_scripts if s.title() == "X/Y/Z plot")
    args = harness.ui_script_args(scripts.scripts_txt2img, afa(enabled=False, members=("tiny-a", "tiny-b"),
                                                               mode="SABW"))
    args[0] = scripts.scripts_txt2img.selectable_scripts.index(xyz_script) + 1
    start = xyz_script.args_from
    current = [axis.label for axis in xyz_script.current_axis_options]  # the txt2img axes, as the dropdown lists
    # axes with choices take their values from the dropdowns
    args[start:start + 6] = [current.index(xyz.AXIS_ENABLED), "", ["False", "True"],
                             current.index(xyz.AXIS_WEIGHTS), "", ["None", "pair.safetensors"]]
    args[start + 10] = True  # include lone images
    processed = webui.txt2img(steps=2, script_args=args)
    cells = [infotext_params(text) for text in processed.infotexts[1:]]  # (x, y): (F, None) (T, None) (F, pair) ...
    assert [("AFA mode" in cell, "AFA not applied" in cell) for cell in cells] == [
        (False, False), (True, False), (False, False), (True, False)]  # no cell inherits another's entries
    # what choosing in the accordion does: None = Block average of the accordion's members (which is in mode SABW),
    # a weights file = SABW with the file's own members
    assert cells[1]["AFA mode"] == "Block average" and cells[1]["AFA members"].startswith("tiny-a [")
    assert cells[3]["AFA mode"] == "SABW" and cells[3]["AFA members"].startswith("tiny-b [")
    assert cells[3]["AFA weights"].startswith("pair [")
    assert_clean()


def test_aggregation_maps_are_appended_with_their_infotexts(webui):
    write_weights(webui, "pair.safetensors", ["tiny-a", "tiny-b"])
    processed = webui.txt2img(batch_size=2, n_iter=2, steps=3,
                              script_args=afa(weights="pair", mode="SABW", show_maps=True))

    # grid, 4 images, then one map per image; every image keeps its infotext
    assert len(processed.images) == len(processed.infotexts) == 1 + 4 + 4
    generated, maps = processed.images[1:5], processed.images[5:]
    assert processed.infotexts[5:] == processed.infotexts[1:5]
    assert all(m.info["parameters"] == t for m, t in zip(maps, processed.infotexts[5:]))
    assert all(m.size != g.size for m, g in zip(maps, generated))
    assert len({pixels(m) for m in maps}) == 4  # each image's own maps
    # SABW weights are per pixel: the last block's map is not one flat colour
    colours = set(maps[0].crop((8, 40, 8 + 128, 40 + 128)).getcolors(1 << 16) or [])
    assert len(colours) > 1

    shared.opts.set("afa_maps", "Every N steps")
    shared.opts.set("afa_maps_every", 1)
    every = webui.txt2img(steps=3, script_args=afa(weights="pair", mode="SABW", show_maps=True))
    assert every.images[-1].size[0] > maps[0].size[0] / 2 and every.images[-1].size[1] > maps[0].size[1]
    noise = webui.txt2img(steps=3, script_args=afa(mode="Noise average", show_maps=True))
    assert len(noise.images) == 2 and noise.images[1].size[0] < maps[0].size[0]  # one block: the prediction
    no_maps = webui.txt2img(steps=1, script_args=afa(show_maps=False))
    assert len(no_maps.images) == 1
    assert_clean()


def test_api_alwayson_args_in_documented_order(webui):
    client = webui.client()
    info = client.get("/sdapi/v1/script-info").json()
    entry = next(x for x in info if x["name"] == "afa ensemble" and not x["is_img2img"])
    assert [arg["label"] for arg in entry["args"]] == ARG_LABELS
    assert [arg["value"] for arg in entry["args"]] == [False, [], "None", "Block average", False]

    payload = dict(prompt="a cat", steps=2, width=64, height=64, sampler_name="Euler", seed=3)
    plain = client.post("/sdapi/v1/txt2img", json=payload).json()
    payload["alwayson_scripts"] = {"AFA ensemble": {"args": [True, "tiny-a, tiny-b", "", "Block average", True]}}
    response = client.post("/sdapi/v1/txt2img", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    infotexts = json.loads(body["info"])["infotexts"]
    assert len(body["images"]) == len(infotexts) == 2  # the image and its aggregation maps
    assert 'AFA mode: Block average, AFA members: "tiny-a [' in infotexts[0] and infotexts[1] == infotexts[0]
    assert body["images"][0] != plain["images"][0]

    payload["alwayson_scripts"] = {"AFA ensemble": {"args": [True]}}  # the rest from ui(): no default members
    body = client.post("/sdapi/v1/txt2img", json=payload).json()
    assert "no ensemble members given" in json.loads(body["info"])["infotexts"][0]
    assert decoded(body["images"][0]) == decoded(plain["images"][0])  # (the PNG's infotext differs)
    assert_clean()


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M"])
def test_samplers_unbatched_cond_uncond_batch_count_and_img2img(webui, sampler):
    shared.opts.set("batch_cond_uncond", False)  # cond and uncond in two UNet calls per step
    processed = webui.txt2img(sampler_name=sampler, steps=3, batch_size=2, n_iter=2,
                              script_args=afa(mode="Noise average", show_maps=True))
    assert len(processed.images) == len(processed.infotexts) == 1 + 4 + 4
    assert all("AFA mode" in infotext_params(text) for text in processed.infotexts)

    from modules.api.api import encode_pil_to_base64
    client = webui.client()
    payload = dict(init_images=[encode_pil_to_base64(processed.images[1]).decode()], denoising_strength=0.6,
                   prompt="a cat", steps=3, width=64, height=64, sampler_name=sampler, seed=5)
    plain = client.post("/sdapi/v1/img2img", json=payload).json()
    payload["alwayson_scripts"] = {"AFA ensemble": {"args": [True, ["tiny-a", "tiny-c"], "None", "Block average"]}}
    response = client.post("/sdapi/v1/img2img", json=payload)
    assert response.status_code == 200, response.text
    body = response.json()
    assert 'AFA mode: Block average, AFA members: "tiny-a [' in json.loads(body["info"])["infotexts"][0]
    assert decoded(body["images"][0]) != decoded(plain["images"][0])
    assert_clean()


def test_member_precision_setting(webui):
    from afa.webui import settings

    assert settings.member_dtype() == torch.float32  # "Same as WebUI" under --no-half
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        shared.opts.set("afa_member_precision", precision)
        assert settings.member_dtype() == dtype
    fp32 = webui.txt2img(steps=1, script_args=afa())
    assert "AFA mode" in infotext_params(fp32.infotexts[0])
    # half-precision members need CUDA autocast (ldm's GroupNorm32 normalises in fp32): refused on the CPU
    for precision in ("fp16", "bf16"):
        shared.opts.set("afa_member_precision", precision)
        refused = webui.txt2img(steps=1, script_args=afa())
        assert "members cannot run on the CPU" in infotext_params(refused.infotexts[0])["AFA not applied"]
    assert_clean()


def test_weights_and_unload_routes(webui):
    write_weights(webui, "pair.safetensors", ["tiny-a", "tiny-b"])
    damaged = webui.data_dir / "models" / "AFA" / "sub" / "broken.safetensors"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a safetensors file")
    client = webui.client()

    listing = client.get("/afa/v1/weights").json()
    assert [entry["name"] for entry in listing] == ["pair.safetensors", "sub/broken.safetensors"]
    pair = listing[0]
    a = sd_models.get_closet_checkpoint_match("tiny-a")
    assert pair["mode"] == "SABW" and pair["error"] is None
    assert [m["name"] for m in pair["members"]] == ["tiny-a", "tiny-b"]
    assert pair["members"][0] == {"name": "tiny-a", "sha256": a.sha256, "checkpoint": a.title}
    assert "not a readable safetensors file" in listing[1]["error"]

    webui.txt2img(steps=1, script_args=afa(members=(), weights="pair", mode="SABW"))
    stats = member_cache.cache.stats()
    assert stats.members == 1 and stats.bytes > 0
    freed = client.post("/afa/v1/unload").json()
    assert freed == {"freed_members": 1, "freed_tensors": stats.tensors, "freed_bytes": stats.bytes}
    assert member_cache.cache.stats().tensors == 0


FAKE_CONTROLNET = '''
import types
from modules import scripts, shared, sd_hijack

ENABLED = False


def forward_webui(self, x, timesteps=None, context=None, **kwargs):
    # like sd-webui-controlnet's hook: its own UNet loop on this instance (here: the original class code)
    return sd_hijack.ldm_original_forward(self, x, timesteps, context, **kwargs)


class FakeControlNet(scripts.Script):
    def title(self):
        return "Fake ControlNet"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        unet = shared.sd_model.model.diffusion_model
        if ENABLED:
            unet._original_forward = unet.forward
            unet.forward = types.MethodType(forward_webui, unet)

    def postprocess(self, p, processed, *args):
        unet = shared.sd_model.model.diffusion_model
        if hasattr(unet, "_original_forward"):  # ControlNet's restore(): leaves the bound class forward behind
            unet.forward = unet._original_forward
            del unet._original_forward
'''


def test_controlnet_style_instance_forward_is_detected_and_reported(tmp_path):
    fake = tmp_path / "extensions" / "fake-controlnet"
    (fake / "scripts").mkdir(parents=True)
    (fake / "scripts" / "fake_controlnet.py").write_text(textwrap.dedent(FAKE_CONTROLNET))
    with harness.webui(tmp_path, extensions=[fake, EXTENSION_ROOT]) as instance:
        controlnet = next(d.module for d in scripts.scripts_data if d.script_class.__name__ == "FakeControlNet")
        ensembled = instance.txt2img(script_args=afa())
        controlnet.ENABLED = True
        reference = instance.txt2img()

        processed = instance.txt2img(script_args=afa())

        params = infotext_params(processed.infotexts[0])
        assert "AFA mode" not in params
        assert "replaced the UNet's forward" in params["AFA not applied"]
        assert "ControlNet" in processed.comments
        assert pixels(processed.images[0]) == pixels(reference.images[0])

        controlnet.ENABLED = False  # its restore() left an instance forward that still routes through sd_unet
        assert "forward" in vars(shared.sd_model.model.diffusion_model)
        after = instance.txt2img(script_args=afa())
        assert pixels(after.images[0]) == pixels(ensembled.images[0])
        assert "AFA not applied" not in after.infotexts[0]
        assert_clean()
    assert harness.leaked_patches() == []


@pytest.mark.parametrize("with_yaml", [False, True], ids=["same-config", "own-yaml"])
def test_hires_checkpoint_switch_recreates_the_ensemble(tmp_path, with_yaml):
    # without a yaml, reload_model_weights loads weights into the same model and calls apply_unet() again; with its
    # own yaml it builds a new model (the old one goes to `meta`) and does not: AFA rebuilds in before_sampling
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], with_yaml=with_yaml) as instance:
        first_model = shared.sd_model
        probe = Probe()
        processed = instance.txt2img(steps=2, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=1,
                                     hr_checkpoint_name="tiny-b", denoising_strength=0.5,
                                     script_args=afa(members=("tiny-a", "tiny-b")))

        assert [step["checkpoint"] for step in probe.steps] == ["tiny-a", "tiny-a", "tiny-b"]
        assert all(step["afa"] and step["ensemble"] is not None for step in probe.steps)
        hires = probe.steps[-1]
        assert hires["members"][1] is hires["base"]  # tiny-b is now the loaded checkpoint: its UNet is reused
        assert not any(p.is_meta for m in hires["members"] for p in m.parameters())
        params = infotext_params(processed.infotexts[0])
        assert "AFA mode" in params and "AFA not applied" not in params
        assert (shared.sd_model is not first_model) == with_yaml
        assert_clean()
    assert harness.leaked_patches() == []


@pytest.mark.parametrize("with_yaml", [False, True], ids=["same-config", "own-yaml"])
def test_refiner_switch_during_sampling_recreates_the_ensemble(tmp_path, with_yaml):
    # the refiner switches checkpoints between two steps of one sampling pass (sd_samplers_common.apply_refiner)
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], with_yaml=with_yaml) as instance:
        probe = Probe()
        processed = instance.txt2img(steps=4, refiner_checkpoint="tiny-c", refiner_switch_at=0.5,
                                     script_args=afa(members=("tiny-b", "tiny-c")))
        assert [step["checkpoint"] for step in probe.steps] == ["tiny-a", "tiny-a", "tiny-c", "tiny-c"]
        assert all(step["afa"] and step["ensemble"] is not None for step in probe.steps)
        assert probe.steps[-1]["members"][1] is probe.steps[-1]["base"]  # tiny-c, now loaded, is reused
        params = infotext_params(processed.infotexts[0])
        assert "AFA mode" in params and "AFA not applied" not in params and params["Refiner"].startswith("tiny-c")
        assert_clean()
    assert harness.leaked_patches() == []


def test_checkpoint_override_in_the_request(webui):
    # an X/Y/Z "Checkpoint name" cell or an API override loads another checkpoint before the job samples
    client = webui.client()
    payload = dict(prompt="a cat", steps=2, width=64, height=64, sampler_name="Euler", seed=3,
                   override_settings={"sd_model_checkpoint": "tiny-b"},
                   alwayson_scripts={"AFA ensemble": {"args": [True, ["tiny-a", "tiny-b"], "", "Block average"]}})
    probe = Probe()
    body = client.post("/sdapi/v1/txt2img", json=payload).json()
    assert {step["checkpoint"] for step in probe.steps} == {"tiny-b"}
    assert all(step["members"][1] is step["base"] for step in probe.steps)
    assert "Model: tiny-b" in json.loads(body["info"])["infotexts"][0]
    assert 'AFA mode: Block average, AFA members: "tiny-a [' in json.loads(body["info"])["infotexts"][0]
    assert_clean()


def test_hires_checkpoint_of_another_architecture_is_refused_for_that_pass(webui):
    write_checkpoint(webui, "tiny-wide", seed=7, unet_params=wide_params())
    probe = Probe()
    processed = webui.txt2img(steps=2, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=1,
                              hr_checkpoint_name="tiny-wide", denoising_strength=0.5, script_args=afa())

    assert [step["ensemble"] is not None for step in probe.steps] == [True, True, False]
    params = infotext_params(processed.infotexts[0])
    assert params["AFA members"].startswith("tiny-a [")  # the first pass was ensembled ...
    message = params["AFA not applied"]  # ... the hires pass was not, and the infotext says why
    assert "cannot be ensembled with the loaded checkpoint tiny-wide" in message
    assert "loaded checkpoint: tiny-wide" in message
    assert_clean()
    assert "AFA not applied" not in webui.txt2img(script_args=afa()).infotexts[0]  # the next job is fine


def test_members_of_another_architecture_than_the_loaded_checkpoint_are_refused(webui):
    write_checkpoint(webui, "tiny-wide", seed=7, unet_params=wide_params())
    reference = webui.txt2img()
    processed = webui.txt2img(script_args=afa(members=("tiny-b", "tiny-wide")))
    message = infotext_params(processed.infotexts[0])["AFA not applied"]
    assert "tiny-wide [" in message and "cannot be ensembled with the loaded checkpoint tiny-a" in message
    assert "first differing key" in message
    assert pixels(processed.images[0]) == pixels(reference.images[0])
    assert_clean()


def test_inpainting_members_only_with_inpainting_members(webui):
    write_checkpoint(webui, "tiny-inpaint", seed=8, unet_params={**copy.deepcopy(PRESETS["tiny"]), "in_channels": 9})
    processed = webui.txt2img(script_args=afa(members=("tiny-a", "tiny-inpaint")))
    message = infotext_params(processed.infotexts[0])["AFA not applied"]
    assert "tiny-inpaint [" in message and "is an inpainting model (9 input channels)" in message

    inpainting, regular = (read_unet_shapes(sd_models.get_closet_checkpoint_match(name).filename)
                           for name in ("tiny-inpaint", "tiny-a"))
    build.check_compatible("inpainting base", inpainting, [("member", inpainting)])  # all inpainting: accepted
    with pytest.raises(IncompatibleMembersError, match="inpainting base is an inpainting model"):
        build.check_compatible("inpainting base", inpainting, [("tiny-a", regular)])


def test_prompt_lora_changes_every_member(tmp_path):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], builtin_lora=True) as instance:
        layers = ["diffusion_model_input_blocks_1_1_proj_in", "diffusion_model_middle_block_1_proj_out",
                  "diffusion_model_output_blocks_11_1_proj_out"]
        harness.write_lora(instance.data_dir / "models" / "Lora" / "style.safetensors", layers, scale=0.5)
        # the loaded checkpoint (tiny-a) is not a member: any effect of a UNet-only LoRA comes from the members
        args = afa(members=("tiny-b", "tiny-c"), mode="Noise average")
        plain = instance.txt2img(prompt="a cat", script_args=args)
        styled = instance.txt2img(prompt="a cat <lora:style:1>", script_args=args)
        assert pixels(plain.images[0]) != pixels(styled.images[0])
        assert "AFA mode" in infotext_params(styled.infotexts[0])

        cached = list(member_cache.cache.unets.values())
        assert len(cached) == 2
        for member in cached:
            layer = member.input_blocks[1][1].proj_in
            assert layer.network_layer_name == "diffusion_model_input_blocks_1_1_proj_in"
            assert layer.network_current_names != ()  # merged into this member's own weights
            assert not torch.equal(layer.weight, layer.network_weights_backup)

        again = instance.txt2img(prompt="a cat", script_args=args)  # LoRA gone: backups restored on use
        assert pixels(again.images[0]) == pixels(plain.images[0])
        for member in cached:
            layer = member.input_blocks[1][1].proj_in
            assert layer.network_current_names == () and torch.equal(layer.weight, layer.network_weights_backup)
    assert harness.leaked_patches() == []


@pytest.mark.parametrize("flag", ["--medvram", "--lowvram"])
def test_low_vram_flags_offload_member_blocks(tmp_path, flag):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], argv=harness.DEFAULT_ARGV + (flag,)) as instance:
        assert shared.sd_model.lowvram
        probe = Probe()
        offloaded = instance.txt2img(script_args=afa(members=("tiny-a", "tiny-b", "tiny-c")))
        assert probe.steps[0]["ensemble"].offload_device == devices.device
        assert all(next(m.parameters()).device == devices.cpu for m in probe.steps[0]["members"][1:])

        shared.opts.set("afa_member_offload", "Never")
        probe.steps.clear()
        resident = instance.txt2img(script_args=afa(members=("tiny-a", "tiny-b", "tiny-c")))
        assert probe.steps[0]["ensemble"].offload_device is None
        assert pixels(offloaded.images[0]) == pixels(resident.images[0])
        assert "AFA mode" in infotext_params(offloaded.infotexts[0])
    assert harness.leaked_patches() == []


def test_tiling_applies_to_members(webui):
    seen = []
    script_callbacks.on_cfg_denoiser(lambda params: seen.append(
        {m.input_blocks[0][0].padding_mode for m in sd_unet.current_unet.ensemble.members}))
    webui.txt2img(steps=1, tiling=True, script_args=afa())
    webui.txt2img(steps=1, tiling=False, script_args=afa())
    assert seen == [{"circular"}, {"zeros"}]


def test_interrupt_while_loading_members(webui, monkeypatch):
    original_get = member_cache.MemberCache.get
    textinfo = []

    def get_then_interrupt(self, info, dtype, device):
        textinfo.append(shared.state.textinfo)
        unet = original_get(self, info, dtype, device)
        shared.state.interrupt()
        return unet

    monkeypatch.setattr(member_cache.MemberCache, "get", get_then_interrupt)
    processed = webui.txt2img(script_args=afa(members=("tiny-b", "tiny-c")))
    assert textinfo == ["AFA: loading member 1/2: tiny-b"]
    assert "interrupted while loading members" in infotext_params(processed.infotexts[0])["AFA not applied"]
    assert shared.state.textinfo is None
    assert_clean()


def test_settings_defaults_feed_the_accordion_and_ui_is_side_effect_free(webui):
    write_weights(webui, "pair.safetensors", ["tiny-b", "tiny-c"])
    for key in ("afa_default_members", "afa_default_weights", "afa_member_precision", "afa_member_cache",
                "afa_member_offload", "afa_maps", "afa_maps_every"):
        assert shared.opts.data_labels[key].section == ("afa", "AFA Ensemble")
    shared.opts.set("afa_default_members", ["tiny-b.safetensors", "tiny-c"])
    shared.opts.set("afa_default_weights", "pair.safetensors")
    shared.opts.set("afa_maps", "Last step")
    webui.txt2img(steps=1, script_args=afa())  # something cached and hashed before the snapshot

    def snapshot():
        files = sorted(str(p) for p in webui.data_dir.rglob("*"))
        return (files, dict(shared.opts.data), member_cache.cache.stats(), sd_unet.current_unet, job.current,
                list(infotext_utils.paste_fields), len(script_callbacks.callback_map["callbacks_cfg_denoiser"]))

    before = snapshot()
    script = webui.script(TITLE)
    for _ in range(2):
        with gr.Blocks():
            components = script.ui(False)
        enabled, member_list, weights, mode, show_maps = components
        titles = [sd_models.get_closet_checkpoint_match(name).title for name in ("tiny-b", "tiny-c")]
        assert [c.label for c in components] == ARG_LABELS
        assert (enabled.value, member_list.value, weights.value, mode.value, show_maps.value) == (
            False, titles, "pair.safetensors", "SABW", True)
        assert member_list.multiselect and "pair.safetensors" in weights.choices
    assert snapshot() == before


def test_accordion_handlers(webui):
    from afa.webui import ui

    write_weights(webui, "pair.safetensors", ["tiny-b", "tiny-c"])
    members_update, mode_update, status = ui.weights_chosen("pair.safetensors", [], "Block average")
    titles = [sd_models.get_closet_checkpoint_match(name).title for name in ("tiny-b", "tiny-c")]
    assert members_update["value"] == titles and mode_update["value"] == "SABW" and status == ""
    _, mode_update, _ = ui.weights_chosen("None", titles, "SABW")
    assert mode_update["value"] == "Block average"
    _, _, status = ui.weights_chosen("nope.safetensors", titles, "SABW")
    assert "not found" in status
    assert "needs a weights file" in ui.mode_chosen("None", "SABW")
    refreshed_members, refreshed_weights = ui.refreshed_choices()
    assert refreshed_weights["choices"] == ["None", "pair.safetensors"]
    assert len(refreshed_members["choices"]) == 3


def test_stale_sd_unet_setting_is_set_back(webui):
    client = webui.client()
    payload = dict(prompt="a cat", steps=2, width=64, height=64, sampler_name="Euler", seed=3)
    reference = client.post("/sdapi/v1/txt2img", json=payload).json()
    stale = dict(payload, override_settings={"sd_unet": afa_unet.LABEL}, override_settings_restore_afterwards=False)
    body = client.post("/sdapi/v1/txt2img", json=stale).json()
    assert decoded(body["images"][0]) == decoded(reference["images"][0])  # the setting alone does not enable AFA
    assert "AFA mode" not in json.loads(body["info"])["infotexts"][0]
    assert shared.opts.sd_unet == "Automatic"
    assert_clean()


@pytest.mark.parametrize("flag, value", [("freeze_settings", True), ("freeze_specific_settings", "sd_unet"),
                                         ("freeze_settings_in_sections", "sd")])
def test_frozen_settings_refuse_afa_instead_of_failing_the_job(webui, monkeypatch, flag, value):
    monkeypatch.setattr(shared.cmd_opts, flag, value)  # the override of SD Unet would fail the whole job
    processed = webui.txt2img(script_args=afa())
    assert "settings frozen" in infotext_params(processed.infotexts[0])["AFA not applied"]
    assert_clean()


def test_extension_loaded_after_the_model_works(tmp_path):
    # "Reload UI" order: the model is already loaded, so on_model_loaded never ran for it
    with harness.webui(tmp_path) as instance:
        instance.load_extension(EXTENSION_ROOT)
        processed = instance.txt2img(script_args=afa())
        assert "AFA mode" in infotext_params(processed.infotexts[0])
        assert_clean()
    assert harness.leaked_patches() == []


def test_unload_tears_down_and_frees_caches(webui):
    webui.txt2img(script_args=afa(members=("tiny-a", "tiny-b", "tiny-c")))
    assert member_cache.cache.stats().members == 2
    with pytest.MonkeyPatch.context() as patch:  # leave an active AfaUnet behind, as a failed job does
        patch.setattr(EnsembleUNet, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
        with pytest.raises(RuntimeError, match="boom"):
            webui.txt2img(script_args=afa(members=("tiny-a", "tiny-b", "tiny-c")))
    assert isinstance(sd_unet.current_unet, afa_unet.AfaUnet)

    webui.unload()
    assert sd_unet.current_unet is None and job.current is None
    assert member_cache.cache.stats().tensors == 0
    assert next(shared.sd_model.model.diffusion_model.parameters()).device == devices.device


def test_preload_flag_sets_the_weights_folder(tmp_path):
    folder = tmp_path / "elsewhere"
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT],
                       argv=harness.DEFAULT_ARGV + ("--afa-dir", str(folder))) as instance:
        assert shared.cmd_opts.afa_dir == str(folder)
        write_weights(instance, "pair.safetensors", ["tiny-a", "tiny-b"], folder=folder)
        assert not (instance.data_dir / "models" / "AFA").exists()
        assert instance.client().get("/afa/v1/weights").json()[0]["name"] == "pair.safetensors"
        processed = instance.txt2img(script_args=afa(members=(), weights="pair", mode="SABW"))
        assert "AFA weights: pair [" in processed.infotexts[0]


def test_install_py_installs_only_what_is_missing_and_never_torch(tmp_path, monkeypatch):
    env = dict(os.environ, PYTHONPATH=str(harness.STANDIN_ROOT))
    run = subprocess.run([sys.executable, str(EXTENSION_ROOT / "install.py")], env=env, capture_output=True,
                         text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout == ""  # A1111 1.10 has everything: nothing to do, nothing printed

    import runpy

    from modules import launch_utils
    import launch

    launch_utils.pip_calls.clear()
    monkeypatch.setattr(launch, "is_installed", lambda name: name not in ("einops", "yaml"))
    runpy.run_path(str(EXTENSION_ROOT / "install.py"))
    assert [command for command, _ in launch_utils.pip_calls] == ["install einops", "install pyyaml"]
    launch_utils.pip_calls.clear()


def test_only_the_script_imports_the_glue():
    # (that the core imports neither the WebUI nor gradio is tests/test_cli.py's)
    assert sorted(p.name for p in (EXTENSION_ROOT / "scripts").iterdir() if p.suffix == ".py") == ["afa_script.py"]
    imports_glue = re.compile(r"^\s*(from afa\.webui\b|import afa\.webui\b|from afa import webui\b)", re.M)
    importers = [p for p in EXTENSION_ROOT.rglob("*.py") if ".venv" not in p.parts and "tests" not in p.parts
                 and p.parent.name != "webui" and imports_glue.search(p.read_text(encoding="utf-8"))]
    assert [p.relative_to(EXTENSION_ROOT).as_posix() for p in importers] == ["scripts/afa_script.py"]


FORGE_LAYOUTS = {
    "Forge": ("modules_forge", "no ldm"),  # lllyasviel's Forge, reForge, Forge Classic and Neo
    "a fork that kept ldm": ("modules_forge",),
    "a WebUI without ldm": ("no ldm",),
}


@pytest.mark.parametrize("layout", FORGE_LAYOUTS)
def test_in_forge_the_extension_registers_nothing_and_says_so_in_one_line(tmp_path, monkeypatch, capsys, layout):
    """Installed in a WebUI it cannot run in, the extension leaves the host as it was: no script, setting, SD Unet
    option, callback, tab or route, no error report, one line saying what it needs; --afa-dir still parses.

    Its scripts load as a fresh Forge process offers them: a `modules_forge` package on the path and/or no `ldm`
    (`import ldm` fails), and `afa` and `training` not yet imported. (The stand-in's own model still needs ldm, so
    that layout holds while the scripts load.)"""
    forge_root = tmp_path / "forge"
    (forge_root / "modules_forge").mkdir(parents=True)
    (forge_root / "modules_forge" / "__init__.py").write_text("", encoding="utf-8")
    hidden_packages = ("afa", "training", "modules_forge") + (("ldm",) if "no ldm" in FORGE_LAYOUTS[layout] else ())
    load_scripts = scripts.load_scripts

    def ours(name: str) -> bool:
        return name.split(".")[0] in hidden_packages

    def load_scripts_in_that_layout():
        saved_modules, saved_path = dict(sys.modules), list(sys.path)
        for name in filter(ours, list(sys.modules)):
            del sys.modules[name]
        if "no ldm" in FORGE_LAYOUTS[layout]:
            sys.modules["ldm"] = None  # what `import ldm` and find_spec("ldm") meet in a WebUI without it
        if "modules_forge" in FORGE_LAYOUTS[layout]:
            sys.path.insert(0, str(forge_root))
        try:
            load_scripts()
        finally:
            for name in filter(ours, list(sys.modules)):
                del sys.modules[name]
            sys.modules.update({name: module for name, module in saved_modules.items() if ours(name)})
            sys.path[:] = saved_path

    monkeypatch.setattr(scripts, "load_scripts", load_scripts_in_that_layout)
    errors.exception_records.clear()
    folder = tmp_path / "weights"
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT],
                       argv=harness.DEFAULT_ARGV + ("--afa-dir", str(folder))) as instance:
        output = capsys.readouterr()
        ours = [line for line in (output.out + output.err).splitlines() if "AFA" in line]
        assert len(ours) == 1 and "needs AUTOMATIC1111's WebUI 1.10 or ComfyUI" in ours[0], output
        assert errors.exception_records == [] and "Traceback" not in output.err, output.err

        assert shared.cmd_opts.afa_dir == str(folder)
        # (the stand-in WebUI lives in this checkout too: its own scripts and callbacks are under tests/)
        extension_files = tuple(str(EXTENSION_ROOT / part) + os.sep for part in ("scripts", "afa", "training"))
        assert not [data for data in scripts.scripts_data if data.path.startswith(extension_files)]
        assert instance.script(TITLE) is None and instance.script(TITLE, is_img2img=True) is None
        assert not [callback for callbacks in script_callbacks.callback_map.values() for callback in callbacks
                    if callback.script.startswith(extension_files)]
        assert not [key for key, info in shared.opts.data_labels.items() if info.section[0] == "afa"]
        assert not [option for option in sd_unet.unet_options if "AFA" in option.label]
        assert instance.client().get("/afa/v1/weights").status_code == 404
        assert not [block for block in instance.demo.blocks.values()
                    if "afa" in (getattr(block, "elem_id", None) or "")]
        processed = instance.txt2img()  # the WebUI itself works
        assert len(processed.images) == 1 and "AFA" not in processed.infotexts[0]
    assert harness.leaked_patches() == []



# -- what the real WebUI showed (issue: real-WebUI correctness) ----------------------------------------------------

def test_a_stale_weights_name_does_not_refuse_modes_that_need_none(webui):
    for mode in ("Block average", "Noise average"):
        processed = webui.txt2img(script_args=afa(weights="deleted.safetensors", mode=mode))
        params = infotext_params(processed.infotexts[0])
        assert params["AFA mode"] == mode and "AFA not applied" not in params and "AFA weights" not in params
    # SABW does need it: refused, the file named by its name in the weights folder, never by a server path
    processed = webui.txt2img(script_args=afa(weights="deleted.safetensors", mode="SABW"))
    message = infotext_params(processed.infotexts[0])["AFA not applied"]
    assert "weights 'deleted.safetensors' not found in the weights folder (models/AFA" in message
    assert str(webui.data_dir) not in processed.infotexts[0] + processed.comments


def test_switch_to_an_already_loaded_checkpoint_rebuilds_the_ensemble(tmp_path):
    # With "Maximum number of checkpoints loaded at the same time" = 2, switching to a checkpoint already in memory
    # swaps shared.sd_model without model_loaded callbacks or apply_unet() (reuse_model_from_already_loaded), and
    # "Only keep one model on device" moves the previous one to the CPU.
    config = {"sd_checkpoints_limit": 2, "sd_checkpoints_keep_in_cpu": True}
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], config=config) as instance:
        tiny_a, tiny_b = (sd_models.get_closet_checkpoint_match(name) for name in ("tiny-a", "tiny-b"))
        sd_models.reload_model_weights(info=tiny_b)
        sd_models.reload_model_weights(info=tiny_a)  # both in memory now, tiny-a loaded
        assert len(sd_models.model_data.loaded_sd_models) == 2
        model_a = shared.sd_model

        probe = Probe()
        processed = instance.txt2img(steps=2, enable_hr=True, hr_scale=2.0, hr_second_pass_steps=2,
                                     hr_checkpoint_name="tiny-b", denoising_strength=0.5,
                                     script_args=afa(members=("tiny-a", "tiny-b")))
        assert [step["checkpoint"] for step in probe.steps] == ["tiny-a", "tiny-a", "tiny-b", "tiny-b"]
        hires = probe.steps[-1]  # the ensemble as rebuilt by the first hires-pass call
        assert hires["base"] is not model_a.model.diffusion_model
        assert hires["members"][1] is hires["base"]  # tiny-b's loaded UNet is member 2, not a copy
        assert hires["members"][0] is not model_a.model.diffusion_model  # not the UNet of the model parked on the CPU
        params = infotext_params(processed.infotexts[0])
        assert "AFA mode" in params and "AFA not applied" not in params
        assert_clean()
    assert harness.leaked_patches() == []


def test_aggregation_maps_follow_each_images_rows_with_and_prompts(webui, monkeypatch):
    from afa.webui.gallery_maps import AggregationMaps

    maps = AggregationMaps(["a", "b"], "title", batch_size=2, every=None)
    maps.blocks, maps.first_block, maps.num_input_blocks = [0], 0, 12
    # image 0's prompt has 2 AND parts, image 1's one: rows 0-1 are image 0, row 2 image 1, rows 3-4 the uncond
    rows = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 2, 2, 2) / 10
    for calls in ([rows], [rows[0:2], rows[2:4], rows[4:5]]):  # batched, and "batch cond/uncond" off
        maps.begin_pass("first pass")
        maps.on_denoiser_step(0, 1, [2, 1])
        for call in calls:
            maps.observe(0, call)
        recorded = [recorder.maps[0] for recorder in maps.passes[-1].recorders]
        assert [len(maps_of_image) for maps_of_image in recorded] == [1, 1]
        assert [float(maps_of_image[0][0, 0, 0]) for maps_of_image in recorded] == [0.0, pytest.approx(0.2)]

    # the job tells the maps each image's number of AND parts, from the conditioning being sampled
    seen = []
    original = AggregationMaps.on_denoiser_step
    monkeypatch.setattr(AggregationMaps, "on_denoiser_step",
                        lambda self, step, total, parts=None: (seen.append(parts), original(self, step, total, parts)))
    processed = webui.txt2img(prompt=["a cat AND a dog", "a cat"], batch_size=2, steps=2,
                              script_args=afa(show_maps=True))
    assert seen and all(parts == [2, 1] for parts in seen)
    assert len(processed.images) - processed.index_of_first_image == 4  # two images and their maps


def test_routes_need_the_api_and_its_auth(tmp_path):
    without_api = tuple(flag for flag in harness.DEFAULT_ARGV if flag != "--api")
    with harness.webui(tmp_path / "no-api", extensions=[EXTENSION_ROOT], argv=without_api) as instance:
        assert instance.client().get("/afa/v1/weights").status_code == 404
        assert instance.client().post("/afa/v1/unload").status_code == 404
    with harness.webui(tmp_path / "auth", extensions=[EXTENSION_ROOT],
                       argv=harness.DEFAULT_ARGV + ("--api-auth", "alice:secret,bob:hunter2")) as instance:
        client = instance.client()
        for method, route in (("get", "/afa/v1/weights"), ("post", "/afa/v1/unload")):
            assert getattr(client, method)(route).status_code == 401
            assert getattr(client, method)(route, auth=("alice", "wrong")).status_code == 401
            assert getattr(client, method)(route, auth=("bob", "hunter2")).status_code == 200
        assert client.get("/sdapi/v1/options").status_code == 401  # the WebUI's own routes alike
    assert harness.leaked_patches() == []


def test_unload_waits_for_the_running_job(webui):
    import threading

    from modules import call_queue

    webui.txt2img(script_args=afa(members=("tiny-b", "tiny-c")))
    assert member_cache.cache.stats().members == 2
    result = {}
    client = webui.client()
    with call_queue.queue_lock:  # what a generation holds while it runs
        thread = threading.Thread(target=lambda: result.update(client.post("/afa/v1/unload").json()))
        thread.start()
        thread.join(timeout=3)
        assert thread.is_alive() and member_cache.cache.stats().members == 2
    thread.join(timeout=60)
    assert result["freed_members"] == 2 and member_cache.cache.stats().members == 0


def test_identical_members_with_a_prompt_lora_give_the_base_image(tmp_path):
    # tiny-a2 is a copy of tiny-a. A strong LoRA on every attention layer makes the model sensitive to the memory
    # layout of the features a block receives; block averaging must hand each block what the UNet itself would.
    checkpoints = (("tiny-a", 1), ("tiny-a2", 1), ("tiny-b", 2))
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], checkpoints=checkpoints, builtin_lora=True) as w:
        layers = [name for name in harness.lora_network_layer_names() if name.startswith("diffusion_model_")
                  and any(part in name for part in ("_attn1_", "_attn2_", "_ff_", "_proj_"))
                  and isinstance(harness.lora_network_layer_names()[name], (torch.nn.Linear, torch.nn.Conv2d))]
        harness.write_lora(w.data_dir / "models" / "Lora" / "strong.safetensors", layers, scale=0.5)
        prompt = "a cat <lora:strong:1>"
        base = w.txt2img(prompt="a cat")
        base_lora = w.txt2img(prompt=prompt)
        assert max(abs(a - b) for a, b in zip(pixels(base.images[0]), pixels(base_lora.images[0]))) > 30
        for mode in ("Block average", "Noise average"):
            for text, reference in (("a cat", base), (prompt, base_lora)):
                processed = w.txt2img(prompt=text, script_args=afa(members=("tiny-a", "tiny-a2"), mode=mode))
                assert "AFA mode" in infotext_params(processed.infotexts[0])
                assert pixels(processed.images[0]) == pixels(reference.images[0]), (mode, text)
    assert harness.leaked_patches() == []


def test_xyz_cells_with_afa_off_print_nothing_about_the_override(webui, capsys):
    xyz_script = next(s for s in scripts.scripts_txt2img.selectable_scripts if s.title() == "X/Y/Z plot")
    args = harness.ui_script_args(scripts.scripts_txt2img, afa(enabled=False))
    args[0] = scripts.scripts_txt2img.selectable_scripts.index(xyz_script) + 1
    start = xyz_script.args_from
    current = [axis.label for axis in xyz_script.current_axis_options]
    args[start:start + 3] = [current.index(xyz.AXIS_ENABLED), "", ["True", "False", "True", "False"]]
    processed = webui.txt2img(steps=1, script_args=args)
    cells = [infotext_params(text) for text in processed.infotexts[1:]]
    assert [("AFA mode" in cell) for cell in cells] == [True, False, True, False]
    assert "ignoring the SD Unet override" not in capsys.readouterr().out
    # someone else's override (an API request naming the label) is dropped, with a word on the console
    webui.txt2img(override_settings={"sd_unet": afa_unet.LABEL})
    assert "ignoring the SD Unet override" in capsys.readouterr().out
    assert_clean()


def test_interrupt_while_loading_members_is_reported_through_the_api(webui, monkeypatch):
    original_get = member_cache.MemberCache.get

    def get_then_interrupt(self, info, dtype, device):
        unet = original_get(self, info, dtype, device)
        shared.state.interrupt()
        return unet

    monkeypatch.setattr(member_cache.MemberCache, "get", get_then_interrupt)
    body = webui.client().post("/sdapi/v1/txt2img", json={
        "prompt": "a cat", "steps": 2, "width": 64, "height": 64,
        "alwayson_scripts": {TITLE: {"args": [True, ["tiny-b", "tiny-c"], "", "Block average"]}}}).json()
    info = json.loads(body["info"])
    # no image was made, so no infotext carries the note: the job's generation parameters do
    assert "interrupted while loading members" in info["extra_generation_params"]["AFA not applied"]
    assert_clean()
