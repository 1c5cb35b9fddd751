"""SD 2.x-v members in the WebUI stand-in: tiny SD 2.x-v checkpoints in the WebUI's form (tests/factories.py: an
OpenCLIP text tower under cond_stage_model.model.*, `parameterization: v`), sd2-a loaded. The loaded model is the
WebUI's SD 2.x model (OpenCLIP conditioning, v-prediction); every member reads its own encoding, and a SABW file
trained through the WebUI's API runs.

Checkpoints: sd2-a (loaded), sd2-a2 (a copy of sd2-a), sd2-b, and sd2-a-text (sd2-a's UNet and VAE with sd2-b's
text encoder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_standin"))

import harness  # noqa: E402

import torch  # noqa: E402

from modules import sd_models, shared  # noqa: E402

from afa.webui import training_job  # noqa: E402
from standin_jobs import WAIT, afa, params_of, resolution_for_members, sabw_against_average, \
    train_through_api  # noqa: E402
from test_webui_text import ContextSpy, write_moved_copy, write_text_variant  # noqa: E402

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (("sd2-a", 1, "sd2"), ("sd2-a2", 1, "sd2"), ("sd2-b", 2, "sd2"))
MEMBERS = ("sd2-a", "sd2-b")


@pytest.fixture
def webui(tmp_path):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], checkpoints=CHECKPOINTS) as instance:
        write_text_variant(Path(sd_models.model_path), "sd2-a-text", "sd2-a", "sd2-b")
        write_moved_copy(Path(sd_models.model_path), "sd2-a-moved", "sd2-a")
        yield instance
        training_job.job.cancel()
        training_job.job.wait(WAIT)
    assert harness.leaked_patches() == []


def test_sd2_members_read_their_own_encoding_and_identical_ones_give_the_loaded_image(webui, monkeypatch):
    model = shared.sd_model
    assert model.is_sd2 and model.parameterization == "v"
    base = webui.txt2img(negative_prompt="blurry")
    same = webui.txt2img(negative_prompt="blurry", script_args=afa(("sd2-a", "sd2-a2")))
    assert same.images[0].tobytes() == base.images[0].tobytes()
    moved = webui.txt2img(negative_prompt="blurry", script_args=afa(("sd2-a", "sd2-a-moved")))  # another sha256
    assert moved.images[0].tobytes() == base.images[0].tobytes()

    spy = ContextSpy(monkeypatch)
    spy.watch_loaded_unet(monkeypatch)
    prompt = "a (red:1.2) cat BREAK on a mat"
    webui.txt2img(prompt=prompt, negative_prompt="blurry", override_settings={"sd_model_checkpoint": "sd2-a-text"})
    expected = list(spy.loaded)
    webui.txt2img(steps=1)  # sd2-a loaded again
    spy.loaded.clear()
    processed = webui.txt2img(prompt=prompt, negative_prompt="blurry", script_args=afa(("sd2-a", "sd2-a-text")))
    assert len(spy.members) == len(expected) == len(spy.loaded) > 0
    for call, (loaded, members, other) in enumerate(zip(spy.loaded, spy.members, expected)):
        assert torch.equal(members[0], loaded) and torch.equal(members[1], other), call
        assert not torch.equal(members[1], loaded), call
    params = params_of(processed)
    assert params["AFA text encoders"] == "Each member's own" and "AFA text notes" not in params


def test_sd2_weights_trained_through_the_api_run_as_sabw(webui, tmp_path):
    info = train_through_api(webui, MEMBERS, "sd2-trained", tmp_path / "images")
    assert info.config.context_dim == 64
    sabw_against_average(webui, MEMBERS, "sd2-trained")


def test_the_training_tab_sets_the_resolution_of_v_members_to_768(webui):
    assert resolution_for_members(webui, ("sd2-b", "sd2-a"))["value"] == 768
