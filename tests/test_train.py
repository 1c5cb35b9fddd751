"""training/train.py end to end on tiny members: outputs, resume equality and its refusals, DDP equality,
accumulation, cached posteriors, bad data, what the ablation flags remove, the presets and the parity switches
(--latents, --crop). The runs use the defaults -- the paper preset, per-member text conditioning, posterior samples,
random crops -- unless a test says otherwise; text conditioning has its own file (test_text_conditioning.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from afa import (SABW_PRESETS, AfaError, EnsembleUNet, MemberRef, load_member, load_weights, read_unet_state_dict,
                 read_weights_info)
from afa.host import find_webui
from conftest import random_inputs
from factories import write_captioned_images
from training import train
from training.data import ImageCaptionDataset, SkipReport, collate, index_captioned_images
from training.diffusion import draw_for_samples
from training.metrics import prepare_batch
from training.sd_checkpoint import load_frozen_models

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 captioned 48x40 images (resized to 38x32 and cropped to 32x32 by the trainer: 7 crop positions)."""
    return write_captioned_images(tmp_path_factory.mktemp("data"), width=48, height=40)


@pytest.fixture(scope="module")
def members(checkpoint_factory) -> list[Path]:
    return [checkpoint_factory(1), checkpoint_factory(2)]


def train_args(members, data, tmp: Path, name: str, *extra: str) -> list[str]:
    return ["--members", *map(str, members), "--data", str(data), "--resolution", "32", "--batch-size", "4",
            "--val-split", "0.25", "--hidden-channels", "32", "--num-workers", "0", "--save-dtype", "fp32",
            "--output", str(tmp / f"{name}.safetensors"), "--run-dir", str(tmp / name), *extra]


def run_in_process(args: list[str]) -> None:
    assert train.main(args) == 0


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


@pytest.fixture(scope="module")
def baseline(members, dataset, tmp_path_factory) -> Path:
    """4 uninterrupted steps (2 epochs of 2 batches) with the defaults: posterior samples, random crops of the 40 px
    images, per-member text conditioning (members 1 and 2 have different text encoders)."""
    tmp = tmp_path_factory.mktemp("baseline")
    run_in_process(train_args(members, dataset, tmp, "baseline", "--max-steps", "4", "--save-every", "2"))
    return tmp


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "training/train.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for action in train.build_parser()._actions:
        assert action.help, action.option_strings
        assert all(option in result.stdout for option in action.option_strings)
    for flag in ("--mixed-precision", "--gradient-checkpointing", "--resume", "--no-spatial", "--no-timestep",
                 "--no-text", "--mode", "--cache-latents", "--val-data", "--max-steps", "--gradient-accumulation",
                 "--preset", "--text-conditioning", "--clip-skip", "--latents", "--crop"):
        assert flag in result.stdout


def test_outputs_of_a_run(baseline, members):
    member_names = {path.stem for path in members}
    output = baseline / "baseline.safetensors"
    info = read_weights_info(output)
    assert info.members == [MemberRef.from_file(path, with_unet=True) for path in members]  # UNet fingerprints too
    assert info.training["steps"] == 4 and info.training["dataset_size"] == 9
    assert info.config.num_members == 2 and info.config.hidden_channels == 32 and info.mode.name == "sabw"
    assert info.config.design == "paper" and info.config.max_resolution is None  # the default preset
    assert info.config.text_conditioning == "per_member" and info.config.clip_skip == 1
    assert info.training["latents"] == "sample" and info.training["crop"] == "random"
    run = baseline / "baseline"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if "loss" in record] == [1, 2, 3, 4]
    validations = [record["validation"] for record in log if "validation" in record]
    weighted, = [row for row in validations[0] if row.startswith("weighted merge (r=")]
    assert len(validations) == 2 and list(validations[0])[2:] == [weighted, "MBW", "block average", "AFA"]
    assert set(list(validations[0])[:2]) == member_names
    # the merges are searched once, at the first validation, and keep their errors; they mix the members' weights,
    # so their errors are not a member's
    assert validations[1][weighted] == validations[0][weighted] and validations[1]["MBW"] == validations[0]["MBW"]
    assert validations[0][weighted] not in [validations[0][name] for name in member_names]
    # fresh SABW starts as block averaging; after training it differs
    assert validations[0]["AFA"] != validations[0]["block average"]
    states = sorted((run / "checkpoints").glob("state-*.safetensors"))
    assert [p.name for p in states] == ["state-00000002.safetensors", "state-00000004.safetensors"]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["state"] == "state-00000004.safetensors"
    assert not list(run.rglob("*.tmp"))
    trained = weights(output)
    assert trained["output_blocks.11.out.weight"].abs().sum() > 0  # the zero-initialised logits moved (paper design)


def test_resumed_run_ends_with_the_same_weights(baseline, members, dataset, tmp_path):
    """Bit for bit, with posterior samples and random crops: their draws are keyed by (seed, epoch, sample). Without
    the merge baselines, which the baseline run searched at each validation: their search changes no training."""
    args = train_args(members, dataset, tmp_path, "resumed", "--merge-baselines", "none")
    run_in_process(args + ["--max-steps", "1"])  # stopped mid-epoch
    run_in_process(args + ["--max-steps", "3", "--resume", "latest"])  # stopped at an epoch boundary + 1
    run_in_process(args + ["--max-steps", "4", "--resume", str(tmp_path / "resumed" / "checkpoints" /
                                                             "state-00000003.safetensors")])
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "resumed.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    validations = [record["validation"] for record in log if "validation" in record]
    assert validations and all(list(validation)[2:] == ["block average", "AFA"] for validation in validations)


def test_unet_only_members_train_with_the_components_of_a_full_checkpoint(baseline, members, dataset, tmp_path):
    """A UNet-only file (ComfyUI's models/diffusion_models: the bare ldm UNet state dict) as member 1, with
    --components naming the checkpoint it came from: the text encoder, VAE and schedule come from there, so the run
    ends with the baseline's weights bit for bit. Without --components it is refused before anything trains."""
    unet_only = tmp_path / "unet-only.safetensors"
    save_file(read_unet_state_dict(members[0]), str(unet_only))
    args = train_args([unet_only, members[1]], dataset, tmp_path, "unet-only", "--max-steps", "4",
                      "--merge-baselines", "none")
    with pytest.raises(AfaError, match="holds a UNet only .* --components"):
        train.main(args)
    assert not (tmp_path / "unet-only.safetensors.tmp").exists() and not (tmp_path / "unet-only").exists()
    run_in_process(args + ["--components", str(members[0])])
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "unet-only.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    info = read_weights_info(tmp_path / "unet-only.safetensors")
    assert info.members[0].name == "unet-only"  # bound to the UNet-only file and its UNet fingerprint
    assert info.members[0].unet == read_weights_info(baseline / "baseline.safetensors").members[0].unet


def test_resume_refuses_changed_settings_and_accepts_a_longer_run(baseline, members, dataset, tmp_path):
    state = baseline / "baseline" / "checkpoints" / "state-00000004.safetensors"
    args = train_args(members, dataset, tmp_path, "longer", "--resume", str(state))
    with pytest.raises(AfaError) as refused:
        train.main(args + ["--max-steps", "5", "--batch-size", "2", "--seed", "1"])
    message = str(refused.value)
    assert "--batch-size: saved 4, given 2" in message and "--seed: saved 0, given 1" in message
    assert "--max-steps" not in message  # training longer is what resuming is for
    with pytest.raises(AfaError) as refused:
        train.main(args + ["--max-steps", "5", "--preset", "fast", "--text-conditioning", "shared", "--clip-skip", "2",
                           "--latents", "mean", "--crop", "center"])
    message = str(refused.value)
    for expected in ("--preset: saved paper, given fast", "--text-conditioning: saved per-member, given shared",
                     "--clip-skip: saved 1, given 2", "--latents: saved sample, given mean",
                     "--crop: saved random, given center"):
        assert expected in message, message
    run_in_process(args + ["--max-steps", "5"])
    assert read_weights_info(tmp_path / "longer.safetensors").training["steps"] == 5


def test_a_state_saved_before_the_parity_flags_resumes_only_with_their_old_behaviour(baseline, members, dataset,
                                                                                     tmp_path):
    """A state whose command line lacks --preset, --text-conditioning, --clip-skip, --latents and --crop ran with
    what the trainer did before they existed (fast, shared, 1, mean, center): the new defaults are refused."""
    state = train.read_state_file(baseline / "baseline" / "checkpoints" / "state-00000004.safetensors")
    for name in ("preset", "text_conditioning", "clip_skip", "latents", "crop"):
        del state["args"][name]
    old_state = tmp_path / "old-state.pt"
    torch.save(state, old_state)
    with pytest.raises(AfaError) as refused:
        train.main(train_args(members, dataset, tmp_path, "old", "--max-steps", "5", "--resume", str(old_state)))
    message = str(refused.value)
    for expected in ("--preset: saved fast, given paper", "--text-conditioning: saved shared, given per-member",
                     "--latents: saved mean, given sample", "--crop: saved center, given random"):
        assert expected in message, message
    assert "--clip-skip" not in message


def test_presets_and_their_overrides(members, dataset, tmp_path):
    def parsed(*extra):
        return train.parse_args(["--members", *map(str, members), "--data", str(dataset), *extra])

    paper, fast = parsed(), parsed("--preset", "fast")
    assert (paper.preset, paper.hidden_channels, paper.max_resolution) == ("paper", 128, None)
    assert (fast.preset, fast.hidden_channels, fast.max_resolution) == ("fast", 160, 32)
    assert SABW_PRESETS["paper"]["hidden_channels"] == 128 and SABW_PRESETS["fast"]["max_resolution"] == 32
    overridden = parsed("--preset", "fast", "--hidden-channels", "64", "--max-resolution", "0")
    assert (overridden.hidden_channels, overridden.max_resolution) == (64, None)
    assert parsed("--max-resolution", "8").max_resolution == 8

    run_in_process(train_args(members, dataset, tmp_path, "fast", "--max-steps", "1", "--val-split", "0",
                              "--preset", "fast", "--hidden-channels", "64"))
    info = read_weights_info(tmp_path / "fast.safetensors")
    assert info.config.design == "fast" and info.config.hidden_channels == 64 and info.config.max_resolution == 32
    assert "output_blocks.11.out.2.weight" in weights(tmp_path / "fast.safetensors")  # the fast design's head
    with pytest.raises(AfaError, match="--preset paper: .*multiple of 32, got 48"):
        train.main(train_args(members, dataset, tmp_path, "odd", "--max-steps", "1", "--hidden-channels", "48"))


def test_gradient_accumulation_matches_one_big_batch(baseline, members, dataset, tmp_path):
    run_in_process(train_args(members, dataset, tmp_path, "accumulated", "--max-steps", "4",
                              "--gradient-accumulation", "2"))
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "accumulated.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("latents", ["sample", "mean"])
def test_cached_latents_match_on_the_fly_encoding(baseline, members, dataset, tmp_path, latents):
    """The cache holds centre crops: the posterior's mean and std (4 + 4 channels) for --latents sample, from which
    the same samples are drawn as from the images; the mean (4 channels) for --latents mean."""
    center = train_args(members, dataset, tmp_path, "center", "--max-steps", "4", "--crop", "center",
                        "--latents", latents)
    run_in_process(center)
    run_in_process(train_args(members, dataset, tmp_path, "cached", "--max-steps", "4", "--crop", "center",
                              "--latents", latents, "--cache-latents"))
    cached_files = list((tmp_path / "cached" / "latent-cache").glob("*/latents.safetensors"))
    assert len(cached_files) == 2  # the training and the validation split
    assert load_file(str(cached_files[0]))["latents"].shape[1:] == ((8 if latents == "sample" else 4), 16, 16)
    expected, got = weights(tmp_path / "center.safetensors"), weights(tmp_path / "cached.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    if latents == "sample":  # the baseline differs only by its random crops
        random_crops = weights(baseline / "baseline.safetensors")
        assert any(not torch.equal(random_crops[key], expected[key]) for key in expected)


def test_cache_latents_refuses_random_crops(members, dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        train.parse_args(train_args(members, dataset, tmp_path, "x", "--cache-latents"))
    assert exited.value.code == 2
    assert "--cache-latents stores one latent per image" in capsys.readouterr().err
    assert train.parse_args(train_args(members, dataset, tmp_path, "x", "--cache-latents", "--crop", "center"))


def test_a_posterior_sample_is_its_mean_plus_std_times_the_samples_own_noise(members, dataset):
    frozen = load_frozen_models(members)
    images = ImageCaptionDataset(index_captioned_images(dataset, SkipReport()), 32)
    batch = collate([images[index] for index in (0, 3, 5)])

    def inputs(batch, epoch=0, **options):
        return prepare_batch(batch, frozen.vae, frozen.text_encoders, frozen.schedule, 0, torch.device("cpu"), epoch,
                             **options)

    mean, std = frozen.vae.posterior(batch["pixel_values"])
    draws = draw_for_samples(batch["indices"], 0, 0, (4, 16, 16), 1000, 0.0, posterior_noise=True)
    sampled, of_means = inputs(batch, sample_latents=True), inputs(batch)
    assert torch.equal(sampled["latents"], mean + std * draws.posterior_noise)
    assert torch.equal(of_means["latents"], frozen.vae.encode(batch["pixel_values"]))
    # The posterior noise is drawn after the other draws, which are the same with or without it.
    assert torch.equal(sampled["noise"], of_means["noise"]) and torch.equal(sampled["timesteps"], of_means["timesteps"])
    assert not torch.equal(inputs(batch, epoch=1, sample_latents=True)["latents"], sampled["latents"])
    # Cached moments give the same sample and mean; cached means cannot be sampled from.
    moments = {key: value for key, value in batch.items() if key != "pixel_values"}
    moments["moments"] = torch.cat([mean, std], dim=1)
    assert torch.equal(inputs(moments, sample_latents=True)["latents"], sampled["latents"])
    assert torch.equal(inputs(moments)["latents"], mean)
    cached_means = {key: value for key, value in moments.items() if key != "moments"}
    cached_means["latents"] = mean
    with pytest.raises(ValueError, match="need its moments"):
        inputs(cached_means, sample_latents=True)


def test_posterior_samples_differ_from_the_mean(baseline, members, dataset, tmp_path):
    run_in_process(train_args(members, dataset, tmp_path, "mean", "--max-steps", "4", "--latents", "mean"))
    sampled, mean = weights(baseline / "baseline.safetensors"), weights(tmp_path / "mean.safetensors")
    assert any(not torch.allclose(sampled[key], mean[key], rtol=1e-3, atol=1e-4) for key in sampled)


def test_two_process_ddp_equals_one_process(baseline, members, dataset, tmp_path):
    """torchrun --nproc_per_node 2 (gloo on CPU), 2 samples per rank = the baseline's global batch of 4."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29500 + os.getpid() % 1000), "training/train.py",
               *train_args(members, dataset, tmp_path, "ddp", "--max-steps", "4")]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "ddp.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert read_weights_info(tmp_path / "ddp.safetensors").training["processes"] == 2
    log = (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()
    assert len([line for line in log if '"loss"' in line]) == 4  # only rank 0 logs


def test_bad_data_is_skipped_and_reported(members, dataset, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for path in dataset.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    (data / "05.png").write_bytes(b"not a png at all")  # unreadable: found when loading
    (data / "07.txt").unlink()  # no caption: found when indexing
    run_in_process(train_args(members, data, tmp_path, "bad", "--max-steps", "3", "--val-split", "0",
                              "--mode", "last-block", "--no-spatial", "--no-text"))
    out = capsys.readouterr().out
    assert "unreadable image" in out and "05.png" in out
    assert "no caption" in out and "07.png" in out
    info = read_weights_info(tmp_path / "bad.safetensors")
    assert info.mode.name == "last-block" and not info.config.spatial and not info.config.use_text


def test_user_errors_are_clear(members, dataset, tmp_path):
    args = train_args(members[:1], dataset, tmp_path, "one")
    with pytest.raises(SystemExit):
        train.parse_args(args)
    result = subprocess.run([sys.executable, "training/train.py",
                             *train_args([members[0], tmp_path / "missing.safetensors"], dataset, tmp_path, "x")],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "missing.safetensors: file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_inside_a_webui_it_finds_models_and_ldm(tmp_path):
    extension = tmp_path / "webui" / "extensions" / "sd-webui-afa"
    extension.mkdir(parents=True)
    (tmp_path / "webui" / "models").mkdir()
    webui = find_webui(extension)
    assert webui is not None and webui.models_dir == tmp_path / "webui" / "models"
    assert find_webui(tmp_path) is None


def test_checkpointing_matches_and_cpu_precision_flags(baseline, members, dataset, tmp_path):
    run_in_process(train_args(members, dataset, tmp_path, "checkpointed", "--max-steps", "4",
                              "--gradient-checkpointing"))
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "checkpointed.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    run_in_process(train_args(members, dataset, tmp_path, "bf16", "--max-steps", "1", "--mixed-precision", "bf16"))
    assert read_weights_info(tmp_path / "bf16.safetensors").training["steps"] == 1
    with pytest.raises(AfaError, match="fp16 needs a CUDA device"):
        train.main(train_args(members, dataset, tmp_path, "fp16", "--max-steps", "1", "--mixed-precision", "fp16"))


def first_block_maps(ensemble: EnsembleUNet, x: torch.Tensor, timesteps: torch.Tensor,
                     context: torch.Tensor) -> torch.Tensor:
    """SABW's weights at input_blocks.0 [B x N x H x W] in one ensemble call."""
    recorded = {}
    ensemble.observer = lambda block_index, weights: recorded.setdefault(block_index, weights)
    with torch.no_grad():
        ensemble(x, timesteps, context)
    return recorded[0]


@pytest.mark.parametrize("preset", ["paper", "fast"])
@pytest.mark.parametrize("flag, config_field, ignored, kept",
                         [("--no-text", "use_text", "context", "timestep"),
                          ("--no-timestep", "use_timestep", "timestep", "context")])
def test_ablation_flags_remove_their_condition_from_the_maps(members, dataset, tmp_path, flag, config_field, ignored,
                                                             kept, preset):
    """The maps of trained weights ignore the condition an ablation flag removes, and still follow the other one.

    Compared at input_blocks.0: the members' features there are a convolution of x alone, so only SABW's own
    conditioning can move its maps. A high learning rate moves the zero-initialised output layers far enough for
    the maps to depend on their inputs after 2 steps. 64 channels: at 32, SABW's GroupNorm(32 groups) normalises
    every channel on its own, which removes the timestep embedding (a per-channel constant) entirely.
    """
    run_in_process(train_args(members, dataset, tmp_path, "ablation", "--max-steps", "2", "--val-split", "0",
                              "--learning-rate", "1e-2", "--hidden-channels", "64", "--preset", preset, flag))
    aggregator, info = load_weights(tmp_path / "ablation.safetensors", [MemberRef.from_file(m) for m in members])
    assert getattr(info.config, config_field) is False and info.config.design == preset
    ensemble = EnsembleUNet([load_member(member) for member in members], aggregator, info.mode)
    x, timesteps, context = random_inputs(batch=2, seed=0)
    _, _, other_context = random_inputs(batch=2, seed=1)
    maps = first_block_maps(ensemble, x, timesteps, context)
    changed = {"context": first_block_maps(ensemble, x, timesteps, other_context),
               "timestep": first_block_maps(ensemble, x, timesteps.flip(0), context)}
    assert torch.equal(changed[ignored], maps)
    assert (changed[kept] - maps).abs().max() > 1e-4


class StopAfter(train.TrainingEvents):
    """Records what a run reports and asks it to stop after `stop_after` steps."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after, self.calls, self.validations = stop_after, [], []

    def started(self, progress, total_steps, dataset_size, skip_report):
        self.calls.append(("started", progress.step, total_steps, dataset_size))

    def stepped(self, progress, total_steps, loss):
        self.calls.append(("stepped", progress.step, total_steps))
        assert loss > 0

    def validated(self, progress, errors):
        self.validations.append((progress.step, errors))

    def should_stop(self):
        return self.stop_after is not None and self.calls[-1][1] >= self.stop_after


def test_a_stopped_run_saves_its_state_and_resumes_to_the_same_weights(baseline, members, dataset, tmp_path):
    """What the WebUI's Cancel and Resume rest on: `train()` stopped by its events after step 3 (mid-epoch, no
    state due by --save-every) saves that step's state and writes no weights; resuming it ends bit for bit as the
    uninterrupted run. The resumed run is given member 1's UNet already loaded (as the WebUI gives its cached ones).
    """
    args = train_args(members, dataset, tmp_path, "stopped", "--max-steps", "4", "--save-every", "100")
    events = StopAfter(stop_after=3)
    outcome = train.train(train.parse_args(args), events)
    assert outcome.stopped and outcome.output is None and outcome.steps == 3 and outcome.total_steps == 4
    assert outcome.state_path.name == "state-00000003.safetensors" and outcome.state_path.is_file()
    assert not (tmp_path / "stopped.safetensors").exists()
    assert events.calls == [("started", 0, 4, 9), ("stepped", 1, 4), ("stepped", 2, 4), ("stepped", 3, 4)]
    assert [step for step, _ in events.validations] == [2]  # the end of epoch 1; no validation of a stopped run

    events = StopAfter()
    outcome = train.train(train.parse_args(args + ["--resume", "latest"]), events,
                          members=[load_member(members[0]), None])
    assert not outcome.stopped and outcome.output == tmp_path / "stopped.safetensors" and outcome.steps == 4
    assert events.calls[0] == ("started", 3, 4, 9) and events.calls[-1] == ("stepped", 4, 4)
    expected, got = weights(baseline / "baseline.safetensors"), weights(outcome.output)
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_validate_every_and_at_the_end_of_a_run_leave_the_result_unchanged(baseline, members, dataset, tmp_path):
    """--validate-every 1 validates after every step, and a run ending mid-epoch validates at its end; neither
    changes the weights (validation draws from its own generators)."""
    events = StopAfter()
    train.train(train.parse_args(train_args(members, dataset, tmp_path, "often", "--max-steps", "4",
                                            "--validate-every", "1")), events)
    assert [step for step, _ in events.validations] == [1, 2, 3, 4]
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "often.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)

    events = StopAfter()
    train.train(train.parse_args(train_args(members, dataset, tmp_path, "short", "--max-steps", "1")), events)
    assert [step for step, _ in events.validations] == [1]


def test_parse_args_can_raise_instead_of_exiting(members, dataset):
    with pytest.raises(train.UsageError, match="--batch-size must be a multiple of --gradient-accumulation"):
        train.parse_args(["--members", *map(str, members), "--data", str(dataset), "--batch-size", "3",
                          "--gradient-accumulation", "2"], exit_on_error=False)
    with pytest.raises(train.UsageError, match="invalid choice: 'huge'"):
        train.parse_args(["--members", *map(str, members), "--data", str(dataset), "--preset", "huge"],
                         exit_on_error=False)


def test_training_states_are_safetensors_without_pickle(baseline):
    """A state opens with safetensors alone (no pickle: what A1111's patched torch.load refuses for newer torch's zip
    layout never comes into play), and round-trips the optimizer's integer keys, tuples and RNG states."""
    from safetensors import safe_open

    path = baseline / "baseline" / "checkpoints" / "state-00000004.safetensors"
    with safe_open(str(path), framework="pt") as file:
        assert train.STATE_METADATA_KEY in file.metadata()
    state = train.read_state_file(path)
    assert state["format"] == train.STATE_FORMAT and state["step"] == 4
    assert all(isinstance(key, int) for key in state["optimizer"]["state"])
    assert state["rng"]["torch"].dtype == torch.uint8 and isinstance(state["rng"]["python"][0], int)
    tensors = {}
    value = {"a": (1, 2.5, None), 3: [torch.ones(2)], "b": {"c": torch.zeros(())}}
    decoded = train.decode_state(train.encode_state(value, tensors), tensors)
    assert decoded["a"] == (1, 2.5, None) and torch.equal(decoded[3][0], torch.ones(2))
    assert torch.equal(decoded["b"]["c"], torch.zeros(()))


def test_members_with_another_text_encoder_width_train_with_their_config_inferred(dataset, tmp_path):
    """SD1-layout members whose text encoder is 64 wide (not ViT-L) and whose yaml names a hub model, not a folder
    (what the WebUI's stock yamls say): the encoder's config comes from its tensors, the aggregator's context width
    from it, and the run trains."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from afa.unet import PRESETS
    from training.sd_checkpoint import (TEXT_ENCODER_PREFIX, TINY_CLIP_TEXT_CONFIG, tiny_sd_config,
                                        tiny_sd_state_dict, write_webui_checkpoint)

    members = []
    for seed in (1, 2):
        state_dict = tiny_sd_state_dict(seed, dict(PRESETS["tiny"], context_dim=64))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TEXT_ENCODER_PREFIX)}
        torch.manual_seed(seed)
        encoder = CLIPTextModel(CLIPTextConfig(**{**TINY_CLIP_TEXT_CONFIG, "hidden_size": 64,
                                                  "num_attention_heads": 1, "intermediate_size": 128}))
        state_dict.update({TEXT_ENCODER_PREFIX + k: v for k, v in encoder.state_dict().items()})
        config = tiny_sd_config(tmp_path / "tiny-clip-text")
        config["model"]["params"]["unet_config"]["params"]["context_dim"] = 64
        config["model"]["params"]["cond_stage_config"]["params"]["version"] = "openai/clip-vit-large-patch14"
        members.append(write_webui_checkpoint(tmp_path / f"wide-{seed}.safetensors", state_dict, config))
    run_in_process(train_args(members, dataset, tmp_path, "wide", "--max-steps", "1"))
    info = read_weights_info(tmp_path / "wide.safetensors")
    assert info.config.context_dim == 64 and info.training["steps"] == 1
