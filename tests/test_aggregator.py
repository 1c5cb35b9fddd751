"""The two SABW designs ("paper", "fast"): parameter counts, what each block reads, format 1 files, and the ensemble's
per-member text conditioning."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_, random_inputs
from safetensors import safe_open
from safetensors.torch import load_file

from afa import (PRESETS, SABW_PRESETS, Aggregator, AggregatorConfig, EnsembleUNet, block_layout, build_unet,
                 load_weights, preset_config, read_weights_info, unet_shapes)
from afa.errors import WeightsFileError
from afa.weights import FORMAT_VERSION

DATA = Path(__file__).parent / "data"


def sd15_block_channels() -> list[int]:
    with torch.device("meta"):
        unet = build_unet(PRESETS["sd15"])
    return list(block_layout(unet_shapes(unet)).channels)


def parameter_count(config: AggregatorConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Aggregator(config).parameters())


@pytest.mark.parametrize("num_members, expected", [(2, 42_425_344), (3, 45_132_416)])
def test_paper_preset_has_the_papers_parameter_count_for_sd15(num_members, expected):
    """Appendix B of the paper: 42.4M for 2 members and +2.7M per member, which only the authors' aggregator at depth
    2 (what their code runs) gives exactly."""
    config = preset_config("paper", num_members, sd15_block_channels(), 768)
    assert parameter_count(config) == expected
    assert config.member_time_embed_dim == 1280 and config.max_resolution is None


def test_fast_preset_is_the_format_1_design():
    config = preset_config("fast", 2, sd15_block_channels(), 768)
    assert config == AggregatorConfig(2, sd15_block_channels())  # the defaults every format 1 file has
    assert round(parameter_count(config) / 1e6, 1) == 37.9


def small_config(design: str, **overrides) -> AggregatorConfig:
    # 64 wide: at 32, GroupNorm's 32 groups of one channel would cancel the per-channel time embedding
    values = dict(SABW_PRESETS[design], hidden_channels=64, num_heads=4)
    if design == "paper":
        values["member_time_embed_dim"] = 24
    values.update(overrides)
    return AggregatorConfig(num_members=2, block_channels=[8, 16, 4], context_dim=16, **values)


def block_inputs(seed: int = 0, size: int = 6):
    generator = torch.Generator().manual_seed(seed)
    features = [torch.randn(2, 16, size, size, generator=generator) for _ in range(2)]
    member_embeddings = [torch.randn(2, 24, generator=generator) for _ in range(2)]
    context = torch.randn(2, 5, 16, generator=generator)
    return features, member_embeddings, context


@pytest.mark.parametrize("design", ["paper", "fast"])
def test_an_untrained_aggregator_gives_equal_weights(design):
    aggregator = Aggregator(small_config(design))
    features, member_embeddings, context = block_inputs()
    time = aggregator.embed_time(torch.tensor([10.0, 900.0]), member_embeddings)
    weights = aggregator(1, features, time, context)
    assert weights.shape == (2, 2, 6, 6)
    assert torch.equal(weights, torch.full_like(weights, 0.5))


def test_the_paper_design_self_attends_over_all_pixels_at_full_resolution():
    """Paper: every transformer block's self-attention reads all 40 x 40 pixels of a 40 x 40 block. Fast: no
    self-attention, and the block is pooled to 20 x 20 (max_resolution 32, integer factor 2)."""
    features, member_embeddings, context = block_inputs(size=40)
    seen = {}
    for design in ("paper", "fast"):
        aggregator = Aggregator(small_config(design))
        tokens = []
        for name, module in aggregator.named_modules():
            if name.endswith(("self_attention", "transformer.proj_in")):
                module.register_forward_hook(lambda m, args, out, name=name: tokens.append((name, args[0].shape)))
        with torch.no_grad():
            aggregator(1, features, aggregator.embed_time(torch.tensor([1.0, 2.0]), member_embeddings), context)
        seen[design] = tokens
    assert seen["paper"] == [("middle_block.transformer.proj_in", (2, 64, 40, 40)),
                             ("middle_block.transformer.blocks.0.self_attention", (2, 1600, 64)),
                             ("middle_block.transformer.blocks.1.self_attention", (2, 1600, 64))]
    assert seen["fast"] == [("middle_block.transformer.proj_in", (2, 400, 64))]


def test_the_paper_design_reads_the_mean_of_the_members_time_embeddings():
    torch.manual_seed(0)
    aggregator = randomize_(Aggregator(small_config("paper")), seed=1, scale=0.2)
    features, member_embeddings, context = block_inputs()
    timesteps = torch.tensor([10.0, 900.0])
    assert not hasattr(aggregator, "time_embed")  # no time MLP of its own
    mean = aggregator.embed_time(timesteps, member_embeddings)
    torch.testing.assert_close(mean, (member_embeddings[0] + member_embeddings[1]) / 2)
    swapped = aggregator.embed_time(timesteps, member_embeddings[::-1])
    other = aggregator.embed_time(timesteps, [member_embeddings[0], -member_embeddings[1]])
    with torch.no_grad():
        weights = aggregator(1, features, mean, context)
        torch.testing.assert_close(aggregator(1, features, swapped, context), weights)
        assert (aggregator(1, features, other, context) - weights).abs().max() > 1e-4
    with pytest.raises(ValueError, match="member_embeddings"):
        aggregator.embed_time(timesteps)


@pytest.mark.parametrize("overrides, message", [
    (dict(design="other"), "design must be one of fast, paper"),
    (dict(design="fast", transformer_depth=2), "the fast design has one transformer layer"),
    (dict(design="paper", member_time_embed_dim=None), "member_time_embed_dim is needed"),
    (dict(text_conditioning="each"), "text_conditioning must be one of per_member, shared"),
    (dict(clip_skip=0), "clip_skip must be at least 1"),
])
def test_invalid_configs_name_the_problem(overrides, message):
    with pytest.raises(ValueError, match=message):
        AggregatorConfig(num_members=2, block_channels=[8, 16, 4], **overrides)


def test_a_format_1_file_loads_unchanged():
    """tests/data/weights-format-1.safetensors was written by AFA's format 1 code (before the paper design existed),
    with the weights it gave for fixed inputs; today's code must read it as the same aggregator."""
    path = DATA / "weights-format-1.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["afa_format_version"] == "1" and "design" not in json.loads(metadata["afa_config"])
    info = read_weights_info(path)
    assert info.format_version == 1
    assert (info.config.design, info.config.text_conditioning, info.config.clip_skip) == ("fast", "shared", 1)
    aggregator, _ = load_weights(path)
    expected = load_file(str(DATA / "weights-format-1-expected.safetensors"))
    with torch.no_grad():
        weights = aggregator(1, [expected["feature0"], expected["feature1"]],
                             aggregator.embed_time(expected["timesteps"]), expected["context"])
    torch.testing.assert_close(weights, expected["weights"], rtol=0, atol=1e-6)


def test_a_newer_format_is_refused(tmp_path):
    path = tmp_path / "future.safetensors"
    source = DATA / "weights-format-1.safetensors"
    with safe_open(str(source), framework="pt") as handle:
        metadata = dict(handle.metadata(), afa_format_version=str(FORMAT_VERSION + 1))
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(WeightsFileError, match=f"version {FORMAT_VERSION + 1} is newer than this AFA supports"):
        read_weights_info(path)


# -- per-member text conditioning in the ensemble ----------------------------------------------------------------

def make_members(tiny_params, count=2):
    members = []
    for seed in range(count):
        torch.manual_seed(seed)
        members.append(randomize_(build_unet(tiny_params), seed=seed, scale=0.05).eval().requires_grad_(False))
    return members


def paper_aggregator(members, seed=1) -> Aggregator:
    config = preset_config("paper", len(members), block_layout(unet_shapes(members[0])).channels, 32,
                           hidden_channels=32, num_heads=4, text_conditioning="per_member")
    torch.manual_seed(0)
    return randomize_(Aggregator(config), seed=seed, scale=0.05)


def test_each_member_reads_its_own_context(tiny_params):
    """Noise averaging of members that read their own contexts is the mean of the members run alone on those."""
    members = make_members(tiny_params)
    x, timesteps, context = random_inputs()
    other = torch.randn_like(context)
    ensemble = EnsembleUNet(members, None, "noise-average")
    with torch.no_grad():
        got = ensemble(x, timesteps, member_contexts=[context, other])
        expected = (members[0](x, timesteps, context) + members[1](x, timesteps, other)) / 2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["sabw", "average"])
def test_one_context_for_all_members_is_the_shared_ensemble_exactly(tiny_params, mode):
    members = make_members(tiny_params)
    aggregator = paper_aggregator(members) if mode == "sabw" else None
    ensemble = EnsembleUNet(members, aggregator, mode)
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        assert torch.equal(ensemble(x, timesteps, member_contexts=[context, context]), ensemble(x, timesteps, context))


def test_sabw_reads_the_mean_of_the_member_contexts(tiny_params):
    members = make_members(tiny_params)
    ensemble = EnsembleUNet(members, paper_aggregator(members), "sabw")
    read = []
    for block_index in (0, ensemble.num_blocks - 1):
        attention = ensemble.aggregator.block(block_index).transformer.blocks[0].cross_attention
        attention.register_forward_pre_hook(lambda module, args: read.append(args[1]))
    x, timesteps, context = random_inputs()
    other = torch.randn_like(context)
    with torch.no_grad():
        ensemble(x, timesteps, member_contexts=[context, other])
    assert len(read) == 2
    for seen in read:
        torch.testing.assert_close(seen, (context + other) / 2)


def test_a_wrong_number_of_member_contexts_is_refused(tiny_params):
    members = make_members(tiny_params)
    x, timesteps, context = random_inputs()
    with pytest.raises(ValueError, match="3 member contexts for 2 members"):
        EnsembleUNet(members, None, "average")(x, timesteps, member_contexts=[context] * 3)
