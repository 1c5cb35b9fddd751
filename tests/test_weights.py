"""SABW weights files: bit-exact round trip, metadata, strict loading and member binding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_
from safetensors import safe_open
from safetensors.torch import save_file

from afa import (FORMAT_VERSION, Aggregator, AggregatorConfig, MemberRef, MembersMismatchError, WeightsFileError,
                 load_weights, read_weights_info, save_weights)

CHANNELS = [32] * 7 + [64] * 12 + [32] * 5 + [4]
MEMBERS = [MemberRef("alpha", "a" * 64), MemberRef("beta", "b" * 64)]


def make_aggregator(num_members: int = 2, **overrides) -> Aggregator:
    config = AggregatorConfig(num_members, CHANNELS, hidden_channels=32, num_heads=2, context_dim=32, **overrides)
    torch.manual_seed(0)
    return randomize_(Aggregator(config), seed=1)


def test_round_trip_is_bit_exact(tmp_path):
    aggregator = make_aggregator(spatial=False, max_resolution=None)
    training = {"steps": 120, "dataset_size": 10000, "date": "2026-11-26"}
    path = save_weights(tmp_path / "w.safetensors", aggregator, MEMBERS, training)
    loaded, info = load_weights(path, MEMBERS)
    assert loaded.config == aggregator.config
    original, restored = aggregator.state_dict(), loaded.state_dict()
    assert set(original) == set(restored)
    assert all(torch.equal(original[k], restored[k]) and original[k].dtype == restored[k].dtype for k in original)
    assert info.members == MEMBERS and info.training == training and info.format_version == FORMAT_VERSION
    assert info.mode.name == "sabw"
    assert not list(tmp_path.glob("*.tmp"))  # written under a temporary name, then renamed


def test_fp16_storage_and_metadata_only_reads(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(only_last_block=True), MEMBERS, dtype=torch.float16)
    with safe_open(str(path), "pt") as handle:
        assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float16}
        metadata = handle.metadata()
    assert json.loads(metadata["afa_members"])[1] == {"name": "beta", "sha256": "b" * 64}
    assert json.loads(metadata["afa_config"])["only_last_block"] is True
    info = read_weights_info(path)
    assert info.mode.name == "last-block" and info.config.num_members == 2
    aggregator, _ = load_weights(path, dtype=torch.float32)
    assert {p.dtype for p in aggregator.parameters()} == {torch.float32}


def test_other_members_are_refused(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS)
    other = [MEMBERS[0], MemberRef("gamma", "c" * 64)]
    with pytest.raises(MembersMismatchError, match=r"w.safetensors: .*trained for 2 other members.*\n.*expected: "
                                                   r"alpha \[aaaaaaaaaa\], beta \[bbbbbbbbbb\]\n.*given: +alpha "
                                                   r"\[aaaaaaaaaa\], gamma \[cccccccccc\]"):
        load_weights(path, other)


def test_a_different_number_of_members_is_refused(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS)
    with pytest.raises(MembersMismatchError, match="expected: alpha .*beta .*\n.*given: +alpha .*beta .*gamma"):
        load_weights(path, MEMBERS + [MemberRef("gamma", "c" * 64)])


def test_reordered_members_get_the_right_order_in_the_message(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS)
    with pytest.raises(MembersMismatchError, match=r"same members in another order; give them as: alpha .*, beta"):
        load_weights(path, MEMBERS[::-1])


def _rewrite(path, tmp_path, name, edit_tensors=None, edit_metadata=None):
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        metadata = handle.metadata()
    if edit_tensors:
        edit_tensors(tensors)
    if edit_metadata:
        edit_metadata(metadata)
    target = tmp_path / name
    save_file(tensors, str(target), metadata=metadata)
    return target


def test_missing_and_extra_keys_are_named(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS)
    missing = _rewrite(path, tmp_path, "missing.safetensors",
                       edit_tensors=lambda t: t.pop("middle_block.out.2.weight"))
    with pytest.raises(WeightsFileError, match=r"missing.safetensors: tensors do not match .*1 keys missing from the "
                                               r"file, e.g. middle_block.out.2.weight"):
        load_weights(missing)
    extra = _rewrite(path, tmp_path, "extra.safetensors",
                     edit_tensors=lambda t: t.update({"input_blocks.0.surprise": torch.zeros(3)}))
    with pytest.raises(WeightsFileError, match=r"extra.safetensors: .*1 keys only in the file, e.g. "
                                               r"input_blocks.0.surprise"):
        load_weights(extra)
    reshaped = _rewrite(path, tmp_path, "reshaped.safetensors",
                        edit_tensors=lambda t: t.update({"time_embed.0.weight": torch.zeros(3, 3)}))
    with pytest.raises(WeightsFileError, match=r"first differing key time_embed.0.weight: \(128, 32\) in the "
                                               r"config, \(3, 3\) in the file"):
        load_weights(reshaped)


def test_newer_format_version_is_refused(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS)
    newer = _rewrite(path, tmp_path, "newer.safetensors",
                     edit_metadata=lambda m: m.update({"afa_format_version": str(FORMAT_VERSION + 1)}))
    with pytest.raises(WeightsFileError, match=rf"newer.safetensors: weights format version {FORMAT_VERSION + 1} is "
                                               rf"newer than this AFA supports \({FORMAT_VERSION}\)"):
        read_weights_info(newer)


def test_damaged_config_and_non_afa_files(tmp_path):
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS)
    unknown = _rewrite(path, tmp_path, "unknown.safetensors", edit_metadata=lambda m: m.update(
        {"afa_config": json.dumps({**json.loads(m["afa_config"]), "colour": "red"})}))
    with pytest.raises(WeightsFileError, match=r"unknown.safetensors: aggregator config has unknown fields "
                                               r"\['colour'\]"):
        read_weights_info(unknown)
    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(1)}, str(plain))
    with pytest.raises(WeightsFileError, match="plain.safetensors: not an AFA weights file"):
        load_weights(plain)
    with pytest.raises(WeightsFileError, match="absent.safetensors: weights file not found"):
        load_weights(tmp_path / "absent.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsFileError, match="truncated.safetensors: not a readable safetensors file"):
        load_weights(truncated)


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 32"):
        AggregatorConfig(2, CHANNELS, hidden_channels=48)
    with pytest.raises(ValueError, match="at least 2"):
        AggregatorConfig(1, CHANNELS)
    with pytest.raises(ValueError, match="odd number"):
        AggregatorConfig(2, CHANNELS[:-1])


def test_default_width_lands_sd15_in_the_papers_range():
    """Paper: 42.4M trainable parameters for SD 1.5 with N=2; the issue asks for 35M-55M."""
    from afa import PRESETS, block_layout, build_unet, default_config, unet_shapes

    with torch.device("meta"):
        layout = block_layout(unet_shapes(build_unet(PRESETS["sd15"])))
        counts = [sum(p.numel() for p in Aggregator(default_config(layout, n, 768)).parameters()) for n in (2, 3)]
    assert 35e6 <= counts[0] <= 55e6
    assert 2e6 <= counts[1] - counts[0] <= 5e6  # paper: +2.7M per extra member


def test_loaded_aggregators_own_aligned_memory(tmp_path):
    """A weights file's tensors sit where safetensors put them (many off 16-byte boundaries); the loaded
    aggregator's are fresh 64-byte-aligned allocations, in the stored dtype and cast."""
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS)
    with safe_open(str(path), framework="pt") as handle:  # the precondition: the check below can fail
        assert any(handle.get_tensor(k).data_ptr() % 16 for k in handle.keys())
    for dtype in (None, torch.float16):
        loaded, _ = load_weights(path, MEMBERS, dtype=dtype)
        assert all(tensor.data_ptr() % 64 == 0 for tensor in loaded.state_dict().values())


def test_unet_fingerprints_are_recorded_and_checked_in_order(tmp_path):
    from afa.weights import check_member_fingerprints

    members = [MemberRef("alpha", "a" * 64, "1" * 64), MemberRef("beta", "b" * 64, "2" * 64)]
    path = save_weights(tmp_path / "w.safetensors", make_aggregator(), members)
    info = read_weights_info(path)
    assert info.members == members
    assert check_member_fingerprints(info, ["1" * 64, "2" * 64], ["model_1", "model_2"]) is True
    with pytest.raises(MembersMismatchError, match="same members in another order; connect them as member 1: alpha"):
        check_member_fingerprints(info, ["2" * 64, "1" * 64], ["model_1", "model_2"])
    with pytest.raises(MembersMismatchError, match=r"other members(.|\n)*expected: alpha \[1111111111\]"):
        check_member_fingerprints(info, ["1" * 64, "3" * 64], ["model_1", "model_2"])
    with pytest.raises(MembersMismatchError, match="for 2 members .alpha, beta.; 3 were given"):
        check_member_fingerprints(info, ["1" * 64] * 3, ["model_1", "model_2", "model_3"])
    # a file written before fingerprints: nothing to check, and the caller is told so
    legacy = save_weights(tmp_path / "legacy.safetensors", make_aggregator(), MEMBERS)
    assert check_member_fingerprints(read_weights_info(legacy), ["1" * 64, "2" * 64], ["a", "b"]) is False
    with safe_open(str(legacy), framework="pt") as handle:
        assert "unet" not in handle.metadata()["afa_members"]  # older readers see what they always saw


def test_weights_that_do_not_fit_the_members_are_refused(tmp_path):
    from afa.weights import check_weights_fit

    info = read_weights_info(save_weights(tmp_path / "w.safetensors", make_aggregator(), MEMBERS))
    check_weights_fit(info, CHANNELS, 32, 2)
    with pytest.raises(MembersMismatchError, match="trained for 2 members, 3 given"):
        check_weights_fit(info, CHANNELS, 32, 3)
    sdxl_like = [320] * 4 + [640] * 3 + [1280] * 5 + [640] * 3 + [320] * 3 + [4]
    with pytest.raises(MembersMismatchError, match="UNets of 25 blocks .* the members have 19 blocks"):
        check_weights_fit(info, sdxl_like, 2048, 2)
    with pytest.raises(MembersMismatchError, match="text conditioning 32 wide, the members read 768"):
        check_weights_fit(info, CHANNELS, 768, 2)
