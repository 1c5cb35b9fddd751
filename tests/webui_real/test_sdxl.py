"""SDXL members in a real A1111 1.10: a WebUI of its own (conftest.py's `own_webui`) on two tiny SDXL
checkpoints in the WebUI's form (sgm yaml beside each; tests/webui_real/sdxl_checkpoint.py, built with the WebUI's
sgm), xl-1 loaded. Block averaging and SABW run (the members' UNets are built from their sgm yaml, with SDXL's
per-level transformer depths, and read `y`), and differ from the base image.

Opt-in: AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui
"""

import os
from pathlib import Path

import pytest

if not os.environ.get("AFA_WEBUI_DIR"):
    pytest.skip("real-WebUI tier: set AFA_WEBUI_DIR to an A1111 1.10 checkout with its venv at "
                "$AFA_WEBUI_DIR/venv and run `AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui`",
                allow_module_level=True)


REPO = Path(__file__).resolve().parents[2]
MEMBERS = ("xl-1", "xl-2")
PAYLOAD = dict(prompt="a photo of a cat", steps=2, width=64, height=64, seed=1, sampler_name="Euler", cfg_scale=7)


@pytest.fixture(scope="module")
def sdxl_webui(tmp_path_factory, webui_python, own_webui, tier_helpers):
    from training.sd_checkpoint import TINY_CLIP_TEXT_CONFIG
    from training.text_encoder import write_text_encoder_folder

    data_dir = tmp_path_factory.mktemp("webui-sdxl-data")
    folder = data_dir / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    text_folder = write_text_encoder_folder(folder / "tiny-clip-text", TINY_CLIP_TEXT_CONFIG)
    files = []
    for seed, name in enumerate(MEMBERS, start=1):
        files.append(folder / f"{name}.safetensors")
        webui_python(str(REPO / "tests/webui_real/sdxl_checkpoint.py"), str(files[-1]), str(text_folder), str(seed))
    tier_helpers.write_pair_weights(data_dir / "models" / "AFA" / "xl-pair.safetensors", files, context_dim=544)
    with own_webui(data_dir, MEMBERS) as server:
        server.post("/sdapi/v1/options", {"live_previews_enable": False})  # SDXL's approx preview would download
        yield server


def afa(mode: str, weights: str = "") -> list:
    return [True, list(MEMBERS), weights, mode, False]


def test_sdxl_members_ensemble_in_the_real_webui(sdxl_webui):
    base = sdxl_webui.txt2img(**PAYLOAD)
    for mode, weights in (("Block average", ""), ("SABW", "xl-pair")):
        generation = sdxl_webui.txt2img(afa=afa(mode, weights), **PAYLOAD)
        params = generation.params
        assert params.get("AFA mode") == mode and "AFA not applied" not in params, generation.infotext
        assert params["AFA members"].startswith("xl-1 [") and "xl-2 [" in params["AFA members"]
        assert not generation.same_image(base), mode
        print(f"real A1111, tiny SDXL (depths 0/2/3): {mode} differs from the base by up to "
              f"{generation.max_diff(base)}/255")
