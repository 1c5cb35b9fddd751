"""Loading members from WebUI checkpoints, compatibility checks, hashing, and every bad input a user can give."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from afa import (PRESETS, CheckpointError, build_unet, IncompatibleMembersError, block_layout, check_members, file_sha256,
                 load_member, read_unet_shapes, read_unet_state_dict, unet_shapes)
from afa.unet import UNET_KEY_PREFIX, infer_unet_params
from training.sd_checkpoint import tiny_sd_state_dict

SD15_CHANNELS = (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280,  # input blocks
                 1280,  # middle block
                 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 4)  # output blocks (+ head)


def test_sd15_block_layout_and_shape_inference():
    with torch.device("meta"):
        shapes = {name: unet_shapes(build_unet(params)) for name, params in PRESETS.items()}
    layout = block_layout(shapes["sd15"])
    assert layout.channels == SD15_CHANNELS
    assert layout.names[0] == "input_blocks.0" and layout.names[12] == "middle_block"
    assert layout.names[24] == "output_blocks.11"
    assert layout.downsampling == (1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1)
    for name in ("sd15", "sd21"):  # shapes + SD conventions recover the exact constructor parameters
        inferred = infer_unet_params(shapes[name])
        assert {k: v for k, v in inferred.items() if k != "image_size"} == \
            {k: v for k, v in PRESETS[name].items() if k != "image_size"}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_load_member_matches_the_checkpoint(checkpoint_factory, suffix):
    path = checkpoint_factory(1, suffix=suffix)
    unet = load_member(path)
    expected = {k[len(UNET_KEY_PREFIX):]: v for k, v in tiny_sd_state_dict(1).items() if k.startswith(UNET_KEY_PREFIX)}
    state = unet.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for p in unet.parameters()) and not unet.training


def test_members_differ_by_seed(checkpoint_factory):
    first, second = (load_member(checkpoint_factory(seed)) for seed in (1, 2))
    assert not torch.equal(first.input_blocks[0][0].weight, second.input_blocks[0][0].weight)


def test_fp16_checkpoint_loads_as_fp16_without_fp32_copy(checkpoint_factory, monkeypatch):
    path = checkpoint_factory(1, dtype=torch.float16)
    built_on = []
    from afa import members as members_module
    original_build = members_module.build_unet
    monkeypatch.setattr(members_module, "build_unet",
                        lambda params, device=None: built_on.append(device) or original_build(params, device))
    unet = load_member(path)
    assert {p.dtype for p in unet.parameters()} == {torch.float16}
    assert built_on == ["meta"]  # the module never allocated weights of its own: it adopted the fp16 tensors
    # cast while reading: fp32 file -> bf16 member
    assert {p.dtype for p in load_member(checkpoint_factory(1), dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_bare_unet_state_dict_and_inferred_architecture(checkpoint_factory, tmp_path):
    """A file with only UNet keys and no yaml: the architecture is inferred, heads from the yaml-less default."""
    state = read_unet_state_dict(checkpoint_factory(1))
    path = tmp_path / "bare.safetensors"
    save_file(state, str(path))
    shapes = read_unet_shapes(path)
    assert shapes == {k: tuple(v.shape) for k, v in state.items()}
    params = infer_unet_params(shapes)
    assert params["model_channels"] == 32 and params["context_dim"] == 32 and params["channel_mult"] == [1, 1, 2, 2]
    unet = load_member(path)  # builds with the SD1 head convention (8 heads): shapes are the same
    assert unet_shapes(unet) == shapes


def test_yaml_beside_the_checkpoint_is_used(checkpoint_factory, tmp_path):
    source = checkpoint_factory(1)
    path = tmp_path / "copy.safetensors"
    shutil.copy(source, path)
    shutil.copy(source.with_suffix(".yaml"), path.with_suffix(".yaml"))
    assert load_member(path).num_heads == PRESETS["tiny"]["num_heads"]
    path.with_suffix(".yaml").write_text("model: {params: {}}")
    with pytest.raises(CheckpointError, match="copy.yaml: not a model config .need model.params.unet_config.params, or model.params.network_config.params"):
        load_member(path)


def test_yaml_that_does_not_match_the_weights(checkpoint_factory, tmp_path):
    source = checkpoint_factory(1)
    path = tmp_path / "mismatch.safetensors"
    shutil.copy(source, path)
    path.with_suffix(".yaml").write_text(source.with_suffix(".yaml").read_text().replace("model_channels: 32",
                                                                                        "model_channels: 64"))
    with pytest.raises(CheckpointError, match=r"mismatch.safetensors: the UNet weights do not match .*first "
                                              r"differing key \S+: \((64|256), .*\) in the config, \((32|128), .*\) "
                                              r"in the file"):
        load_member(path)


def test_check_members(checkpoint_factory, tiny_params):
    first, second = checkpoint_factory(1), checkpoint_factory(2)
    layout = check_members([(p.name, read_unet_shapes(p)) for p in (first, second)])
    assert len(layout) == 25 and layout.channels[-1] == 4


def test_member_of_other_channels_is_refused(checkpoint_factory, tiny_params):
    wide = checkpoint_factory(3, name="wide", unet_params=dict(tiny_params, model_channels=64))
    with pytest.raises(IncompatibleMembersError,
                       match=r"wide cannot be ensembled with member1.*first differing key \S+: \(32,.*\) in member1\S*, "
                             r"\(64,.*\) in wide"):
        check_members([(p.stem, read_unet_shapes(p)) for p in (checkpoint_factory(1), wide)])


def test_sd2_member_among_sd1_members_is_refused(checkpoint_factory, tiny_params):
    sd2 = dict(tiny_params, use_linear_in_transformer=True, context_dim=64, num_head_channels=16)
    sd2.pop("num_heads")
    path = checkpoint_factory(4, name="sd2like", unet_params=sd2)
    with pytest.raises(IncompatibleMembersError, match=r"sd2like cannot be ensembled .* \(32, 32\) in .*\(32, 64\)|"
                                                       r"sd2like cannot be ensembled .*first differing key"):
        check_members([(p.stem, read_unet_shapes(p)) for p in (checkpoint_factory(1), path)])


def test_fewer_than_two_members(checkpoint_factory):
    with pytest.raises(IncompatibleMembersError, match="at least 2 members, got 1"):
        check_members([("only", read_unet_shapes(checkpoint_factory(1)))])


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothere.safetensors: file not found"):
        load_member(tmp_path / "nothere.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors(checkpoint_factory, tmp_path, damage):
    data = checkpoint_factory(1).read_bytes()
    path = tmp_path / f"{damage}.safetensors"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00not a model" * 10)
    with pytest.raises(CheckpointError, match=rf"{damage}.safetensors: not a readable safetensors file"):
        load_member(path)
    with pytest.raises(CheckpointError, match=rf"{damage}.safetensors"):
        read_unet_shapes(path)


class _Payload:
    """Unpickling this runs code: exactly what a malicious .ckpt does."""

    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_ckpt_that_needs_code_execution_is_refused(checkpoint_factory, tmp_path, monkeypatch):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": read_unet_state_dict(checkpoint_factory(1)), "payload": _Payload()}, path)
    ran = []
    monkeypatch.setattr(os, "system", lambda command: ran.append(command))
    with pytest.raises(CheckpointError, match=r"evil.ckpt: refusing to load: this .ckpt needs pickle code execution"):
        load_member(path)
    assert ran == []


def test_not_a_unet(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match=r"vae.safetensors: no Stable Diffusion UNet in this file"):
        load_member(path)


def test_sha256_is_the_full_file_hash_and_cached(checkpoint_factory, tmp_path, monkeypatch):
    path = tmp_path / "hashed.safetensors"
    shutil.copy(checkpoint_factory(1), path)
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert file_sha256(path) == expected
    from afa import hashing
    hashing._memory.clear()  # a new process: the disk cache answers without reading the file
    monkeypatch.setattr(hashing, "open", lambda *a, **k: pytest.fail("re-hashed a cached file"), raising=False)
    assert file_sha256(path) == expected
    monkeypatch.undo()
    path.write_bytes(b"changed")  # a changed file is hashed again
    assert file_sha256(path) == hashlib.sha256(b"changed").hexdigest()


def _misaligned_copy(path, tmp_path):
    """The checkpoint at `path` rewritten with a 12-byte tensor stored first, so that every other tensor sits 12
    bytes (mod 16) past where it was: views into the file's memory map are then off 16-byte boundaries."""
    from safetensors.torch import load_file
    tensors = load_file(str(path))
    tensors["aaa_padding"] = torch.zeros(3, dtype=torch.float32)  # sorts first among the float32 tensors
    misaligned = tmp_path / "misaligned.safetensors"
    save_file(tensors, str(misaligned))
    return misaligned


def _views_off_16_bytes(path) -> int:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as handle:
        return sum(handle.get_tensor(key).data_ptr() % 16 != 0 for key in handle.keys())


@pytest.mark.parametrize("dtype", [None, torch.float32, torch.float16])
def test_loaded_members_own_aligned_memory(checkpoint_factory, tmp_path, dtype):
    """Every parameter is a fresh 64-byte-aligned allocation, never a view into the file's map (issue 17: MKL's
    sgemv rounds differently for unaligned matrices, so an ensemble of identical members drifted from the member)."""
    path = _misaligned_copy(checkpoint_factory(1), tmp_path)
    assert _views_off_16_bytes(path) > 0  # the file really offers unaligned views: the check below can fail
    unet = load_member(path, dtype=dtype)
    assert all(parameter.data_ptr() % 64 == 0 for parameter in unet.state_dict().values())
    assert all(tensor.data_ptr() % 64 == 0 for tensor in read_unet_state_dict(path, dtype).values())


def test_a_loaded_member_survives_its_file_rewritten_in_place(checkpoint_factory, tmp_path):
    path = tmp_path / "rewritten.safetensors"
    shutil.copy(checkpoint_factory(1), path)
    unet = load_member(path)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    with open(path, "r+b") as handle:  # truncated, then another checkpoint written at the same path
        handle.truncate(0)
    shutil.copyfile(checkpoint_factory(2), path)
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_unet_fingerprint_is_the_same_from_the_file_and_the_loaded_unet_in_any_precision(checkpoint_factory):
    from afa.hashing import unet_fingerprint
    from afa.members import MemberRef, unet_fingerprint_of_file

    path = checkpoint_factory(1)
    from_file = unet_fingerprint_of_file(path)
    for dtype in (None, torch.float16, torch.bfloat16):
        state = load_member(path, dtype=dtype).state_dict()
        fingerprint = unet_fingerprint(state, state.__getitem__)
        assert fingerprint == from_file or dtype is torch.bfloat16  # bf16 rounds otherwise than fp16
    assert unet_fingerprint_of_file(checkpoint_factory(1, dtype=torch.float16)) == from_file  # an fp16 copy
    assert unet_fingerprint_of_file(checkpoint_factory(2)) != from_file
    assert MemberRef.from_file(path, with_unet=True).unet == from_file
    assert MemberRef.from_file(path).unet is None
    state = load_member(path).state_dict()
    state["out.2.bias"] = state["out.2.bias"] + 1e-2  # one changed tensor changes it
    assert unet_fingerprint(state, state.__getitem__) != from_file
