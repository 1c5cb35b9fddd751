"""Jobs the stand-in tests of each model family run the same way (tests/test_webui_sd2.py, test_webui_sdxl.py):
the AFA script's arguments, a short training run through the WebUI's API, SABW against block averaging, and the
training tab's members. Import after `harness` (it puts the stand-in's `modules` on the path)."""

from __future__ import annotations

from afa import read_weights_info
from afa.webui import folders, training_job
from modules import infotext_utils

TITLE = "AFA ensemble"
WAIT = 600  # seconds: only catches a hang (a loaded 2-core machine took over 120 s for the SDXL run)


def afa(members, mode: str = "Block average", weights: str = "", show_maps: bool = False) -> dict:
    """script_args for harness.WebUI.txt2img: the AFA accordion ticked with these members, mode and weights."""
    return {TITLE: [True, list(members), weights, mode, show_maps]}


def params_of(processed) -> dict:
    """The first image's infotext, parsed."""
    return infotext_utils.parse_generation_parameters(processed.infotexts[0])


def train_through_api(webui, members, output: str, images_folder):
    """A 4-step run (32 px, the `fast` design) on the captioned images written into `images_folder`, through
    POST /afa/v1/train; returns the weights file's WeightsInfo after checking the run finished and names the
    members."""
    from factories import write_captioned_images

    training_job.job.status = training_job.Status()
    images_folder.mkdir()
    response = webui.client().post("/afa/v1/train", json={
        "members": list(members), "data": str(write_captioned_images(images_folder)), "resolution": 32,
        "batch_size": 2, "max_steps": 4, "val_split": 0.25, "preset": "fast", "hidden_channels": 32,
        "output": output})
    assert response.status_code == 200, response.text
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.FINISHED, final
    training_job.job.status = training_job.Status()
    info = read_weights_info(folders.weights_dir() / f"{output}.safetensors")
    assert [ref.name for ref in info.members] == list(members)
    return info


def sabw_against_average(webui, members, weights: str, **fields):
    """(block average, SABW with `weights`) of the same job; SABW ran with them, each member on its own encoding,
    and gave another image."""
    average = webui.txt2img(script_args=afa(members), **fields)
    sabw = webui.txt2img(script_args=afa(members, mode="SABW", weights=weights), **fields)
    params = params_of(sabw)
    assert params["AFA mode"] == "SABW" and params["AFA weights"].startswith(weights), sabw.infotexts[0]
    assert "AFA text notes" not in params and "AFA not applied" not in params
    assert sabw.images[0].tobytes() != average.images[0].tobytes()
    return average, sabw


def resolution_for_members(webui, members) -> dict:
    """The training tab's update of its resolution slider when `members` are chosen."""
    component = next(block for block in webui.demo.blocks.values()
                     if getattr(block, "elem_id", None) == "afa_train_members")
    [[update]] = webui.event(component, "change", inputs=[list(members)])
    return update
