"""Training SABW weights inside the WebUI: one run at a time, with the trainer of `python training/train.py`.

A run is a background thread that holds the WebUI's queue lock (`call_queue.queue_lock`) from start to end, as
A1111's own Train tab does by running inside `wrap_gradio_gpu_call`: generations, checkpoint switches and everything
else that needs the GPU queue behind it, first come first served, and run when it ends. Starting is refused while
the lock is held (a generation is running). Progress goes through `shared.state` and `modules.progress` the way a
generation's does, so the WebUI's progress bar and `/internal/progress` show it, with an ETA.

Members are the loaded checkpoint's own UNet when it is one of them (same dtype, no LoRA merged into it), else the
member cache's UNets (the ones the ensemble uses); when the loaded UNet is not used, the loaded model is moved off
the GPU for the run and back after. VAE and text encoders come from the member files, as with train.py.

A new run trains on a snapshot of its data (`<run dir>/data.jsonl`, the trainer's own indexing of the folders or
manifest, by default the WebUI's txt2img and img2img output folders with their PNG infotext prompts), so resuming it
reads the same images although the WebUI keeps saving new ones. Runs live in `<WebUI data>/afa-training/<name>/`;
the weights go to the weights folder as `<name>.safetensors`.

`afa/` never imports `training/`: scripts/afa_script.py hands `training.service` to `use_trainer`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from modules import call_queue, devices, paths_internal, progress, sd_models, shared

from afa.errors import AfaError
from afa.members import MAX_MEMBERS, MIN_MEMBERS, check_members
from afa.unet import BlockLayout

from . import checkpoints, folders, settings
from .infotext import public_text
from .member_cache import cache

JOB_NAME = "AFA training"
WEBUI_OUTPUTS = ""  # the data source "" means the WebUI's own output folders

# train.py flags the WebUI sets itself: paths on the server, the device, and the processes of the data loader
# (worker processes would re-import the WebUI on Windows).
RESERVED_FLAGS = ("config", "run_dir", "latent_cache_dir", "device", "num_workers", "val_data", "tensorboard")
# What a resumed run may change: how long it trains (training longer is what resuming is for).
RESUME_OVERRIDES = ("max_steps", "epochs")

IDLE, PREPARING, TRAINING, STOPPING, FINISHED, CANCELLED, FAILED = (
    "idle", "preparing", "training", "stopping", "finished", "cancelled", "failed")

trainer = None  # training.service, from use_trainer()


def use_trainer(module) -> None:
    """Hands over the trainer (training.service); called by scripts/afa_script.py at import."""
    global trainer
    trainer = module


class TrainingRefused(AfaError):
    """A run that was not started, and why (nothing was written)."""


class TrainingBusy(TrainingRefused):
    """Not started because a run or a generation holds the WebUI."""


class LoadingCancelled(AfaError):
    """Cancel (or Interrupt) pressed before the first step."""


def public_lines(text: str) -> str:
    """A report of several lines (the trainer's skip report) with files named as public_text names them."""
    return "\n".join(public_text(line) for line in str(text).splitlines())


def runs_dir() -> Path:
    return Path(paths_internal.data_path) / "afa-training"


def webui_output_folders() -> list[Path]:
    """Where the WebUI saves txt2img and img2img images (Settings > Paths for saving), relative to its working
    directory like the WebUI's own saving."""
    if shared.opts.outdir_samples:
        return [Path(os.path.abspath(shared.opts.outdir_samples))]
    return [Path(os.path.abspath(shared.opts.outdir_txt2img_samples)),
            Path(os.path.abspath(shared.opts.outdir_img2img_samples))]


def default_name(infos) -> str:
    """`afa-<member>+<member>...`, from the members' file names (what the output name defaults to)."""
    stems = [re.sub(r"[^\w.-]+", "-", Path(info.filename).stem).strip("-")[:24] for info in infos]
    return "afa-" + "+".join(stems)


def check_name(name: str) -> str:
    name = str(name).strip()
    if name.endswith(folders.WEIGHTS_SUFFIX):
        name = name[:-len(folders.WEIGHTS_SUFFIX)]
    folders.refuse_paths(name, "output name")
    if not name or name.startswith(".") or not re.fullmatch(r"[\w.+\- ()\[\]/]+", name):
        raise TrainingRefused(f"output name {name!r}: use letters, digits, spaces and . + - ( ) [ ] (a / makes a "
                              f"sub-folder of the weights folder)")
    return name


def argv_of(options: dict) -> list[str]:
    """train.py's command line for {flag: value} (flag names with _ or -; True is a switch, False or None leaves
    the flag out, a list gives several values)."""
    argv = []
    for key, value in options.items():
        flag = "--" + str(key).replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


@dataclass
class Plan:
    """A checked run: what to train and where, before anything is written."""

    name: str
    infos: list
    args: argparse.Namespace
    sources: list[Path]
    layout: BlockLayout
    resume: bool
    start_step: int = 0


def plan_run(request: dict) -> Plan:
    """Checks a training request (the tab's or POST /afa/v1/train's body) and returns its plan; raises
    TrainingRefused, or the trainer's UsageError for a bad flag, with nothing written.

    Request keys: "members" (2 to 6 installed checkpoint names), "data" (a folder or manifest on the server; "" or
    absent: the WebUI's output folders), "output" (the weights name; default from the members), "resume" (bool:
    continue the run of that name with the settings it was started with), and any other train.py flag by name
    ("max_steps": 200, "preset": "fast", "gradient_checkpointing": true, ...)."""
    if trainer is None:
        raise TrainingRefused("the trainer is not available (training/ is missing from the extension)")
    request = {str(k).replace("-", "_"): v for k, v in dict(request).items()}
    reserved = sorted(set(request) & set(RESERVED_FLAGS))
    if reserved:
        raise TrainingRefused(f"{', '.join('--' + k.replace('_', '-') for k in reserved)}: set by the WebUI, not "
                              f"by a request")
    members = request.pop("members", None) or []
    data = request.pop("data", WEBUI_OUTPUTS) or WEBUI_OUTPUTS
    resume = bool(request.pop("resume", False))
    output = request.pop("output", None)
    if isinstance(members, str):
        members = [members]

    if resume:
        return plan_resume(output, members, request)
    if not MIN_MEMBERS <= len(members) <= MAX_MEMBERS:
        raise TrainingRefused(f"choose {MIN_MEMBERS} to {MAX_MEMBERS} members (checkpoints), got {len(members)}")
    infos = checkpoints.resolve_members(members)
    if len({os.path.abspath(info.filename) for info in infos}) < len(infos):
        raise TrainingRefused("a checkpoint is chosen twice: members must be different files")
    layout = check_members([(checkpoints.label(info), checkpoints.unet_shapes_of(info)) for info in infos])
    name = check_name(output or default_name(infos))
    weights_path = folders.weights_dir() / f"{name}{folders.WEIGHTS_SUFFIX}"
    run_dir = runs_dir() / name
    if weights_path.exists():
        raise TrainingRefused(f"weights {name}{folders.WEIGHTS_SUFFIX} already exist in the weights folder; choose "
                              f"another output name (or delete the file)")
    if trainer.saved_arguments(run_dir) is not None:
        raise TrainingRefused(f"a run named {name!r} has a saved training state: resume it, or choose another "
                              f"output name")

    sources = [Path(data)] if data != WEBUI_OUTPUTS else webui_output_folders()
    if data != WEBUI_OUTPUTS and not Path(data).exists():
        raise TrainingRefused(f"data {data!r}: no such folder or manifest on the server")
    argv = ["--members", *[info.filename for info in infos], "--data", str(run_dir / trainer.DATA_SNAPSHOT_NAME),
            "--output", str(weights_path), "--run-dir", str(run_dir), "--device", str(devices.device),
            "--num-workers", "0", *argv_of(request)]
    args = trainer.parse_args(argv, exit_on_error=False)
    return Plan(name, infos, args, sources, layout, resume=False)


def whole_count(flag: str, value) -> int:
    """A resumed run's new --max-steps or --epochs, read as train.py's parser reads the text a new run's request
    becomes (`int(str(value))`: 2.5 and true are refused), and at least 1."""
    try:
        count = int(str(value))
    except ValueError:
        count = None
    if count is None or count < 1:
        raise TrainingRefused(f"--{flag.replace('_', '-')} must be a whole number of at least 1, got {value!r}")
    return count


def plan_resume(output, members, overrides: dict) -> Plan:
    """A stopped run continued with the command line it was saved with (so it ends as the uninterrupted run);
    only how long it trains may change (RESUME_OVERRIDES)."""
    if not output:
        raise TrainingRefused("resume: name the run (its output name)")
    name = check_name(output)
    run_dir = runs_dir() / name
    saved = trainer.saved_arguments(run_dir)
    if saved is None:
        raise TrainingRefused(f"resume: no stopped run named {name!r} (runs are in "
                              f"{public_text(str(runs_dir()))})")
    refused = sorted(k for k in overrides if k not in RESUME_OVERRIDES and overrides[k] != saved.get(k))
    if refused:
        raise TrainingRefused(f"resume continues a run with the settings it was started with; only "
                              f"{', '.join(RESUME_OVERRIDES)} may change, given {', '.join(refused)}")
    by_file = {os.path.abspath(info.filename): info for info in sd_models.checkpoints_list.values()}
    infos = []
    for path in saved["members"]:
        info = by_file.get(os.path.abspath(path))
        if info is None:
            raise TrainingRefused(f"resume: member {Path(path).name} of run {name!r} is no longer installed")
        infos.append(info)
    if members and [checkpoints.resolve_checkpoint(m).filename for m in members] != [i.filename for i in infos]:
        raise TrainingRefused(f"resume: run {name!r} was trained with members "
                              f"{', '.join(checkpoints.label(i) for i in infos)}")
    values = {k: v for k, v in saved.items() if k != "step"}
    values.update({k: whole_count(k, v) for k, v in overrides.items() if k in RESUME_OVERRIDES and v is not None})
    values.update(run_dir=run_dir, resume="latest", device=str(devices.device), num_workers=0)
    layout = check_members([(checkpoints.label(info), checkpoints.unet_shapes_of(info)) for info in infos])
    return Plan(name, infos, argparse.Namespace(**values), [], layout, resume=True, start_step=saved["step"])


def state_bytes(plan: Plan) -> int:
    """The disk the run needs (the trainer's count, `state_bytes`)."""
    shapes = checkpoints.unet_shapes_of(plan.infos[0])
    context_dim = next(shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight"))
    return trainer.state_bytes(plan.args, plan.layout, len(plan.infos), context_dim)


def check_data(plan: Plan):
    """Writes a new run's data snapshot and checks that it fills at least one batch, before any member is loaded;
    returns the report of the files indexing skipped. A refused snapshot is deleted (and the run folder, if that
    leaves it empty)."""
    count, report = trainer.snapshot_data(plan.sources, plan.args.data)
    sources = ", ".join(public_text(str(source)) for source in plan.sources)
    skipped = f"\n{public_lines(report.summary())}" if report.total else ""
    if count == 0:
        problem = f"no captioned images in {sources}{skipped}"
    else:
        # train.py drops the batch a tail of images does not fill: with fewer images than one batch it has nothing
        training = trainer.training_image_count(plan.args.data, plan.args.val_split, plan.args.seed)
        batch_size = plan.args.batch_size
        problem = None if training >= batch_size else (
            f"{training} training images do not fill one batch of {batch_size} ({count} captioned images in "
            f"{sources}, {count - training} of them held out for validation): add images, or lower the batch size "
            f"or the share held out{skipped}")
    if problem is not None:
        Path(plan.args.data).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            plan.args.run_dir.rmdir()  # only if empty: a folder the user made stays
        raise TrainingRefused(problem)
    return report


def check_free_disk(plan: Plan) -> None:
    problem = trainer.disk_shortfall(state_bytes(plan), [plan.args.run_dir, folders.weights_dir()])
    if problem is not None:
        raise TrainingRefused(f"{problem} (--keep-checkpoints {plan.args.keep_checkpoints})")


# -- the run ------------------------------------------------------------------------------------------------------

@dataclass
class Status:
    """What GET /afa/v1/train and the tab show. `losses` are [step, loss] pairs; `validation` is one
    {"step", "errors": {model: MSE}} per validation (members, "block average", "AFA"; lower is better)."""

    state: str = IDLE
    name: str | None = None
    members: list[str] = field(default_factory=list)  # checkpoint titles, as the checkpoint lists show them
    step: int = 0
    start_step: int = 0
    total_steps: int = 0
    dataset_size: int = 0
    losses: list = field(default_factory=list)
    validation: list = field(default_factory=list)
    weights: str | None = None
    message: str = ""
    skipped: str = ""
    started_at: float | None = None
    id_task: str | None = None

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


class Events:
    """The trainer's TrainingEvents for a WebUI run: progress into the status and `shared.state`, stop requests
    from Cancel and from the WebUI's Interrupt."""

    def __init__(self, job: "TrainingJob"):
        self.job = job

    def started(self, progress_, total_steps, dataset_size, skip_report):
        status = self.job.status
        status.state, status.step, status.start_step = TRAINING, progress_.step, progress_.step
        status.total_steps, status.dataset_size = total_steps, dataset_size
        if self.job.snapshot_report is not None:  # what indexing the data for the snapshot skipped
            skip_report.merge(self.job.snapshot_report)
        self.skip_report, self.skipped_total = skip_report, -1
        self.report_skipped()
        shared.state.job_count, shared.state.job_no = 1, 0
        shared.state.sampling_steps = max(total_steps - progress_.step, 1)
        shared.state.sampling_step = 0
        shared.state.time_start = time.time()  # the ETA counts from the first step of this session
        shared.state.textinfo = f"{JOB_NAME} {status.name}: step {progress_.step}/{total_steps}"

    def report_skipped(self) -> None:
        """The skip report into the status when it grew (images that fail to decode are found as they load)."""
        if self.skip_report.total != self.skipped_total:
            self.skipped_total = self.skip_report.total
            self.job.status.skipped = public_lines(self.skip_report.summary()) if self.skipped_total else ""

    def stepped(self, progress_, total_steps, loss):
        self.report_skipped()
        status = self.job.status
        status.step = progress_.step
        status.losses.append([progress_.step, loss])
        shared.state.sampling_step = progress_.step - status.start_step
        shared.state.textinfo = f"{JOB_NAME} {status.name}: step {progress_.step}/{total_steps}, loss {loss:.4f}"

    def validated(self, progress_, errors):
        self.job.status.validation.append({"step": progress_.step, "errors": dict(errors)})

    def should_stop(self):
        stop = self.job.cancel_requested.is_set() or shared.state.interrupted
        if stop:
            self.job.status.state = STOPPING
        return stop


def holds_merged_networks(unet: torch.nn.Module) -> bool:
    """Whether the built-in Lora extension left a prompt's LoRA merged into the UNet's weights (it restores them
    only at the next generation): such weights are not the checkpoint's."""
    return any(getattr(module, "network_current_names", ()) for module in unet.modules())


class TrainingJob:
    """The one training run of this WebUI process (started, watched and cancelled from the tab and the API)."""

    def __init__(self):
        self.status = Status()
        self.cancel_requested = threading.Event()
        self.thread: threading.Thread | None = None
        self.active = False  # from Start until the run has given everything back
        self.snapshot_report = None  # the files the data snapshot of the current run skipped
        self.guard = threading.Lock()  # start/cancel/status from several request threads

    @property
    def running(self) -> bool:
        return self.active

    def start(self, request: dict, id_task: str | None = None) -> dict:
        """Checks the request, takes the queue lock and starts the run; returns the status. Raises AfaError
        (TrainingRefused, UsageError, a checkpoint error) when it does not start."""
        with self.guard:
            if self.running:
                raise TrainingBusy(f"a training run ({self.status.name}) is already running; cancel it first")
            plan = plan_run(request)
            check_free_disk(plan)
            if not call_queue.queue_lock.acquire(blocking=False):
                raise TrainingBusy("the WebUI is busy (a generation or another job is running); start training "
                                   "when it has finished")
            try:
                self.snapshot_report = None
                if not plan.resume:
                    self.snapshot_report = check_data(plan)
                losses, validation = (trainer.read_run_log(plan.args.run_dir, plan.start_step) if plan.resume
                                      else ([], []))
                self.status = Status(state=PREPARING, name=plan.name, members=[info.title for info in plan.infos],
                                     step=plan.start_step, start_step=plan.start_step, losses=losses,
                                     validation=validation, started_at=time.time(), id_task=id_task,
                                     message=f"{'resuming' if plan.resume else 'starting'}: loading members")
                self.cancel_requested.clear()
                shared.state.begin(job=JOB_NAME)
                if id_task:
                    progress.start_task(id_task)
                self.active = True
                self.thread = threading.Thread(target=self.run, args=(plan,), name="afa-training", daemon=True)
                self.thread.start()
            except BaseException:
                self.active = False
                call_queue.queue_lock.release()
                raise
        return self.status.to_dict()

    def cancel(self) -> dict:
        """Asks the run to stop after its current step (it saves its state; Resume continues it)."""
        if self.running:
            self.cancel_requested.set()
            self.status.state = STOPPING
            self.status.message = "stopping after the current step"
        return self.status.to_dict()

    def wait(self, timeout: float | None = None) -> dict:
        if self.thread is not None:
            self.thread.join(timeout)
        return self.status.to_dict()

    def run(self, plan: Plan) -> None:
        """The run's thread. Its end (finished, cancelled, failed) is published last, after the WebUI's model,
        the queue lock and the progress task are given back: whoever sees it may start the next run at once."""
        status = self.status
        restore = []
        weights, skipped = None, None
        try:
            members = self.members_for(plan, restore)
            status.message = ""
            outcome = trainer.train(plan.args, Events(self), members=members, member_refs=self.member_refs(plan))
            if outcome.stopped:
                state, message = CANCELLED, (f"cancelled at step {outcome.steps} of {outcome.total_steps}; the "
                                             f"training state is saved: Resume continues it")
            else:
                weights = folders.weights_name(Path(outcome.output))
                state, message = FINISHED, f"wrote {weights} ({outcome.steps} steps)"
            if outcome.skip_report.total:
                skipped = public_lines(outcome.skip_report.summary())
        except LoadingCancelled as error:
            state, message = CANCELLED, str(error)
        except AfaError as error:
            state, message = FAILED, public_text(str(error))
        except Exception as error:  # noqa: BLE001 -- a bug or an out-of-memory: report it, keep the WebUI running
            state, message = FAILED, public_text(f"{type(error).__name__}: {error}")
            import traceback
            traceback.print_exc()
        finally:
            for undo in reversed(restore):
                try:
                    undo()
                except Exception as error:  # noqa: BLE001
                    print(f"AFA: restoring after training: {error}")
            cache.park(settings.cache_policy())
            cache.trim(settings.cache_policy())
            devices.torch_gc()
            if status.id_task:
                progress.finish_task(status.id_task)
            shared.state.end()
            shared.state.interrupted = False
            shared.state.job_count = 0
            self.active = False
            call_queue.queue_lock.release()
        status.weights = weights
        if skipped is not None:
            status.skipped = skipped
        status.state, status.message = state, message

    @staticmethod
    def member_refs(plan: Plan) -> list | None:
        """The members' names and sha256 from the WebUI's hash cache (the trainer would hash each whole file
        again); None under --no-hashing, where the trainer hashes them itself."""
        try:
            return [checkpoints.member_ref(info) for info in plan.infos]
        except AfaError:
            return None

    def members_for(self, plan: Plan, restore: list) -> list[torch.nn.Module]:
        """The members' UNets for the run (see the module docstring); `restore` collects what undoes the changes to
        the WebUI's own model."""
        args = plan.args
        device = torch.device(args.device)
        dtype = trainer.member_dtype(args.mixed_precision, device)
        sd_model = checkpoints.loaded_base()
        base = sd_model.model.diffusion_model if sd_model is not None else None
        base_info = getattr(sd_model, "sd_checkpoint_info", None)
        low_vram = sd_model is not None and (getattr(sd_model, "lowvram", False)
                                             or getattr(shared.cmd_opts, "medvram", False))
        reused = None
        if base is not None and not low_vram and next(base.parameters()).dtype == dtype \
                and not holds_merged_networks(base):
            reused = next((i for i, info in enumerate(plan.infos)
                           if checkpoints.is_loaded_checkpoint(info, base_info)), None)
        if sd_model is not None and reused is None and device.type == "cuda":
            sd_models.send_model_to_cpu(sd_model)
            restore.append(lambda: sd_models.send_model_to_device(sd_model))
        if reused is not None:
            flags = [p.requires_grad for p in base.parameters()]
            was_training = base.training

            def restore_base():
                for parameter, flag in zip(base.parameters(), flags):
                    parameter.requires_grad_(flag)
                base.train(was_training)
            restore.append(restore_base)

        members = []
        for index, info in enumerate(plan.infos):
            if self.cancel_requested.is_set() or shared.state.interrupted:
                raise LoadingCancelled("cancelled while loading members; nothing was trained")
            status_text = f"loading member {index + 1}/{len(plan.infos)}: {checkpoints.label(info)}"
            self.status.message = shared.state.textinfo = f"{JOB_NAME}: {status_text}"
            if index == reused:
                members.append(base.to(device))
                continue
            unet = cache.get(info, dtype, device)
            if holds_merged_networks(unet):  # a LoRA of the last AFA generation is still merged: read it afresh
                cache.keep_only(k for k in cache.unets if cache.unets[k] is not unet)
                unet = cache.get(info, dtype, device)
            members.append(unet)
        return members


job = TrainingJob()
