"""SD 2.x-v members in a real A1111 1.10, on a WebUI of its own: two tiny SD 2.x-v checkpoints (tests/factories.py:
open_clip's ViT-B-32 text tower with random weights, different per member, `parameterization: v`), sd2-a loaded.
SABW weights are trained through the WebUI's own /afa/v1/train (the trainer in the WebUI's process), then block
averaging and SABW run with each member reading its own text encoder.

Opt-in (its fixtures skip without AFA_WEBUI_DIR): AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui
"""

import pytest


MEMBERS = ("sd2-a", "sd2-b")


@pytest.fixture(scope="module")
def sd2_webui(tmp_path_factory, own_webui, tier_helpers):
    from factories import VIT_B_32_OPEN_CLIP, write_tiny_sd2_checkpoint

    data_dir, _ = tier_helpers.members_data_dir(
        tmp_path_factory, "webui-sd2-data", MEMBERS,
        lambda path, seed: write_tiny_sd2_checkpoint(path, seed, tower=VIT_B_32_OPEN_CLIP, arch="ViT-B-32"))
    with own_webui(data_dir, MEMBERS) as server:
        yield server


def test_sd2_v_members_train_in_the_webui_and_ensemble(sd2_webui, tier_helpers):
    status = tier_helpers.train_through_api(sd2_webui, MEMBERS, "sd2-pair")
    errors = status["validation"][-1]["errors"]
    print(f"real A1111, tiny SD 2.x-v trained in the WebUI: validation {errors}")

    base = sd2_webui.txt2img()
    for mode, weights in (("Block average", ""), ("SABW", "sd2-pair")):
        generation = sd2_webui.txt2img(afa=[True, list(MEMBERS), weights, mode, False])
        params = generation.params
        assert params.get("AFA mode") == mode and "AFA not applied" not in params, generation.infotext
        assert params.get("AFA text encoders") == "Each member's own", generation.infotext
        assert "AFA text notes" not in params, generation.infotext  # each member found its own encoder
        assert not generation.same_image(base), mode
        print(f"real A1111, tiny SD 2.x-v: {mode} differs from the base by up to {generation.max_diff(base)}/255")
