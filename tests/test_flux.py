"""The core's FLUX ensemble (afa.flux) on ComfyUI's own FLUX class (tests/comfyui_standin, comfy/ldm/flux) at tiny
width: identical members give the member's prediction bit for bit (block average, noise average, untrained SABW of
both designs), different members differ, SABW's maps sum to one over the members, the text tokens follow the image
tokens' weights (or the average, the ablation), and weights files record the members' family: a UNet file is refused
for FLUX members and the reverse; format 2 files load as UNet files.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import comfyui_factories as cf
from afa import Aggregator, AggregatorConfig, MemberRef, MembersMismatchError, load_weights, read_weights_info, \
    save_weights
from afa.aggregator import preset_config
from afa.ensemble import EnsembleUNet
from afa.flux import (FLUX1_DEV, EnsembleFlux, flux_layout, flux_preset_config, is_flux, patchify, unpatchify)
from afa.weights import check_weights_fit

MEMBERS = [MemberRef("pixelwave", "a" * 64), MemberRef("verus", "b" * 64)]


@pytest.fixture
def flux(comfy_standin):
    """Tiny FLUX-layout transformers (ComfyUI's class): `make(seed)`, and one call's inputs at a 6 x 10 latent
    (3 x 5 tokens, padding-free) with batch 2."""
    generator = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(2, 16, 6, 10, generator=generator), timesteps=torch.tensor([0.3, 0.8]),
                  context=torch.randn(2, 5, 24, generator=generator), y=torch.randn(2, 16, generator=generator),
                  guidance=torch.tensor([3.5, 2.0]))
    with torch.inference_mode():
        yield cf.tiny_flux_transformer, inputs


def layout_of(member):
    return flux_layout({key: tuple(value.shape) for key, value in member.state_dict().items()})


def member_prediction(member, inputs):
    return member(inputs["x"], inputs["timesteps"], inputs["context"], inputs["y"], inputs["guidance"])


def sabw(preset, member, **overrides):
    return Aggregator(flux_preset_config(preset, 2, layout_of(member), **overrides)).eval()


@pytest.mark.parametrize("mode,preset", [("average", None), ("noise-average", None), ("sabw", "paper"),
                                         ("sabw", "fast")])
def test_identical_members_give_the_members_prediction_bit_for_bit(flux, mode, preset):
    make, inputs = flux
    member = make(1)
    expected = member_prediction(member, inputs)
    aggregator = sabw(preset, member) if preset else None  # untrained: equal weights, like block averaging
    ensemble = EnsembleFlux([member, make(1)], aggregator, mode=mode)
    assert torch.equal(ensemble(**inputs), expected)
    # the same module twice, and per-member contexts that are one tensor
    ensemble = EnsembleFlux([member, member], aggregator, mode=mode)
    context = inputs["context"]
    assert torch.equal(ensemble(**{**inputs, "context": None}, member_contexts=[context, context]), expected)


def test_different_members_differ_and_modes_differ(flux):
    make, inputs = flux
    first, second = make(1), make(2)
    predictions = [member_prediction(first, inputs), member_prediction(second, inputs)]
    average = EnsembleFlux([first, second], mode="average")(**inputs)
    noise = EnsembleFlux([first, second], mode="noise-average")(**inputs)
    assert torch.allclose(noise, (predictions[0] + predictions[1]) / 2, atol=1e-6)
    for ensembled in (average, noise):
        assert all((ensembled - prediction).abs().max() > 1e-3 for prediction in predictions)
    assert (average - noise).abs().max() > 1e-3
    # each member reads its own vec: the guidance of one member's embedding changes the block average
    assert not torch.equal(EnsembleFlux([first, second], mode="average")(**{**inputs, "guidance": None}), average)


def test_sabw_weights_are_per_image_token_maps_that_sum_to_one(flux):
    make, inputs = flux
    first, second = make(1), make(2)
    for preset in ("paper", "fast"):
        aggregator = cf.randomize_parameters_(sabw(preset, first), seed=3, scale=0.05)
        recorded = []
        ensemble = EnsembleFlux([first, second], aggregator, "sabw",
                                observer=lambda block, weights: recorded.append((block, weights)))
        prediction = ensemble(**inputs)
        assert prediction.shape == inputs["x"].shape
        assert [block for block, _ in recorded] == [0, 1, 2, 3]  # 2 double + 2 single blocks, the last with the head
        for _, weights in recorded:
            assert weights.shape == (2, 2, 3, 5)  # B x N x the 3 x 5 token grid of the 6 x 10 latent
            assert torch.allclose(weights.sum(dim=1), torch.ones(2, 3, 5), atol=1e-6)
            assert weights.std() > 1e-3  # spatial, not uniform
        assert not torch.allclose(prediction, EnsembleFlux([first, second], mode="average")(**inputs), atol=1e-4)


class OneMember(torch.nn.Module):
    """Stands in for a trained aggregator that gives one member every image token of every block."""

    def __init__(self, aggregator, member):
        super().__init__()
        self.config, self.member = aggregator.config, member

    def embed_time(self, timesteps, member_embeddings=None):
        return None

    def forward(self, block_index, features, time_embedding, context):
        weights = torch.zeros(features[0].shape[0], len(features), *features[0].shape[-2:])
        weights[:, self.member] = 1.0
        return weights


def test_text_tokens_follow_the_image_tokens_weights_or_the_average(flux):
    """With text_mixing "image-mean" (the default), SABW that hands every image token to member 2 gives member 2's
    prediction exactly: its text stream and the text part of its single blocks come along. With "average" the text
    tokens are mixed 1/N, so the prediction is not member 2's."""
    make, inputs = flux
    first, second = make(1), make(2)
    expected = member_prediction(second, inputs)
    followed = EnsembleFlux([first, second], OneMember(sabw("fast", first), 1), "sabw")
    assert torch.equal(followed(**inputs), expected)
    averaged = EnsembleFlux([first, second], OneMember(sabw("fast", first, text_mixing="average"), 1), "sabw")
    assert (averaged(**inputs) - expected).abs().max() > 1e-3
    # the text weights of a map: each member's mean over the image tokens
    weights = torch.tensor([[[[0.2, 0.4]], [[0.8, 0.6]]]])  # B 1 x N 2 x 1 x 2
    assert torch.allclose(followed.text_weights(weights), torch.tensor([[[0.3], [0.7]]]))
    assert torch.equal(averaged.text_weights(weights), torch.full((1, 2, 1), 0.5))


def test_flux_layout_patchify_and_the_flux1_dev_preset(flux):
    make, inputs = flux
    member = make(1)
    shapes = {key: tuple(value.shape) for key, value in member.state_dict().items()}
    assert is_flux(shapes) and is_flux({f"model.diffusion_model.{key}": shape for key, shape in shapes.items()})
    layout = layout_of(member)
    assert (layout.hidden_size, layout.num_heads, layout.num_double_blocks, layout.num_single_blocks,
            layout.context_dim, layout.vec_dim, layout.out_channels) == (32, 2, 2, 2, 24, 16, 64)
    assert layout.names == ["double_blocks.0", "double_blocks.1", "single_blocks.0", "single_blocks.1"]
    tokens, ids, grid = patchify(inputs["x"][:, :, :5, :9])  # odd sizes are padded as ComfyUI pads them
    expected_tokens, expected_ids = member.process_img(inputs["x"][:, :, :5, :9])
    assert torch.equal(tokens, expected_tokens) and torch.equal(ids, expected_ids) and grid == (3, 5)
    assert torch.equal(unpatchify(*patchify(inputs["x"])[::2], 6, 10), inputs["x"])
    config = flux_preset_config("paper", 2, FLUX1_DEV)
    assert (config.family, config.num_double_blocks, config.num_blocks, config.member_time_embed_dim,
            config.context_dim, config.block_channels[-2:]) == ("flux", 19, 57, 3072, 4096, [3072, 64])
    assert Aggregator(config).block_names[18:20] == ["double_blocks.18", "single_blocks.0"]


def test_weights_files_record_the_family_and_refuse_the_other(flux, tmp_path):
    make, inputs = flux
    first, second = make(1), make(2)
    aggregator = cf.randomize_parameters_(sabw("paper", first), seed=3, scale=0.05)
    path = save_weights(tmp_path / "flux.safetensors", aggregator, MEMBERS)
    loaded, info = load_weights(path, MEMBERS)
    assert info.config.family == "flux" and info.config.num_double_blocks == 2
    assert any(key.startswith("single_blocks.1.") for key in loaded.state_dict())
    ensemble = EnsembleFlux([first, second], aggregator, "sabw")
    assert torch.equal(EnsembleFlux([first, second], loaded, "sabw")(**inputs), ensemble(**inputs))

    unet_config = preset_config("fast", 2, [32] * 7 + [64] * 12 + [32] * 5 + [4], 32, hidden_channels=32,
                                num_heads=2)
    unet_aggregator = Aggregator(unet_config)
    with pytest.raises(MembersMismatchError, match="trained for UNet members .SD 1.x, SD 2.x, SDXL.; these members "
                                                   "are FLUX transformer members"):
        EnsembleFlux([first, second], unet_aggregator, "sabw")
    with pytest.raises(MembersMismatchError, match="trained for FLUX transformer members; these members are UNet"):
        EnsembleUNet([torch.nn.Module(), torch.nn.Module()], aggregator, "sabw")
    with pytest.raises(MembersMismatchError, match="flux.safetensors were trained for FLUX transformer members"):
        check_weights_fit(info, unet_config.block_channels, 32, 2, family="unet")
    unet_path = save_weights(tmp_path / "unet.safetensors", unet_aggregator, MEMBERS)
    with pytest.raises(MembersMismatchError, match="unet.safetensors were trained for UNet members"):
        check_weights_fit(read_weights_info(unet_path), layout_of(first).channels, 24, 2, family="flux")
    check_weights_fit(info, layout_of(first).channels, 24, 2, family="flux")  # fits its own members


def test_format_2_files_load_as_unet_files(tmp_path):
    config = AggregatorConfig(2, [32] * 7 + [64] * 12 + [32] * 5 + [4], hidden_channels=32, num_heads=2,
                              context_dim=32)
    path = save_weights(tmp_path / "w.safetensors", Aggregator(config), MEMBERS)
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata()
    values = json.loads(metadata["afa_config"])
    for field in ("family", "num_double_blocks", "text_mixing"):  # what a format 2 writer did not know
        values.pop(field)
    save_file(tensors, str(tmp_path / "v2.safetensors"),
              metadata={**metadata, "afa_format_version": "2", "afa_config": json.dumps(values)})
    loaded, info = load_weights(tmp_path / "v2.safetensors")
    assert info.format_version == 2 and info.config == config and info.config.family == "unet"
    with pytest.raises(ValueError, match="family must be one of unet, flux"):
        AggregatorConfig(2, config.block_channels, family="dit")
    with pytest.raises(ValueError, match="text_mixing must be one of image-mean, average"):
        flux_preset_config("fast", 2, FLUX1_DEV, text_mixing="max")


def test_the_cores_bfl_layout_transformer_equals_comfyuis_on_the_same_weights(flux):
    """afa.flux_model.Flux (the host-free FLUX.1 the trainer and `afa bench` build) loads a ComfyUI FLUX
    transformer's state dict key for key and predicts what ComfyUI's class predicts (float32 rounding: the RMS norm
    is written out); EnsembleFlux runs it with its default runner, identical members giving its prediction bit for
    bit."""
    from afa.flux_model import Flux, FluxParams

    make, inputs = flux
    comfy_member = make(1)
    params = FluxParams.from_layout(layout_of(comfy_member), axes_dim=(4, 6, 6))
    member = Flux(params).eval()
    member.load_state_dict(comfy_member.state_dict(), strict=True)
    expected = member_prediction(comfy_member, inputs)
    prediction = member_prediction(member, inputs)
    assert torch.allclose(prediction, expected, rtol=1e-4, atol=1e-5), (prediction - expected).abs().max()
    twin = Flux(params).eval()
    twin.load_state_dict(member.state_dict())
    for mode, aggregator in (("average", None), ("sabw", sabw("paper", member))):
        assert torch.equal(EnsembleFlux([member, twin], aggregator, mode)(**inputs), prediction)
    assert FluxParams.from_layout(FLUX1_DEV) == FluxParams()
    with pytest.raises(ValueError, match="heads of width 16 are not FLUX.1's"):
        FluxParams.from_layout(layout_of(comfy_member))


def test_sabw_learns_through_frozen_flux_members_with_or_without_checkpointing():
    """What a trainer needs of the core (host-free members, afa.flux_model): the loss's gradient reaches every SABW
    block through the frozen members, and with gradient checkpointing (member blocks recomputed in the backward
    pass) the gradients are the same."""
    from afa.bench import flux_architectures
    from afa.flux_model import Flux

    torch.manual_seed(0)
    params = flux_architectures()["flux-tiny"]
    members = [Flux(params).requires_grad_(False) for _ in range(2)]
    aggregator = cf.randomize_parameters_(Aggregator(flux_preset_config("paper", 2, layout_of(members[0]))), 3, 0.05)
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 16, 4, 6, generator=generator), torch.randn(2, 5, 24, generator=generator)
    inputs = dict(timesteps=torch.tensor([0.2, 0.9]), context=context, y=torch.randn(2, 16, generator=generator),
                  guidance=torch.tensor([3.5, 3.5]))
    target = torch.randn(2, 16, 4, 6, generator=generator)
    gradients = []
    for checkpointing in (False, True):
        aggregator.zero_grad()
        ensemble = EnsembleFlux(members, aggregator, "sabw")
        ensemble.gradient_checkpointing = checkpointing
        (ensemble(x, **inputs) - target).pow(2).mean().backward()
        gradients.append({name: p.grad.clone() for name, p in aggregator.named_parameters() if p.grad is not None})
    assert {name.split(".")[0] + "." + name.split(".")[1] for name in gradients[0]} == {
        "double_blocks.0", "single_blocks.0", "single_blocks.1"}
    assert all(gradient.abs().sum() > 0 for name, gradient in gradients[0].items() if name.endswith("out.weight"))
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert torch.allclose(gradient, gradients[1][name], rtol=1e-4, atol=1e-7), name
