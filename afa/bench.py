"""`python -m afa bench`: seconds per UNet call for one member and for the ensemble in every mode.

Members of a named architecture are built with random weights (no downloads). Runs are interleaved (one UNet,
then each mode, repeated) so machine noise hits all of them alike, and medians are reported. The figure that matters
is the ratio ensemble / (N x one UNet): the cost of AFA beyond running the N members.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time

import torch

from .aggregator import Aggregator, AggregatorConfig
from .ensemble import EnsembleUNet
from .modes import LAST_BLOCK, MODES, SABW
from .members import unet_shapes
from .unet import PRESETS, block_layout, build_unet


def _random_members(arch: str, count: int, dtype: torch.dtype, seed: int) -> list[torch.nn.Module]:
    torch.manual_seed(seed)
    first = build_unet(PRESETS[arch]).to(dtype).eval().requires_grad_(False)
    members = [first]
    for _ in range(count - 1):
        member = copy.deepcopy(first)
        with torch.no_grad():
            for parameter in member.parameters():  # distinct weights, so no cache can share them
                parameter.mul_(1.0 + 0.01 * torch.randn((), dtype=torch.float32).item())
        members.append(member)
    return members


def _aggregator(config: AggregatorConfig, dtype: torch.dtype) -> Aggregator:
    aggregator = Aggregator(config)
    with torch.no_grad():  # non-zero output layers, so the weights are not trivially uniform
        for name, parameter in aggregator.named_parameters():
            if name.endswith("out.2.weight"):
                parameter.normal_(0.0, 0.02)
    return aggregator.to(dtype).eval().requires_grad_(False)


def _time_call(function, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats


def _setup(arch: str, num_members: int, latent: int, batch: int, dtype: torch.dtype, hidden_channels: int | None,
           max_resolution, seed: int):
    """Random members, the SABW configs (all blocks / last block) and one batch of inputs."""
    members = _random_members(arch, num_members, dtype, seed)
    params = PRESETS[arch]
    layout = block_layout(unet_shapes(members[0]))
    overrides = {}
    if hidden_channels is not None:
        overrides["hidden_channels"] = hidden_channels
    if max_resolution != "default":
        overrides["max_resolution"] = max_resolution

    def config(only_last_block: bool) -> AggregatorConfig:
        return AggregatorConfig(num_members, list(layout.channels), context_dim=params["context_dim"],
                                only_last_block=only_last_block, **overrides)

    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, params["in_channels"], latent, latent, generator=generator).to(dtype)
    timesteps = torch.full((batch,), 500.0)
    context = torch.randn(batch, 77, params["context_dim"], generator=generator).to(dtype)
    return members, config, (x, timesteps, context)


def flop_ratios(arch: str, num_members: int, latent: int, batch: int, config) -> dict[str, float]:
    """FLOPs of the ensemble in each mode / (N x one UNet), counted by torch's FlopCounterMode on meta tensors (no
    compute, no memory). Unlike seconds, this does not depend on what else the machine is doing."""
    from torch.utils.flop_counter import FlopCounterMode

    params = PRESETS[arch]
    with torch.device("meta"):
        members = [build_unet(params) for _ in range(num_members)]
        aggregators = {SABW: Aggregator(config(False)), LAST_BLOCK: Aggregator(config(True))}
        x = torch.randn(batch, params["in_channels"], latent, latent)
        timesteps = torch.full((batch,), 500.0)
        context = torch.randn(batch, 77, params["context_dim"])

        def count(function) -> int:
            with FlopCounterMode(display=False) as counter:
                function()
            return counter.get_total_flops()

        one = count(lambda: members[0](x, timesteps, context))
        return {mode.name: count(lambda: EnsembleUNet(members, aggregators.get(mode), mode)(x, timesteps, context))
                / (num_members * one) for mode in MODES}


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


def run_bench(arch: str = "sd15", num_members: int = 2, latent: int = 64, batch: int = 1, repeats: int = 3,
              dtype: torch.dtype = torch.float32, hidden_channels: int | None = None,
              max_resolution: int | None | str = "default", seed: int = 0, out=sys.stdout) -> dict:
    """Times one UNet and the ensemble in each mode; prints a table and returns the figures."""
    members, config, (x, timesteps, context) = _setup(arch, num_members, latent, batch, dtype, hidden_channels,
                                                      max_resolution, seed)
    aggregators = {SABW: _aggregator(config(False), dtype), LAST_BLOCK: _aggregator(config(True), dtype)}
    ensembles = {mode.name: EnsembleUNet(members, aggregators.get(mode), mode) for mode in MODES}
    calls = {"one UNet": lambda: members[0](x, timesteps, context)}
    calls.update({mode: (lambda e=ensemble: e(x, timesteps, context)) for mode, ensemble in ensembles.items()})
    medians = _interleaved_medians(calls, repeats, inference=True)
    flops = flop_ratios(arch, num_members, latent, batch, config)

    one = medians["one UNet"]
    sabw_parameters = sum(p.numel() for p in aggregators[SABW].parameters())
    peak_rss_gib = _peak_rss_gib()
    print(f"arch={arch} members={num_members} latent={latent}x{latent} batch={batch} dtype={str(dtype)[6:]} "
          f"threads={torch.get_num_threads()} repeats={repeats} (medians)", file=out)
    print(f"{'call':<16}{'s/call':>10}{'time / (N x one)':>18}{'FLOPs / (N x one)':>19}", file=out)
    for name, value in medians.items():
        ratio = "" if name == "one UNet" else f"{value / (num_members * one):.3f}"
        flop_ratio = "" if name == "one UNet" else f"{flops[name]:.4f}"
        print(f"{name:<16}{value:>10.3f}{ratio:>18}{flop_ratio:>19}", file=out)
    sabw_config = aggregators[SABW].config
    print(f"SABW parameters: {sabw_parameters / 1e6:.2f}M (hidden {sabw_config.hidden_channels}, "
          f"max_resolution {sabw_config.max_resolution}); peak RSS {_format_gib(peak_rss_gib)}", file=out)
    figures = {
        "arch": arch, "members": num_members, "latent": latent, "batch": batch, "dtype": str(dtype)[6:],
        "threads": torch.get_num_threads(), "repeats": repeats,
        "seconds_one_unet": round(one, 4),
        "seconds": {mode.name: round(medians[mode.name], 4) for mode in MODES},
        "ratio_to_n_unets": {mode.name: round(medians[mode.name] / (num_members * one), 4) for mode in MODES},
        "flop_ratio_to_n_unets": {mode.name: round(flops[mode.name], 5) for mode in MODES},
        "sabw_parameters": sabw_parameters, "peak_rss_gib": _round(peak_rss_gib),
    }
    print(json.dumps(figures), file=out)
    return figures


def run_train_bench(arch: str = "sd15", num_members: int = 2, latent: int = 32, batch: int = 1, repeats: int = 3,
                    dtype: torch.dtype = torch.float32, hidden_channels: int | None = None,
                    max_resolution: int | None | str = "default", gradient_checkpointing: bool = False,
                    seed: int = 0, out=sys.stdout) -> dict:
    """Times one SABW training step (ensemble forward + backward into SABW) against one ensemble forward without
    gradients. Peak RSS is the process's, so compare --gradient-checkpointing on and off in separate runs."""
    members, config, (x, timesteps, context) = _setup(arch, num_members, latent, batch, dtype, hidden_channels,
                                                      max_resolution, seed)
    aggregator = _aggregator(config(False), dtype).train().requires_grad_(True)
    ensemble = EnsembleUNet(members, aggregator, SABW)
    ensemble.gradient_checkpointing = gradient_checkpointing

    def forward():
        with torch.no_grad():
            ensemble(x, timesteps, context)

    def train_step():
        ensemble(x, timesteps, context).float().square().mean().backward()
        aggregator.zero_grad(set_to_none=True)

    medians = _interleaved_medians({"ensemble forward": forward, "train step": train_step}, repeats,
                                   inference=False)
    peak_rss_gib = _peak_rss_gib()
    ratio = medians["train step"] / medians["ensemble forward"]
    print(f"arch={arch} members={num_members} latent={latent}x{latent} batch={batch} dtype={str(dtype)[6:]} "
          f"gradient_checkpointing={gradient_checkpointing} threads={torch.get_num_threads()} (medians)", file=out)
    print(f"ensemble forward {medians['ensemble forward']:.3f} s; train step {medians['train step']:.3f} s "
          f"({ratio:.2f}x); peak RSS {_format_gib(peak_rss_gib)}", file=out)
    figures = {
        "arch": arch, "members": num_members, "latent": latent, "batch": batch, "dtype": str(dtype)[6:],
        "gradient_checkpointing": gradient_checkpointing, "threads": torch.get_num_threads(), "repeats": repeats,
        "seconds_forward": round(medians["ensemble forward"], 4), "seconds_train_step": round(medians["train step"], 4),
        "ratio_train_step_to_forward": round(ratio, 3), "peak_rss_gib": _round(peak_rss_gib),
    }
    print(json.dumps(figures), file=out)
    return figures
