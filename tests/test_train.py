"""training/train.py end to end on tiny members: outputs, resume equality and its refusals, DDP equality,
accumulation, bad data, what the ablation flags remove."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from afa import AfaError, EnsembleUNet, MemberRef, load_member, load_weights, read_weights_info
from afa.host import find_webui
from conftest import random_inputs
from training import train

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 captioned 40x40 images (resized and cropped to 32 by the trainer)."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for index in range(12):
        colour = ["red", "blue", "green"][index % 3]
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a {colour} thing number {index}")
    return folder


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
    """4 uninterrupted steps (2 epochs of 2 batches)."""
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
                 "--no-text", "--mode", "--cache-latents", "--val-data", "--max-steps", "--gradient-accumulation"):
        assert flag in result.stdout


def test_outputs_of_a_run(baseline, members):
    member_names = {path.stem for path in members}
    output = baseline / "baseline.safetensors"
    info = read_weights_info(output)
    assert info.members == [MemberRef.from_file(path) for path in members]
    assert info.training["steps"] == 4 and info.training["dataset_size"] == 9
    assert info.config.num_members == 2 and info.config.hidden_channels == 32 and info.mode.name == "sabw"
    run = baseline / "baseline"
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in log if "loss" in record] == [1, 2, 3, 4]
    validations = [record["validation"] for record in log if "validation" in record]
    assert len(validations) == 2 and set(validations[0]) == member_names | {"block average", "AFA"}
    # fresh SABW starts as block averaging; after training it differs
    assert validations[0]["AFA"] != validations[0]["block average"]
    states = sorted((run / "checkpoints").glob("state-*.pt"))
    assert [p.name for p in states] == ["state-00000002.pt", "state-00000004.pt"]
    assert json.loads((run / "checkpoints" / "latest.json").read_text())["state"] == "state-00000004.pt"
    assert not list(run.rglob("*.tmp"))
    trained = weights(output)
    assert trained["output_blocks.11.out.2.weight"].abs().sum() > 0  # the zero-initialised logits moved


def test_resumed_run_ends_with_the_same_weights(baseline, members, dataset, tmp_path):
    args = train_args(members, dataset, tmp_path, "resumed")
    run_in_process(args + ["--max-steps", "1"])  # stopped mid-epoch
    run_in_process(args + ["--max-steps", "3", "--resume", "latest"])  # stopped at an epoch boundary + 1
    run_in_process(args + ["--max-steps", "4", "--resume", str(tmp_path / "resumed" / "checkpoints" /
                                                             "state-00000003.pt")])
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "resumed.safetensors")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_refuses_changed_settings_and_accepts_a_longer_run(baseline, members, dataset, tmp_path):
    state = baseline / "baseline" / "checkpoints" / "state-00000004.pt"
    args = train_args(members, dataset, tmp_path, "longer", "--resume", str(state))
    with pytest.raises(AfaError) as refused:
        train.main(args + ["--max-steps", "5", "--batch-size", "2", "--seed", "1"])
    message = str(refused.value)
    assert "--batch-size: saved 4, given 2" in message and "--seed: saved 0, given 1" in message
    assert "--max-steps" not in message  # training longer is what resuming is for
    run_in_process(args + ["--max-steps", "5"])
    assert read_weights_info(tmp_path / "longer.safetensors").training["steps"] == 5


def test_gradient_accumulation_matches_one_big_batch(baseline, members, dataset, tmp_path):
    run_in_process(train_args(members, dataset, tmp_path, "accumulated", "--max-steps", "4",
                              "--gradient-accumulation", "2"))
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "accumulated.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


def test_cached_latents_match_on_the_fly_encoding(baseline, members, dataset, tmp_path):
    run_in_process(train_args(members, dataset, tmp_path, "cached", "--max-steps", "4", "--cache-latents"))
    assert list((tmp_path / "cached" / "latent-cache").glob("*/latents.safetensors"))
    expected, got = weights(baseline / "baseline.safetensors"), weights(tmp_path / "cached.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("flag, config_field, ignored, kept", [("--no-text", "use_text", "context", "timestep"),
                                                               ("--no-timestep", "use_timestep", "timestep", "context")])
def test_ablation_flags_remove_their_condition_from_the_maps(members, dataset, tmp_path, flag, config_field, ignored,
                                                             kept):
    """The maps of trained weights ignore the condition an ablation flag removes, and still follow the other one.

    Compared at input_blocks.0: the members' features there are a convolution of x alone, so only SABW's own
    conditioning can move its maps. A high learning rate moves the zero-initialised output layers far enough for
    the maps to depend on their inputs after 2 steps. 64 channels: at 32, SABW's GroupNorm(32 groups) normalises
    every channel on its own, which removes the timestep embedding (a per-channel constant) entirely.
    """
    run_in_process(train_args(members, dataset, tmp_path, "ablation", "--max-steps", "2", "--val-split", "0",
                              "--learning-rate", "1e-2", "--hidden-channels", "64", flag))
    aggregator, info = load_weights(tmp_path / "ablation.safetensors", [MemberRef.from_file(m) for m in members])
    assert getattr(info.config, config_field) is False
    ensemble = EnsembleUNet([load_member(member) for member in members], aggregator, info.mode)
    x, timesteps, context = random_inputs(batch=2, seed=0)
    _, _, other_context = random_inputs(batch=2, seed=1)
    maps = first_block_maps(ensemble, x, timesteps, context)
    changed = {"context": first_block_maps(ensemble, x, timesteps, other_context),
               "timestep": first_block_maps(ensemble, x, timesteps.flip(0), context)}
    assert torch.equal(changed[ignored], maps)
    assert (changed[kept] - maps).abs().max() > 1e-4
