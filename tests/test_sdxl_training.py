"""SDXL members in the trainer and the evaluator, on tiny random SDXL checkpoints in the WebUI's form
(tests/factories.py: sgm's key layout and sd_xl_base.yaml's structure): each member's two text encoders from
`conditioner.embedders.*` (context = CLIP-L's hidden layer and the OpenCLIP tower's penultimate layer, `y` = the
pooled embedding and the size embeddings), each image's original size and crop as its size conditioning, `y`
reaching every member; training, resuming to the same weights, the ablation flags, the latent cache, evaluation and
`afa inspect`."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from afa import EnsembleUNet, read_weights_info
from factories import (TINY_OPEN_CLIP, TRAINER_VARIANTS, check_variant_config, trainer_args,
                       write_captioned_images, write_tiny_sdxl_checkpoint)
from test_cli import run_afa
from training import data as datasets
from training import sd_checkpoint
from training import evaluate, train
from training.metrics import encode_for_members, prepare_batch
from training.sd_checkpoint import SDXL_SCALE_FACTOR, load_frozen_models
from training.sdxl_text import SIZE_EMBEDDING_WIDTH, SdxlTextEncoders, size_embeddings
from training.text_encoder import tokenize

CPU = torch.device("cpu")
POOLED = TINY_OPEN_CLIP["embed_dim"]  # the pooled part of `y`; the rest is the size embeddings
Y_WIDTH = POOLED + 6 * SIZE_EMBEDDING_WIDTH


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl")
    return [write_tiny_sdxl_checkpoint(folder / f"xl-{seed}.safetensors", seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def frozen(members):
    return load_frozen_models(members)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Wide images (48 x 32): a 32 px square crop has room to move, so crops and sizes differ per sample."""
    return write_captioned_images(tmp_path_factory.mktemp("data"), width=48, height=32)


def batch_of(dataset_folder, count: int = 3, crop: str = "random", epoch: int = 0) -> dict:
    records = datasets.index_captioned_images(dataset_folder, datasets.SkipReport())[:count]
    images = datasets.ImageCaptionDataset(records, 32, crop=crop).for_epoch(epoch)
    return datasets.collate([images[index] for index in range(count)])


def test_sdxl_members_read_their_own_two_text_encoders_vae_scale_and_schedule(frozen):
    assert all(isinstance(encoder, SdxlTextEncoders) for encoder in frozen.text_encoders)
    assert frozen.distinct_text_encoders == 2  # each checkpoint has its own pair
    assert frozen.text_encoder.config.hidden_size == 32 + TINY_OPEN_CLIP["width"]  # CLIP-L's and the tower's
    assert frozen.vae.scale_factor == SDXL_SCALE_FACTOR and frozen.schedule.parameterization == "eps"
    assert len(frozen.layout.names) == 19  # 9/1/9


def test_the_scale_factor_of_an_sdxl_checkpoint_without_a_yaml_is_sdxl_s(tmp_path):
    bare = write_tiny_sdxl_checkpoint(tmp_path / "bare.safetensors", 3, with_yaml=False)
    assert not bare.with_suffix(".yaml").exists()
    from training.sd_checkpoint import read_sd_config
    assert read_sd_config(bare)["model"]["params"]["scale_factor"] == SDXL_SCALE_FACTOR


def test_images_carry_their_original_size_and_crop_which_reach_y(dataset, frozen):
    batch = batch_of(dataset)
    sizes = batch["sizes"]
    assert sizes.shape == (3, 6) and sizes.dtype == torch.int64
    assert sizes[:, :2].tolist() == [[32, 48]] * 3 and sizes[:, 4:].tolist() == [[32, 32]] * 3
    # shorter side 32 already: the random crop moves along the 48 px width only
    assert (sizes[:, 2] == 0).all() and 0 <= sizes[:, 3].min() and sizes[:, 3].max() <= 16
    center = batch_of(dataset, crop="center")["sizes"]
    assert center[:, 2:4].tolist() == [[0, 8]] * 3

    inputs = prepare_batch(batch, frozen.vae, frozen.text_encoders, frozen.schedule, seed=0, device=CPU)
    vectors = inputs["member_vectors"]
    assert len(vectors) == 2 and all(vector.shape == (3, Y_WIDTH) for vector in vectors)
    assert len(inputs["member_contexts"]) == 2 and inputs["member_contexts"][0].shape == (3, 77, 96)
    expected_sizes = size_embeddings(sizes[:, 0:2], sizes[:, 2:4], sizes[:, 4:6])
    for vector in vectors:
        torch.testing.assert_close(vector[:, POOLED:], expected_sizes, rtol=0, atol=0)
    # each member's pooled part is its own tower's
    assert not torch.equal(vectors[0][:, :POOLED], vectors[1][:, :POOLED])


def test_caption_dropout_zeroes_the_text_embeddings_and_keeps_the_sizes(dataset, frozen):
    batch = batch_of(dataset, count=2)
    token_ids = tokenize(batch["captions"])
    contexts, vectors = encode_for_members(frozen.text_encoders, token_ids, sizes=batch["sizes"],
                                           dropped=[True, False])
    kept, _ = encode_for_members(frozen.text_encoders, token_ids, sizes=batch["sizes"])
    for context, vector, full in zip(contexts, vectors, kept):
        assert (context[0] == 0).all() and (vector[0, :POOLED] == 0).all()  # what the WebUI's empty negative gets
        assert (vector[0, POOLED:] != 0).any()
        assert torch.equal(context[1], full[1])
    with pytest.raises(ValueError, match="size conditioning"):
        encode_for_members(frozen.text_encoders, token_ids)


def test_each_member_reads_its_own_y(frozen):
    ensemble = EnsembleUNet(frozen.members, None, "average")
    torch.manual_seed(0)
    x, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    context, y = torch.randn(2, 77, 96), torch.randn(2, Y_WIDTH)
    with torch.no_grad():
        shared = ensemble(x, timesteps, context, y=y)
        assert torch.equal(ensemble(x, timesteps, member_contexts=[context, context], member_vectors=[y, y]), shared)
        other = y + 1.0
        # each member's label embedding reads its own vector: changing either one changes the ensemble
        assert not torch.equal(ensemble(x, timesteps, member_contexts=[context, context], member_vectors=[other, y]),
                               shared)
        assert not torch.equal(ensemble(x, timesteps, member_contexts=[context, context], member_vectors=[y, other]),
                               shared)
        with pytest.raises(ValueError, match="3 member vectors for 2 members"):
            ensemble(x, timesteps, context, member_vectors=[y] * 3)


def test_sdxl_members_train_resume_to_the_same_weights_evaluate_and_inspect(members, dataset, tmp_path):
    assert train.main(trainer_args(members, dataset, tmp_path, "full", "--max-steps", "4")) == 0
    info = read_weights_info(tmp_path / "full.safetensors")
    assert info.config.context_dim == 96 and info.config.text_conditioning == "per_member"
    assert len(info.config.block_channels) == 19

    args = trainer_args(members, dataset, tmp_path, "resumed")
    assert train.main(args + ["--max-steps", "1"]) == 0
    assert train.main(args + ["--max-steps", "4", "--resume", "latest"]) == 0
    full, resumed = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    validation = [record["validation"] for record in log if "validation" in record][-1]
    rows = list(validation)  # the merge baselines too: the SDXL UNets' 19 MBW blocks and both text encoders merged
    assert rows[:2] == ["xl-1", "xl-2"] and rows[2].startswith("weighted merge (r=") and rows[3:] == [
        "MBW", "block average", "AFA"], rows

    report = tmp_path / "evaluation"
    assert evaluate.main(["--members", *map(str, members), "--data", str(dataset), "--resolution", "32",
                          "--draws", "2", "--batch-size", "8", "--figure-images", "1", "--figure-draws", "2",
                          "--weights", str(tmp_path / "full.safetensors"), "--output-dir", str(report)]) == 0
    results = json.loads((report / evaluate.RESULTS_FILE).read_text())
    assert {"xl-1", "xl-2", "AFA", "MBW"} <= set(results["models"]), results["models"].keys()
    mbw, = [merge for merge in results["merges"] if merge["kind"] == "MBW"]
    assert len(mbw["blocks"]) == 19 + 1 and mbw["blocks"][-1] == "BASE"  # IN00..OUT08, and the text encoders
    assert all((report / name).is_file() for name in results["figures"].values()) and len(results["figures"]) == 2

    inspected = run_afa("inspect", str(tmp_path / "full.safetensors"))
    assert inspected.returncode == 0, inspected.stderr
    assert "xl-1" in inspected.stdout and "mode sabw" in inspected.stdout


@pytest.mark.parametrize("flags", TRAINER_VARIANTS.values(), ids=TRAINER_VARIANTS.keys())
def test_the_ablation_flags_and_the_latent_cache_train_sdxl_members(members, dataset, tmp_path, flags):
    assert train.main(trainer_args(members, dataset, tmp_path, "run", "--max-steps", "2", *flags)) == 0
    info = read_weights_info(tmp_path / "run.safetensors")
    check_variant_config(info.config, flags)
    if "shared" in flags:
        cache = next((tmp_path / "run" / "latent-cache").iterdir())
        index = json.loads((cache / "index.json").read_text())
        assert all(sizes[2:4] == [0, 8] for sizes in index["sizes"].values())  # the centre crops' positions


def test_without_resolution_the_trainer_and_evaluator_use_the_members_native_size(members, tmp_path):
    from factories import write_tiny_sd2_checkpoint
    from training.sd_checkpoint import native_resolution

    sd2 = write_tiny_sd2_checkpoint(tmp_path / "sd2.safetensors", 1)
    sd2_base = write_tiny_sd2_checkpoint(tmp_path / "sd2-base.safetensors", 2, parameterization="eps")
    assert [native_resolution(path) for path in (members[0], sd2, sd2_base)] == [1024, 768, 512]
    assert native_resolution(tmp_path / "missing.safetensors") == 512  # loading it says what is wrong
    assert train.parse_args(["--members", *map(str, members), "--data", "x"]).resolution == 1024
    assert train.parse_args(["--members", str(sd2), str(sd2), "--data", "x", "--resolution", "64"]).resolution == 64
    assert evaluate.parse_args(["--members", str(sd2), str(sd2_base), "--data", "x"]).resolution == 768


def test_the_schedule_comes_from_sgms_denoiser_sigmas_and_its_scaling(tmp_path):
    """sgm stores its discrete denoiser's sigmas (sigma^2 = (1 - alphas_cumprod) / alphas_cumprod), not ldm's
    alphas_cumprod; a VScaling denoiser in the yaml is v-prediction."""
    import yaml
    from safetensors.torch import save_file

    from training.sd_checkpoint import load_schedule, read_sd_config, schedule_buffers

    path = write_tiny_sdxl_checkpoint(tmp_path / "xl-v.safetensors", 4)
    alphas_cumprod = schedule_buffers(0.001, 0.02)["alphas_cumprod"]  # not SDXL's default schedule
    tensors = load_file(str(path))
    tensors["denoiser.sigmas"] = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    save_file(tensors, str(path))
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    scaling = config["model"]["params"]["denoiser_config"]["params"]["scaling_config"]
    scaling["target"] = scaling["target"].replace("EpsScaling", "VScaling")
    path.with_suffix(".yaml").write_text(yaml.safe_dump(config))
    schedule = load_schedule(path, read_sd_config(path))
    assert schedule.parameterization == "v"
    torch.testing.assert_close(schedule.alphas_cumprod.float(), alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_on_a_gpu_with_mixed_precision_the_text_encoders_are_kept_in_half_precision(members, dataset):
    """train.py keeps the text encoders in the members' dtype on CUDA (SDXL's pair: 1.6 GB instead of 3.3 GB);
    the conditioning they give then reaches the members as on a GPU (checked here in bfloat16 on the CPU)."""
    assert train.text_encoder_dtype(torch.float16, torch.device("cuda", 0)) is torch.float16
    assert train.text_encoder_dtype(torch.bfloat16, torch.device("cuda", 0)) is torch.bfloat16
    assert train.text_encoder_dtype(torch.float32, torch.device("cpu")) is None

    half = load_frozen_models(members, text_encoder_dtype=torch.bfloat16)
    assert {parameter.dtype for encoder in half.text_encoders for parameter in encoder.parameters()} == {torch.bfloat16}
    assert half.distinct_text_encoders == 2 and half.vae.parts["encoder"].conv_in.weight.dtype == torch.float32
    inputs = prepare_batch(batch_of(dataset), half.vae, half.text_encoders, half.schedule, seed=0, device=CPU)
    assert inputs["member_contexts"][0].dtype == torch.bfloat16 and inputs["member_vectors"][0].dtype == torch.bfloat16
    ensemble = EnsembleUNet(half.members, None, "average")
    with torch.no_grad():
        prediction = ensemble(inputs["noisy"], inputs["timesteps"], member_contexts=inputs["member_contexts"],
                              member_vectors=inputs["member_vectors"])
    assert prediction.dtype == torch.float32 and torch.isfinite(prediction).all()


def test_whether_a_checkpoint_is_sdxl_is_read_once_per_file_version(members, tmp_path, monkeypatch):
    """A .ckpt is read whole to list its keys: the resolution default, the config defaults and the text encoders
    ask the same question of it, and only the first reads the file (until the file changes)."""
    path = tmp_path / "copy.safetensors"
    shutil.copyfile(members[0], path)
    reads = []
    original = sd_checkpoint.read_prefixed_tensors
    monkeypatch.setattr(sd_checkpoint, "read_prefixed_tensors", lambda *a, **k: reads.append(a) or original(*a, **k))
    assert all(sd_checkpoint.is_sdxl_checkpoint(path) for _ in range(3)) and len(reads) == 1
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert sd_checkpoint.is_sdxl_checkpoint(path) and len(reads) == 2
