"""`python -m afa bench`: seconds and FLOPs per UNet call for one member, N members and the ensemble in every mode.

Members of a named architecture are built with random weights (no downloads), the aggregator from a SABW preset
(`afa.aggregator.SABW_PRESETS`) with random output layers. Runs are interleaved (one UNet, N UNets, then each mode,
repeated) so machine noise hits all of them alike, and medians are reported. The figure that matters is the ratio
ensemble / N UNets: the cost of AFA beyond running the N members.

FLOPs are counted by torch's FlopCounterMode on meta tensors (no compute, no memory): 2 per multiply-add of the
convolutions, linear layers and matrix products, attention's included; norms, softmax and pooling are not counted.
The aggregator's count is checked against `sabw_matmul_flops`, the same count written out from the config, so a
torch whose counter misses an attention kernel shows up as a mismatch instead of a flattering ratio.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import time
from typing import Callable

import torch
from torch import nn

from .aggregator import DEFAULT_PRESET, Aggregator, AggregatorConfig, SabwBlock, _pooled_size, preset_config
from .ensemble import EnsembleUNet
from .modes import LAST_BLOCK, MODES, SABW
from .members import unet_shapes
from .unet import PRESETS, block_layout, build_unet

CONTEXT_LENGTH = 77  # CLIP's token count: the length of the text context every call reads
N_UNETS = "N UNets"
ONE_UNET = "one UNet"

ConfigFactory = Callable[[bool], AggregatorConfig]
"""config(only_last_block) -> the aggregator config of the SABW mode (False) or the last-block mode (True)."""


def _cast_time_embedding_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook of a member's `time_embed`: ldm's `UNetModel.forward` feeds it the fp32 sinusoidal
    embedding whatever the weights' dtype (the WebUI patches `timestep_embedding` for that), so cast it there."""
    return (args[0].to(module[0].weight.dtype),) + tuple(args[1:])


def random_members(arch: str, count: int, dtype: torch.dtype, seed: int,
                   device: torch.device | str | None = None) -> list[nn.Module]:
    """`count` members of architecture `arch` with random, distinct weights, frozen, in eval mode, in `dtype` on
    `device`. Their own `forward()` (the "one UNet" baseline) takes half-precision weights too, under CUDA autocast
    as the WebUI runs them (ldm's GroupNorm32 normalises a float32 input with the weights' dtype)."""
    torch.manual_seed(seed)
    first = build_unet(PRESETS[arch], device=device).to(dtype).eval().requires_grad_(False)
    members = [first]
    for _ in range(count - 1):
        member = copy.deepcopy(first)
        with torch.no_grad():
            for parameter in member.parameters():  # distinct weights, so no cache can share them
                parameter.mul_(1.0 + 0.01 * torch.randn((), dtype=torch.float32).item())
        members.append(member)
    for member in members:
        member.dtype = dtype  # ldm's forward casts the input to `self.dtype` (set from its use_fp16 flag)
        member.time_embed.register_forward_pre_hook(_cast_time_embedding_input)
    return members


def random_aggregator(config: AggregatorConfig, dtype: torch.dtype,
                      device: torch.device | str | None = None) -> Aggregator:
    """An aggregator whose zero-initialised output convolutions (both designs) are random, so the weights are not
    trivially uniform and no kernel can skip work on zeros."""
    aggregator = Aggregator(config)
    with torch.no_grad():
        for module in aggregator.modules():
            if isinstance(module, SabwBlock):
                output_conv = module.out if isinstance(module.out, nn.Conv2d) else module.out[-1]
                output_conv.weight.normal_(0.0, 0.02)
    return aggregator.to(device=device, dtype=dtype).eval().requires_grad_(False)


def preset_configs(preset: str, num_members: int, block_channels, context_dim: int, hidden_channels: int | None = None,
                   max_resolution: int | None | str = "default") -> ConfigFactory:
    """The config factory of a preset, with optional overrides ("default" leaves the preset's max_resolution)."""
    overrides = {}
    if hidden_channels is not None:
        overrides["hidden_channels"] = hidden_channels
    if max_resolution != "default":
        overrides["max_resolution"] = max_resolution

    def config(only_last_block: bool) -> AggregatorConfig:
        return preset_config(preset, num_members, list(block_channels), context_dim,
                             only_last_block=only_last_block, **overrides)

    return config


def _time_call(function, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def unet_inputs(params: dict, latent: int, batch: int, generator: torch.Generator | None = None,
                dtype: torch.dtype = torch.float32) -> tuple:
    """One batch of random UNet inputs for UNetModel parameters `params`: (x [B x C_in x latent x latent],
    timesteps [B], context [B x 77 x context_dim], y [B x adm_in_channels] for label-conditioned (SDXL) UNets, else
    None)."""
    x = torch.randn(batch, params["in_channels"], latent, latent, generator=generator).to(dtype)
    timesteps = torch.full((batch,), 500.0)
    context = torch.randn(batch, CONTEXT_LENGTH, params["context_dim"], generator=generator).to(dtype)
    adm = params.get("adm_in_channels")
    y = torch.randn(batch, adm, generator=generator).to(dtype) if adm else None
    return x, timesteps, context, y


def _setup(arch: str, num_members: int, latent: int, batch: int, dtype: torch.dtype, preset: str,
           hidden_channels: int | None, max_resolution, seed: int):
    """Random members, the SABW config factory and one batch of inputs (`unet_inputs`)."""
    members = random_members(arch, num_members, dtype, seed)
    params = PRESETS[arch]
    layout = block_layout(unet_shapes(members[0]))
    config = preset_configs(preset, num_members, layout.channels, params["context_dim"], hidden_channels,
                            max_resolution)
    return members, config, unet_inputs(params, latent, batch, torch.Generator().manual_seed(seed), dtype)


def sabw_matmul_flops(config: AggregatorConfig, block_sizes: dict[int, tuple[int, int]], batch: int,
                      context_length: int = CONTEXT_LENGTH) -> dict[str, int]:
    """The aggregator's FLOPs in one ensemble call, written out from its config, counted as FlopCounterMode counts
    (2 per multiply-add of convolutions, linear layers and attention's two matrix products; no norms, softmax,
    pooling or upsampling).

    Args:
        block_sizes: {block index: (H, W) of that block's member features} for the blocks the aggregator runs.
        batch: B.
    Returns:
        {"total", "self_attention", "cross_attention"}: the latter two are attention's products alone
        (q k^T and softmax(.) v), their projections are in the total only.
    """
    hidden, members, depth = config.hidden_channels, config.num_members, config.transformer_depth
    text = config.context_dim if config.use_text else None
    time_width = (None if not config.use_timestep else
                  config.member_time_embed_dim if config.reads_member_time_embeddings else 4 * hidden)
    square = hidden * hidden  # one hidden -> hidden projection per token, in multiply-adds
    total = self_attention = cross_attention = 0
    if config.use_timestep and not config.reads_member_time_embeddings:
        total += 2 * batch * (hidden * 4 * hidden + 4 * hidden * 4 * hidden)  # the fast design's time MLP, once
    for block_index, (height, width) in block_sizes.items():
        pooled_height, pooled_width = _pooled_size(height, width, config.max_resolution)
        tokens = batch * pooled_height * pooled_width  # B*h*w: pixels, the tokens of the transformer layers
        pixels = pooled_height * pooled_width
        macs = tokens * members * config.block_channels[block_index] * hidden  # input projection, 1x1
        macs += 2 * tokens * square * 9  # ResNet layer: two 3x3 convolutions
        if time_width is not None:
            macs += batch * time_width * hidden  # its time projection
        block_cross = 0
        if config.design == "paper":
            macs += 2 * tokens * square  # SpatialTransformer: 1x1 proj_in and proj_out
            for _ in range(depth):
                macs += 4 * tokens * square  # self-attention: q, k, v, out
                self_attention += 2 * 2 * tokens * pixels * hidden  # q k^T and attn v over all h*w pixels
                if text is not None:
                    macs += 2 * tokens * square + 2 * batch * context_length * text * hidden  # q, out; k, v
                    block_cross += 2 * 2 * tokens * context_length * hidden
                macs += tokens * hidden * 8 * hidden + tokens * 4 * hidden * hidden  # GEGLU feed-forward
            macs += tokens * hidden * members  # 1x1 output convolution
        else:
            macs += 2 * tokens * square  # TransformerLayer: proj_in and proj_out
            if text is not None:
                macs += 2 * tokens * square + 2 * batch * context_length * text * hidden
                block_cross += 2 * 2 * tokens * context_length * hidden
            macs += tokens * hidden * 8 * hidden + tokens * 4 * hidden * hidden
            macs += tokens * hidden * members * 9  # 3x3 output convolution
        cross_attention += block_cross
        total += 2 * macs
    total += self_attention + cross_attention
    return {"total": total, "self_attention": self_attention, "cross_attention": cross_attention}


def feature_sizes(downsampling, height: int, width: int) -> dict[int, tuple[int, int]]:
    """{block index: (H, W) of its output} for a latent of height x width; `downsampling` is
    `BlockLayout.downsampling`. ldm's stride-2 convolutions (padding 1) round up, so every level is a ceiling."""
    return {index: (math.ceil(height / factor), math.ceil(width / factor)) for index, factor in enumerate(downsampling)}


def sabw_flops_for_latent(config: AggregatorConfig, downsampling, latent: int, batch: int) -> dict[str, int]:
    """`sabw_matmul_flops` of the blocks `config` aggregates, for square latents of side `latent`."""
    sizes = feature_sizes(downsampling, latent, latent)
    return sabw_matmul_flops(config, {index: sizes[index] for index in config.aggregated_blocks}, batch)


def _count_flops(function) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def unet_flops(arch: str, latent: int, batch: int) -> int:
    """FLOPs of one UNet call of architecture `arch` on [batch x C_in x latent x latent] (FlopCounterMode, meta)."""
    params = PRESETS[arch]
    with torch.device("meta"):
        member = build_unet(params)
        x, timesteps, context, y = unet_inputs(params, latent, batch)
        return _count_flops(lambda: member(x, timesteps, context, y=y))


def count_flops(arch: str, num_members: int, latent: int, batch: int, config: ConfigFactory) -> dict:
    """FLOPs of one UNet and of the ensemble in each mode, counted by FlopCounterMode on meta tensors, with the
    aggregator's analytic count (`sabw_matmul_flops`) of the modes that run it. Unlike seconds, these do not depend
    on what else the machine is doing.

    Returns:
        {"one_unet": int, "modes": {mode: int}, "sabw_analytic": {mode: sabw_matmul_flops(...)}}.
    """
    params = PRESETS[arch]
    with torch.device("meta"):
        members = [build_unet(params) for _ in range(num_members)]
        aggregators = {SABW: Aggregator(config(False)), LAST_BLOCK: Aggregator(config(True))}
        x, timesteps, context, y = unet_inputs(params, latent, batch)
        one = _count_flops(lambda: members[0](x, timesteps, context, y=y))
        modes, analytic = _count_mode_flops(
            lambda mode, observe: EnsembleUNet(members, aggregators.get(mode), mode, observer=observe),
            lambda ensemble: ensemble(x, timesteps, context, y=y), aggregators, batch)
    return {"one_unet": one, "modes": modes, "sabw_analytic": analytic}


def _count_mode_flops(build: Callable, call: Callable, aggregators: dict, batch: int,
                      context_length: int = CONTEXT_LENGTH) -> tuple[dict[str, int], dict[str, dict]]:
    """({mode: FLOPs of one ensemble call}, {mode: sabw_matmul_flops} of the modes that run SABW), for
    `build(mode, observer)` -> an ensemble and `call(ensemble)`; `aggregators` {mode: Aggregator} for those modes."""
    modes, analytic = {}, {}
    for mode in MODES:
        block_sizes: dict[int, tuple[int, int]] = {}

        def observe(block_index: int, weights: torch.Tensor) -> None:
            block_sizes[block_index] = tuple(weights.shape[-2:])

        ensemble = build(mode, observe)
        modes[mode.name] = _count_flops(lambda: call(ensemble))
        if mode.needs_weights:
            analytic[mode.name] = sabw_matmul_flops(aggregators[mode].config, block_sizes, batch, context_length)
    return modes, analytic


def flop_ratios(arch: str, num_members: int, latent: int, batch: int, config: ConfigFactory) -> dict[str, float]:
    """FLOPs of the ensemble in each mode / (N x one UNet) (`count_flops`)."""
    counts = count_flops(arch, num_members, latent, batch, config)
    return {name: flops / (num_members * counts["one_unet"]) for name, flops in counts["modes"].items()}


def _interleaved_medians(calls: dict, repeats: int, inference: bool) -> dict[str, float]:
    """Runs every call once to warm up, then `repeats` rounds of all calls in turn; median seconds per call."""
    seconds = {name: [] for name in calls}
    with torch.inference_mode(inference):
        for function in calls.values():  # warm-up: allocator, oneDNN kernels
            function()
        for _ in range(repeats):
            for name, function in calls.items():
                seconds[name].append(_time_call(function))
    return {name: statistics.median(values) for name, values in seconds.items()}


def _peak_rss_gib() -> float | None:
    """The process's peak resident memory: `resource` on Linux and macOS, psutil's peak working set on Windows
    (A1111 installs psutil); None where neither is there."""
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil
        except ImportError:
            return None
        return psutil.Process().memory_info().peak_wset / 2 ** 30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 30 if sys.platform == "darwin" else peak / 2 ** 20  # bytes on macOS, KiB on Linux


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _format_gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def describe_config(config: AggregatorConfig) -> str:
    """One line naming what sets the aggregator's cost."""
    return (f"design {config.design}, hidden {config.hidden_channels}, {config.num_heads} heads, transformer depth "
            f"{config.transformer_depth}, max_resolution {config.max_resolution}")


def run_bench(arch: str = "sd15", num_members: int = 2, latent: int = 64, batch: int = 1, repeats: int = 3,
              dtype: torch.dtype = torch.float32, hidden_channels: int | None = None,
              max_resolution: int | None | str = "default", seed: int = 0, out=sys.stdout,
              preset: str = DEFAULT_PRESET) -> dict:
    """Times one UNet, N UNets (the members called one after another) and the ensemble in each mode with the
    aggregator of `preset`; prints a table and returns the figures."""
    members, config, (x, timesteps, context, y) = _setup(arch, num_members, latent, batch, dtype, preset,
                                                         hidden_channels, max_resolution, seed)
    aggregators = {SABW: random_aggregator(config(False), dtype), LAST_BLOCK: random_aggregator(config(True), dtype)}
    ensembles = {mode.name: EnsembleUNet(members, aggregators.get(mode), mode) for mode in MODES}

    def n_unets():
        for member in members:
            member(x, timesteps, context, y=y)

    calls = {ONE_UNET: lambda: members[0](x, timesteps, context, y=y), N_UNETS: n_unets}
    calls.update({mode: (lambda e=ensemble: e(x, timesteps, context, y=y)) for mode, ensemble in ensembles.items()})
    medians = _interleaved_medians(calls, repeats, inference=True)
    flops = count_flops(arch, num_members, latent, batch, config)

    one, baseline = medians[ONE_UNET], medians[N_UNETS]
    members_flops = num_members * flops["one_unet"]
    flop_ratio = {name: value / members_flops for name, value in flops["modes"].items()}
    sabw_config = aggregators[SABW].config
    sabw_parameters = sum(p.numel() for p in aggregators[SABW].parameters())
    peak_rss_gib = _peak_rss_gib()
    print(f"arch={arch} members={num_members} latent={latent}x{latent} batch={batch} dtype={str(dtype)[6:]} "
          f"preset={preset} threads={torch.get_num_threads()} repeats={repeats} (medians)", file=out)
    print(f"{'call':<16}{'s/call':>10}{'time / N UNets':>16}{'FLOPs / N UNets':>17}", file=out)
    for name, value in medians.items():
        time_ratio = "" if name == ONE_UNET else f"{value / baseline:.3f}"
        flop_text = "" if name == ONE_UNET else "1.0000" if name == N_UNETS else f"{flop_ratio[name]:.4f}"
        print(f"{name:<16}{value:>10.3f}{time_ratio:>16}{flop_text:>17}", file=out)
    print(f"SABW ({describe_config(sabw_config)}): {sabw_parameters / 1e6:.2f}M parameters; peak RSS "
          f"{_format_gib(peak_rss_gib)}", file=out)

    counted = flops["modes"][SABW.name] - members_flops
    analytic = flops["sabw_analytic"][SABW.name]
    agreement = {name: flops["modes"][name] - members_flops == value["total"]
                 for name, value in flops["sabw_analytic"].items()}
    print(f"SABW FLOPs per ensemble call: {counted / 1e9:.2f} G = {100 * counted / members_flops:.2f}% of the "
          f"{num_members} members' {members_flops / 1e9:.1f} G; attention products: self "
          f"{analytic['self_attention'] / 1e9:.2f} G, cross {analytic['cross_attention'] / 1e9:.2f} G", file=out)
    if all(agreement.values()):
        print("FLOP check: FlopCounterMode's count of SABW equals the analytic count (sabw_matmul_flops)", file=out)
    else:
        for name, value in flops["sabw_analytic"].items():
            if not agreement[name]:
                print(f"WARNING: FLOP check failed for {name}: FlopCounterMode counted "
                      f"{(flops['modes'][name] - members_flops) / 1e9:.3f} G for SABW, the analytic count is "
                      f"{value['total'] / 1e9:.3f} G; the FLOP ratios above are not to be trusted", file=out)
    figures = {
        "arch": arch, "members": num_members, "latent": latent, "batch": batch, "dtype": str(dtype)[6:],
        "preset": preset, "sabw_config": sabw_config.to_dict(),
        "threads": torch.get_num_threads(), "repeats": repeats,
        "seconds_one_unet": round(one, 4), "seconds_n_unets": round(baseline, 4),
        "seconds": {mode.name: round(medians[mode.name], 4) for mode in MODES},
        "ratio_to_n_unets": {mode.name: round(medians[mode.name] / baseline, 4) for mode in MODES},
        "flop_ratio_to_n_unets": {mode.name: round(flop_ratio[mode.name], 5) for mode in MODES},
        "flops_one_unet": flops["one_unet"], "flops": flops["modes"], "sabw_flops_analytic": flops["sabw_analytic"],
        "flop_check_passed": all(agreement.values()),
        "sabw_parameters": sabw_parameters, "peak_rss_gib": _round(peak_rss_gib),
    }
    print(json.dumps(figures), file=out)
    return figures


def run_train_bench(arch: str = "sd15", num_members: int = 2, latent: int = 32, batch: int = 1, repeats: int = 3,
                    dtype: torch.dtype = torch.float32, hidden_channels: int | None = None,
                    max_resolution: int | None | str = "default", gradient_checkpointing: bool = False,
                    seed: int = 0, out=sys.stdout, preset: str = DEFAULT_PRESET) -> dict:
    """Times one SABW training step (ensemble forward + backward into SABW) against one ensemble forward without
    gradients. Peak RSS is the process's, so compare --gradient-checkpointing on and off in separate runs."""
    members, config, (x, timesteps, context, y) = _setup(arch, num_members, latent, batch, dtype, preset,
                                                         hidden_channels, max_resolution, seed)
    aggregator = random_aggregator(config(False), dtype).train().requires_grad_(True)
    ensemble = EnsembleUNet(members, aggregator, SABW)
    ensemble.gradient_checkpointing = gradient_checkpointing

    def forward():
        with torch.no_grad():
            ensemble(x, timesteps, context, y=y)

    def train_step():
        ensemble(x, timesteps, context, y=y).float().square().mean().backward()
        aggregator.zero_grad(set_to_none=True)

    medians = _interleaved_medians({"ensemble forward": forward, "train step": train_step}, repeats,
                                   inference=False)
    peak_rss_gib = _peak_rss_gib()
    ratio = medians["train step"] / medians["ensemble forward"]
    print(f"arch={arch} members={num_members} latent={latent}x{latent} batch={batch} dtype={str(dtype)[6:]} "
          f"preset={preset} gradient_checkpointing={gradient_checkpointing} threads={torch.get_num_threads()} "
          f"(medians)", file=out)
    print(f"ensemble forward {medians['ensemble forward']:.3f} s; train step {medians['train step']:.3f} s "
          f"({ratio:.2f}x); peak RSS {_format_gib(peak_rss_gib)}", file=out)
    figures = {
        "arch": arch, "members": num_members, "latent": latent, "batch": batch, "dtype": str(dtype)[6:],
        "preset": preset, "gradient_checkpointing": gradient_checkpointing, "threads": torch.get_num_threads(),
        "repeats": repeats, "seconds_forward": round(medians["ensemble forward"], 4),
        "seconds_train_step": round(medians["train step"], 4),
        "ratio_train_step_to_forward": round(ratio, 3), "peak_rss_gib": _round(peak_rss_gib),
    }
    print(json.dumps(figures), file=out)
    return figures


# -- FLUX: FLOPs only --------------------------------------------------------------------------------------------------

T5_TOKENS = 512  # FLUX.1 [dev]'s T5 sequence length (ComfyUI pads T5 to at least 77 tokens, BFL's pipeline to 512)


def flux_architectures() -> dict:
    """{name: afa.flux_model.FluxParams} of the FLUX layouts `afa bench` counts: FLUX.1 [dev], and a tiny one of the
    same block structure (1 double + 2 single blocks) for tests."""
    from .flux_model import FluxParams
    return {"flux-dev": FluxParams(),
            "flux-tiny": FluxParams(in_channels=64, out_channels=64, vec_in_dim=16, context_in_dim=24, hidden_size=32,
                                    mlp_ratio=2.0, num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6))}


def flux_flops(arch: str, num_members: int, latent: int, batch: int, preset: str,
               text_tokens: int = T5_TOKENS) -> dict:
    """FLOPs of one FLUX member call and of the FLUX ensemble in each mode (FlopCounterMode on meta tensors, as
    `count_flops`), a latent [batch x 16 x latent x latent] (latent 128 = 1024 px) and `text_tokens` T5 tokens, with
    SABW of `preset` for the modes that run it; SABW's count is the mode's minus block averaging's (the members'
    work, the rotary embedding computed once), checked against `sabw_matmul_flops`.

    Returns:
        {"one_member", "modes": {mode: FLOPs}, "sabw_counted": {mode: FLOPs}, "sabw_analytic": {mode: {...}},
         "sabw_parameters", "config": the SABW mode's AggregatorConfig}.
    """
    from .flux import EnsembleFlux, flux_layout, flux_preset_config
    from .flux_model import Flux

    params = flux_architectures()[arch]
    with torch.device("meta"):
        members = [Flux(params) for _ in range(num_members)]
        layout = flux_layout(unet_shapes(members[0]))
        configs = {mode: flux_preset_config(preset, num_members, layout, only_last_block=mode is LAST_BLOCK)
                   for mode in (SABW, LAST_BLOCK)}
        aggregators = {mode: Aggregator(config) for mode, config in configs.items()}
        x = torch.randn(batch, params.out_channels // 4, latent, latent)
        inputs = dict(timesteps=torch.full((batch,), 0.5), context=torch.randn(batch, text_tokens,
                                                                                 params.context_in_dim),
                      y=torch.randn(batch, params.vec_in_dim), guidance=torch.full((batch,), 3.5))
        one = _count_flops(lambda: members[0](x, **inputs))
        modes, analytic = _count_mode_flops(
            lambda mode, observe: EnsembleFlux(members, aggregators.get(mode), mode, observer=observe),
            lambda ensemble: ensemble(x, **inputs), aggregators, batch, text_tokens)
    baseline = {name: modes["average" if name != LAST_BLOCK.name else "noise-average"] for name in analytic}
    return {"one_member": one, "modes": modes, "sabw_analytic": analytic,
            "sabw_counted": {name: modes[name] - baseline[name] for name in analytic},
            "sabw_parameters": sum(p.numel() for p in aggregators[SABW].parameters()), "config": configs[SABW]}


def run_flux_bench(arch: str = "flux-dev", num_members: int = 2, latent: int = 128, batch: int = 1,
                   preset: str = DEFAULT_PRESET, out=sys.stdout) -> dict:
    """Prints the FLOPs of N FLUX members and of their ensemble in each mode, and SABW's parameters (no timing:
    FLUX.1 [dev] members are 11.9B parameters each); returns the figures."""
    counts = flux_flops(arch, num_members, latent, batch, preset)
    members_flops = num_members * counts["one_member"]
    ratio = {name: value / members_flops for name, value in counts["modes"].items()}
    print(f"arch={arch} members={num_members} latent={latent}x{latent} ({8 * latent} px, "
          f"{(latent // 2) ** 2} image tokens, {T5_TOKENS} text tokens) batch={batch} preset={preset} "
          f"(FLOPs on meta tensors; no timing)", file=out)
    print(f"{'call':<16}{'TFLOPs':>12}{'FLOPs / N members':>20}", file=out)
    print(f"{'one member':<16}{counts['one_member'] / 1e12:>12.2f}", file=out)
    print(f"{'N members':<16}{members_flops / 1e12:>12.2f}{1.0:>20.4f}", file=out)
    for name, value in counts["modes"].items():
        print(f"{name:<16}{value / 1e12:>12.2f}{ratio[name]:>20.4f}", file=out)
    counted, analytic = counts["sabw_counted"][SABW.name], counts["sabw_analytic"][SABW.name]
    check = all(counts["sabw_counted"][name] == value["total"] for name, value in counts["sabw_analytic"].items())
    print(f"SABW ({describe_config(counts['config'])}): {counts['sabw_parameters'] / 1e6:.2f}M parameters, "
          f"{counted / 1e9:.1f} G per call = {100 * counted / members_flops:.2f}% of the {num_members} members' "
          f"{members_flops / 1e12:.1f} T; attention products: self {analytic['self_attention'] / 1e9:.1f} G, "
          f"cross {analytic['cross_attention'] / 1e9:.1f} G", file=out)
    print("FLOP check: FlopCounterMode's count of SABW equals the analytic count (sabw_matmul_flops)" if check else
          "WARNING: FLOP check failed: FlopCounterMode's count of SABW differs from sabw_matmul_flops", file=out)
    figures = {"arch": arch, "members": num_members, "latent": latent, "batch": batch, "preset": preset,
               "flops_one_member": counts["one_member"], "flops": counts["modes"],
               "flop_ratio_to_n_members": {name: round(value, 5) for name, value in ratio.items()},
               "sabw_flops_analytic": counts["sabw_analytic"], "flop_check_passed": check,
               "sabw_parameters": counts["sabw_parameters"], "sabw_config": counts["config"].to_dict()}
    print(json.dumps(figures), file=out)
    return figures
