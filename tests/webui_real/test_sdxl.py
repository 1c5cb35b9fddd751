"""SDXL members in a real A1111 1.10: a WebUI of its own (conftest.py's `own_webui`) on two tiny SDXL
checkpoints in the WebUI's form (sgm yaml beside each; tests/webui_real/sdxl_checkpoint.py, built with the WebUI's
sgm), xl-1 loaded. Block averaging and SABW run (the members' UNets are built from their sgm yaml, with SDXL's
per-level transformer depths, and read `y`), and differ from the base image.

Opt-in (its fixtures skip without AFA_WEBUI_DIR): AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui
"""

from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[2]
MEMBERS = ("xl-1", "xl-2")


@pytest.fixture(scope="module")
def sdxl_data_dir(tmp_path_factory, webui_python, tier_helpers):
    """The data dir: two tiny SDXL checkpoints built with the WebUI's sgm, and a SABW file for them."""
    from training.sd_checkpoint import TINY_CLIP_TEXT_CONFIG
    from training.text_encoder import write_text_encoder_folder

    text_folder = write_text_encoder_folder(tmp_path_factory.mktemp("sdxl-text") / "tiny-clip-text",
                                            TINY_CLIP_TEXT_CONFIG)
    data_dir, files = tier_helpers.members_data_dir(
        tmp_path_factory, "webui-sdxl-data", MEMBERS,
        lambda path, seed: webui_python(str(REPO / "tests/webui_real/sdxl_checkpoint.py"), str(path),
                                        str(text_folder), str(seed)))
    tier_helpers.write_pair_weights(data_dir / "models" / "AFA" / "xl-pair.safetensors", files, context_dim=544)
    return data_dir


@pytest.fixture(scope="module")
def sdxl_webui(sdxl_data_dir, own_webui):
    with own_webui(sdxl_data_dir, MEMBERS) as server:
        server.post("/sdapi/v1/options", {"live_previews_enable": False})  # SDXL's approx preview would download
        yield server


def afa(mode: str, weights: str = "") -> list:
    return [True, list(MEMBERS), weights, mode, False]


def test_sdxl_members_ensemble_in_the_real_webui(sdxl_webui):
    base = sdxl_webui.txt2img()
    for mode, weights in (("Block average", ""), ("SABW", "xl-pair")):
        generation = sdxl_webui.txt2img(afa=afa(mode, weights))
        params = generation.params
        assert params.get("AFA mode") == mode and "AFA not applied" not in params, generation.infotext
        assert params["AFA members"].startswith("xl-1 [") and "xl-2 [" in params["AFA members"]
        assert not generation.same_image(base), mode
        print(f"real A1111, tiny SDXL (depths 0/2/3): {mode} differs from the base by up to "
              f"{generation.max_diff(base)}/255")


def test_sdxl_members_train_in_the_webui_and_read_their_own_conditioning(sdxl_webui, tier_helpers):
    """A SABW file trained in the WebUI (/afa/v1/train) on the two SDXL members, then used: each member reads the
    prompt as its own two text encoders encode it (context and `y`), with nothing left unmatched."""
    status = tier_helpers.train_through_api(sdxl_webui, MEMBERS, "xl-trained")
    print(f"real A1111, tiny SDXL trained in the WebUI: validation {status['validation'][-1]['errors']}")

    own = sdxl_webui.txt2img(afa=afa("SABW", "xl-trained"))
    params = own.params
    assert params.get("AFA mode") == "SABW" and params.get("AFA weights", "").startswith("xl-trained"), own.infotext
    assert params.get("AFA text encoders") == "Each member's own", own.infotext
    assert "AFA text notes" not in params, own.infotext  # xl-2's encoders found, every chunk and y row matched
    loaded = sdxl_webui.txt2img(afa=afa("SABW", "xl-trained"),
                                override_settings={"afa_text_encoders": "The loaded checkpoint's"})
    assert "AFA text notes" in loaded.params, loaded.infotext  # trained per member, used shared: said
    assert not own.same_image(loaded)
    print(f"real A1111, tiny SDXL: each member's own conditioning vs the loaded model's differ by up to "
          f"{own.max_diff(loaded)}/255")


CONDITIONING_SCRIPT = """
import sys
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

sys.path.insert(0, "tests/webui_real")
from sdxl_checkpoint import offline_text_models
from sgm.util import instantiate_from_config
from training.sdxl_text import load_sdxl_text_encoders
from training.text_encoder import tokenize

path = Path(sys.argv[1])
config = yaml.safe_load(path.with_suffix(".yaml").read_text())
offline_text_models()
conditioner = instantiate_from_config(OmegaConf.create(config)["model"]["params"]["conditioner_config"])
state = load_file(str(path))
conditioner.load_state_dict({k[len("conditioner."):]: v for k, v in state.items() if k.startswith("conditioner.")})
for embedder in conditioner.embedders:
    if hasattr(embedder, "device"):
        embedder.device = "cpu"  # sgm's default is "cuda" (the WebUI sets its own device)
prompts = ["a photo of a cat", "", "an oil painting of a lighthouse at dusk"]
sizes = torch.tensor([[1024.0, 768.0], [512.0, 512.0], [768.0, 1344.0]])
crops = torch.tensor([[0.0, 0.0], [16.0, 32.0], [0.0, 64.0]])
targets = torch.tensor([[1024.0, 1024.0]] * 3)
with torch.no_grad():
    expected = conditioner({"txt": prompts, "original_size_as_tuple": sizes, "crop_coords_top_left": crops,
                            "target_size_as_tuple": targets})
ours = load_sdxl_text_encoders(state, config, checkpoint_name=path.name)
context, pooled = ours.encode(tokenize(prompts))
y = ours.vector(pooled, sizes, crops, targets)
context_difference = (expected["crossattn"] - context).abs().max().item()
vector_difference = (expected["vector"] - y).abs().max().item()
print(f"sgm conditioner vs AFA: context {tuple(context.shape)} max difference {context_difference:.3g}, "
      f"y {tuple(y.shape)} max difference {vector_difference:.3g}")
assert expected["crossattn"].shape == context.shape and expected["vector"].shape == y.shape
assert context_difference < 5e-5 and vector_difference < 5e-5
"""


def test_sdxl_conditioning_equals_sgms_conditioner(sdxl_data_dir, webui_python):
    """training/sdxl_text.py (context and y from a checkpoint's own text encoders, without sgm) against sgm's
    GeneralConditioner on the same tiny SDXL checkpoint: the WebUI's SDXL conditioning."""
    checkpoint = sdxl_data_dir / "models" / "Stable-diffusion" / f"{MEMBERS[0]}.safetensors"
    print(webui_python("-c", CONDITIONING_SCRIPT, str(checkpoint)).stdout.strip().splitlines()[-1])


def test_the_training_tab_trains_sdxl_members_in_a_browser(sdxl_webui, screenshots, tmp_path):
    """The AFA Training tab in Chromium with SDXL members: choosing them sets the resolution to SDXL's 1024; a short
    run at 32 px finishes, its table lists both members, and nothing on the page failed."""
    browser = pytest.importorskip("test_browser")  # skips where Chromium or playwright is missing
    with browser.sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(browser.CHROMIUM), headless=True,
            args=browser.CHROMIUM_ARGS, viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(browser.TIMEOUT_MS)
        try:
            page = browser.Page(context.new_page(), sdxl_webui.url, screenshots)
            page.load()
            p = page.page
            page.open_tab("AFA Training", "tab_afa_training")
            page.pick("afa_train_members", f"{MEMBERS[0]}.safetensors")
            p.wait_for_function(
                "() => document.querySelector('#afa_train_resolution input[type=number]').value === '1024'")
            page.load()  # a fresh form for the run
            page.fill_training_form(MEMBERS, sdxl_webui.data_dir / "training-images", steps=4, output="xl-browser")
            p.click("#afa_train_generate")
            p.wait_for_function("() => document.querySelector('#afa_train_status').innerText"
                                ".includes('wrote xl-browser')", timeout=browser.GENERATION_TIMEOUT_MS)
            p.wait_for_selector("#afa_train_validation_table td", state="visible")
            p.wait_for_timeout(1500)  # the plots redraw
            page.shot("20-training-sdxl", "#tab_afa_training")
            table = p.inner_text("#afa_train_validation_table")
            assert all(model in table for model in ("AFA", "block average", "weighted merge (r=", "MBW", *MEMBERS)), \
                table
            page.assert_no_errors("training tab, SDXL members")
        finally:
            context.close()
    assert (sdxl_webui.data_dir / "models" / "AFA" / "xl-browser.safetensors").is_file()
