"""The "AFA Training" tab: train SABW weights for 2 to 6 installed checkpoints on the WebUI's own images.

Left, the run's settings (as train.py's flags) and Start / Cancel / Resume; right, the run: status with the WebUI's
progress bar, the training loss, the held-out denoising error of every member, the merge baselines, block averaging
and AFA at each validation (plot and table), the skipped files, and "Use these weights" once a run has written its
file.

Building the tab only reads (the checkpoint list, the runs folder); the work is `training_job`'s. The right column is
redrawn when a hidden ticker (state, step, validations, message) changes; javascript/afa.js polls it every
POLL_SECONDS while the tab is on screen, by clicking the tab's refresh button (a short event, not a gradio `every`
loop, which would hold one of the queue's workers per open page), so a run started through the API shows too.
"""

from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from modules import devices, progress, shared
from modules.ui_components import ToolButton

from afa.aggregator import DEFAULT_PRESET, SABW_PRESETS
from afa.comparison import compare_rows
from afa.errors import AfaError
from afa.modes import SABW

from . import checkpoints, folders, training_job
from .training_job import FINISHED, job
from .ui import ACCORDIONS, REFRESH_SYMBOL

DATA_OUTPUTS = "WebUI outputs (txt2img and img2img images; prompts from their infotext)"
DATA_PATH = "A folder or manifest on the server"
LENGTH_EPOCHS, LENGTH_STEPS = "Epochs", "Steps"
PRECISIONS = {"fp16 (CUDA)": "fp16", "bf16": "bf16", "fp32": "no"}
POLL_SECONDS = 2.0  # javascript/afa.js: AFA_TRAINING_POLL_MS
VALIDATION_COLUMNS = ["model", "MSE", "vs best member", "vs best merge"]
VALIDATION_PLOT = dict(x="step", y="MSE", color="model", title="Held-out denoising error (lower is better)",
                       tooltip=["model", "MSE"], height=260, width=520)


def default_precision() -> str:
    return "fp16 (CUDA)" if devices.device.type == "cuda" else "fp32"


def resumable_runs() -> list[str]:
    """Names of the runs in the runs folder that stopped before writing their weights (a training state, and no
    `<name>.safetensors` in the weights folder)."""
    root = training_job.runs_dir()
    if not root.is_dir() or training_job.trainer is None:
        return []
    names = [pointer.parent.parent.relative_to(root).as_posix()
             for pointer in sorted(root.rglob("checkpoints/latest.json"))
             if training_job.trainer.saved_arguments(pointer.parent.parent) is not None]
    return [name for name in names if not (folders.weights_dir() / f"{name}{folders.WEIGHTS_SUFFIX}").exists()]


def request_from_form(members, preset, data_source, data_path, resolution, validation_percent, length_unit, epochs,
                      steps, batch_size, precision, gradient_checkpointing, validate_every, output) -> dict:
    """The tab's settings as a training request (the body POST /afa/v1/train takes)."""
    request = {"members": list(members or []), "preset": preset,
               "data": (data_path or "").strip() if data_source == DATA_PATH else "",
               "resolution": int(resolution), "val_split": float(validation_percent) / 100.0,
               "batch_size": int(batch_size),
               "mixed_precision": PRECISIONS.get(precision, precision),
               "gradient_checkpointing": bool(gradient_checkpointing),
               "validate_every": int(validate_every or 0), "output": (output or "").strip() or None}
    if data_source == DATA_PATH and not request["data"]:
        raise training_job.TrainingRefused("name the folder or manifest to train on")
    if length_unit == LENGTH_STEPS:
        request["max_steps"] = form_number(steps, "Steps")
    else:
        request["epochs"] = form_number(epochs, "Epochs")
    return request


def form_number(value, label: str) -> int:
    """A Number field's value for the trainer, which checks its range (--max-steps and --epochs at least 1); an
    emptied field (None) is refused here, naming the field."""
    if value is None:
        raise training_job.TrainingRefused(f"{label}: enter a whole number")
    return int(value)


# -- the right column ----------------------------------------------------------------------------------------------

def status_html(status: dict, error: str = "") -> str:
    parts = []
    if error:
        parts.append(f"<p class='afa-train-error' style='color: var(--error-text-color, #e33)'>"
                     f"{html.escape(error)}</p>")
    state = status["state"]
    if status["name"]:
        steps = f"step {status['step']} of {status['total_steps']}" if status["total_steps"] else ""
        parts.append(f"<p><b>{html.escape(status['name'])}</b>: {html.escape(state)}"
                     + (f", {steps}" if steps else "")
                     + (f"; {status['dataset_size']} training images" if status["dataset_size"] else "") + "</p>")
        if status["members"]:
            parts.append(f"<p>Members: {html.escape(', '.join(status['members']))}</p>")
    if status["message"]:
        parts.append(f"<p>{html.escape(status['message'])}</p>")
    if not parts:
        parts.append("<p>No training run yet. Choose 2 to 6 members and press Start.</p>")
    return "<div class='afa-train-status'>" + "".join(parts) + "</div>"


def loss_frame(status: dict) -> pd.DataFrame:
    return pd.DataFrame(status["losses"], columns=["step", "loss"])


def validation_frame(status: dict) -> pd.DataFrame:
    rows = [(entry["step"], model, error) for entry in status["validation"] for model, error in entry["errors"].items()]
    return pd.DataFrame(rows, columns=["step", "model", "MSE"])


def validation_plot(status: dict):
    """The validation plot, its y axis fitted to the errors (the models differ by a few percent; from 0 their lines
    would coincide)."""
    frame = validation_frame(status)
    if frame.empty:
        return gr.update(value=frame)
    low, high = float(frame["MSE"].min()), float(frame["MSE"].max())
    margin = max((high - low) * 0.1, high * 1e-3)
    # gradio 3.41 rebuilds the chart from the properties an update gives, and needs x and y among them
    return gr.update(value=frame, y_lim=[low - margin, high + margin], **VALIDATION_PLOT)


def validation_table(status: dict) -> pd.DataFrame:
    """The last validation, best first, with each model's error relative to the best member's and to the best
    merge's (afa.comparison)."""
    if not status["validation"]:
        return pd.DataFrame(columns=VALIDATION_COLUMNS)
    rows, _, _ = compare_rows(status["validation"][-1]["errors"])
    return pd.DataFrame([(row.model, round(row.error, 6), row.vs_best_member, row.vs_best_merge) for row in rows],
                        columns=VALIDATION_COLUMNS)


def ticker_value() -> str:
    """What changes when the right column should be redrawn (polled every POLL_SECONDS)."""
    status = job.status
    return f"{status.state}|{status.name}|{status.step}|{len(status.validation)}|{status.message}"


def refresh(error: str = ""):
    """The right column from the job's status: status, loss plot, validation plot and table, skipped files, the
    "Use these weights" button, the resumable runs, and (when a run has just written weights) the accordions'
    weights lists."""
    status = job.status.to_dict()
    finished = status["state"] == FINISHED and status["weights"]
    accordion_updates = [gr.update(choices=folders.weights_choices()) if finished else gr.update()
                         for _ in accordion_weights()]
    return [status_html(status, error), loss_frame(status), validation_plot(status), validation_table(status),
            gr.update(value=status["skipped"], visible=bool(status["skipped"])),
            gr.update(visible=bool(finished), value=f"Use {status['weights']}" if finished else "Use these weights"),
            gr.update(choices=resumable_runs()), *accordion_updates]


def accordion_weights() -> list:
    return [controls.weights for controls in ACCORDIONS.values()]


# -- actions -------------------------------------------------------------------------------------------------------

def refused(id_task, error: AfaError):
    if id_task:
        progress.finish_task(id_task)  # the progress bar the Start button opened closes at once
    return refresh(str(error))


def start(id_task, *form):
    try:
        job.start(request_from_form(*form), id_task=id_task)
    except AfaError as error:
        return refused(id_task, error)
    return refresh()


def resume(id_task, name):
    """Continues the chosen run with the settings it was saved with (the form's settings are not used: they may be
    another run's). Training it longer is the API's `"max_steps"` with `"resume": true`."""
    if not name:
        return refused(id_task, training_job.TrainingRefused("choose the run to resume"))
    try:
        job.start({"resume": True, "output": name}, id_task=id_task)
    except AfaError as error:
        return refused(id_task, error)
    return refresh()


def cancel():
    job.cancel()
    return refresh()


def use_weights():
    """Fills the txt2img and img2img accordions with the finished run: enabled, its members, its weights, SABW."""
    status = job.status.to_dict()
    updates = []
    for _ in ACCORDIONS.values():
        if status["state"] != FINISHED or not status["weights"]:
            updates += [gr.update()] * 4
            continue
        updates += [gr.update(value=True),
                    gr.update(choices=shared.list_checkpoint_tiles(False), value=status["members"]),
                    gr.update(choices=folders.weights_choices(), value=status["weights"]),
                    gr.update(value=SABW.label)]
    return updates


def resolution_for(members):
    """The resolution slider when the members change: the first member's native size (512 SD 1.x and SD 2.x base,
    768 SD 2.x-v, 1024 SDXL); left as it is without a member or a trainer."""
    if not members or training_job.trainer is None:
        return gr.update()
    try:
        info = checkpoints.resolve_checkpoint(members[0])
    except AfaError:
        return gr.update()
    return gr.update(value=training_job.trainer.native_resolution(info.filename))


# -- the tab -------------------------------------------------------------------------------------------------------

def create_tab():
    """on_ui_tabs: [(the tab's Blocks, its label, its id)]."""
    with gr.Blocks(analytics_enabled=False) as tab:
        id_task = gr.Textbox(visible=False, elem_id="afa_train_id_task")
        with gr.Row(equal_height=False):
            with gr.Column(variant="compact", scale=1):
                with gr.Row():
                    members = gr.Dropdown(label="Members (2 to 6 checkpoints)", multiselect=True,
                                          choices=shared.list_checkpoint_tiles(False), elem_id="afa_train_members")
                    refresh_members = ToolButton(value=REFRESH_SYMBOL, elem_id="afa_train_refresh_members")
                preset = gr.Radio(label="SABW design", choices=list(SABW_PRESETS), value=DEFAULT_PRESET,
                                  info="paper: the authors' aggregator; fast: cheaper, pooled to 32x32",
                                  elem_id="afa_train_preset")
                data_source = gr.Radio(label="Training images", choices=[DATA_OUTPUTS, DATA_PATH],
                                       value=DATA_OUTPUTS, elem_id="afa_train_data_source")
                data_path = gr.Textbox(label="Folder (images with .txt captions or WebUI PNGs) or JSONL/CSV "
                                             "manifest", visible=False, elem_id="afa_train_data_path")
                resolution = gr.Slider(label="Resolution (set to the first member's native size: SD 1.x 512, "
                                             "SD 2.x-v 768, SDXL 1024)", minimum=32, maximum=2048, step=32,
                                       value=512, elem_id="afa_train_resolution")
                validation_percent = gr.Slider(label="Held out for validation (%)", minimum=0, maximum=50, step=1,
                                               value=5, elem_id="afa_train_validation_percent")
                # The Number fields set no gradio `minimum`: gradio would refuse a smaller value before Start's
                # handler runs, leaving the progress bar Start opened waiting; the trainer's own check (e.g.
                # --max-steps at least 1) refuses it instead, with its reason, and closes the bar.
                with gr.Row():
                    length_unit = gr.Radio(label="Train for", choices=[LENGTH_EPOCHS, LENGTH_STEPS],
                                           value=LENGTH_EPOCHS, elem_id="afa_train_length_unit")
                    epochs = gr.Number(label="Epochs", value=10, precision=0, elem_id="afa_train_epochs")
                    steps = gr.Number(label="Steps", value=1000, precision=0, elem_id="afa_train_steps")
                with gr.Row():
                    batch_size = gr.Slider(label="Batch size", minimum=1, maximum=64, step=1, value=8,
                                           elem_id="afa_train_batch_size")
                    precision = gr.Dropdown(label="Precision of the members", choices=list(PRECISIONS),
                                            value=default_precision(), elem_id="afa_train_precision")
                with gr.Row():
                    gradient_checkpointing = gr.Checkbox(label="Gradient checkpointing (less VRAM, slower)",
                                                         value=False, elem_id="afa_train_gradient_checkpointing")
                    validate_every = gr.Number(label="Validate every N steps (0: each epoch)", value=0,
                                               precision=0, elem_id="afa_train_validate_every")
                output = gr.Textbox(label="Output name (weights folder)", placeholder="afa-<member>+<member>",
                                    elem_id="afa_train_output")
                with gr.Row():
                    # The ids end like txt2img's Generate and Interrupt buttons: the WebUI's keyboard shortcuts
                    # (script.js: Ctrl+Enter, Esc) look for those in the current tab and fail on a tab without them.
                    start_button = gr.Button("Start", variant="primary", elem_id="afa_train_generate")
                    cancel_button = gr.Button("Cancel", elem_id="afa_train_interrupt")
                with gr.Row():
                    resume_run = gr.Dropdown(label="Stopped run", choices=resumable_runs(),
                                             elem_id="afa_train_resume_run")
                    resume_button = gr.Button("Resume", elem_id="afa_train_resume")
            with gr.Column(scale=1):
                gr.HTML(elem_id="afa_train_progress")  # where javascript/afa.js puts the WebUI's progress bar
                status = gr.HTML(status_html(job.status.to_dict()), elem_id="afa_train_status")
                loss_plot = gr.LinePlot(x="step", y="loss", title="Training loss", height=220, width=520,
                                        elem_id="afa_train_loss_plot")
                validation_plot = gr.LinePlot(**VALIDATION_PLOT, elem_id="afa_train_validation_plot")
                table = gr.Dataframe(label="Last validation", headers=VALIDATION_COLUMNS,
                                     interactive=False, elem_id="afa_train_validation_table")
                skipped = gr.Textbox(label="Skipped files", lines=4, visible=False, interactive=False,
                                     elem_id="afa_train_skipped")
                use_button = gr.Button("Use these weights", visible=False, variant="primary",
                                       elem_id="afa_train_use_weights")
                with gr.Row():
                    poll_button = ToolButton(value=REFRESH_SYMBOL, elem_id="afa_train_poll")
                    ticker = gr.Textbox(ticker_value(), visible=False, elem_id="afa_train_ticker")

        view = [status, loss_plot, validation_plot, table, skipped, use_button, resume_run, *accordion_weights()]
        form = [members, preset, data_source, data_path, resolution, validation_percent, length_unit, epochs, steps,
                batch_size, precision, gradient_checkpointing, validate_every, output]
        refresh_members.click(fn=lambda: gr.update(choices=shared.list_checkpoint_tiles(False)), outputs=[members],
                              show_progress=False)
        members.change(fn=resolution_for, inputs=[members], outputs=[resolution], show_progress=False)
        data_source.change(fn=lambda source: gr.update(visible=source == DATA_PATH), inputs=[data_source],
                           outputs=[data_path], show_progress=False)
        start_button.click(fn=start, _js="afa_start_training", inputs=[id_task, *form], outputs=view,
                           show_progress=False)
        resume_button.click(fn=resume, _js="afa_start_training", inputs=[id_task, resume_run], outputs=view,
                            show_progress=False)
        cancel_button.click(fn=cancel, outputs=view, show_progress=False)
        poll_button.click(fn=ticker_value, outputs=[ticker], show_progress=False)
        ticker.change(fn=refresh, outputs=view, show_progress=False)
        accordion_outputs = [component for controls in ACCORDIONS.values()
                             for component in (controls.enabled, controls.members, controls.weights, controls.mode)]
        use_button.click(fn=use_weights, _js="switch_to_txt2img", outputs=accordion_outputs, show_progress=False)
    return [(tab, "AFA Training", "afa_training")]

