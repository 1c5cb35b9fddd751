"""AFA Train in a real ComfyUI through its HTTP API: images saved by a txt2img prompt (their prompts in their PNG
metadata), the example workflow sd15-train-then-sample queued through POST /prompt on them, interrupted through
POST /interrupt while it trains, queued again (resume on) to the end, and its weights used by the ensemble node.

Opt-in: COMFYUI_DIR=/path/to/ComfyUI make test-comfyui
"""

import json
import os
import time

import pytest

if not os.environ.get("COMFYUI_DIR"):
    pytest.skip("real-ComfyUI tier: set COMFYUI_DIR to a ComfyUI checkout with its venv at $COMFYUI_DIR/venv and "
                "run `COMFYUI_DIR=/path/to/ComfyUI make test-comfyui`", allow_module_level=True)

import numpy as np  # noqa: E402

from . import comfyui_workflows as workflows  # noqa: E402

DATA = "afa-train-data"
NAME = "afa-tier-trained"
STEPS = 4
IMAGES = 4
TIMEOUT_S = 900  # a cold load of two 2 GB checkpoints, then the first step on 2 loaded cores


def saved_training_images(comfyui) -> None:
    """IMAGES images of member a, saved by SaveImage into output/DATA with ComfyUI's prompt metadata."""
    prompt, save = workflows.txt2img([workflows.SABW_MEMBERS[0]], seed=3)
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["batch_size"] = IMAGES
    prompt[save]["inputs"]["filename_prefix"] = f"{DATA}/img"
    comfyui.run(prompt).assert_success()


def log_steps(comfyui) -> list[int]:
    log = comfyui.base / "user" / "afa-training" / NAME / "log.jsonl"
    try:
        return [json.loads(line)["step"] for line in log.read_text().splitlines() if '"loss"' in line]
    except (OSError, ValueError):
        return []


def test_train_interrupt_resume_and_sample(comfyui, tier_models):
    saved_training_images(comfyui)
    prompt = workflows.train_example_for_tier(DATA, NAME, STEPS)
    weights = comfyui.base / "models" / "afa" / f"{NAME}.safetensors"

    prompt_id = comfyui.queue(prompt)
    deadline = time.monotonic() + TIMEOUT_S
    while not log_steps(comfyui):  # the first step is done: interrupt the second
        comfyui.check_alive("the first training step")
        assert time.monotonic() < deadline, "no training step within the timeout"
        time.sleep(0.2)
    comfyui.request("POST", "/interrupt", {}, raw=True)  # what the Cancel button sends
    run = comfyui.wait(prompt_id)
    assert run.status == "error" and any(kind == "execution_interrupted" for kind, _ in run.messages), run.describe()
    stopped_at = max(log_steps(comfyui))
    assert 1 <= stopped_at < STEPS and not weights.exists()
    state = comfyui.base / "user" / "afa-training" / NAME / "checkpoints" / "latest.json"
    assert json.loads(state.read_text())["step"] == stopped_at

    run = comfyui.run(prompt).assert_success()  # the same prompt again: resume is on in the example
    assert weights.is_file() and max(log_steps(comfyui)) == STEPS
    from afa.weights import read_weights_info
    assert read_weights_info(weights).training["steps"] == STEPS
    (text,) = run.entry["outputs"][workflows.nodes_of(prompt, "PreviewAny")[0]]["text"]
    assert "AFA" in text and "block average" in text and "resumed" in text
    (save,) = workflows.nodes_of(prompt, "SaveImage")
    image = np.asarray(run.image(save), dtype=np.int16)
    assert image.shape[:2] == (workflows.SIZE, workflows.SIZE) and image.std() > 1.0
    curves = np.asarray(run.image(workflows.nodes_of(prompt, "PreviewImage")[0]), dtype=np.int16)
    assert curves.std() > 1.0
