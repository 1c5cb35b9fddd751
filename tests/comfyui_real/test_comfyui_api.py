"""The node pack in a real ComfyUI through its HTTP API: /object_info, POST /prompt, GET /history/<id>, /view.

Every image is 64x64 px from 2 euler steps on full-width random SD 1.5 checkpoints (conftest.py), so a run takes
seconds to a minute on a CPU. The images are noise; what is checked is that the graphs run, which images are equal
pixel for pixel and which differ, and what a refusal looks like.

Opt-in: COMFYUI_DIR=/path/to/ComfyUI make test-comfyui
"""

import os

import pytest

if not os.environ.get("COMFYUI_DIR"):
    pytest.skip("real-ComfyUI tier: set COMFYUI_DIR to a ComfyUI checkout with its venv at $COMFYUI_DIR/venv and "
                "run `COMFYUI_DIR=/path/to/ComfyUI make test-comfyui`", allow_module_level=True)

import numpy as np  # noqa: E402

from . import comfyui_workflows as workflows  # noqa: E402

A, B = workflows.SABW_MEMBERS
A_COPY = "afa-random-a-copy"
SEED = 7


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def assert_an_image(image, size: int = workflows.SIZE) -> None:
    """A decoded image of `size` px that is not one flat colour (a NaN or an all-zero latent decodes to one)."""
    assert image.size == (size, size)
    assert pixels(image).std() > 1.0, "the image is a flat colour"


def run_txt2img(comfyui, checkpoints, **options):
    prompt, save = workflows.txt2img(checkpoints, **options)
    run = comfyui.run(prompt).assert_success()
    return run.image(save)


@pytest.fixture(scope="module")
def alone_a(comfyui):
    """Checkpoint a alone (CheckpointLoaderSimple -> KSampler), seed SEED: the reference image."""
    image = run_txt2img(comfyui, [A], seed=SEED)
    assert_an_image(image)
    return image


@pytest.fixture(scope="module")
def average_ab(comfyui):
    """Block average of a and b, both reading a's CLIP encoding (CLIPTextEncode), seed SEED."""
    image = run_txt2img(comfyui, [A, B], mode="Block average", seed=SEED)
    assert_an_image(image)
    return image


# -- a. the nodes as ComfyUI lists them -------------------------------------------------------------------------------

def test_object_info_lists_the_nodes_with_their_inputs(comfyui, tier_models):
    from afa.modes import CHOICES

    info = comfyui.object_info()
    module = f"custom_nodes.{comfyui.pack_folder}"  # loaded from the checkout linked into custom_nodes/
    expected = {"AFAEnsemble": "AFA Ensemble", "AFATextEncode": "AFA Text Encode (per member)",
                "AFAAggregationMaps": "AFA Aggregation Maps", "AFATrain": "AFA Train (SABW weights)"}
    for name, display_name in expected.items():
        assert name in info, f"{name} is not in /object_info"
        node = info[name]
        assert (node["display_name"], node["category"], node["python_module"]) == \
            (display_name, "advanced/model_merging/AFA", module)

    ensemble = info["AFAEnsemble"]
    required, optional = ensemble["input"]["required"], ensemble["input"]["optional"]
    assert list(required) == ["model_1", "model_2", "mode", "weights"]
    assert list(optional) == [f"model_{index}" for index in range(3, 7)] + ["weights_name"]
    assert all(required[f"model_{index}"][0] == "MODEL" for index in (1, 2))
    assert all(spec[0] == "MODEL" for name, spec in optional.items() if name != "weights_name")
    assert optional["weights_name"][0] == "STRING" and optional["weights_name"][1]["forceInput"]
    assert required["mode"][0] == [mode.label for mode in CHOICES]
    assert required["mode"][1]["default"] == "Block average"
    # the weights file placed in <base>/models/afa/ is offered, after "none"
    assert required["weights"][0] == ["none", tier_models.weights_name]
    assert ensemble["output"] == ["MODEL", "AFA_MAPS"]

    text = info["AFATextEncode"]
    assert {name: spec[0] for name, spec in text["input"]["required"].items()} == {"text": "STRING", "clip_1": "CLIP"}
    assert {name: spec[0] for name, spec in text["input"]["optional"].items()} == \
        {f"clip_{index}": "CLIP" for index in range(2, 7)}
    assert text["output"] == ["CONDITIONING"]

    maps = info["AFAAggregationMaps"]
    assert {name: spec[0] for name, spec in maps["input"]["required"].items()} == \
        {"maps": "AFA_MAPS", "samples": "LATENT", "blocks": "STRING", "every": "INT"}
    assert maps["output"] == ["IMAGE"]

    train = info["AFATrain"]
    assert {name: spec[0] for name, spec in train["input"]["required"].items() if name[:5] in ("model", "clip_")} \
        == {"model_1": "MODEL", "model_2": "MODEL", "clip_1": "CLIP"}
    assert train["input"]["required"]["vae"][0] == "VAE" and train["input"]["required"]["resume"][0] == "BOOLEAN"
    assert train["output"] == ["STRING", "STRING", "IMAGE"]

    listed = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert {f"{name}.safetensors" for name in workflows.CHECKPOINT_SEEDS} <= set(listed)


# -- b. the example workflows -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", workflows.example_names())
def test_example_workflow_runs(comfyui, tier_models, name):
    """Each examples/comfyui/*.api.json, on the tier's checkpoints (and for SABW the tier's trained weights) at
    64 px and 2 steps, runs and gives its images: the ensemble's, and the aggregation maps where it draws them."""
    if name in workflows.NOT_RUN:
        pytest.skip(workflows.NOT_RUN[name])
    prompt = workflows.for_the_tier(workflows.load_example(name), workflows.EXAMPLE_FILES)
    run = comfyui.run(prompt).assert_success()
    saved = workflows.nodes_of(prompt, "SaveImage")
    assert saved, f"{name} saves no image"
    for node_id in saved:
        assert_an_image(run.image(node_id))
    for node_id in workflows.nodes_of(prompt, "AFAAggregationMaps"):
        (preview,) = [other for other, node in prompt.items()
                      if node["class_type"] == "PreviewImage" and node["inputs"]["images"][0] == node_id]
        maps = run.image(preview)
        assert pixels(maps).std() > 1.0, "the aggregation maps image is a flat colour"


def test_sabw_weights_trained_on_ldm_unets_bind_to_comfyuis_members(comfyui, tier_models):
    """training/train.py recorded UNet fingerprints computed from ldm-loaded UNets; ComfyUI's AFA Ensemble computes
    them from its own loaded models. SABW with the members in the file's order runs (the SABW example above, and
    here with one CLIP) only if they agree; had the file no fingerprints, the node would run unchecked and say so
    in the log, so that is ruled out too."""
    from afa.weights import read_weights_info

    info = read_weights_info(tier_models.weights)
    assert [member.name for member in info.members] == list(tier_models.sabw_members)
    assert all(member.unet for member in info.members), f"{tier_models.weights} records no UNet fingerprints"
    run_txt2img(comfyui, list(tier_models.sabw_members), mode="SABW", weights=tier_models.weights_name, seed=SEED)
    assert "records no UNet fingerprints" not in comfyui.log.read_text(encoding="utf-8", errors="replace")


# -- c. identical members give the member's image ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["Block average", "Noise average"])
def test_identical_members_give_the_members_image(comfyui, alone_a, mode):
    """a and a copy of a under another file name (ComfyUI loads it as a MODEL of its own): the same pixels as a
    alone, same seed and sampler."""
    ensembled = run_txt2img(comfyui, [A, A_COPY], mode=mode, seed=SEED)
    assert np.array_equal(pixels(ensembled), pixels(alone_a)), \
        f"max pixel difference {np.abs(pixels(ensembled) - pixels(alone_a)).max()}"


def test_different_members_give_another_image(alone_a, average_ab):
    assert not np.array_equal(pixels(average_ab), pixels(alone_a))


# -- d. refusals ------------------------------------------------------------------------------------------------------

REFUSALS = {
    # name: (txt2img options, the node that refuses, the exception's class name, what the message says)
    "sabw-weights-members-in-another-order": (
        dict(checkpoints=[B, A], mode="SABW", weights=workflows.SABW_WEIGHTS), "AFAEnsemble", "MembersMismatchError",
        ["these weights are for the same members in another order", f"member 1: {A}, member 2: {B}"]),
    "sabw-without-weights": (
        dict(checkpoints=[A, B], mode="SABW"), "AFAEnsemble", "AfaError",
        ["mode SABW needs SABW weights", "Block average"]),
    "text-encoded-for-3-members-on-2": (
        dict(checkpoints=[A, B], mode="Block average", text_clips=[0, 1, 0]), "KSampler", "AfaError",
        ["the prompt was encoded for 3 members", "the ensemble has 2"]),
}


@pytest.mark.parametrize("refusal", list(REFUSALS))
def test_refusal_is_an_execution_error_with_our_message_and_the_queue_goes_on(comfyui, refusal):
    """The refused prompt ends with ComfyUI's execution error carrying AFA's message (not a traceback's last line
    of something else); a prompt queued right behind it still runs."""
    options, node_type, exception, phrases = REFUSALS[refusal]
    refused_prompt, _ = workflows.txt2img(options.pop("checkpoints"), seed=SEED, **options)
    next_prompt, save = workflows.txt2img([A, B], mode="Block average",
                                          seed=1000 + list(REFUSALS).index(refusal))
    refused_id, next_id = comfyui.queue(refused_prompt), comfyui.queue(next_prompt)

    refused = comfyui.wait(refused_id)
    assert refused.status == "error", refused.describe()
    error = refused.error
    assert error["node_type"] == node_type, refused.describe()
    assert error["exception_type"].rsplit(".", 1)[-1] == exception, refused.describe()
    for phrase in phrases:
        assert phrase in error["exception_message"], refused.describe()

    after = comfyui.wait(next_id).assert_success()
    assert_an_image(after.image(save))


# -- e. per-member text encoders --------------------------------------------------------------------------------------

def test_each_members_own_clip_changes_the_image(comfyui, average_ab):
    """AFA Text Encode with a's and b's CLIPs (different random text encoders): each member reads its own encoding,
    which differs from both members reading a's."""
    per_member = run_txt2img(comfyui, [A, B], mode="Block average", seed=SEED, text_clips=[0, 1])
    assert_an_image(per_member)
    assert not np.array_equal(pixels(per_member), pixels(average_ab))


def test_one_clip_in_afa_text_encode_is_clip_text_encode(comfyui, average_ab):
    """AFA Text Encode with a's CLIP only: exactly CLIPTextEncode's conditioning, so the same pixels."""
    one_clip = run_txt2img(comfyui, [A, B], mode="Block average", seed=SEED, text_clips=[0])
    assert np.array_equal(pixels(one_clip), pixels(average_ab))


# -- f. a hires pass --------------------------------------------------------------------------------------------------

def test_hires_pass_on_the_ensemble_model(comfyui):
    """LatentUpscale to 96 px and a second KSampler (denoise 0.5) on the same ensemble MODEL."""
    image = run_txt2img(comfyui, [A, B], mode="Block average", seed=SEED, hires=True)
    assert_an_image(image, size=workflows.SIZE * 3 // 2 // 8 * 8)
