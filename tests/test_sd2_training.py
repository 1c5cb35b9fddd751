"""SD 2.x-v members in the trainer and the evaluator: the OpenCLIP text tower from `cond_stage_model.model.*`, its
penultimate layer with 0 padding after EOS (the WebUI's SD2 conditioning), v-prediction targets from the yaml's
`parameterization: v`; training, resuming to the same weights, and evaluation on tiny random SD 2.x-v checkpoints
(tests/factories.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from afa import read_weights_info
from factories import (TINY_OPEN_CLIP, TRAINER_VARIANTS, check_variant_config, trainer_args,
                       write_captioned_images, write_tiny_sd2_checkpoint)
from training import evaluate, train
from training.open_clip_text import PAD_ID, OpenClipTextEncoder, pad_after_end
from training.sd_checkpoint import load_frozen_models
from training.text_encoder import END_OF_TEXT_ID, encode, tokenize


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd2")
    return [write_tiny_sd2_checkpoint(folder / f"sd2-{seed}.safetensors", seed) for seed in (1, 2)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_captioned_images(tmp_path_factory.mktemp("data"), width=40, height=40)


def test_the_open_clip_tower_loads_from_the_checkpoint_and_encodes_the_penultimate_layer(members):
    frozen = load_frozen_models(members)
    assert frozen.schedule.parameterization == "v"
    encoders = frozen.text_encoders
    assert all(isinstance(encoder, OpenClipTextEncoder) for encoder in encoders) and encoders[0] is not encoders[1]
    assert encoders[0].config.hidden_size == TINY_OPEN_CLIP["width"] == 64
    token_ids = tokenize(["a photo of a cat", ""])
    padded = pad_after_end(token_ids, END_OF_TEXT_ID)
    end = token_ids[0].tolist().index(END_OF_TEXT_ID)
    assert padded[0, end] == END_OF_TEXT_ID and (padded[0, end + 1:] == PAD_ID).all()
    assert padded[1, :2].tolist() == token_ids[1, :2].tolist() and (padded[1, 2:] == PAD_ID).all()
    context = encode(encoders[0], token_ids, clip_skip=1)
    assert context.shape == (2, 77, 64)
    # penultimate: the last block does not take part; CLIP skip does not apply (as in the WebUI)
    with torch.no_grad():
        for parameter in encoders[0].transformer.resblocks[-1].parameters():
            parameter.add_(1.0)
    assert torch.equal(encode(encoders[0], token_ids), context)
    assert torch.equal(encode(encoders[0], token_ids, clip_skip=2), context)


def test_sd2_v_members_train_resume_to_the_same_weights_and_evaluate(members, dataset, tmp_path):
    assert train.main(trainer_args(members, dataset, tmp_path, "full", "--max-steps", "4")) == 0
    info = read_weights_info(tmp_path / "full.safetensors")
    assert info.config.context_dim == 64 and info.config.text_conditioning == "per_member"

    args = trainer_args(members, dataset, tmp_path, "resumed")
    assert train.main(args + ["--max-steps", "1"]) == 0
    assert train.main(args + ["--max-steps", "4", "--resume", "latest"]) == 0
    full, resumed = load_file(str(tmp_path / "full.safetensors")), load_file(str(tmp_path / "resumed.safetensors"))
    assert all(torch.equal(full[k], resumed[k]) for k in full)

    report = tmp_path / "evaluation"
    assert evaluate.main(["--members", *map(str, members), "--data", str(dataset), "--resolution", "32",
                          "--draws", "2", "--batch-size", "8", "--figure-images", "1", "--figure-draws", "2",
                          "--weights", str(tmp_path / "full.safetensors"), "--output-dir", str(report)]) == 0
    results = json.loads((report / evaluate.RESULTS_FILE).read_text())
    rows = results["rows"] if "rows" in results else results
    assert "sd2-1" in json.dumps(rows) and "AFA" in json.dumps(rows), results
    assert [merge["kind"] for merge in results["merges"]] == ["weighted merge", "MBW"]
    assert len(results["merges"][1]["blocks"]) in (25, 26)  # IN00..OUT11 (and BASE when the towers differ)


@pytest.mark.parametrize("flags", TRAINER_VARIANTS.values(), ids=TRAINER_VARIANTS.keys())
def test_the_ablation_flags_and_the_latent_cache_train_sd2_members(members, dataset, tmp_path, flags):
    assert train.main(trainer_args(members, dataset, tmp_path, "run", "--max-steps", "2", *flags)) == 0
    info = read_weights_info(tmp_path / "run.safetensors")
    assert info.config.context_dim == 64
    check_variant_config(info.config, flags)


def test_afa_check_and_inspect_read_sd2_members(members):
    from test_cli import run_afa

    checked = run_afa("check", *map(str, members))
    assert checked.returncode == 0, checked.stderr
    inspected = run_afa("inspect", str(members[0]))
    assert inspected.returncode == 0, inspected.stderr
    assert '"context_dim": 64' in inspected.stdout and "24  output_blocks.11" in inspected.stdout, inspected.stdout
