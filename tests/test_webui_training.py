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

from modules import call_queue, progress, sd_models, shared  # noqa: E402

from afa import read_weights_info  # noqa: E402
from afa.webui import checkpoints, folders, training_job, training_ui  # noqa: E402

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
# What the tab's form below sends (form_values), as an API body.
TRAIN = {"members": ["tiny-a", "tiny-b"], "resolution": 32, "batch_size": 2, "max_steps": 4, "val_split": 0.25,
         "preset": "paper", "mixed_precision": "no"}
WAIT = 600  # seconds: only catches a hang (a loaded 2-core machine took over 120 s for the SDXL run)


@pytest.fixture(autouse=True)
def no_run_left():
    """The job is the process's (it outlives a UI reload): each test starts with none and leaves none running."""
    training_job.job.status = training_job.Status()
    yield
    training_job.job.cancel()
    training_job.job.wait(WAIT)
    assert not training_job.job.running and not call_queue.queue_lock.locked()
    training_job.job.status = training_job.Status()


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
    start = tab_component(webui, "afa_train_generate")
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

    [view] = webui.event(tab_component(webui, "afa_train_interrupt"))
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.CANCELLED and final["step"] == 2, final
    assert "Resume continues it" in final["message"]
    assert not call_queue.queue_lock.locked() and progress.current_task is None
    assert "task(test-start)" in progress.finished_tasks
    assert not (folders.weights_dir() / "tab-run.safetensors").exists()
    run_dir = training_job.runs_dir() / "tab-run"
    assert (run_dir / "checkpoints" / "state-00000002.safetensors").is_file()
    snapshot = [json.loads(line) for line in (run_dir / "data.jsonl").read_text().splitlines()]
    assert len(snapshot) == 8 and {row["caption"] for row in snapshot} == {"a photo of a red cat"}
    assert "tab-run" in training_ui.resumable_runs()

    # images saved after the start do not enter the resumed run (it trains on the snapshot)
    generate_outputs(webui, 8)
    [view] = webui.event(tab_component(webui, "afa_train_resume"), inputs=["task(test-resume)", "tab-run"])
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.FINISHED, final
    assert final["weights"] == "tab-run.safetensors" and final["step"] == 4
    assert [step for step, _ in final["losses"]] == [1, 2, 3, 4]  # the earlier session's losses from the run's log
    assert final["validation"] and set(final["validation"][-1]["errors"]) >= {"AFA", "block average"}
    assert "tab-run" not in training_ui.resumable_runs()  # it wrote its weights

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
    losses, plot, table = outputs[1], outputs[2], outputs[3]
    assert list(losses["step"]) == [1, 2, 3, 4]
    models = set(plot["value"]["model"])
    weighted, = [model for model in models if model.startswith("weighted merge (r=")]
    assert models == {"tiny-a", "tiny-b", weighted, "MBW", "block average", "AFA"}
    low, high = plot["y_lim"]
    assert low <= plot["value"]["MSE"].min() and plot["value"]["MSE"].max() <= high and low > 0
    assert list(table.columns) == ["model", "MSE", "vs best member", "vs best merge"] and len(table) == 6
    by_model = table.set_index("model")
    best_merge = min((weighted, "MBW"), key=lambda model: by_model.loc[model, "MSE"])
    assert by_model.loc[best_merge, "vs best merge"] == "" and by_model.loc["AFA", "vs best merge"].endswith("%")
    # the merges were searched once: the same errors at every validation
    assert all(entry["errors"][weighted] == final["validation"][-1]["errors"][weighted] for entry in final["validation"])
    # what the page's poll gets (javascript/afa.js clicks the refresh button), then the ticker's change event, both
    # through gradio's processing
    [[ticker]] = webui.event(tab_component(webui, "afa_train_poll"))
    assert ticker.startswith("finished|same-data|4|")
    [processed] = webui.event(tab_component(webui, "afa_train_ticker"), event="change", inputs=[])
    assert len(processed) == len(outputs) and processed[2]["value"] is not None
    weights_updates = outputs[7:]
    assert len(weights_updates) == 2 and all("same-data.safetensors" in u["choices"] for u in weights_updates)
    filled = webui.event(tab_component(webui, "afa_train_use_weights"))[0]
    enabled, members, weights, mode = filled[:4]
    assert enabled["value"] is True and weights["value"] == "same-data.safetensors" and mode["value"] == "SABW"
    assert [m.split(".")[0] for m in members["value"]] == ["tiny-a", "tiny-b"]
    processed = webui.txt2img(script_args={"AFA ensemble": [True, members["value"], "same-data.safetensors", "SABW",
                                                            False]})
    assert "AFA weights: same-data" in processed.infotexts[0] and "AFA not applied" not in processed.infotexts[0]


def test_refusals_name_the_problem_and_start_nothing(webui, tmp_path):
    """Each bad request: HTTP 400 (409 when busy) with one clear reason; no run, no folder, no weights."""
    client = webui.client()
    empty = tmp_path / "empty"
    empty.mkdir()
    unreadable = tmp_path / "unreadable"
    unreadable.mkdir()
    (unreadable / "a.png").write_bytes(b"not a png")
    (unreadable / "b.jpg").write_bytes(b"")

    def refused(body, status=400) -> str:
        response = client.post("/afa/v1/train", json=body)
        assert response.status_code == status, response.text
        return response.json()["detail"]

    assert "choose 2 to 6 members" in refused({**TRAIN, "members": ["tiny-a"]})
    assert "not an installed checkpoint" in refused({**TRAIN, "members": ["tiny-a", "nope"]})
    assert "is a path" in refused({**TRAIN, "members": ["tiny-a", "/etc/passwd"]})
    assert "chosen twice" in refused({**TRAIN, "members": ["tiny-a", "tiny-a.safetensors"]})
    assert "no captioned images" in refused({**TRAIN, "data": str(empty)})
    message = refused({**TRAIN, "data": str(unreadable)})
    assert "no captioned images" in message and "a.png" in message and "b.jpg" in message
    assert "no such folder or manifest" in refused({**TRAIN, "data": str(tmp_path / "missing")})
    assert "no captioned images" in refused(TRAIN)  # the WebUI's outputs folders are empty
    assert "--device, --run-dir: set by the WebUI" in refused({**TRAIN, "run_dir": "/tmp/x", "device": "cuda"})
    assert "unrecognized arguments: --colour" in refused({**TRAIN, "colour": "red"})
    assert "--batch-size must be a multiple" in refused({**TRAIN, "gradient_accumulation": 3})
    assert "--batch-size must be at least 1" in refused({**TRAIN, "batch_size": 0})
    folders.weights_dir().mkdir(parents=True, exist_ok=True)
    (folders.weights_dir() / "pair.safetensors").write_bytes(b"SABW weights")
    weights_member = {**TRAIN, "members": ["tiny-a", "pair.safetensors"]}
    assert "'pair.safetensors' is not an installed checkpoint" in refused(weights_member)
    assert client.post("/afa/v1/train", json=[TRAIN]).status_code == 422  # not an object: FastAPI's validation
    assert "is a path" in refused({**TRAIN, "output": "../outside"})
    assert "resume: no stopped run named 'never'" in refused({"resume": True, "output": "never"})
    (folders.weights_dir() / "taken.safetensors").write_bytes(b"user's file")
    assert "already exist" in refused({**TRAIN, "output": "taken"})
    assert (folders.weights_dir() / "taken.safetensors").read_bytes() == b"user's file"

    with call_queue.queue_lock:  # a generation is running
        assert "the WebUI is busy" in refused({**TRAIN, "data": str(EXTENSION_ROOT / "tests")}, status=409)
    assert not training_job.runs_dir().exists() or not any(training_job.runs_dir().iterdir())
    assert training_job.job.status.state == training_job.IDLE
    assert client.get("/afa/v1/train").json()["state"] == training_job.IDLE


@pytest.fixture
def no_member_loads(monkeypatch) -> list:
    """The names of the runs that got as far as loading their members (each then fails at once)."""
    loaded = []

    def members_for(self, plan, restore):
        loaded.append(plan.name)
        raise training_job.TrainingRefused("the test expected no member to load")

    monkeypatch.setattr(training_job.TrainingJob, "members_for", members_for)
    return loaded


def assert_nothing_started(client, loaded: list) -> None:
    assert training_job.job.wait(WAIT)["state"] == training_job.IDLE and loaded == []
    assert client.get("/afa/v1/train").json()["state"] == training_job.IDLE
    assert not training_job.runs_dir().exists() or not any(training_job.runs_dir().iterdir())
    assert not call_queue.queue_lock.locked()


@pytest.mark.parametrize("max_steps, reason", [(-5, "--max-steps must be at least 1, got -5"),
                                                (0, "--max-steps must be at least 1, got 0"),
                                                (2.5, "--max-steps: invalid int value: '2.5'"),
                                                ("ten", "--max-steps: invalid int value: 'ten'"),
                                                (True, "--max-steps: expected one argument")])
def test_a_length_that_is_not_a_positive_whole_number_is_refused_before_a_member_loads(
        webui, tmp_path, no_member_loads, max_steps, reason):
    """0 would silently train for --epochs, -5 "finish" before the first step: both are refused like a non-integer,
    through the API and through the tab's Steps field."""
    client = webui.client()
    response = client.post("/afa/v1/train", json={**TRAIN, "data": str(harness_images(tmp_path)),
                                                  "max_steps": max_steps})
    assert response.status_code == 400 and reason in response.json()["detail"], response.text
    assert_nothing_started(client, no_member_loads)

    if isinstance(max_steps, int) and not isinstance(max_steps, bool):  # what the tab's Steps field can hold
        [view] = webui.event(tab_component(webui, "afa_train_generate"),
                             inputs=form_values(["tiny-a", "tiny-b"], max_steps, "tab-run"))
        assert reason in view[0] and "task(test-start)" in progress.finished_tasks
        assert_nothing_started(client, no_member_loads)


def test_too_few_training_images_for_one_batch_are_refused_before_a_member_loads(webui, tmp_path, no_member_loads):
    """train.py drops the tail of an epoch that does not fill a batch: a data source whose training images (its
    captioned images less the share held out for validation) do not fill one batch would load every member and
    then fail. It is refused when the request is checked, through the API and the tab, naming the counts."""
    from factories import write_captioned_images

    client = webui.client()
    one = tmp_path / "one"
    one.mkdir()
    write_captioned_images(one, count=1)
    (one / "zz-uncaptioned.png").write_bytes(b"not a png")
    response = client.post("/afa/v1/train", json={**TRAIN, "data": str(one), "batch_size": 8, "val_split": 0})
    detail = response.json()["detail"]
    assert response.status_code == 400 and "1 training images do not fill one batch of 8" in detail, response.text
    assert "zz-uncaptioned.png" in detail  # with what indexing skipped, as for a source without captioned images
    assert_nothing_started(client, no_member_loads)

    # 8 captioned images, a quarter held out: 6 train, which fill batches of 6 but not of 8
    eight = harness_images(tmp_path)
    response = client.post("/afa/v1/train", json={**TRAIN, "data": str(eight), "batch_size": 8})
    detail = response.json()["detail"]
    assert response.status_code == 400 and "6 training images do not fill one batch of 8" in detail, response.text
    assert "8 captioned images" in detail and "2 of them held out for validation" in detail
    assert_nothing_started(client, no_member_loads)

    generate_outputs(webui)  # the tab's default source: the WebUI's 8 outputs, a quarter held out
    form = form_values(["tiny-a", "tiny-b"], 4, "tab-run")
    form[10] = 8  # batch size
    [view] = webui.event(tab_component(webui, "afa_train_generate"), inputs=form)
    assert "6 training images do not fill one batch of 8" in view[0]
    assert_nothing_started(client, no_member_loads)

    response = client.post("/afa/v1/train", json={**TRAIN, "data": str(eight), "batch_size": 6, "max_steps": 1})
    assert response.status_code == 200, response.text  # exactly one batch: starts (and loads its members)
    assert training_job.job.wait(WAIT)["state"] == training_job.FAILED and no_member_loads == [response.json()["name"]]


def test_without_its_trainer_the_tab_refuses_and_says_why(webui, monkeypatch):
    """scripts/afa_script.py hands no trainer over when another extension's `training` package shadows ours."""
    monkeypatch.setattr(training_job, "trainer", None)
    response = webui.client().post("/afa/v1/train", json=TRAIN)
    assert response.status_code == 400 and "the trainer is not available" in response.json()["detail"]
    assert training_ui.resumable_runs() == []


def test_different_architectures_and_no_free_disk_are_refused(webui, monkeypatch, tmp_path):
    from training.sd_checkpoint import tiny_sd_state_dict, write_webui_checkpoint
    from afa.unet import PRESETS

    wide = dict(PRESETS["tiny"], model_channels=64)
    write_webui_checkpoint(Path(sd_models.model_path) / "tiny-wide.safetensors", tiny_sd_state_dict(5, wide))
    sd_models.list_models()
    client = webui.client()
    response = client.post("/afa/v1/train", json={**TRAIN, "members": ["tiny-a", "tiny-wide"]})
    assert response.status_code == 400 and "tiny-wide" in response.json()["detail"], response.text

    data = harness_images(tmp_path)
    from training import service
    monkeypatch.setattr(service.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 10_000})())
    response = client.post("/afa/v1/train", json={**TRAIN, "data": str(data)})
    assert response.status_code == 400 and "not enough free disk" in response.json()["detail"], response.text


def test_sdxl_members_train_from_the_api(webui, tmp_path):
    """SDXL checkpoints in the WebUI's form (tests/factories.py) train through the same route as SD 1.x ones, read
    from their files (the loaded model is SD 1.x): the weights file is bound to them and listed as SABW."""
    from factories import write_tiny_sdxl_checkpoint

    for seed, name in enumerate(("xl-a", "xl-b"), start=1):
        write_tiny_sdxl_checkpoint(Path(sd_models.model_path) / f"{name}.safetensors", seed)
    sd_models.list_models()
    client = webui.client()
    response = client.post("/afa/v1/train", json={**TRAIN, "members": ["xl-a", "xl-b"], "output": "xl-run",
                                                  "data": str(harness_images(tmp_path))})
    assert response.status_code == 200, response.text
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.FINISHED and final["step"] == 4, final
    info = read_weights_info(folders.weights_dir() / "xl-run.safetensors")
    assert [ref.name for ref in info.members] == ["xl-a", "xl-b"] and len(info.config.block_channels) == 19
    rows = list(final["validation"][-1]["errors"])
    assert rows[:2] == ["xl-a", "xl-b"] and rows[2].startswith("weighted merge (r=") and rows[3:] == [
        "MBW", "block average", "AFA"], final


def harness_images(tmp_path) -> Path:
    from factories import write_captioned_images
    folder = tmp_path / "images"
    folder.mkdir()
    return write_captioned_images(folder, count=8, width=40, height=40)


def test_a_generation_queues_behind_a_run_and_interrupt_stops_the_run(webui, monkeypatch, tmp_path):
    """While a run holds the GPU a generation waits in the WebUI's queue (no error, no image mixed into the run) and
    runs when the run ends; the WebUI's Interrupt stops the run like Cancel. Through the API, with its status."""
    data = harness_images(tmp_path)
    (data / "zz-broken.png").write_bytes(b"not a png")  # no .txt: its infotext cannot be read (skipped when indexed)
    hold = HoldAt(monkeypatch, step=1)
    client = webui.client()
    response = client.post("/afa/v1/train", json={**TRAIN, "data": str(data), "output": "queued"})
    assert response.status_code == 200 and response.json()["state"] == training_job.PREPARING, response.text
    hold.wait()
    status = client.get("/afa/v1/train").json()
    assert status["state"] == training_job.TRAINING and status["step"] == 1 and status["losses"][0][0] == 1
    assert status["members"][0].startswith("tiny-a") and status["total_steps"] == 4
    assert "zz-broken.png" in status["skipped"], status["skipped"]  # reported, and the run goes on without it

    again = client.post("/afa/v1/train", json={**TRAIN, "data": str(data), "output": "second"})
    assert again.status_code == 409 and "already running" in again.json()["detail"]

    generated = {}

    def generate():
        generated["response"] = client.post("/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 1, "width": 64,
                                                                        "height": 64})

    generation = threading.Thread(target=generate)
    generation.start()
    generation.join(2.0)
    assert generation.is_alive() and "response" not in generated  # queued behind the run

    shared.state.interrupt()  # the WebUI's Interrupt button / POST /sdapi/v1/interrupt
    hold.release()
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.CANCELLED and final["step"] == 1, final
    generation.join(WAIT)
    assert generated["response"].status_code == 200 and len(generated["response"].json()["images"]) == 1

    # resuming keeps the run's settings; only its length may change
    response = client.post("/afa/v1/train", json={"resume": True, "output": "queued", "batch_size": 4})
    assert response.status_code == 400 and "only max_steps, epochs may change" in response.json()["detail"]
    for max_steps, reason in ((-5, "got -5"), (0, "got 0"), (2.5, "got 2.5"), (True, "got True")):
        response = client.post("/afa/v1/train", json={"resume": True, "output": "queued", "max_steps": max_steps})
        detail = response.json()["detail"]
        assert response.status_code == 400 and "--max-steps must be a whole number of at least 1" in detail, detail
        assert reason in detail
    assert training_job.job.status.state == training_job.CANCELLED  # nothing started
    response = client.post("/afa/v1/train", json={"resume": True, "output": "queued", "max_steps": 5})
    assert response.status_code == 200, response.text
    final = training_job.job.wait(WAIT)
    assert final["state"] == training_job.FINISHED and final["step"] == 5 and final["total_steps"] == 5, final
    assert read_weights_info(folders.weights_dir() / "queued.safetensors").training["steps"] == 5


def test_the_loaded_checkpoint_is_a_member_as_it_is_and_others_come_from_the_member_cache(webui, monkeypatch,
                                                                                          tmp_path):
    """The loaded tiny-a's own UNet trains as member 1 (frozen for the run, its flags restored after); tiny-b is the
    member cache's UNet, which the ensemble then uses without reading its file again."""
    from afa.webui.member_cache import cache

    data = harness_images(tmp_path)
    base = shared.sd_model.model.diffusion_model
    flags = [p.requires_grad for p in base.parameters()]
    seen = {}
    original = training_job.trainer.train

    started = training_job.Events.started

    def train(args, events=None, members=None, member_refs=None):
        seen["members"], seen["refs"] = list(members), member_refs
        return original(args, events, members=members, member_refs=member_refs)

    def hashed_again(path):
        raise AssertionError(f"the trainer hashed {path} again; the WebUI knows its sha256")

    def started_frozen(events, *args):
        seen["frozen"] = all(not p.requires_grad for p in seen["members"][0].parameters())
        started(events, *args)

    monkeypatch.setattr(training_job.trainer, "train", train)
    monkeypatch.setattr(training_job.Events, "started", started_frozen)
    monkeypatch.setattr("training.sd_checkpoint.MemberRef.from_file", hashed_again)
    response = webui.client().post("/afa/v1/train", json={**TRAIN, "data": str(data), "output": "reuse",
                                                           "max_steps": 1})
    assert response.status_code == 200, response.text
    assert training_job.job.wait(WAIT)["state"] == training_job.FINISHED
    assert seen["members"][0] is base and seen["frozen"]
    assert [ref.sha256 for ref in seen["refs"]] == [checkpoints.ensure_hashed(info) for info in (
        shared.sd_model.sd_checkpoint_info, sd_models.get_closet_checkpoint_match("tiny-b"))]
    weights = read_weights_info(folders.weights_dir() / "reuse.safetensors")
    assert [ref.name for ref in weights.members] == ["tiny-a", "tiny-b"]  # as the trainer alone names them
    assert seen["members"][1] in cache.unets.values()
    assert [p.requires_grad for p in base.parameters()] == flags
    # a LoRA left merged into the loaded UNet by the last generation: its weights are not the checkpoint's
    next(base.modules()).network_current_names = ("some-lora",)
    response = webui.client().post("/afa/v1/train", json={**TRAIN, "data": str(data), "output": "fresh",
                                                           "max_steps": 1})
    assert response.status_code == 200, response.text
    assert training_job.job.wait(WAIT)["state"] == training_job.FINISHED
    assert seen["members"][0] is not base
    del next(base.modules()).network_current_names


def test_the_training_routes_need_the_api_credentials(tmp_path):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT],
                       argv=harness.DEFAULT_ARGV + ("--api-auth", "alice:secret")) as instance:
        client = instance.client()
        assert client.get("/afa/v1/train").status_code == 401
        assert client.post("/afa/v1/train/cancel").status_code == 401
        assert client.post("/afa/v1/train", json=TRAIN).status_code == 401
        assert client.get("/afa/v1/train", auth=("alice", "secret")).json()["state"] == training_job.IDLE


def test_the_tab_reports_a_refused_start_and_closes_its_progress_bar(webui):
    [view] = webui.event(tab_component(webui, "afa_train_generate"), inputs=form_values(["tiny-a"], 4, ""))
    assert "choose 2 to 6 members" in view[0] and "task(test-start)" in progress.finished_tasks
    assert training_job.job.status.state == training_job.IDLE


def test_a_run_seen_ended_has_given_everything_back(webui, monkeypatch, tmp_path):
    """The end of a run is published last: a client that sees "finished" can start the next run at once (no 409),
    and the queue lock is free. The run's cleanup is slowed down to widen the window this guards."""
    import time

    data = harness_images(tmp_path)
    trim = training_job.cache.trim

    def slow_trim(policy):
        time.sleep(0.5)
        trim(policy)

    monkeypatch.setattr(training_job.cache, "trim", slow_trim)
    client = webui.client()
    assert client.post("/afa/v1/train", json={**TRAIN, "data": str(data), "output": "first",
                                              "max_steps": 1}).status_code == 200
    deadline = time.time() + WAIT
    while client.get("/afa/v1/train").json()["state"] != training_job.FINISHED:
        assert time.time() < deadline
        time.sleep(0.01)
    assert not call_queue.queue_lock.locked()
    response = client.post("/afa/v1/train", json={**TRAIN, "data": str(data), "output": "second", "max_steps": 1})
    assert response.status_code == 200, response.text
    assert training_job.job.wait(WAIT)["state"] == training_job.FINISHED
