"""SDXL's conditioning from a checkpoint's own text encoders (training/sdxl_text.py): CLIP-L's hidden layer and
bigG's penultimate layer concatenated as the context, bigG's pooled output and the size embeddings as `y`, on a
tiny SDXL-form state dict (tiny CLIP-L 32 wide, tiny OpenCLIP tower 64 wide). The real-WebUI tier compares the same
with sgm's conditioner (tests/webui_real/test_sdxl.py)."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from afa.errors import CheckpointError
from factories import TINY_OPEN_CLIP, randomize_
from training.open_clip_text import OpenClipTextEncoder
from training.sd_checkpoint import TINY_CLIP_TEXT_CONFIG
from training.sdxl_text import load_sdxl_text_encoders, size_embeddings, timestep_embedding
from training.text_encoder import tokenize


@pytest.fixture(scope="module")
def state_dict():
    torch.manual_seed(0)
    clip_l = randomize_(CLIPTextModel(CLIPTextConfig(**TINY_CLIP_TEXT_CONFIG)), seed=1, scale=0.05)
    big_g = randomize_(OpenClipTextEncoder(**TINY_OPEN_CLIP), seed=2, scale=0.05)
    tensors = {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.state_dict().items()}
    tensors.update({"conditioner.embedders.1.model." + k: v for k, v in big_g.state_dict().items()})
    return tensors


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from training.text_encoder import write_text_encoder_folder
    return write_text_encoder_folder(tmp_path_factory.mktemp("clip") / "tiny-clip-text", TINY_CLIP_TEXT_CONFIG)


def sgm_yaml(folder, layer_idx: int | None = None) -> dict:
    """sd_xl_base.yaml's conditioner, its CLIP-L naming the tiny text encoder folder (as the WebUI reads it)."""
    clip_l = {"layer": "hidden", "version": str(folder)}
    if layer_idx is not None:
        clip_l["layer_idx"] = layer_idx
    return {"model": {"params": {"conditioner_config": {"params": {"emb_models": [
        {"params": clip_l}, {"params": {"layer": "penultimate"}}]}}}}}


def test_context_and_pooled_are_the_two_encoders_layers(state_dict, clip_folder):
    encoders = load_sdxl_text_encoders(state_dict, sgm_yaml(clip_folder, 1))
    assert encoders.config.hidden_size == 32 + 64 and encoders.config.pooled_size == 64
    token_ids = tokenize(["a photo of a cat", ""])
    context, pooled = encoders.encode(token_ids)
    assert context.shape == (2, 77, 96) and pooled.shape == (2, 64)
    with torch.no_grad():
        hidden = encoders.clip_l(input_ids=token_ids, output_hidden_states=True).hidden_states[1]
    assert torch.equal(context[..., :32], hidden)  # CLIP-L's hidden layer 1, no final layer norm
    # bigG: the penultimate layer without ln_final; the last block and ln_final change only the pooled output
    with torch.no_grad():
        encoders.big_g.ln_final.weight.mul_(2.0)
    again, pooled_again = encoders.encode(token_ids)
    assert torch.equal(again, context) and not torch.allclose(pooled_again, pooled)


def test_y_is_pooled_then_the_three_size_embeddings(state_dict, clip_folder):
    encoders = load_sdxl_text_encoders(state_dict, sgm_yaml(clip_folder))
    assert encoders.clip_l_layer_idx == 11  # sd_xl_base.yaml's, when the yaml does not say
    pooled = torch.randn(2, 64)
    sizes = torch.tensor([[1024.0, 768.0], [512.0, 512.0]])
    crops = torch.tensor([[0.0, 0.0], [16.0, 32.0]])
    y = encoders.vector(pooled, sizes, crops, sizes)
    assert y.shape == (2, 64 + 1536) and torch.equal(y[:, :64], pooled)
    embedded = size_embeddings(sizes, crops, sizes)
    assert torch.equal(y[:, 64:], embedded)
    # each value embedded alone, 256 wide (cos half, then sin half), in the order h, w of each size
    assert torch.equal(embedded[1, 256 * 2:256 * 3], timestep_embedding(torch.tensor([16.0]), 256)[0])
    assert torch.allclose(timestep_embedding(torch.tensor([0.0]), 8)[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_a_missing_encoder_is_named(state_dict):
    only_clip_l = {k: v for k, v in state_dict.items() if k.startswith("conditioner.embedders.0.")}
    with pytest.raises(CheckpointError, match="found CLIP-L and no bigG"):
        load_sdxl_text_encoders(only_clip_l, None, checkpoint_name="xl.safetensors")
