"""SDXL members in a real A1111 1.10: a WebUI of its own (tests/webui_real/conftest.py's server) on two tiny SDXL
checkpoints in the WebUI's form (sgm yaml beside each; tests/webui_real/sdxl_checkpoint.py, built with the WebUI's
sgm), xl-1 loaded. Block averaging and SABW run (the members' UNets are built from their sgm yaml, with SDXL's
per-level transformer depths, and read `y`), and differ from the base image.

Opt-in: AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

if not os.environ.get("AFA_WEBUI_DIR"):
    pytest.skip("real-WebUI tier: set AFA_WEBUI_DIR to an A1111 1.10 checkout with its venv at "
                "$AFA_WEBUI_DIR/venv and run `AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui`",
                allow_module_level=True)


def _load_tier_helpers():
    """This tier's conftest.py (the server helpers), loaded under a name of its own: pytest may hold another
    module named `conftest` (tests/conftest.py)."""
    spec = importlib.util.spec_from_file_location("afa_real_tier_helpers", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


real = _load_tier_helpers()

REPO = Path(__file__).resolve().parents[2]
MEMBERS = ("xl-1", "xl-2")
PAYLOAD = dict(prompt="a photo of a cat", steps=2, width=64, height=64, seed=1, sampler_name="Euler", cfg_scale=7)


def write_sdxl_checkpoints(webui_dir: Path, folder: Path) -> list[Path]:
    from training.sd_checkpoint import TINY_CLIP_TEXT_CONFIG
    from training.text_encoder import write_text_encoder_folder

    text_folder = write_text_encoder_folder(folder / "tiny-clip-text", TINY_CLIP_TEXT_CONFIG)
    repositories = webui_dir / "repositories"
    path = os.pathsep.join([str(repositories / "generative-models"),
                            str(repositories / "stable-diffusion-stability-ai")])
    files = []
    for seed, name in enumerate(MEMBERS, start=1):
        out = folder / f"{name}.safetensors"
        subprocess.run([str(webui_dir / "venv" / "bin" / "python"), str(REPO / "tests/webui_real/sdxl_checkpoint.py"),
                        str(out), str(text_folder), str(seed)], check=True, timeout=600, capture_output=True,
                       env={**os.environ, "PYTHONPATH": path, "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"})
        files.append(out)
    return files


@pytest.fixture(scope="module")
def sdxl_webui(tmp_path_factory):
    webui_dir = Path(os.environ["AFA_WEBUI_DIR"]).resolve()
    data_dir = tmp_path_factory.mktemp("webui-sdxl-data")
    files = write_sdxl_checkpoints(webui_dir, data_dir / "models" / "Stable-diffusion")
    real.write_pair_weights(data_dir / "models" / "AFA" / "xl-pair.safetensors", files, context_dim=544)
    (data_dir / "extensions").mkdir(parents=True)
    (data_dir / "extensions" / "afa").symlink_to(REPO, target_is_directory=True)
    saved = real.LOADED, real.CHECKPOINTS
    real.LOADED, real.CHECKPOINTS = MEMBERS[0], {name: 0 for name in MEMBERS}
    try:
        server = real.start_webui(webui_dir, data_dir)
    finally:
        real.LOADED, real.CHECKPOINTS = saved
    try:
        server.post("/sdapi/v1/options", {"live_previews_enable": False})  # SDXL's approx preview would download
        yield server
    finally:
        real.stop_webui(server)


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
