"""The extension in a real A1111 1.10 through its HTTP API (/sdapi/v1/txt2img with the AFA script's args, the
extension's /afa/v1 routes, the settings). The server and the helpers are in conftest.py (`webui`, `base`).

Opt-in: AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui
"""

import os
import re

import pytest

if not os.environ.get("AFA_WEBUI_DIR"):
    pytest.skip("real-WebUI tier: set AFA_WEBUI_DIR to an A1111 1.10 checkout with its venv at "
                "$AFA_WEBUI_DIR/venv and run `AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui`",
                allow_module_level=True)

LORA_PROMPT = "a photo of a cat <lora:strong:1>"
AVERAGE_MODES = ["Block average", "Noise average"]

# an absolute path in a text: "/tmp/...", "/home/...", "C:\..."; after a space, quote, bracket or at the start
_ABSOLUTE_PATH = re.compile(r"(?:^|[\s\"'(\[=:])(?:/[\w.+-]+/|[A-Za-z]:\\)")


def afa(enabled=True, members=("tiny-a", "tiny-b"), weights="", mode="Block average", show_maps=False) -> list:
    return [enabled, list(members), weights, mode, show_maps]


@pytest.fixture(scope="module")
def base_with_lora(webui):
    return webui.txt2img(prompt=LORA_PROMPT)


@pytest.fixture(scope="module")
def average_ab(webui):
    """Block average of tiny-a and tiny-b (different members)."""
    return webui.txt2img(afa=afa())


def assert_ensembled(generation, mode: str):
    params = generation.params
    assert params.get("AFA mode") == mode, generation.infotext
    assert "AFA not applied" not in params, generation.infotext


def assert_refused(webui, generation, base, *reason_parts: str) -> str:
    """The job ran without AFA (the base image), says why in one pathless line, and claims no AFA mode."""
    params = generation.params
    assert "AFA mode" not in params and "AFA members" not in params, generation.infotext
    reason = params.get("AFA not applied")
    assert reason, generation.infotext
    assert generation.same_image(base), f"a refused job must give the base image: {reason}"
    # one line: the infotext is the prompt line and the parameters line (no negative prompt here)
    assert len(generation.infotext.strip().split("\n")) == 2, generation.infotext
    assert "\n" not in reason
    for root in {webui.data_dir, webui.data_dir.resolve(), webui.webui_dir, webui.webui_dir.resolve(), webui.repo}:
        assert str(root) not in generation.infotext, generation.infotext
    assert not _ABSOLUTE_PATH.search(reason), reason
    for part in reason_parts:
        assert part in reason, reason
    return reason


# -- off and identical members: exactly the base image -------------------------------------------------------------

def test_base_is_tiny_a(base):
    assert base.image.size == (16, 16)  # 64 px: 8x8 latents, which the tiny VAE decodes 2x
    assert base.params["Model"] == "tiny-a"
    assert not any(key.startswith("AFA") for key in base.params), base.infotext


def test_off_is_the_base_image_bit_for_bit(webui, base):
    off = webui.txt2img(afa=afa(enabled=False))
    assert off.same_image(base)
    assert not any(key.startswith("AFA") for key in off.params), off.infotext


@pytest.mark.parametrize("mode", AVERAGE_MODES)
@pytest.mark.parametrize("copy", ["tiny-a2", "tiny-a-moved"])
def test_identical_members_give_the_base_image(webui, base, mode, copy):
    """tiny-a2 is tiny-a's file copied (the same sha256); tiny-a-moved holds the same UNet at other offsets (another
    sha256, so the WebUI's member cache reads it from its own file; issue 17's case)."""
    generation = webui.txt2img(afa=afa(members=("tiny-a", copy), mode=mode))
    assert_ensembled(generation, mode)
    assert generation.same_image(base), f"max pixel difference {generation.max_diff(base)}/255"


def test_the_lora_changes_the_base_image(base, base_with_lora):
    assert base_with_lora.max_diff(base) > 30, base_with_lora.max_diff(base)


@pytest.mark.parametrize("mode", AVERAGE_MODES)
def test_identical_members_with_a_lora_give_the_base_image_with_the_lora(webui, base_with_lora, mode):
    """Regression: block averaging drifted by 1-7/255 from the loaded model when a prompt LoRA was active."""
    generation = webui.txt2img(afa=afa(members=("tiny-a", "tiny-a2"), mode=mode), prompt=LORA_PROMPT)
    assert_ensembled(generation, mode)
    assert generation.same_image(base_with_lora), \
        f"max pixel difference {generation.max_diff(base_with_lora)}/255"


# -- real ensembles --------------------------------------------------------------------------------------------------

def test_different_members_differ_from_the_base_image(base, average_ab):
    assert_ensembled(average_ab, "Block average")
    assert not average_ab.same_image(base)
    members = average_ab.params["AFA members"]
    assert re.fullmatch(r"tiny-a \[[0-9a-f]{10}\], tiny-b \[[0-9a-f]{10}\]", members), members
    assert "AFA weights" not in average_ab.params


@pytest.mark.parametrize("mode", AVERAGE_MODES)
def test_a_member_with_another_text_encoder_reads_its_own_encoding(webui, base, mode):
    """tiny-a-text has tiny-a's UNet and another text encoder: with each member's own encoder the ensemble differs
    from tiny-a; with the loaded checkpoint's encoding for both it is tiny-a bit for bit."""
    own = webui.txt2img(afa=afa(members=("tiny-a", "tiny-a-text"), mode=mode))
    assert_ensembled(own, mode)
    assert own.params["AFA text encoders"] == "Each member's own", own.infotext
    assert not own.same_image(base)
    loaded = webui.txt2img(afa=afa(members=("tiny-a", "tiny-a-text"), mode=mode),
                           override_settings={"afa_text_encoders": "The loaded checkpoint's"})
    assert_ensembled(loaded, mode)
    assert loaded.params["AFA text encoders"] == "The loaded checkpoint's", loaded.infotext
    assert loaded.same_image(base), f"max pixel difference {loaded.max_diff(base)}/255"


def test_sabw_with_a_weights_file_runs_its_members(webui, base):
    generation = webui.txt2img(afa=afa(members=(), weights="pair.safetensors", mode="SABW"))
    assert_ensembled(generation, "SABW")
    params = generation.params
    assert params["AFA members"].startswith("tiny-b ["), generation.infotext
    assert re.fullmatch(r"tiny-b \[[0-9a-f]{10}\], tiny-c \[[0-9a-f]{10}\]", params["AFA members"])
    assert params["AFA weights"].startswith("pair ["), generation.infotext
    assert not generation.same_image(base)


def test_a_stale_weights_name_does_not_refuse_block_average(webui, average_ab):
    generation = webui.txt2img(afa=afa(weights="no-such-weights.safetensors", mode="Block average"))
    assert_ensembled(generation, "Block average")
    assert "AFA weights" not in generation.params, generation.infotext
    assert generation.same_image(average_ab), f"max pixel difference {generation.max_diff(average_ab)}/255"


# -- refusals: the job runs without AFA and says why -----------------------------------------------------------------

def test_one_member_is_refused(webui, base):
    assert_refused(webui, webui.txt2img(afa=afa(members=("tiny-b",))), base)


def test_an_uninstalled_member_is_refused(webui, base):
    assert_refused(webui, webui.txt2img(afa=afa(members=("tiny-a", "tiny-nope"))), base, "tiny-nope")


def test_sabw_without_weights_is_refused(webui, base):
    assert_refused(webui, webui.txt2img(afa=afa(mode="SABW")), base, "SABW")


def test_weights_trained_for_other_members_are_refused(webui, base):
    generation = webui.txt2img(afa=afa(members=("tiny-a", "tiny-b"), weights="pair.safetensors", mode="SABW"))
    assert_refused(webui, generation, base, "pair", "tiny-a", "tiny-b", "tiny-c")


def test_missing_weights_file_is_refused(webui, base):
    generation = webui.txt2img(afa=afa(weights="no-such-weights.safetensors", mode="SABW"))
    assert_refused(webui, generation, base, "no-such-weights")


# -- routes and settings ---------------------------------------------------------------------------------------------

def test_weights_route_lists_the_pair(webui):
    entries = {entry["name"]: entry for entry in webui.get("/afa/v1/weights")}
    assert "pair.safetensors" in entries, entries
    entry = entries["pair.safetensors"]
    assert entry["error"] is None
    assert entry["mode"] == "SABW"
    assert [member["name"] for member in entry["members"]] == list(webui.pair_members)
    for member in entry["members"]:
        assert re.fullmatch(r"[0-9a-f]{64}", member["sha256"])
        assert member["checkpoint"].startswith(member["name"] + ".safetensors"), member


def test_unload_frees_the_cached_members(webui):
    webui.txt2img(afa=afa(members=("tiny-b", "tiny-c")))  # neither is the loaded checkpoint: both get cached
    freed = webui.post("/afa/v1/unload")
    assert set(freed) == {"freed_members", "freed_tensors", "freed_bytes"}, freed
    assert all(isinstance(value, int) for value in freed.values()), freed
    assert freed["freed_members"] >= 1 and freed["freed_bytes"] > 0, freed
    again = webui.post("/afa/v1/unload")
    assert again["freed_members"] == 0, again


def test_settings_are_registered(webui):
    options = webui.get("/sdapi/v1/options")
    for key in ("afa_default_members", "afa_default_weights", "afa_member_precision", "afa_member_cache",
                "afa_member_offload", "afa_text_encoders", "afa_maps", "afa_maps_every"):
        assert key in options, key
    assert options["afa_member_cache"] == "RAM"
    assert options["afa_text_encoders"] == "Each member's own"
    assert options["afa_default_members"] == []
    assert options["afa_maps"] == "Off"


def test_infotext_parser(infotext_parser):
    params = infotext_parser('a cat\nSteps: 2, AFA mode: Block average, AFA members: "x [0123456789], y [abcdef0123]", '
                            'AFA not applied: "fewer than 2: \\"x\\"", Version: 1.10.1')
    assert params["Prompt"] == "a cat"
    assert params["AFA members"] == "x [0123456789], y [abcdef0123]"
    assert params["AFA not applied"] == 'fewer than 2: "x"'
    assert params["Version"] == "1.10.1"


# -- training (POST/GET /afa/v1/train, /afa/v1/train/cancel) -----------------------------------------------------------

TRAINING_IMAGES = "training-images"  # conftest.py writes them into the data dir


def training_body(webui, output: str, **extra) -> dict:
    return {"members": ["tiny-a", "tiny-b"], "data": str(webui.data_dir / TRAINING_IMAGES), "resolution": 32,
            "batch_size": 2, "val_split": 0.25, "preset": "fast", "hidden_channels": 32, "save_dtype": "fp32",
            "output": output, **extra}


def wait_for_training(webui, until, timeout: float = 600) -> dict:
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = webui.get("/afa/v1/train")
        if until(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"training did not get there in {timeout} s: {status}")


@pytest.fixture
def trained_weights_removed(webui):
    """The weights files the training tests write are removed afterwards (the other tests list the folder)."""
    yield
    for path in (webui.data_dir / "models" / "AFA").glob("api-*.safetensors"):
        path.unlink()


def test_training_through_the_api_cancels_resumes_to_the_same_weights_and_runs_as_sabw(webui,
                                                                                        trained_weights_removed):
    """Started, polled, cancelled mid-run, resumed: the weights equal an uninterrupted run's bit for bit, the
    weights list names the file, and it runs as SABW."""
    from safetensors.torch import load_file
    import torch

    ended = ("finished", "cancelled", "failed")
    status = webui.post("/afa/v1/train", training_body(webui, "api-interrupted", max_steps=60))
    assert status["state"] == "preparing", status
    status = wait_for_training(webui, lambda s: s["step"] >= 3 or s["state"] in ended)
    assert status["state"] == "training" and status["total_steps"] == 60, status
    webui.post("/afa/v1/train/cancel")
    status = wait_for_training(webui, lambda s: s["state"] in ended)
    assert status["state"] == "cancelled" and 3 <= status["step"] < 60, status
    stopped_at = status["step"]
    status = webui.post("/afa/v1/train", {"resume": True, "output": "api-interrupted"})
    status = wait_for_training(webui, lambda s: s["state"] in ended)
    assert status["state"] == "finished" and status["weights"] == "api-interrupted.safetensors", status["message"]
    assert status["validation"] and status["losses"][-1][0] == 60

    webui.post("/afa/v1/train", training_body(webui, "api-uninterrupted", max_steps=60))
    status = wait_for_training(webui, lambda s: s["state"] in ended and s["name"] == "api-uninterrupted")
    assert status["state"] == "finished", status
    folder = webui.data_dir / "models" / "AFA"
    first, second = (load_file(str(folder / f"api-{name}.safetensors")) for name in ("interrupted", "uninterrupted"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    print(f"real A1111: cancelled at step {stopped_at} of 60, resumed; weights equal the uninterrupted run's")

    listed = {entry["name"]: entry for entry in webui.get("/afa/v1/weights")}
    assert "api-interrupted.safetensors" in listed and listed["api-interrupted.safetensors"]["mode"] == "SABW"
    generation = webui.txt2img(afa=afa(members=("tiny-a", "tiny-b"), weights="api-interrupted", mode="SABW"))
    assert_ensembled(generation, "SABW")
    assert generation.params["AFA weights"].startswith("api-interrupted")


def test_training_refusals_through_the_api(webui):
    """Each refused when the request is checked, before a member loads: HTTP 400 with the reason (a body that is
    not an object: FastAPI's 422), and no run starts (as tests/test_webui_training.py checks in the stand-in)."""
    before = webui.get("/afa/v1/train")
    for body, expected in ((training_body(webui, "x", members=["tiny-a"]), "choose 2 to 6 members"),
                           (training_body(webui, "x", members=["tiny-a", "pair.safetensors"]),
                            "'pair.safetensors' is not an installed checkpoint"),  # a SABW weights file
                           (training_body(webui, "x", data="/nonexistent"), "no such folder"),
                           (training_body(webui, "x", device="cuda"), "--device: set by the WebUI"),
                           (training_body(webui, "x", colour="red"), "unrecognized arguments: --colour"),
                           (training_body(webui, "../outside"), "is a path"),
                           (training_body(webui, "x", batch_size=0), "--batch-size must be at least 1"),
                           (training_body(webui, "x", max_steps=-5), "--max-steps must be at least 1, got -5"),
                           (training_body(webui, "x", max_steps=0), "--max-steps must be at least 1, got 0"),
                           (training_body(webui, "x", max_steps=2.5), "--max-steps: invalid int value: '2.5'"),
                           # 8 captioned images, a quarter held out for validation
                           (training_body(webui, "x", batch_size=8), "6 training images do not fill one batch of 8")):
        with pytest.raises(AssertionError, match="HTTP 400") as refused:  # conftest's WebUIError
            webui.post("/afa/v1/train", body)
        assert expected in str(refused.value)
    with pytest.raises(AssertionError, match="HTTP 422"):
        webui.post("/afa/v1/train", [training_body(webui, "x")])
    after = webui.get("/afa/v1/train")
    assert (after["state"], after["name"], after["started_at"]) == (before["state"], before["name"],
                                                                    before["started_at"])
    assert not (webui.data_dir / "afa-training" / "x").exists()
