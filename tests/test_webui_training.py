"""The "AFA Training" tab and /afa/v1/train in the A1111 1.10 stand-in: a tiny two-member run on the WebUI's own
txt2img outputs (prompts from their PNG infotext), started from the tab's functions and from the API, reporting
progress the WebUI's way, cancelled and resumed to bit-identical weights, listed by the accordion and run as SABW;
and every refusal (nothing starts, nothing is written).

A run is held at a chosen step by a wrapped `Events.stepped` (the trainer calls it after each optimizer step), so
the tests cancel, poll and queue a generation at a known point instead of racing a fast CPU run.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_standin"))

import harness  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from modules import call_queue, progress, shared  # noqa: E402

from afa import read_weights_info  # noqa: E402
from afa.webui import folders, training_job, training_ui  # noqa: E402

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
# What the tab's form below sends (form_values), as an API body.
TRAIN = {"members": ["tiny-a", "tiny-b"], "resolution": 32, "batch_size": 2, "max_steps": 4, "val_split": 0.25,
         "preset": "paper", "mixed_precision": "no"}
WAIT = 120  # seconds: generous for a shared CPU


@pytest.fixture
def webui(tmp_path):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT]) as instance:
        yield instance
        training_job.job.cancel()
        training_job.job.wait(WAIT)
    assert harness.leaked_patches() == []


def generate_outputs(webui, count: int = 8) -> list[Path]:
    """`count` txt2img images saved by the WebUI into its outputs folder, each PNG with its infotext."""
    shared.opts.samples_save = True
    folder = Path(shared.opts.outdir_txt2img_samples)
    before = set(folder.rglob("*.png"))
    webui.txt2img(prompt="a photo of a red cat", batch_size=4, n_iter=count // 4, width=64, height=64, steps=1)
    saved = sorted(set(folder.rglob("*.png")) - before)
    assert len(saved) == count
    return saved


class HoldAt:
    """Wraps Events.stepped: after step `step` the run waits until Cancel is pressed (or `release()`)."""

    def __init__(self, monkeypatch, step: int):
        self.step, self.reached, self.released = step, threading.Event(), threading.Event()
        original = training_job.Events.stepped

        def stepped(events, progress_, total_steps, loss):
            original(events, progress_, total_steps, loss)
            if progress_.step == self.step:
                self.reached.set()
                deadline = threading.Event()
                while not (events.job.cancel_requested.is_set() or self.released.is_set()):
                    deadline.wait(0.05)

        monkeypatch.setattr(training_job.Events, "stepped", stepped)

    def wait(self):
        assert self.reached.wait(WAIT), training_job.job.status

    def release(self):
        self.released.set()


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def tab_component(webui, elem_id: str):
    return next(block for block in webui.demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)


def form_values(members, steps: int, output: str) -> list:
    """The Start button's inputs (the hidden task id first), in the tab's order."""
    return ["task(test-start)", members, "paper", training_ui.DATA_OUTPUTS, "", 32, 25, training_ui.LENGTH_STEPS,
            10, steps, 2, "fp32", False, 0, output]


def test_a_run_from_the_tab_trains_reports_progress_cancels_resumes_and_fills_the_accordion(webui, monkeypatch):
    generate_outputs(webui)
    hold = HoldAt(monkeypatch, step=2)
    start = tab_component(webui, "afa_train_start")
    [view] = webui.event(start, inputs=form_values(["tiny-a", "tiny-b"], 4, "tab-run"))
    hold.wait()

    # progress the WebUI's way: the task the Start button opened is active, with a fraction, an ETA and the step
    status = training_job.job.status
    assert status.state == training_job.TRAINING and status.step == 2 and status.total_steps == 4
    reported = progress.progress_of("task(test-start)")
    assert progress.current_task == "task(test-start)"
    assert shared.state.job == training_job.JOB_NAME and shared.state.sampling_step == 2
    assert shared.state.sampling_steps == 4 and "step 2/4" in shared.state.textinfo
    assert reported["active"] and reported["progress"] == pytest.approx(0.5) and reported["eta"] is not None
    assert call_queue.queue_lock.locked()  # generations queue behind the run

    [view] = webui.event(tab_component(webui, "afa_train_cancel"))
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.CANCELLED and final["step"] == 2, final
    assert "Resume continues it" in final["message"]
    assert not call_queue.queue_lock.locked() and progress.current_task is None
    assert "task(test-start)" in progress.finished_tasks
    assert not (folders.weights_dir() / "tab-run.safetensors").exists()
    run_dir = training_job.runs_dir() / "tab-run"
    assert (run_dir / "checkpoints" / "state-00000002.pt").is_file()
    snapshot = [json.loads(line) for line in (run_dir / "data.jsonl").read_text().splitlines()]
    assert len(snapshot) == 8 and {row["caption"] for row in snapshot} == {"a photo of a red cat"}
    assert "tab-run" in training_ui.resumable_runs()

    # images saved after the start do not enter the resumed run (it trains on the snapshot)
    generate_outputs(webui, 8)
    [view] = webui.event(tab_component(webui, "afa_train_resume"), inputs=["task(test-resume)", "tab-run",
                                                                            training_ui.LENGTH_EPOCHS, 10, 4])
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.FINISHED, final
    assert final["weights"] == "tab-run.safetensors" and final["step"] == 4
    assert [step for step, _ in final["losses"]] == [1, 2, 3, 4]  # the earlier session's losses from the run's log
    assert final["validation"] and set(final["validation"][-1]["errors"]) >= {"AFA", "block average"}

    # the same run uninterrupted, started through the API on the first run's snapshot: bit for bit
    hold.release()
    monkeypatch.undo()
    client = webui.client()
    interrupted = weights_of(folders.weights_dir() / "tab-run.safetensors")
    uninterrupted = {**TRAIN, "output": "same-data", "data": str(run_dir / "data.jsonl"), "max_steps": 4}
    response = client.post("/afa/v1/train", json=uninterrupted)
    assert response.status_code == 200, response.text
    assert training_job.job.wait(WAIT)["state"] == training_job.FINISHED
    same = weights_of(folders.weights_dir() / "same-data.safetensors")
    assert interrupted.keys() == same.keys() and all(torch.equal(interrupted[k], same[k]) for k in same)

    # the accordion lists the new weights, "Use these weights" fills it, and the file runs as SABW
    outputs = training_ui.refresh()
    weights_updates = outputs[7:]
    assert len(weights_updates) == 2 and all("same-data.safetensors" in u["choices"] for u in weights_updates)
    filled = webui.event(tab_component(webui, "afa_train_use_weights"))[0]
    enabled, members, weights, mode = filled[:4]
    assert enabled["value"] is True and weights["value"] == "same-data.safetensors" and mode["value"] == "SABW"
    assert [m.split(".")[0] for m in members["value"]] == ["tiny-a", "tiny-b"]
    processed = webui.txt2img(script_args={"AFA ensemble": [True, members["value"], "same-data.safetensors", "SABW",
                                                            False]})
    assert "AFA weights: same-data" in processed.infotexts[0] and "AFA not applied" not in processed.infotexts[0]
