"""Training SABW weights inside ComfyUI, for the AFA Train node: the trainer of `python training/train.py` (the same
code, defaults and flags) on the MODELs, CLIPs and VAE the graph loaded.

train.py reads its members from checkpoint files; ComfyUI has loaded models instead. `comfy_frozen_models` hands the
trainer what it would have loaded (`training.sd_checkpoint.FrozenModels`), built from them without a second copy:

* members: each MODEL's diffusion model (comfy's UNetModel), run block by block through the core's `EnsembleUNet`
  with `TrainingBlockRunner` (ComfyUI's own block code, afa.comfyui.forward), in the dtype ComfyUI loaded it in;
  bound to the weights file by its UNet fingerprint (a ComfyUI MODEL has no file, so no file sha256);
* VAE: the VAE input's AutoencoderKL, read as ldm's `get_first_stage_encoding` reads it (the posterior's mean, or
  mean and std for `--latents sample`, times the model's latent scale factor);
* text encoders: each member's CLIP, encoding a caption as CLIPTextEncode encodes it (ComfyUI's tokenizer, its
  emphasis syntax and prompts longer than 75 tokens, the CLIP's own last layer as CLIPSetLastLayer sets it);
* schedule: member 1's `model_sampling` (its sigmas, eps or v prediction).

Everything is loaded once, together, through `comfy.model_management.load_models_gpu`, before the first step.
Progress goes to ComfyUI's progress bar; ComfyUI's Interrupt stops the run after the current step with its training
state saved, and running the node again with the same name and `resume` continues it to the weights an
uninterrupted run gives. Runs live in `<ComfyUI user folder>/afa-training/<name>/` (training states, log, the data
snapshot); the weights go to `models/afa/<name>.safetensors`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import shlex
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

import comfy.model_base
import comfy.model_management
import comfy.utils
import folder_paths

from afa.errors import AfaError
from afa.hashing import shorthash
from afa.members import MemberRef, check_members, unet_shapes
from afa.unet import block_layout

from .ensemble_model import (check_ensemble_members, distinct_members, member_family, member_fingerprint,
                             member_network)
from .forward import ComfyBlockRunner

WEIGHTS_FOLDER = "afa"
WEIGHTS_SUFFIX = ".safetensors"
OUTPUT_FOLDER = "output"  # the data input that means ComfyUI's output folder
# train.py flags the node sets itself (from its own inputs, or because they are paths and devices on this server).
NODE_FLAGS = ("members", "data", "val_data", "output", "run_dir", "resume", "device", "num_workers", "config",
              "val_split", "epochs", "max_steps", "batch_size", "mixed_precision", "gradient_checkpointing",
              "preset", "resolution", "seed", "latent_cache_dir", "tensorboard")


class TrainingRefused(AfaError):
    """A run the node did not start, and why (nothing was loaded or trained)."""


# -- what ComfyUI loaded, as the trainer's FrozenModels ----------------------------------------------------------

class TrainingBlockRunner(ComfyBlockRunner):
    """ComfyUI's block code for the trainer's ensemble: one runner for every call, its per-call state (the input's
    shape, fresh transformer options) set when the ensemble asks for the input dtype, at the start of each call.
    The members compute in `dtype`, the dtype ComfyUI's BaseModel casts their input to."""

    def __init__(self, dtype: torch.dtype):
        super().__init__(torch.empty(0), None, {}, {})
        self.dtype = dtype

    def input_dtype(self, first_member, x: torch.Tensor) -> torch.dtype:
        self.x_shape = list(x.shape)
        self.options, self.patches = {}, {}
        return self.dtype


def compute_dtype(patcher) -> torch.dtype:
    """The dtype ComfyUI runs a model's UNet in (BaseModel.apply_model: the manual cast dtype, else the weights')."""
    model = patcher.model
    return model.manual_cast_dtype or model.get_dtype()


class ComfyVae:
    """The VAE input as the trainer reads a VAE: images [B x 3 x H x W] in [-1, 1] (ComfyUI's VAE Encode takes
    [B x H x W x 3] in [0, 1] and maps it to the same) -> the posterior of its AutoencoderKL, scaled by the latent
    format's scale factor (what BaseModel.process_latent_in does to VAE Encode's latents)."""

    def __init__(self, vae, latent_format, device: torch.device):
        model = getattr(vae, "first_stage_model", None)
        if model is None or not hasattr(model, "encoder") or not hasattr(model, "regularization"):
            raise TrainingRefused(f"the VAE is a {type(model).__name__}, not an SD AutoencoderKL: connect the VAE "
                                  f"of the members' checkpoints")
        if getattr(latent_format, "shift_factor", None) or hasattr(latent_format, "latents_mean"):
            raise TrainingRefused(f"latent format {type(latent_format).__name__} is not SD 1.x/2.x/SDXL's")
        self.vae, self.model, self.device = vae, model, device
        self.scale_factor = float(latent_format.scale_factor)

    def parameters(self):
        return self.model.parameters()

    def _moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.vae.device, self.vae.vae_dtype)
        moments = self.model.encoder(x)
        if getattr(self.model, "quant_conv", None) is not None:
            moments = self.model.quant_conv(moments)
        mean, log_variance = moments.float().to(self.device).chunk(2, dim=1)
        return mean, log_variance

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B x 3 x H x W] in [-1, 1] -> the scaled posterior mean [B x 4 x H/8 x W/8] (VAE Encode's latent, scaled)."""
        return self._moments(images)[0] * self.scale_factor

    @torch.no_grad()
    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each scaled like the latents (ldm's DiagonalGaussianDistribution, log-variance clamped)."""
        mean, log_variance = self._moments(images)
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        return mean * self.scale_factor, std * self.scale_factor


class ComfyTextEncoder:
    """A member's CLIP as the trainer's text encoder: it reads the captions as text (training/metrics.py's
    `reads_captions`) and encodes each as CLIPTextEncode does (`clip.tokenize`, then what `encode_from_tokens`
    does, without its own model loading: everything was loaded together before the run). Prompts of different
    lengths (ComfyUI encodes 75 tokens at a time) are repeated to their least common length, as ComfyUI batches
    them. For SDXL it also gives each sample's `y` through the model's own `encode_adm` (pooled output and size
    conditioning), and zeroes the text parts of dropped captions as the trainer's SDXL encoders do."""

    reads_captions = True

    def __init__(self, clip, width: int, device: torch.device, adm_model=None):
        self.clip, self.device, self.adm_model = clip, device, adm_model
        self.config = types.SimpleNamespace(hidden_size=width)

    def _encode(self, caption: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        clip = self.clip
        clip.cond_stage_model.reset_clip_options()
        if clip.layer_idx is not None:
            clip.cond_stage_model.set_clip_options({"layer": clip.layer_idx})
        cond, pooled = clip.cond_stage_model.encode_token_weights(clip.tokenize(caption))[:2]
        return cond, pooled

    @torch.no_grad()
    def encode_captions(self, captions: Sequence[str], sizes: torch.Tensor | None = None,
                        dropped: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoded = [self._encode(caption) for caption in captions]
        conds = [cond.float() for cond, _ in encoded]
        common = math.lcm(*[cond.shape[1] for cond in conds])
        context = torch.cat([cond.repeat(1, common // cond.shape[1], 1) for cond in conds]).to(self.device)
        if self.adm_model is None:
            return context, None
        if sizes is None:
            raise ValueError("SDXL members need the images' size conditioning (sizes [B x 6])")
        pooled = torch.cat([p.float() for _, p in encoded]).to(self.device)
        if dropped is not None and any(dropped):
            keep = torch.tensor([not drop for drop in dropped], dtype=context.dtype, device=self.device)
            context, pooled = context * keep[:, None, None], pooled * keep[:, None]
        vectors = []
        for row, size in zip(pooled, sizes.tolist()):
            height, width, top, left, target_height, target_width = size
            vectors.append(self.adm_model.encode_adm(
                pooled_output=row[None], height=height, width=width, crop_h=top, crop_w=left,
                target_height=target_height, target_width=target_width).float())
        return context, torch.cat(vectors).to(self.device)


def use_normal_tensors_(module: torch.nn.Module) -> int:
    """Replaces the module's inference tensors (parameters and buffers made under ComfyUI's torch.inference_mode,
    which autograd cannot save for the backward pass) by normal ones, one tensor at a time, in place; returns how
    many. Gradients flow through the frozen members to the earlier SABW blocks, so their weights must be normal."""
    replaced = 0
    for submodule in module.modules():
        for name, tensor in list(submodule._parameters.items()):
            if tensor is not None and tensor.is_inference():
                submodule._parameters[name] = torch.nn.Parameter(tensor.clone(), requires_grad=False)
                replaced += 1
        for name, tensor in list(submodule._buffers.items()):
            if tensor is not None and tensor.is_inference():
                submodule._buffers[name] = tensor.clone()
                replaced += 1
    return replaced


def schedule_of(patcher):
    """member 1's noise schedule: alphas_cumprod from its model_sampling's sigmas (sigma^2 = (1 - a) / a)."""
    from training.diffusion import NoiseSchedule

    model = patcher.model
    prediction = {"EPS": "eps", "V_PREDICTION": "v"}.get(model.model_type.name)
    sigmas = getattr(model.model_sampling, "sigmas", None)
    if prediction is None or sigmas is None:
        raise TrainingRefused(f"model_1 predicts {model.model_type.name}: the trainer trains eps and v "
                              f"prediction models (SD 1.x, SD 2.x, SDXL)")
    return NoiseSchedule(1.0 / (1.0 + sigmas.detach().double().cpu() ** 2), prediction)


def context_width(unet) -> int:
    shapes = unet_shapes(unet)
    return next(shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight"))


def comfy_frozen_models(models: Sequence, clips: Sequence, vae, device: torch.device):
    """The trainer's FrozenModels from the graph's MODELs (members, in order), CLIPs (one per member, or one for
    all) and VAE, all loaded to `device` by ComfyUI's model management (fully, together), with their weights as
    normal tensors. Call outside torch.inference_mode."""
    from training.sd_checkpoint import FrozenModels

    models, clips = list(models), list(clips)
    if len(clips) == 1:
        clips = clips * len(models)
    unets = [member_unet(model, f"model_{index + 1}") for index, model in enumerate(models)]
    refs = []
    for index, model in enumerate(models):
        fingerprint = member_fingerprint(model)  # before loading: the unpatched weights (LoRAs are not part of it)
        refs.append(MemberRef(f"model_{index + 1}", fingerprint, fingerprint))
    distinct_clips = list({id(clip): clip for clip in clips}.values())
    patchers = list({id(model.model): model for model in models}.values())
    comfy.model_management.load_models_gpu(patchers + [vae.patcher] + [clip.patcher for clip in distinct_clips],
                                           force_full_load=True)
    for model in patchers:
        use_normal_tensors_(model.model.diffusion_model)
    layout = check_members([(ref.name, unet_shapes(unet)) for ref, unet in zip(refs, unets)])
    width = context_width(unets[0])
    sdxl_model = models[0].model if isinstance(models[0].model, comfy.model_base.SDXL) else None
    encoders = {id(clip): ComfyTextEncoder(clip, width, device, sdxl_model) for clip in distinct_clips}
    frozen = FrozenModels(refs, unets, layout, ComfyVae(vae, models[0].model.latent_format, device),
                          [encoders[id(clip)] for clip in clips], schedule_of(models[0]),
                          runner=TrainingBlockRunner(compute_dtype(models[0])))
    return frozen


# -- the run: checked before any work --------------------------------------------------------------------------

@dataclass
class Request:
    """The node's inputs."""

    data: str = OUTPUT_FOLDER
    output_name: str = "afa-comfyui"
    resume: bool = False
    validation_share: float = 0.05
    epochs: int = 10
    max_steps: int = 0
    batch_size: int = 8
    precision: str = "auto"
    gradient_checkpointing: bool = False
    design: str = "paper"
    resolution: int = 0
    seed: int = 0
    extra_flags: str = ""


@dataclass
class Plan:
    name: str
    args: object
    weights_path: Path
    run_dir: Path
    resumed: bool
    skip_report: object | None


def weights_dir() -> Path:
    return Path(folder_paths.get_folder_paths(WEIGHTS_FOLDER)[0])


def runs_dir() -> Path:
    return Path(folder_paths.get_user_directory()) / "afa-training"


def check_name(name: str) -> str:
    name = str(name).strip()
    if name.endswith(WEIGHTS_SUFFIX):
        name = name[:-len(WEIGHTS_SUFFIX)]
    if not name or name.startswith(".") or ".." in name.split("/") or not re.fullmatch(r"[\w.+\- ()\[\]/]+", name):
        raise TrainingRefused(f"output name {name!r}: use letters, digits, spaces and . + - ( ) [ ] (a / makes a "
                              f"sub-folder of models/afa)")
    return name


def data_sources(data: str) -> list[Path]:
    """The folder the images are read from: ComfyUI's output folder for "output" (or empty), else a folder on the
    server (relative paths are relative to the output folder)."""
    data = str(data).strip()
    output = Path(folder_paths.get_output_directory())
    if data in ("", OUTPUT_FOLDER):
        return [output]
    path = Path(data).expanduser()
    return [path if path.is_absolute() else output / path]


def default_resolution(patcher) -> int:
    from training.sd_checkpoint import NATIVE_RESOLUTIONS

    model = patcher.model
    if type(model.model_config).__name__.startswith("SDXL"):
        return NATIVE_RESOLUTIONS["sdxl"]
    return NATIVE_RESOLUTIONS["v" if model.model_type.name == "V_PREDICTION" else "sd"]


def member_precision(request: Request, models: Sequence, device: torch.device) -> str:
    """train.py's --mixed-precision for the members as ComfyUI loaded them (they are not copied to another dtype):
    "auto" follows their dtype; a choice that does not fit it is refused."""
    dtype = compute_dtype(models[0])
    natural = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")
    if request.precision == "auto":
        return natural
    if natural != "no" and request.precision != natural:
        raise TrainingRefused(f"precision {request.precision}: ComfyUI loaded the members in {natural}, and the "
                              f"trainer uses them as loaded (no second copy); choose {natural} or auto, or start "
                              f"ComfyUI with --fp32-unet for fp32 members")
    if request.precision == "fp16" and device.type != "cuda":
        raise TrainingRefused("precision fp16 needs a CUDA device; use bf16 or no on the CPU")
    return request.precision


def extra_argv(flags: str) -> list[str]:
    argv = shlex.split(flags or "")
    reserved = sorted({arg[2:].split("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")}
                      & set(NODE_FLAGS))
    if reserved:
        raise TrainingRefused(f"extra_flags: {', '.join('--' + r.replace('_', '-') for r in reserved)} "
                              f"{'is' if len(reserved) == 1 else 'are'} set by the node's own inputs")
    return argv


def member_unet(patcher, label: str):
    """The member's UNet (`comfy.ldm`'s UNetModel); TrainingRefused for a FLUX.1 transformer, which AFA Ensemble runs
    with block or noise averaging but the trainer does not train yet, and AfaError for other models."""
    network = member_network(patcher, label)
    if member_family(patcher) != "unet":
        raise TrainingRefused(f"{label} is a FLUX.1 transformer: AFA Train trains SABW for SD 1.x, SD 2.x and SDXL "
                              f"members; FLUX members run in AFA Ensemble with Block average or Noise average")
    return network


def plan_run(models: Sequence, clips: Sequence, request: Request, device: torch.device) -> Plan:
    """Checks everything that can be checked before loading or training, in this order: the members (2 to 6 UNets
    of one family and shape), the CLIPs (one, or one per member), the output name (existing weights or a saved run
    need `resume`), the settings (train.py's own checks), the images (at least one batch of captioned images after
    the held-out share; the refusal counts what was skipped and why), a resumed run's settings, and the disk.
    A new run writes its data snapshot (`<run dir>/data.jsonl`) here; nothing else is written."""
    from training import service
    from training.train import check_resumed_members, load_resume_state

    models = list(models)
    check_ensemble_members(models)
    member_unet(models[0], "model_1")  # FLUX members ensemble, but the trainer trains UNet ensembles only
    distinct_members(models)  # one loaded checkpoint connected twice with different patches cannot be both
    schedule_of(models[0])  # refuses prediction types the trainer does not train
    if len(clips) not in (1, len(models)):
        raise TrainingRefused(f"connect one CLIP per member ({len(models)}), in the members' order, or one CLIP "
                              f"for all; got {len(clips)}")
    if any(clip is None for clip in clips):
        raise TrainingRefused("a CLIP input is empty (its checkpoint has no text encoder)")
    if device.type not in ("cpu", "cuda"):
        raise TrainingRefused(f"the trainer runs on CUDA or the CPU, not {device.type}")
    name = check_name(request.output_name)
    weights_path = weights_dir() / f"{name}{WEIGHTS_SUFFIX}"
    run_dir = runs_dir() / name
    saved = service.saved_arguments(run_dir)
    resumed = bool(request.resume and saved is not None)
    if not request.resume:
        if weights_path.exists():
            raise TrainingRefused(f"weights {name}{WEIGHTS_SUFFIX} already exist in models/afa; choose another "
                                  f"output name, or turn on resume to continue (or retrain) that run")
        if saved is not None:
            raise TrainingRefused(f"a run named {name!r} has a saved training state (step {saved['step']}): turn on "
                                  f"resume to continue it, or choose another output name")
    elif saved is None and weights_path.exists():
        raise TrainingRefused(f"resume: weights {name}{WEIGHTS_SUFFIX} exist but no training state of that run "
                              f"(in {run_dir}); choose another output name")

    unet = member_unet(models[0], "model_1")
    snapshot = run_dir / service.DATA_SNAPSHOT_NAME
    argv = ["--members", *[f"model_{index + 1}" for index in range(len(models))], "--data", str(snapshot),
            "--output", str(weights_path), "--run-dir", str(run_dir), "--device", str(device),
            "--num-workers", "0", "--val-split", str(request.validation_share), "--epochs", str(request.epochs),
            "--batch-size", str(request.batch_size),
            "--mixed-precision", member_precision(request, models, device), "--preset", request.design,
            "--resolution", str(request.resolution or default_resolution(models[0])), "--seed", str(request.seed)]
    if request.max_steps:
        argv += ["--max-steps", str(request.max_steps)]
    if request.gradient_checkpointing:
        argv.append("--gradient-checkpointing")
    if resumed:
        argv += ["--resume", "latest"]
    argv += extra_argv(request.extra_flags)
    args = service.parse_args(argv, exit_on_error=False)
    if args.resolution % 8:
        raise TrainingRefused(f"resolution {args.resolution}: the VAE needs a multiple of 8")

    report = None
    if resumed:
        state, state_path = load_resume_state(args)  # refuses other settings than the run started with, named
        check_resumed_members(state, state_path, [MemberRef(f"model_{index + 1}", member_fingerprint(model))
                                                  for index, model in enumerate(models)])
    else:
        sources = data_sources(request.data)
        missing = [str(source) for source in sources if not source.is_dir()]
        if missing:
            raise TrainingRefused(f"data: no such folder on the server: {', '.join(missing)}")
        count, report = service.snapshot_data(sources, snapshot)
        skipped = f"\n{report.summary()}" if report.total else ""
        training = service.training_image_count(snapshot, args.val_split, args.seed) if count else 0
        problem = None
        if count == 0:
            problem = f"no usable images in {', '.join(map(str, sources))}: none has a caption{skipped}"
        elif training < args.batch_size:
            problem = (f"{training} training images do not fill one batch of {args.batch_size} ({count} captioned "
                       f"images, {count - training} of them held out for validation): add images, or lower the "
                       f"batch size or the held-out share{skipped}")
        if problem is not None:
            snapshot.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                run_dir.rmdir()
            raise TrainingRefused(problem)
    layout = block_layout(unet_shapes(unet))
    problem = service.disk_shortfall(service.state_bytes(args, layout, len(models), context_width(unet)),
                                     [run_dir, weights_path.parent])
    if problem is not None:
        raise TrainingRefused(problem)
    return Plan(name, args, weights_path, run_dir, resumed, report)


# -- progress and interrupt -------------------------------------------------------------------------------------

def _training_events_class():
    from training.train import TrainingEvents

    class Events(TrainingEvents):
        """Progress into ComfyUI's progress bar (and a line with loss and ETA into the console); ComfyUI's
        Interrupt as the stop request, honoured after the current step."""

        def __init__(self, name: str):
            self.name, self.bar, self.validations = name, None, []
            self.started_at, self.start_step, self.last_log = 0.0, 0, 0.0

        def started(self, progress, total_steps, dataset_size, skip_report):
            self.bar = comfy.utils.ProgressBar(total_steps)
            self.bar.update_absolute(progress.step, total_steps)
            self.started_at, self.start_step = time.time(), progress.step
            logging.info("AFA Train %s: %d training images, step %d of %d", self.name, dataset_size, progress.step,
                         total_steps)

        def stepped(self, progress, total_steps, loss):
            self.bar.update_absolute(progress.step, total_steps)
            now = time.time()
            if now - self.last_log >= 10 or progress.step == total_steps:
                self.last_log = now
                done = progress.step - self.start_step
                eta = (now - self.started_at) / max(done, 1) * (total_steps - progress.step)
                logging.info("AFA Train %s: step %d/%d, loss %.4f, ETA %s", self.name, progress.step, total_steps,
                             loss, format_seconds(eta))

        def validated(self, progress, errors):
            self.validations.append((progress.step, dict(errors)))

        def should_stop(self):
            return comfy.model_management.processing_interrupted()

    return Events


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# -- the node's work ---------------------------------------------------------------------------------------------

def train_members(models: Sequence, clips: Sequence, vae, request: Request):
    """Runs the training `request` describes on the members; returns (weights name for AFA Ensemble, validation
    table text, curves image [H x W x 3] float in 0..1). Refuses (TrainingRefused) before any work; an Interrupt
    raises ComfyUI's InterruptProcessingException after the state was saved."""
    from training.curves import read_run_log, render_training_curves, validation_table
    from training.train import train

    device = comfy.model_management.get_torch_device()
    plan = plan_run(models, clips, request, device)
    comfy.model_management.throw_exception_if_processing_interrupted()
    events = _training_events_class()(plan.name)
    started = time.time()
    with torch.inference_mode(False), torch.enable_grad():
        frozen = comfy_frozen_models(models, clips, vae, device)
        logging.info("AFA Train %s: members %s", plan.name,
                     ", ".join(f"{ref.name} [{shorthash(ref.unet)}]" for ref in frozen.member_refs))
        outcome = train(plan.args, events, frozen=frozen)
    if outcome.stopped:
        logging.info("AFA Train %s: interrupted at step %d of %d; the training state is saved (run the node again "
                     "with resume on to continue)", plan.name, outcome.steps, outcome.total_steps)
        comfy.model_management.throw_exception_if_processing_interrupted()
        raise AfaError(f"stopped at step {outcome.steps} of {outcome.total_steps}; the training state is saved")
    report = outcome.skip_report
    if plan.skip_report is not None:
        report.merge(plan.skip_report)
    losses, validations = read_run_log(plan.run_dir, outcome.steps)
    weights_name = plan.weights_path.relative_to(weights_dir()).as_posix()
    header = (f"{weights_name}: {outcome.steps} steps ({'resumed, ' if plan.resumed else ''}"
              f"{format_seconds(time.time() - started)} in this run)")
    text = validation_table(validations, header, report.summary() if report.total else "")
    image = render_training_curves(losses, validations, title=f"AFA training: {plan.name}")
    return weights_name, text, image

