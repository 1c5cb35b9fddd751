"""The trainer's SD1 text encoder: the offline tokenizer's ids, SD1 padding/truncation, and loading the text model
out of a WebUI checkpoint (key variants, dtype, shape errors, unsupported families, the text config read from the
folder the yaml's `version` names)."""

from __future__ import annotations

import importlib.util
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel

from afa.errors import AfaError, CheckpointError
from training import text_encoder as text_encoder_module
from training.sd_checkpoint import TEXT_ENCODER_PREFIX, TINY_CLIP_TEXT_CONFIG, tiny_sd_state_dict
from training.text_encoder import (END_OF_TEXT_ID, START_OF_TEXT_ID, UnsupportedTextEncoderError, encode,
                                   load_text_encoder, sd1_text_config, sd1_tokenizer, tokenize,
                                   write_text_encoder_folder)

BOS, EOS = START_OF_TEXT_ID, END_OF_TEXT_ID


def padded(ids: list[int]) -> list[int]:
    return ids + [EOS] * (77 - len(ids))


@pytest.fixture(scope="module")
def open_clip_reference_tokenizer():
    """open_clip's own SimpleTokenizer (an independent implementation of CLIP's BPE), loaded from its file: importing
    the open_clip package would import torchvision, which is not installed."""
    spec = importlib.util.find_spec("open_clip")
    module_path = spec.submodule_search_locations[0] + "/tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_reference_tokenizer", module_path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    return tiny_sd_state_dict(0)


def text_encoder_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key[len(TEXT_ENCODER_PREFIX):]: value for key, value in state_dict.items()
            if key.startswith(TEXT_ENCODER_PREFIX)}


# -- tokenizer -----------------------------------------------------------------------------------------------------

def test_tokenizer_matches_openai_clip_ids():
    # The ids openai/clip-vit-large-patch14's tokenizer gives (webui-environment.md).
    assert tokenize(["a photo of a cat"])[0].tolist() == padded([BOS, 320, 1125, 539, 320, 2368, EOS])
    # Ids from open_clip's SimpleTokenizer: "," 267, "by" 638, "greg" 7943, "rutkowski" = "rut" 14973 + "kowski" 17649.
    assert tokenize(["a photo of a cat, by greg rutkowski"])[0].tolist() == padded(
        [BOS, 320, 1125, 539, 320, 2368, 267, 638, 7943, 14973, 17649, EOS])


@pytest.mark.parametrize("prompt", [
    "masterpiece, best quality, 1girl, solo, long hair, looking at viewer",
    "A Photo of   TWO cats!!  (sitting) on a 3-legged stool; 1984 style",
    "portrait of a wizard, trending on artstation, 8k, unreal engine",
    "café crème brûlée, naïve façade, 東京タワー",
])
def test_tokenizer_agrees_with_open_clip(prompt, open_clip_reference_tokenizer):
    expected = [BOS] + open_clip_reference_tokenizer.encode(prompt)[:75] + [EOS]
    assert tokenize([prompt])[0].tolist() == padded(expected)


def test_long_prompt_is_truncated_to_75_tokens_and_ends_with_eos():
    cat = sd1_tokenizer().convert_tokens_to_ids("cat</w>")
    token_ids = tokenize(["cat " * 100, "cat " * 75])
    assert token_ids.shape == (2, 77) and token_ids.dtype == torch.long
    for row in token_ids:
        assert row[0] == BOS and row[-1] == EOS
        assert (row[1:76] == cat).all()


def test_empty_prompt_is_bos_then_eos_padding():
    assert tokenize([""])[0].tolist() == [BOS] + [EOS] * 76


def test_tokenizer_is_cached_and_rejects_a_single_string():
    assert sd1_tokenizer() is sd1_tokenizer()
    with pytest.raises(TypeError):
        tokenize("a photo of a cat")


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(text_encoder_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match="open_clip_torch is not installed"):
        sd1_tokenizer.__wrapped__()


# -- text model ----------------------------------------------------------------------------------------------------

def test_loads_tiny_text_encoder_frozen_with_sd1_context_shape(tiny_state_dict, tiny_config):
    text_encoder = load_text_encoder(tiny_state_dict, tiny_config)
    assert not text_encoder.training
    assert not any(parameter.requires_grad for parameter in text_encoder.parameters())
    context = encode(text_encoder, tokenize(["a photo of a cat", ""]))
    assert context.shape == (2, 77, 32) and context.dtype == torch.float32
    assert not context.requires_grad


def test_matches_clip_text_model_loaded_directly(tiny_state_dict, tiny_config):
    reference = CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG)).eval()
    reference.load_state_dict(text_encoder_tensors(tiny_state_dict))
    token_ids = tokenize(["a photo of a cat, by greg rutkowski", "a dog"])
    with torch.no_grad():
        expected = reference(input_ids=token_ids).last_hidden_state
    assert torch.equal(encode(load_text_encoder(tiny_state_dict, tiny_config), token_ids), expected)


def test_accepts_old_keys_without_text_model_and_without_position_ids(tiny_state_dict, tiny_config):
    old_style = {}
    for key, value in tiny_state_dict.items():
        if key.endswith("position_ids"):
            continue
        old_style[key.replace(TEXT_ENCODER_PREFIX + "text_model.", TEXT_ENCODER_PREFIX)] = value
    assert not any(".text_model." in key for key in old_style)
    token_ids = tokenize(["a photo of a cat"])
    expected = encode(load_text_encoder(tiny_state_dict, tiny_config), token_ids)
    assert torch.equal(encode(load_text_encoder(old_style, tiny_config), token_ids), expected)


def test_fp16_checkpoint_file_with_yaml(checkpoint_factory, tiny_state_dict, tiny_config):
    path = checkpoint_factory(0, dtype=torch.float16)
    config = yaml.safe_load(path.with_suffix(".yaml").read_text())
    text_encoder = load_text_encoder(load_file(str(path)), config, checkpoint_name=path.name)
    assert all(parameter.dtype == torch.float32 for parameter in text_encoder.parameters())
    token_ids = tokenize(["a photo of a cat"])
    expected = encode(load_text_encoder(tiny_state_dict, tiny_config), token_ids)
    torch.testing.assert_close(encode(text_encoder, token_ids), expected, atol=5e-3, rtol=5e-3)


def test_clip_skip_takes_an_earlier_layer_through_the_final_layer_norm(tiny_state_dict, tiny_config):
    text_encoder = load_text_encoder(tiny_state_dict, tiny_config)
    token_ids = tokenize(["a photo of a cat"])
    with torch.no_grad():
        hidden_states = text_encoder(input_ids=token_ids, output_hidden_states=True).hidden_states
        expected = text_encoder.text_model.final_layer_norm(hidden_states[-2])
    assert torch.equal(encode(text_encoder, token_ids, clip_skip=2), expected)
    assert not torch.equal(encode(text_encoder, token_ids, clip_skip=1), expected)


def test_shape_mismatch_names_checkpoint_key_shapes_and_the_config_file(tiny_state_dict, tmp_path):
    wider = write_text_encoder_folder(tmp_path / "wider-clip-text", {**TINY_CLIP_TEXT_CONFIG, "intermediate_size": 128})
    config = config_naming(wider)
    expected_message = (r"model\.safetensors.*fc1\.weight.*\(64, 32\).*" + re.escape(str(wider / "config.json"))
                        + r".*\(128, 32\)")
    with pytest.raises(CheckpointError, match=expected_message):
        load_text_encoder(tiny_state_dict, config, checkpoint_name="model.safetensors")


def config_naming(version: str | Path) -> dict:
    """An ldm config whose FrozenCLIPEmbedder has this `version`."""
    return {"model": {"params": {"cond_stage_config": {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"version": str(version)}}}}}


def test_text_config_is_read_from_the_folder_the_yaml_names(tmp_path):
    narrower_config = {**TINY_CLIP_TEXT_CONFIG, "hidden_size": 16, "intermediate_size": 48, "num_hidden_layers": 3}
    narrower = write_text_encoder_folder(tmp_path / "narrower-clip-text", narrower_config)
    torch.manual_seed(0)
    narrower_model = CLIPTextModel(CLIPTextConfig(**narrower_config)).eval()
    state_dict = {TEXT_ENCODER_PREFIX + key: value for key, value in narrower_model.state_dict().items()}

    text_encoder = load_text_encoder(state_dict, config_naming(narrower))
    assert (text_encoder.config.hidden_size, text_encoder.config.num_hidden_layers) == (16, 3)
    token_ids = tokenize(["a photo of a cat"])
    with torch.no_grad():
        assert torch.equal(encode(text_encoder, token_ids), narrower_model(input_ids=token_ids).last_hidden_state)
    with pytest.raises(CheckpointError, match=re.escape(str(narrower / "config.json")) + r".*hidden size 16"):
        load_text_encoder(tiny_sd_state_dict(0), config_naming(narrower))


def test_a_relative_text_encoder_folder_is_found_where_the_webui_would_resolve_it(tmp_path):
    """A yaml naming `models/text/narrow` (relative, as the WebUI resolves it from its own directory)."""
    narrower_config = {**TINY_CLIP_TEXT_CONFIG, "hidden_size": 16, "intermediate_size": 48}
    write_text_encoder_folder(tmp_path / "models" / "text" / "narrow", narrower_config)
    config, source = sd1_text_config(config_naming("models/text/narrow"), search_dirs=[tmp_path / "elsewhere",
                                                                                      tmp_path])
    assert config.hidden_size == 16 and str(tmp_path / "models" / "text" / "narrow" / "config.json") in source
    assert sd1_text_config(config_naming("models/text/narrow"))[1] == "SD1's CLIP ViT-L/14 text config"


def test_a_hub_name_means_sd1_vit_l_without_reading_anything():
    config, source = sd1_text_config(config_naming("openai/clip-vit-large-patch14"))
    assert (config.hidden_size, config.num_hidden_layers, source) == (768, 12, "SD1's CLIP ViT-L/14 text config")
    assert sd1_text_config(config_naming("openai/clip-vit-large-patch14"))[0].to_dict() == \
        sd1_text_config(None)[0].to_dict()


def test_a_missing_or_empty_text_encoder_folder_is_named(tmp_path):
    missing = tmp_path / "moved-away"
    with pytest.raises(CheckpointError, match=re.escape(str(missing)) + ".*does not exist"):
        sd1_text_config(config_naming(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "empty")) + ".*holds no config.json"):
        sd1_text_config(config_naming(tmp_path / "empty"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "broken" / "config.json")) + ": not a readable"):
        sd1_text_config(config_naming(tmp_path / "broken"))


def test_yamls_with_the_inline_text_config_of_earlier_versions_are_still_read(tiny_state_dict):
    earlier = {"model": {"params": {"cond_stage_config": {
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"clip_text_config": dict(TINY_CLIP_TEXT_CONFIG)}}}}}
    assert load_text_encoder(tiny_state_dict, earlier).config.hidden_size == 32


def test_without_a_config_folder_the_encoder_is_inferred_from_its_tensors(tiny_state_dict):
    """No yaml, or one naming a hub model: a text encoder that is not ViT-L is built from its own shapes (64
    channels per head, CLIP's convention), and one whose width gives no head count is one clear error."""
    other_config = {**TINY_CLIP_TEXT_CONFIG, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3,
                    "num_attention_heads": 2}
    torch.manual_seed(0)
    other = CLIPTextModel(CLIPTextConfig(**other_config)).eval()
    state_dict = {TEXT_ENCODER_PREFIX + key: value for key, value in other.state_dict().items()}
    for config in (None, config_naming("openai/clip-vit-large-patch14")):
        text_encoder = load_text_encoder(state_dict, config, checkpoint_name="narrow.safetensors")
        got = text_encoder.config
        assert (got.hidden_size, got.num_hidden_layers, got.num_attention_heads, got.intermediate_size) == \
            (128, 3, 2, 256)
        token_ids = tokenize(["a photo of a cat"])
        with torch.no_grad():
            assert torch.equal(encode(text_encoder, token_ids), other(input_ids=token_ids).last_hidden_state)
    with pytest.raises(CheckpointError, match=r"tiny\.ckpt: its text encoder is 32 wide, which gives no CLIP head "
                                              r"count.*cond_stage_config\.params\.version names a folder"):
        load_text_encoder(tiny_state_dict, None, checkpoint_name="tiny.ckpt")


def test_missing_layer_is_reported(tiny_state_dict, tiny_config):
    truncated = {key: value for key, value in tiny_state_dict.items() if ".layers.1." not in key}
    with pytest.raises(CheckpointError, match=r"missing \d+ keys.*layers\.1\."):
        load_text_encoder(truncated, tiny_config)


def test_checkpoint_without_text_encoder(tiny_state_dict):
    unet_only = {key: value for key, value in tiny_state_dict.items() if key.startswith("model.diffusion_model.")}
    with pytest.raises(CheckpointError, match="no SD1 text encoder"):
        load_text_encoder(unet_only, None)


def test_an_incomplete_sd2_tower_sdxl_and_a_mismatched_yaml_are_named(tiny_state_dict):
    """SD 2.x towers load (tests/test_sd2_training.py); one missing its tensors, SDXL's pair, and an OpenCLIP yaml
    over an SD1 encoder are each refused with what is wrong."""
    sd2_state_dict = {"cond_stage_model.model.ln_final.weight": torch.ones(1024),
                      "cond_stage_model.model.token_embedding.weight": torch.zeros(49408, 1024)}
    with pytest.raises(CheckpointError, match="OpenCLIP text encoder lacks 'positional_embedding'"):
        load_text_encoder(sd2_state_dict, None)
    sdxl_state_dict = {"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(768)}
    with pytest.raises(UnsupportedTextEncoderError, match="SDXL's pair .*load_sdxl_text_encoders") as raised:
        load_text_encoder(sdxl_state_dict, None)
    assert isinstance(raised.value, AfaError) and isinstance(raised.value, NotImplementedError)

    sd2_config = {"model": {"params": {"cond_stage_config": {
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"layer": "penultimate"}}}}}
    with pytest.raises(UnsupportedTextEncoderError, match="holds no OpenCLIP text tower"):
        load_text_encoder(tiny_state_dict, sd2_config)


def test_unusual_position_ids_are_loaded_with_a_warning(tiny_state_dict, caplog, tiny_config):
    shifted = dict(tiny_state_dict)
    key = TEXT_ENCODER_PREFIX + "text_model.embeddings.position_ids"
    shifted[key] = torch.arange(77, dtype=torch.float32).expand(1, -1) - 0.01  # truncates to -0, 0, 1, ..., 75
    with caplog.at_level(logging.WARNING):
        text_encoder = load_text_encoder(shifted, tiny_config, checkpoint_name="merged.safetensors")
    assert "merged.safetensors" in caplog.text and "position_ids" in caplog.text
    assert text_encoder.text_model.embeddings.position_ids[0, :3].tolist() == [0, 0, 1]
