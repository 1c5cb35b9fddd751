"""SDXL members in the WebUI stand-in (tests/webui_standin: sgm's DiffusionEngine and the WebUI's SDXL conditioning,
modules/standin_sgm.py): tiny SDXL checkpoints in the WebUI's form (tests/factories.py), xl-a loaded. The loaded
model is the WebUI's SDXL model (conditioner, dict conditioning, per-level transformer depths); the ensemble runs on
it, every member reads its own context and `y`, and a SABW file trained through the WebUI's API runs.

Checkpoints: xl-a (loaded), xl-a2 (a copy of xl-a), xl-b, and xl-a-text (xl-a's UNet and VAE with xl-b's text
encoders).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_standin"))

import harness  # noqa: E402

import torch  # noqa: E402

from modules import sd_models, shared  # noqa: E402

from afa.ensemble import EnsembleUNet  # noqa: E402
from afa.webui import gallery_maps, training_job  # noqa: E402
from standin_jobs import WAIT, afa, params_of, resolution_for_members, sabw_against_average, \
    train_through_api  # noqa: E402
from test_webui_text import write_moved_copy, write_text_variant  # noqa: E402

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = (("xl-a", 1, "sdxl"), ("xl-a2", 1, "sdxl"), ("xl-b", 2, "sdxl"))
MEMBERS = ("xl-a", "xl-b")
NEGATIVE = "blurry, lowres"


@pytest.fixture
def webui(tmp_path):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], checkpoints=CHECKPOINTS) as instance:
        write_text_variant(Path(sd_models.model_path), "xl-a-text", "xl-a", "xl-b", text_prefix="conditioner.")
        write_moved_copy(Path(sd_models.model_path), "xl-a-moved", "xl-a")
        yield instance
        training_job.job.cancel()
        training_job.job.wait(WAIT)
    assert harness.leaked_patches() == []


def test_the_stand_in_loads_an_sdxl_checkpoint_as_the_webui_does(webui):
    model = shared.sd_model
    assert model.is_sdxl and not model.is_sd1 and model.sd_checkpoint_info.name_for_extra == "xl-a"
    assert model.cond_stage_model is model.conditioner  # sd_hijack: the conditioner serves as cond_stage_model
    # every tensor of the file is in the model (the hijack's `wrapped` levels aside)
    stored = load_file(str(Path(sd_models.model_path) / "xl-a.safetensors"))
    loaded = {".".join(part for part in key.split(".") if part != "wrapped"): value
              for key, value in model.state_dict().items()}
    assert all(torch.equal(loaded[key].float(), value.float()) for key, value in stored.items()), \
        sorted(set(stored) - set(loaded))[:3]
    unet = model.model.diffusion_model
    assert len(unet.input_blocks) == 9 and len(unet.input_blocks[4][1].transformer_blocks) == 2
    assert len(unet.middle_block[1].transformer_blocks) == 3
    conditioning = model.get_learned_conditioning(["a photo of a cat"])
    assert conditioning["crossattn"].shape == (1, 77, 96) and conditioning["vector"].shape == (1, 1600)
    assert webui.txt2img().images


def test_identical_members_give_the_loaded_models_image_and_different_ones_do_not(webui):
    base = webui.txt2img(negative_prompt=NEGATIVE)
    same = webui.txt2img(negative_prompt=NEGATIVE, script_args=afa(("xl-a", "xl-a2")))
    assert params_of(same)["AFA mode"] == "Block average" and "AFA not applied" not in params_of(same)
    assert same.images[0].tobytes() == base.images[0].tobytes()
    moved = webui.txt2img(negative_prompt=NEGATIVE, script_args=afa(("xl-a", "xl-a-moved")))  # another sha256
    assert moved.images[0].tobytes() == base.images[0].tobytes()
    mixed = webui.txt2img(negative_prompt=NEGATIVE, script_args=afa(MEMBERS))
    params = params_of(mixed)
    assert params["AFA members"].startswith("xl-a [") and "xl-b [" in params["AFA members"]
    assert mixed.images[0].tobytes() != base.images[0].tobytes()


class ConditioningSpy:
    """Records (context, y) of every UNet call of the loaded model, and the members' (contexts, vectors) of every
    ensemble call."""

    def __init__(self, monkeypatch):
        self.loaded: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.members: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        original = EnsembleUNet.forward

        def forward(ensemble, x, timesteps=None, context=None, y=None, member_contexts=None, member_vectors=None,
                    **kwargs):
            count = len(ensemble.members)
            self.members.append(([c.clone() for c in member_contexts] if member_contexts else [context] * count,
                                 [v.clone() for v in member_vectors] if member_vectors else [y] * count))
            return original(ensemble, x, timesteps, context, y, member_contexts, member_vectors, **kwargs)

        monkeypatch.setattr(EnsembleUNet, "forward", forward)
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        routed = UNetModel.forward

        def unet_forward(unet, x, timesteps=None, context=None, y=None, **kwargs):
            self.loaded.append((context.clone(), y.clone()))
            # y positional, as UNetModel.forward's 4th parameter (sgm's wrapper names it; extensions may not)
            return routed(unet, x, timesteps, context, y, **kwargs)

        monkeypatch.setattr(UNetModel, "forward", unet_forward)


@pytest.mark.parametrize("negative", [NEGATIVE, ""], ids=["negative", "empty-negative"])
def test_each_sdxl_member_reads_its_own_context_and_y(webui, monkeypatch, negative):
    """The member with xl-b's text encoders reads, at every UNet call, exactly the context and `y` the WebUI gives
    the UNet when that checkpoint is loaded (an empty negative prompt: SDXL's zero embeddings)."""
    spy = ConditioningSpy(monkeypatch)
    prompt = "a photo of a red cat, BREAK on a mat in a sunny garden"
    webui.txt2img(prompt=prompt, negative_prompt=negative, override_settings={"sd_model_checkpoint": "xl-a-text"})
    expected = list(spy.loaded)
    webui.txt2img(steps=1)  # xl-a loaded again
    before = {k: v.clone() for k, v in shared.sd_model.conditioner.state_dict().items()}
    spy.loaded.clear()
    processed = webui.txt2img(prompt=prompt, negative_prompt=negative, script_args=afa(("xl-a", "xl-a-text")))
    assert shared.sd_model.sd_checkpoint_info.name_for_extra == "xl-a"
    assert len(spy.members) == len(expected) == len(spy.loaded) > 0
    for call, ((context, y), (contexts, vectors), (other_context, other_y)) in enumerate(
            zip(spy.loaded, spy.members, expected)):
        assert torch.equal(contexts[0], context) and torch.equal(vectors[0], y), call  # xl-a: the loaded encoding
        assert torch.equal(contexts[1], other_context) and torch.equal(vectors[1], other_y), call  # its own
    # the prompt's pooled embedding is each tower's own (an empty negative prompt's is zero for both)
    assert any(not torch.equal(vectors[1], vectors[0]) for _, vectors in spy.members)
    if not negative:
        assert any((vectors[0][:, :64] == 0).all(dim=1).any() for _, vectors in spy.members)
    assert all(torch.equal(before[k], v) for k, v in shared.sd_model.conditioner.state_dict().items())
    assert "get_learned_conditioning" not in vars(shared.sd_model)
    params = params_of(processed)
    assert params["AFA text encoders"] == "Each member's own" and "AFA text notes" not in params


def test_sdxl_weights_trained_through_the_api_run_as_sabw_and_draw_their_maps(webui, tmp_path, monkeypatch):
    info = train_through_api(webui, MEMBERS, "xl-trained", tmp_path / "images")
    assert info.config.context_dim == 96 and len(info.config.block_channels) == 19
    _, sabw = sabw_against_average(webui, MEMBERS, "xl-trained", negative_prompt=NEGATIVE)

    # the aggregation maps of the SDXL layout: output_blocks.1, .4 and .8 (the last output at each resolution)
    configure, recorded = gallery_maps.AggregationMaps.configure, []
    monkeypatch.setattr(gallery_maps.AggregationMaps, "configure", lambda maps, ensemble, mode: (
        recorded.append(gallery_maps.blocks_to_show(ensemble, mode)), configure(maps, ensemble, mode)))
    with_maps = webui.txt2img(negative_prompt=NEGATIVE, script_args=afa(MEMBERS, mode="SABW", weights="xl-trained",
                                                                        show_maps=True))
    assert len(with_maps.images) == 2 and with_maps.images[1].size != with_maps.images[0].size
    assert recorded == [[11, 14, 18]] and with_maps.images[0].tobytes() == sabw.images[0].tobytes()


def test_the_training_tab_sets_the_resolution_to_the_first_members_native_size(webui):
    assert resolution_for_members(webui, MEMBERS)["value"] == 1024
    assert "value" not in resolution_for_members(webui, ["tiny-a"])  # not installed here: left as it is
