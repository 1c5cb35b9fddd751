"""The ensembled forward: equivalences that must hold exactly, shapes/dtypes across UNet variants, gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import randomize_, random_inputs
from ldm.modules.diffusionmodules.openaimodel import UNetModel

from afa import MODES, Aggregator, AggregatorConfig, EnsembleUNet, block_layout, build_unet, mix, unet_shapes
from afa.errors import AfaError, IncompatibleMembersError
from afa.modes import LAST_BLOCK, parse_mode


def make_unet(params: dict, seed: int) -> UNetModel:
    torch.manual_seed(seed)
    return randomize_(build_unet(params), seed=seed, scale=0.05).eval().requires_grad_(False)


def make_aggregator(unet: UNetModel, num_members: int, seed: int | None = None, **overrides) -> Aggregator:
    """An aggregator for `unet`'s layout; fresh (zero output layers) when seed is None, else random weights."""
    context_dim = overrides.pop("context_dim", unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features)
    config = AggregatorConfig(num_members, list(block_layout(unet_shapes(unet)).channels), hidden_channels=32,
                              num_heads=2, context_dim=context_dim, **overrides)
    torch.manual_seed(0)
    aggregator = Aggregator(config)
    return randomize_(aggregator, seed=seed) if seed is not None else aggregator


def ensemble_for(members, mode, seed=1, **overrides) -> EnsembleUNet:
    mode = parse_mode(mode)
    aggregator = None
    if mode.needs_weights:
        aggregator = make_aggregator(members[0], len(members), seed=seed, only_last_block=mode is LAST_BLOCK,
                                     **overrides)
    return EnsembleUNet(members, aggregator, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_members", [2, 3])
def test_identical_members_equal_the_single_member(tiny_params, mode, num_members):
    """Weights sum to one at every pixel, so N copies of one UNet ensemble to that UNet, whatever SABW learned."""
    unet = make_unet(tiny_params, seed=3)
    members = [copy.deepcopy(unet) for _ in range(num_members)]
    ensemble = ensemble_for(members, mode, seed=7)
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        expected = unet(x, timesteps, context)
        got = ensemble(x, timesteps, context)
    assert got.shape == expected.shape == x.shape
    assert (got - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("num_members", [2, 3])
def test_fresh_sabw_is_block_averaging_exactly(tiny_params, num_members):
    members = [make_unet(tiny_params, seed=s) for s in range(num_members)]
    fresh = EnsembleUNet(members, make_aggregator(members[0], num_members), "sabw")
    average = EnsembleUNet(members, None, "average")
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        assert torch.equal(fresh(x, timesteps, context), average(x, timesteps, context))
    # and block averaging of different members is not a trivial output
    assert not torch.allclose(members[0](x, timesteps, context), members[1](x, timesteps, context))


def test_trained_sabw_differs_from_averaging(tiny_params):
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        sabw = ensemble_for(members, "sabw", seed=5)(x, timesteps, context)
        average = EnsembleUNet(members, None, "average")(x, timesteps, context)
    assert (sabw - average).abs().max() > 1e-3


@pytest.mark.parametrize("num_members", [2, 3])
def test_noise_average_is_mean_of_member_outputs(tiny_params, num_members):
    members = [make_unet(tiny_params, seed=s) for s in range(num_members)]
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        expected = torch.stack([m(x, timesteps, context) for m in members]).mean(0)
        got = EnsembleUNet(members, None, "noise-average")(x, timesteps, context)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_never_calls_the_class_forward(tiny_params, mode, monkeypatch):
    """The WebUI patches UNetModel.forward on the class to route to the active SdUnet (this ensemble)."""
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        expected = ensemble_for(members, mode)(x, timesteps, context)

    def recursing_forward(self, *args, **kwargs):
        raise RecursionError("member forward() called: the WebUI's patched forward would recurse into AFA")

    monkeypatch.setattr(UNetModel, "forward", recursing_forward)
    with torch.no_grad():
        got = ensemble_for(members, mode)(x, timesteps, context)
    assert torch.equal(got, expected)


def sd2_like_params(tiny_params: dict) -> dict:
    params = dict(tiny_params, use_linear_in_transformer=True, context_dim=1024, num_head_channels=16)
    params.pop("num_heads")
    return params


@pytest.mark.parametrize("variant", ["sd1", "sd2", "class-labels", "sequential-labels", "inpainting"])
def test_shapes_and_dtypes_across_unet_variants(tiny_params, variant):
    params = dict(tiny_params)
    context_dim, y = 32, None
    if variant == "sd2":
        params = sd2_like_params(tiny_params)
        context_dim = 1024
    elif variant == "class-labels":
        params["num_classes"] = 10
        y = torch.tensor([3, 7])
    elif variant == "inpainting":
        params["in_channels"] = 9
    members = [make_unet(params, seed=s) for s in range(2)]
    if variant == "sequential-labels":
        # Test double of A1111's ldm / SDXL label embedding (num_classes="sequential", adm_in_channels), which the
        # PyPI ldm snapshot lacks: Sequential(Sequential(Linear, SiLU, Linear)) fed by a float vector y.
        for seed, member in enumerate(members):
            time_embed_dim = member.time_embed[0].out_features
            member.num_classes = "sequential"
            member.label_emb = randomize_(torch.nn.Sequential(torch.nn.Sequential(
                torch.nn.Linear(12, time_embed_dim), torch.nn.SiLU(), torch.nn.Linear(time_embed_dim, time_embed_dim)
            )), seed=seed).requires_grad_(False)
        y = torch.randn(2, 12)
    x, timesteps, context = random_inputs(context_dim=context_dim, in_channels=params["in_channels"])
    for mode in MODES:
        ensemble = ensemble_for(members, mode, context_dim=context_dim)
        with torch.no_grad():
            out = ensemble(x, timesteps, context, y=y)
        assert out.shape == (2, 4, 16, 16) and out.dtype == torch.float32, mode
        assert torch.isfinite(out).all()
    if y is not None:  # the label embedding takes part: other labels, other output
        ensemble = ensemble_for(members, "sabw")
        with torch.no_grad():
            other_y = torch.tensor([1, 2]) if variant == "class-labels" else torch.randn(2, 12)
            assert not torch.allclose(ensemble(x, timesteps, context, y=y), ensemble(x, timesteps, context, y=other_y))
        with pytest.raises(ValueError, match="pass y"):
            ensemble(x, timesteps, context)


def test_odd_latent_sizes(tiny_params):
    """Non-square latents and sizes where the SABW pooling factor does not divide the side: the weights are pooled
    and upsampled back to every block's own size, still sum to one at every pixel (so identical members give the
    member's output), and differ across the image (SABW is spatial)."""
    unet = make_unet(tiny_params, seed=4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 24, 16, generator=generator)
    timesteps, context = torch.tensor([100.0]), torch.randn(1, 77, 32, generator=generator)
    seen = {}

    def observe(block_index, weights):
        seen[block_index] = weights

    identical = ensemble_for([copy.deepcopy(unet) for _ in range(2)], "sabw", seed=9, max_resolution=6)
    identical.observer = observe
    with torch.no_grad():
        expected = unet(x, timesteps, context)
        out = identical(x, timesteps, context)
    assert out.shape == x.shape
    assert (out - expected).abs().max().item() < 1e-5
    first = seen[0]
    assert first.shape == (1, 2, 24, 16)
    torch.testing.assert_close(first.sum(dim=1), torch.ones(1, 24, 16))
    assert (first[:, 0].max() - first[:, 0].min()).item() > 1e-4


def _cpu_autocast_dtype():
    """fp16 under CPU autocast where this torch supports it, else bf16 (torch < 2.3)."""
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            torch.ones(2, 2) @ torch.ones(2, 2)
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


def test_fp16_members_fp32_aggregator_under_autocast(tiny_params, monkeypatch):
    """The GPU setup of the WebUI: fp16 members, fp32 SABW, autocast.

    CPU autocast lacks CUDA autocast's fp32 policy for group_norm (it casts input *and* weights to fp32), so even a
    lone fp16 ldm UNet fails under CPU autocast; the policy is emulated here so the test runs on CPU CI.
    """
    group_norm = torch.nn.functional.group_norm

    def group_norm_fp32_policy(self, x):
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return group_norm(x.float(), self.num_groups, weight, bias, self.eps)

    monkeypatch.setattr(torch.nn.GroupNorm, "forward", group_norm_fp32_policy)
    members32 = [make_unet(tiny_params, seed=s) for s in range(2)]
    members16 = [copy.deepcopy(m).half() for m in members32]
    aggregator = make_aggregator(members32[0], 2, seed=4)
    x, timesteps, context = random_inputs(batch=1)  # fp16 kernels are slow on CPU
    seen_dtypes = []
    with torch.no_grad():
        reference = EnsembleUNet(members32, aggregator, "sabw")(x, timesteps, context)
        ensemble = EnsembleUNet(members16, aggregator, "sabw",
                                observer=lambda block_index, weights: seen_dtypes.append(weights.dtype))
        with torch.autocast("cpu", dtype=_cpu_autocast_dtype()):
            out = ensemble(x, timesteps, context)
    assert next(aggregator.parameters()).dtype == torch.float32
    assert set(seen_dtypes) == {torch.float32}  # softmax weights in fp32, cast only for the mix
    assert out.dtype == x.dtype == torch.float32  # output in the input's dtype, like UNetModel
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("mode", ["sabw", "last-block"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_every_sabw_block_and_no_member(tiny_params, mode, checkpointing):
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    ensemble = ensemble_for(members, mode, seed=2)
    ensemble.gradient_checkpointing = checkpointing
    ensemble.aggregator.requires_grad_(True)
    x, timesteps, context = random_inputs()
    ensemble(x, timesteps, context).square().mean().backward()
    blocks = ensemble.aggregator.config.aggregated_blocks
    for block_index in blocks:
        for name, parameter in ensemble.aggregator.block(block_index).named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, (block_index, name)
    assert all(p.grad is None for member in members for p in member.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny_params):
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    x, timesteps, context = random_inputs()
    gradients = []
    for checkpointing in (False, True):
        ensemble = ensemble_for(members, "sabw", seed=2)
        ensemble.aggregator.requires_grad_(True)
        ensemble.gradient_checkpointing = checkpointing
        ensemble(x, timesteps, context).square().mean().backward()
        gradients.append([p.grad for p in ensemble.aggregator.parameters()])
    for with_grad, without in zip(*gradients):
        torch.testing.assert_close(with_grad, without, rtol=1e-5, atol=1e-7)


def test_observer_receives_every_weight_map(tiny_params):
    members = [make_unet(tiny_params, seed=s) for s in range(3)]
    seen = []
    ensemble = ensemble_for(members, "sabw", seed=2)
    ensemble.observer = lambda block_index, weights: seen.append((block_index, weights))
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        ensemble(x, timesteps, context)
    layout = block_layout(unet_shapes(members[0]))
    assert [index for index, _ in seen] == list(range(25))
    for block_index, weights in seen:
        side = 16 // layout.downsampling[block_index]
        assert weights.shape == (2, 3, side, side)
        torch.testing.assert_close(weights.sum(1), torch.ones(2, side, side))
    # spatial weights vary over pixels; the no-spatial ablation gives one weight per member
    assert seen[0][1].std(dim=(2, 3)).max() > 0
    seen.clear()
    ensemble = ensemble_for(members, "sabw", seed=2, spatial=False)
    ensemble.observer = lambda block_index, weights: seen.append((block_index, weights))
    with torch.no_grad():
        ensemble(x, timesteps, context)
    assert all(weights.std(dim=(2, 3)).max() == 0 for _, weights in seen)


def test_last_block_mode_mixes_only_the_predictions(tiny_params):
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    seen = []
    ensemble = ensemble_for(members, "last-block", seed=2)
    ensemble.observer = lambda block_index, weights: seen.append(block_index)
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        ensemble(x, timesteps, context)
    assert seen == [24]
    assert len(ensemble.aggregator.state_dict()) == len(
        [k for k in ensemble.aggregator.state_dict() if k.startswith(("output_blocks.11.", "time_embed."))])


@pytest.mark.parametrize("flag", ["use_timestep", "use_text"])
def test_ablation_flags_remove_their_conditioning(tiny_params, flag):
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    x, timesteps, context = random_inputs()
    ensemble = ensemble_for(members, "sabw", seed=2, **{flag: False})
    with torch.no_grad():
        out = ensemble(x, timesteps, context)
        if flag == "use_timestep":
            # the members still see the timestep; only SABW's own time embedding is gone
            assert not any("time_embed" in k or "emb_layers" in k for k in ensemble.aggregator.state_dict())
        else:
            assert not any(k.split(".")[-2] in ("to_k", "to_v") for k in ensemble.aggregator.state_dict())
    assert torch.isfinite(out).all()


def test_mode_and_member_count_errors(tiny_params):
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    with pytest.raises(IncompatibleMembersError, match="at least 2 members"):
        EnsembleUNet(members[:1], None, "average")
    with pytest.raises(ValueError, match="needs SABW weights"):
        EnsembleUNet(members, None, "sabw")
    with pytest.raises(AfaError, match="unknown AFA mode"):
        EnsembleUNet(members, None, "median")
    with pytest.raises(IncompatibleMembersError, match="for 3 members"):
        EnsembleUNet(members, make_aggregator(members[0], 3), "sabw")
    with pytest.raises(ValueError, match="trained for mode sabw, not last-block"):
        EnsembleUNet(members, make_aggregator(members[0], 2), "last-block")


def test_offloading_moves_one_member_block_at_a_time(tiny_params, monkeypatch):
    """Low-VRAM mode: each member block visits the offload device only while it runs, then goes home."""
    members = [make_unet(tiny_params, seed=s) for s in range(2)]
    x, timesteps, context = random_inputs()
    with torch.no_grad():
        expected = ensemble_for(members, "sabw")(x, timesteps, context)
    moves = []
    original_to = torch.nn.Module.to

    def recording_to(module, *args, **kwargs):
        moves.append((module, str(args[0]) if args else str(kwargs.get("device"))))
        return original_to(module, *args, **kwargs)

    ensemble = ensemble_for(members, "sabw")
    ensemble.offload_device = torch.device("cpu")  # stands in for the GPU: the moves are what is checked
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    with torch.no_grad():
        got = ensemble(x, timesteps, context)
    assert torch.equal(got, expected)
    moved = [module for module, _ in moves]
    for member in members:
        blocks = [*member.input_blocks, member.middle_block, *member.output_blocks, member.out, member.time_embed]
        for block in blocks:  # every block moved exactly twice: there and back
            assert sum(module is block for module in moved) == 2
    assert len(moves) == 2 * 2 * 27


def test_default_sabw_stays_within_3_percent_of_the_members_flops():
    """The cost budget: SD 1.5, 512 px (64x64 latents), 2 members, default config. FLOPs are counted on meta
    tensors, so this is exact and independent of machine load."""
    from afa.bench import flop_ratios

    def config(only_last_block):
        return AggregatorConfig(2, list(SD15_CHANNELS), context_dim=768, only_last_block=only_last_block)

    ratios = flop_ratios("sd15", 2, 64, 1, config)
    assert ratios["average"] == ratios["noise-average"] == 1.0
    assert 1.0 < ratios["sabw"] <= 1.03


SD15_CHANNELS = (320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280,
                 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 4)


@pytest.mark.parametrize("size", [1, 4])
def test_mix_keeps_the_memory_layout_of_the_features(size):
    # In a real A1111 blocks return channels-last tensors; for a 1 x 1 block plain arithmetic would give the mix
    # contiguous strides, the next block then rounds differently, and a strong prompt LoRA made that visible as
    # block averaging of identical members drifting from the member alone.
    features = torch.randn(2, size, size, 64).permute(0, 3, 1, 2)  # channels-last strides, as ldm's blocks return
    weights = torch.full((2, 2, 1, 1), 0.5, requires_grad=True)
    mixed = mix([features, features.clone()], weights)
    assert mixed.stride() == features.stride() and torch.equal(mixed, features)
    mixed.sum().backward()  # SABW's weights still get their gradient
    assert weights.grad is not None and torch.isfinite(weights.grad).all()
    plain = torch.randn(2, 8, 4, 4)
    assert mix([plain, plain], weights.detach()).stride() == plain.stride()
