"""The tiny checkpoints' yaml as a real WebUI reads it: its text encoder is built by the real ldm
`FrozenCLIPEmbedder` (stable-diffusion-sdkit's `ldm`, the same class as in the WebUI's
repositories/stable-diffusion-stability-ai) from the folder the yaml names, offline, and encodes prompts exactly as
the trainer does; the text encoder folder itself (files, idempotent and parallel writes); and what the trainer reads
from member checkpoints (each member's own text encoder, one module for identical ones; the VAE posterior)."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import socket
import sys
import threading
import types

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from training.sd_checkpoint import (TEXT_ENCODER_PREFIX, TINY_CLIP_TEXT_CONFIG, TINY_TEXT_ENCODER_FOLDER_NAME,
                                    load_text_encoders, load_vae, read_sd_config,
                                    tiny_sd_config, tiny_sd_state_dict, write_webui_checkpoint)
from training.text_encoder import encode, load_text_encoder, tokenize, write_text_encoder_folder

PROMPTS = ["a photo of a cat, by greg rutkowski", "", "a red circle and a blue square on a white background"]


@pytest.fixture
def no_network(monkeypatch):
    """No hub access: any connection attempt fails the test (transformers read HF_HUB_OFFLINE when it was imported,
    so setting it now is not enough on its own)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def real_ldm_encoders(monkeypatch):
    """The real `ldm.modules.encoders.modules`, imported afresh. It imports `open_clip` at the top, whose package
    imports torchvision, which this environment keeps out; FrozenCLIPEmbedder does not use it, so a bare stub stands
    in during the import only (and the module is dropped again afterwards, so nothing else sees the stub)."""
    name = "ldm.modules.encoders.modules"
    previous = sys.modules.pop(name, None)
    try:
        with monkeypatch.context() as during_import:
            during_import.setitem(sys.modules, "open_clip", types.ModuleType("open_clip"))
            module = importlib.import_module(name)
        yield module
    finally:
        sys.modules.pop(name, None)
        if previous is not None:
            sys.modules[name] = previous


@pytest.fixture
def webui_clip_from_pretrained(monkeypatch):
    """What the WebUI's model loading does to `CLIPTextModel.from_pretrained` (modules/sd_disable_initialization.py,
    DisableInitialization, v1.10): the text model is built from the config that `version` names, with an empty state
    dict, and the checkpoint's tensors are loaded into it afterwards. So no weights file is read."""
    original = transformers.CLIPTextModel.from_pretrained

    def from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs):
        model = original(None, *model_args, config=pretrained_model_name_or_path, state_dict={}, **kwargs)
        model.name_or_path = pretrained_model_name_or_path
        return model

    monkeypatch.setattr(transformers.CLIPTextModel, "from_pretrained", from_pretrained)


def test_the_real_ldm_frozen_clip_embedder_builds_the_tiny_text_encoder_from_the_yaml(
        tmp_path, no_network, real_ldm_encoders, webui_clip_from_pretrained):
    from ldm.util import instantiate_from_config

    state_dict = tiny_sd_state_dict(0)
    path = write_webui_checkpoint(tmp_path / "tiny.safetensors", state_dict,
                                  tiny_sd_config(tmp_path / TINY_TEXT_ENCODER_FOLDER_NAME))
    config = yaml.safe_load(path.with_suffix(".yaml").read_text(encoding="utf-8"))
    cond_stage_config = config["model"]["params"]["cond_stage_config"]
    assert cond_stage_config["params"] == {"version": str(tmp_path / TINY_TEXT_ENCODER_FOLDER_NAME)}

    embedder = instantiate_from_config(cond_stage_config)  # FrozenCLIPEmbedder(**params), as ldm's LatentDiffusion
    assert type(embedder) is real_ldm_encoders.FrozenCLIPEmbedder
    assert embedder.transformer.config.hidden_size == 32
    assert embedder.tokenizer.pad_token == "<|endoftext|>" and embedder.tokenizer.model_max_length == 77
    # ldm's FrozenCLIPEmbedder.forward tokenization gives the trainer's ids
    ids = embedder.tokenizer(PROMPTS, truncation=True, max_length=77, return_length=True,
                             return_overflowing_tokens=False, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, tokenize(PROMPTS))

    # with the checkpoint's tensors loaded (as the WebUI does next), its conditioning is the trainer's
    embedder.transformer.load_state_dict({key[len(TEXT_ENCODER_PREFIX):]: value for key, value in state_dict.items()
                                          if key.startswith(TEXT_ENCODER_PREFIX)})
    embedder.device = "cpu"  # the yaml leaves ldm's default, "cuda"
    with torch.no_grad():
        context = embedder(PROMPTS)
    assert torch.equal(context, encode(load_text_encoder(state_dict, config), tokenize(PROMPTS)))


def test_the_stand_in_frozen_clip_embedder_has_the_real_signature(real_ldm_encoders):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "webui_standin"))
    try:
        from modules import standin_ldm
    finally:
        sys.path.pop(0)
    assert inspect.signature(standin_ldm.FrozenCLIPEmbedder.__init__) == \
        inspect.signature(real_ldm_encoders.FrozenCLIPEmbedder.__init__)


def test_text_encoder_folder_holds_the_config_and_the_sd1_tokenizer_files(tmp_path, no_network):
    folder = write_text_encoder_folder(tmp_path / "relative" / ".." / "clip-text", TINY_CLIP_TEXT_CONFIG)
    assert folder == (tmp_path / "clip-text") and folder.is_absolute()
    assert sorted(entry.name for entry in folder.iterdir()) == [
        "config.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert {key: config[key] for key in TINY_CLIP_TEXT_CONFIG} == TINY_CLIP_TEXT_CONFIG
    assert config["model_type"] == "clip_text_model"
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert torch.equal(tokenizer(PROMPTS, truncation=True, max_length=77, padding="max_length",
                                 return_tensors="pt")["input_ids"], tokenize(PROMPTS))


def test_writing_the_folder_again_is_idempotent_and_repairs_a_damaged_file(tmp_path):
    folder = write_text_encoder_folder(tmp_path / "clip-text", TINY_CLIP_TEXT_CONFIG)
    contents = {entry.name: entry.read_bytes() for entry in folder.iterdir()}
    modified = {entry.name: entry.stat().st_mtime_ns for entry in folder.iterdir()}
    (folder / "vocab.json").write_bytes(contents["vocab.json"][:1000])  # as a killed writer might have left it

    write_text_encoder_folder(folder, TINY_CLIP_TEXT_CONFIG)
    assert {entry.name: entry.read_bytes() for entry in folder.iterdir()} == contents
    assert all(entry.stat().st_mtime_ns == modified[entry.name] for entry in folder.iterdir()
               if entry.name != "vocab.json")


def test_parallel_writers_leave_complete_files(tmp_path):
    folder = tmp_path / "clip-text"
    errors = []

    def write():
        try:
            write_text_encoder_folder(folder, TINY_CLIP_TEXT_CONFIG)
            transformers.CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
            transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(entry.name for entry in folder.iterdir()) == [
        "config.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


# -- what the trainer reads from member checkpoints ----------------------------------------------------------------

def test_each_member_gets_its_own_text_encoder_and_identical_ones_are_one_module(checkpoint_factory):
    first, twin, other = checkpoint_factory(1), checkpoint_factory(1, name="twin"), checkpoint_factory(2)
    encoders = load_text_encoders([first, other, twin])
    assert encoders[0] is encoders[2] and encoders[0] is not encoders[1]
    token_ids = tokenize(PROMPTS)
    for path, encoder in zip([first, other], encoders):
        config = yaml.safe_load(path.with_suffix(".yaml").read_text(encoding="utf-8"))
        expected = load_text_encoder(load_file(str(path)), config)
        assert torch.equal(encode(encoder, token_ids), encode(expected, token_ids))


def test_the_vae_posterior_is_the_mean_encode_returns_and_its_clamped_std(checkpoint_factory):
    path = checkpoint_factory(0)
    vae = load_vae(path, read_sd_config(path))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = vae.posterior(images)
    assert torch.equal(mean, vae.encode(images)) and mean.shape == std.shape == (2, 4, 16, 16)
    with torch.no_grad():
        _, log_variance = vae.parts["quant_conv"](vae.parts["encoder"](images)).chunk(2, dim=1)
    torch.testing.assert_close(std, torch.exp(0.5 * log_variance.clamp(-30, 20)) * vae.scale_factor)
