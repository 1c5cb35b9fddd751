#!/usr/bin/env python
"""GPU benchmark of the AFA ensemble: seconds per UNet call, one UNet vs N UNets vs the ensemble in every mode.

    python tools/gpu_bench.py [--output PATH] [--budget-s 240]     # on a CUDA machine, from the repository root
    python tools/gpu_bench.py --quick --output /tmp/gpu_bench.json  # CPU smoke run: tiny members, fp32

What it measures (the defaults): SD 1.5-shaped members with random weights, fp16 on CUDA, at 512 px (latent
64x64, batch 2 = one classifier-free-guidance pair), N = 2 and N = 3. For each N, one round calls, one after another:
one UNet, the N UNets (the members called in turn: what running them without AFA costs), block averaging, noise
averaging, and for each SABW preset (paper, fast) the ensemble in its two SABW modes (sabw, last-block). Rounds repeat
until the time budget share of that N is spent (at least --min-repeats, at most --max-repeats); the medians are
reported, as seconds per call and as ratios to the N UNets, next to the goals (GOALS: fast <= 1.03x, paper <= 1.07x).
FLOP ratios come from `afa.bench.count_flops` (meta tensors, CPU), peak memory from torch.cuda's allocator.

The members' attention runs through `torch.nn.functional.scaled_dot_product_attention`, as in an A1111 started with
`--opt-sdp-attention` (or its default SDP optimisation on torch 2): ldm's `CrossAttention.forward` (einsum softmax
attention) is replaced by `sdpa_cross_attention_forward`, which is A1111's `scaled_dot_product_attention_forward`
without hypernetworks, and ldm is kept off xformers (`XFORMERS_IS_AVAILBLE = False`) so every member builds
`CrossAttention`. The aggregator calls SDPA itself. Calls are timed with `torch.cuda.synchronize()` on both sides,
so the CPU's kernel-launch time (the ensemble drives its members block by block from Python) counts as it does in the
WebUI.

Needs torch, einops, safetensors, PyYAML, numpy and Pillow (ldm's imports), and the `ldm` package
(stable-diffusion-sdkit, requirements/no-deps.txt; pure Python). Where `import ldm` fails, the script looks for it
in $AFA_LDM_PATH and in this repository's .venv/lib/python*/site-packages (appended to sys.path, so the machine's own
torch still wins): on a machine without it, bring `.venv/lib/python3.11/site-packages/ldm` along.

Writes the figures as JSON to --output (default: $OUT/gpu_bench.json when OUT is set), after every N so a run cut
short keeps what it measured, and prints them as one JSON line at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import glob
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # `afa` from this checkout, wherever the script is started from

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

GOALS = {"fast": 1.03, "paper": 1.07}
"""The most each preset's SABW modes may cost, as a multiple of the N UNets' seconds."""
FULL = dict(arch="sd15", device="cuda", dtype="float16", latent=64, batch=2, members=[2, 3], presets=["paper", "fast"],
            budget_s=240.0, min_repeats=3, max_repeats=30, warmup=3)
QUICK = dict(arch="tiny", device="cpu", dtype="float32", latent=8, batch=2, members=[2, 3], presets=["paper", "fast"],
             budget_s=60.0, min_repeats=2, max_repeats=2, warmup=1)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def ensure_ldm() -> str:
    """Makes `import ldm` work; returns where ldm came from. Exits with a message saying what to bring otherwise."""
    try:
        import ldm.modules.attention  # noqa: F401
        return str(Path(sys.modules["ldm"].__file__).parent)
    except ImportError:
        pass
    candidates = [os.environ.get("AFA_LDM_PATH", "")]
    candidates += sorted(glob.glob(str(REPO / ".venv" / "lib" / "python*" / "site-packages")))
    for folder in candidates:
        if folder and (Path(folder) / "ldm" / "modules" / "attention.py").is_file():
            sys.path.append(folder)  # appended: only what the machine lacks (ldm) comes from there
            import ldm.modules.attention  # noqa: F401
            return str(Path(folder) / "ldm")
    sys.exit("error: the ldm package (stable-diffusion-sdkit) is not importable: install it, set AFA_LDM_PATH to "
             "the folder that holds ldm/, or bring this repository's .venv/lib/python3.11/site-packages/ldm along")


def sdpa_cross_attention_forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                                 mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
    """ldm `CrossAttention.forward` through torch SDPA (A1111's `scaled_dot_product_attention_forward`).

    x [B x L x query_dim], context [B x M x context_dim] (None: self-attention) -> [B x L x query_dim].
    """
    if mask is not None:
        raise NotImplementedError("ldm's SpatialTransformer passes no attention mask")
    batch = x.shape[0]
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    heads = self.heads
    head_dim = q.shape[-1] // heads
    # [B x L x heads*d] -> [B x heads x L x d], the layout SDPA's fused kernels take without a copy
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
    return self.to_out(out)


def use_sdpa_in_ldm(device: torch.device) -> dict:
    """Switches ldm's attention to SDPA for every model built afterwards; checks the patched forward against
    ldm's own on one layer (fp32). Returns what was done, for the JSON."""
    from ldm.modules import attention

    had_xformers = bool(getattr(attention, "XFORMERS_IS_AVAILBLE", False))
    attention.XFORMERS_IS_AVAILBLE = False  # BasicTransformerBlock reads it at construction: build CrossAttention
    original_forward = attention.CrossAttention.forward
    torch.manual_seed(0)
    self_layer = attention.CrossAttention(64, heads=4, dim_head=16).to(device).eval()  # attn1 of a block
    cross_layer = attention.CrossAttention(64, context_dim=32, heads=4, dim_head=16).to(device).eval()  # attn2
    x, context = torch.randn(2, 50, 64, device=device), torch.randn(2, 7, 32, device=device)
    with torch.no_grad():
        expected = [original_forward(self_layer, x), original_forward(cross_layer, x, context)]
        attention.CrossAttention.forward = sdpa_cross_attention_forward
        if hasattr(attention, "MemoryEfficientCrossAttention"):  # same attributes; in case anything builds one
            attention.MemoryEfficientCrossAttention.forward = sdpa_cross_attention_forward
        got = [self_layer(x), cross_layer(x, context)]
    difference = max((a - b).abs().max().item() for a, b in zip(expected, got))
    if difference > 1e-3:
        raise RuntimeError(f"the SDPA forward differs from ldm's CrossAttention by {difference:g}")
    return {"member_attention": "ldm CrossAttention.forward -> torch.nn.functional.scaled_dot_product_attention",
            "xformers_was_available": had_xformers, "sdpa_check_max_abs_difference": difference}


def count_member_attention(member: torch.nn.Module) -> int:
    """Attention layers of a member, after checking each runs the SDPA forward."""
    from ldm.modules import attention

    layers = [m for m in member.modules() if isinstance(m, attention.CrossAttention)]
    others = [type(m).__name__ for m in member.modules()
              if "Attention" in type(m).__name__ and not isinstance(m, attention.CrossAttention)
              and type(m).__name__ not in ("SpatialTransformer", "AttentionBlock")]
    if others or not all(type(m).forward is sdpa_cross_attention_forward for m in layers):
        raise RuntimeError(f"members have attention layers not on SDPA: {sorted(set(others))}")
    return len(layers)


class Timer:
    """Seconds of one call; on CUDA synchronised before and after, so queued kernels count where they ran."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, function) -> float:
        self.sync()
        start = time.perf_counter()
        function()
        self.sync()
        return time.perf_counter() - start

    def peak_gib(self, function) -> float | None:
        """Peak allocated memory (weights included) while `function` runs; None off CUDA."""
        if not self.cuda:
            function()
            return None
        self.sync()
        torch.cuda.reset_peak_memory_stats()
        function()
        self.sync()
        return torch.cuda.max_memory_allocated() / 2 ** 30


def bench_members(num_members: int, settings: dict, device: torch.device, deadline: float,
                  one_unet_flops: int | None) -> dict:
    """All calls for N members, interleaved in rounds until `deadline` (time.perf_counter()); the run's figures.

    FLOP ratios (when `one_unet_flops`, one member's FLOPs per call, is given): the ensemble's FLOPs beyond the N
    members' are SABW's alone, as `python -m afa bench` checks with FlopCounterMode, so they come from
    `sabw_flops_for_latent` (the aggregator's count written out), which costs no time here."""
    from afa import EnsembleUNet
    from afa.bench import preset_configs, random_aggregator, random_members, sabw_flops_for_latent
    from afa.members import unet_shapes
    from afa.modes import AVERAGE, LAST_BLOCK, NOISE, SABW
    from afa.unet import PRESETS, block_layout

    dtype = DTYPES[settings["dtype"]]
    arch, latent, batch = settings["arch"], settings["latent"], settings["batch"]
    params = PRESETS[arch]
    members = random_members(arch, num_members, dtype, seed=0, device=device)
    attention_layers = count_member_attention(members[0])
    layout = block_layout(unet_shapes(members[0]))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, params["in_channels"], latent, latent, generator=generator).to(device, dtype)
    timesteps = torch.full((batch,), 500.0, device=device)
    context = torch.randn(batch, 77, params["context_dim"], generator=generator).to(device, dtype)

    def n_unets():
        for member in members:
            member(x, timesteps, context)

    # call name -> (preset, mode, function); the baselines and the modes without weights have no preset
    calls = {"one UNet": (None, None, lambda: members[0](x, timesteps, context)),
             "N UNets": (None, None, n_unets)}
    for mode in (AVERAGE, NOISE):
        ensemble = EnsembleUNet(members, None, mode)
        calls[mode.name] = (None, mode.name, lambda e=ensemble: e(x, timesteps, context))
    configs, parameters, flops = {}, {}, {}
    for preset in settings["presets"]:
        configs[preset] = preset_configs(preset, num_members, layout.channels, params["context_dim"])
        for mode in (SABW, LAST_BLOCK):
            aggregator = random_aggregator(configs[preset](mode is LAST_BLOCK), dtype, device)
            if mode is SABW:
                parameters[preset] = sum(p.numel() for p in aggregator.parameters())
            ensemble = EnsembleUNet(members, aggregator, mode)
            calls[f"{mode.name} [{preset}]"] = (preset, mode.name, lambda e=ensemble: e(x, timesteps, context))
            if one_unet_flops is not None:
                flops.setdefault(preset, {})[mode.name] = sabw_flops_for_latent(
                    configs[preset](mode is LAST_BLOCK), layout.downsampling, latent, batch)

    timer = Timer(device)
    resident_gib = torch.cuda.memory_allocated() / 2 ** 30 if timer.cuda else None
    peaks: dict[str, float | None] = {}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    # As the WebUI samples half-precision models: under CUDA autocast, which also runs ldm's GroupNorm32 (float32
    # input, half weights) in float32 -- without it that layer fails. The trainer's --mixed-precision does the same.
    autocast = (torch.autocast("cuda", dtype=dtype) if timer.cuda and dtype != torch.float32
                else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        for _ in range(settings["warmup"]):  # cuBLAS/cuDNN handles, SDPA kernel choice, the caching allocator
            for name, (_, _, function) in calls.items():
                peaks[name] = timer.peak_gib(function)
        rounds = 0
        while rounds < settings["max_repeats"]:
            round_start = time.perf_counter()
            for name, (_, _, function) in calls.items():
                samples[name].append(timer(function))
            rounds += 1
            now = time.perf_counter()
            if rounds >= settings["min_repeats"] and now + (now - round_start) > deadline:
                break  # another round would overrun this N's share of the budget

    medians = {name: statistics.median(values) for name, values in samples.items()}
    baseline = medians["N UNets"]
    rows = []
    for name, (preset, mode, _) in calls.items():
        flop_ratio = None
        if name == "N UNets" or mode in (AVERAGE.name, NOISE.name):
            flop_ratio = 1.0  # the members' work exactly (afa.bench counts it so)
        elif preset is not None and preset in flops:
            flop_ratio = 1.0 + flops[preset][mode]["total"] / (num_members * one_unet_flops)
        elif name == "one UNet":
            flop_ratio = 1.0 / num_members
        goal = GOALS.get(preset)
        ratio = round(medians[name] / baseline, 4)  # rounded first, so meets_goal says what the JSON shows
        rows.append({"call": name, "preset": preset, "mode": mode, "seconds": round(medians[name], 5),
                     "seconds_min": round(min(samples[name]), 5), "seconds_max": round(max(samples[name]), 5),
                     "ratio_to_n_unets": ratio, "goal": goal,
                     "meets_goal": None if goal is None else ratio <= goal,
                     "flop_ratio_to_n_unets": None if flop_ratio is None else round(flop_ratio, 5),
                     "peak_memory_gib": None if peaks.get(name) is None else round(peaks[name], 3)})
    run = {"members": num_members, "repeats": rounds, "attention_layers_per_member": attention_layers,
           "resident_memory_gib": None if resident_gib is None else round(resident_gib, 3),
           "peak_memory_gib": None if not timer.cuda else round(max(peaks.values()), 3),
           "seconds_one_unet": round(medians["one UNet"], 5), "seconds_n_unets": round(baseline, 5),
           "sabw_parameters": parameters, "flops_one_unet": one_unet_flops, "sabw_flops": flops,
           "sabw_configs": {preset: configs[preset](False).to_dict() for preset in configs},
           "autocast": not isinstance(autocast, contextlib.nullcontext), "rows": rows}
    return run


def print_run(run: dict, settings: dict) -> None:
    print(f"\nN={run['members']} members, {settings['arch']}, {settings['dtype']}, latent {settings['latent']}x"
          f"{settings['latent']} ({8 * settings['latent']} px), batch {settings['batch']}; median of "
          f"{run['repeats']} rounds; resident {run['resident_memory_gib']} GiB")
    print(f"{'call':<20}{'s/call':>10}{'/ N UNets':>11}{'goal':>10}{'':>6}{'FLOPs / N UNets':>17}{'peak GiB':>10}")
    for row in run["rows"]:
        goal = "" if row["goal"] is None else f"<= {row['goal']:.2f}"
        verdict = "" if row["meets_goal"] is None else "ok" if row["meets_goal"] else "MISS"
        flops = "" if row["flop_ratio_to_n_unets"] is None else f"{row['flop_ratio_to_n_unets']:.4f}"
        peak = "" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(f"{row['call']:<20}{row['seconds']:>10.4f}{row['ratio_to_n_unets']:>10.3f}x{goal:>10}{verdict:>6}"
              f"{flops:>17}{peak:>10}")
    print("SABW parameters: " + ", ".join(f"{preset} {count / 1e6:.2f}M"
                                          for preset, count in run["sabw_parameters"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny members, fp32, latent 8")
    parser.add_argument("--output", help="JSON file to write (default: $OUT/gpu_bench.json when OUT is set)")
    parser.add_argument("--members", type=int, nargs="+", help=f"values of N (default {FULL['members']})")
    parser.add_argument("--presets", nargs="+", choices=sorted(GOALS), help="SABW presets (default: both)")
    parser.add_argument("--budget-s", type=float, help=f"seconds for all the timing, setup included (default "
                        f"{FULL['budget_s']:g}; rounds stop when the next would overrun it)")
    parser.add_argument("--max-repeats", type=int, help=f"most timed rounds per N (default {FULL['max_repeats']})")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP ratios (one UNet's count on meta "
                        "tensors takes a few CPU seconds)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # each table as it is done, also when the run is cut short

    settings = dict(QUICK if args.quick else FULL)
    for key in ("members", "presets", "budget_s", "max_repeats"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    settings["min_repeats"] = min(settings["min_repeats"], settings["max_repeats"])
    output = args.output or (str(Path(os.environ["OUT"]) / "gpu_bench.json") if os.environ.get("OUT") else None)
    if settings["device"] == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; --quick runs a CPU smoke test", file=sys.stderr)
        return 2
    device = torch.device(settings["device"])
    if args.quick:
        torch.set_num_threads(1)  # a smoke run on a shared CPU: no OpenMP threads spinning against other work
    ldm_path = ensure_ldm()
    environment = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
                   "cuda": torch.version.cuda, "ldm": ldm_path,
                   "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                   "gpu_memory_gib": (round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
                                      if device.type == "cuda" else None),
                   "cpu_threads": torch.get_num_threads()}
    environment.update(use_sdpa_in_ldm(device))  # its check compares in exact fp32: before TF32 is allowed
    if device.type == "cuda":
        # as A1111's devices.enable_tf32 (matters only for fp32 work; the members and SABW run in fp16)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    figures = {"script": "tools/gpu_bench.py", "quick": args.quick, "environment": environment,
               "settings": settings, "goals": GOALS, "runs": [], "complete": False}
    print(f"AFA GPU bench: {environment['gpu'] or 'CPU'} ({environment['gpu_memory_gib']} GiB), torch "
          f"{environment['torch']}, CUDA {environment['cuda']}; members' attention: {environment['member_attention']} "
          f"(checked, max |difference| {environment['sdpa_check_max_abs_difference']:.2g}); goals vs N UNets: "
          + ", ".join(f"{preset} <= {goal}x" for preset, goal in GOALS.items()), flush=True)

    one_unet_flops = None
    if not args.no_flops:
        from afa.bench import unet_flops

        one_unet_flops = unet_flops(settings["arch"], settings["latent"], settings["batch"])
    deadline = started + settings["budget_s"]
    failures = 0
    for index, num_members in enumerate(settings["members"]):
        now = time.perf_counter()
        share = (deadline - now) / (len(settings["members"]) - index)  # the rest, split over the Ns still to run
        try:
            run = bench_members(num_members, settings, device, now + share, one_unet_flops)
        except Exception as error:  # noqa: BLE001 -- one lease, one try: keep the other Ns' figures
            failures += 1
            figures["runs"].append({"members": num_members, "error": f"{type(error).__name__}: {error}"})
            print(f"\nN={num_members} failed: {type(error).__name__}: {error}", flush=True)
            traceback.print_exc()
        else:
            figures["runs"].append(run)
            print_run(run, settings)
        gc.collect()  # the members of this N go before the next N builds its own
        if device.type == "cuda":
            torch.cuda.empty_cache()
        figures["elapsed_s"] = round(time.perf_counter() - started, 1)
        if output:
            write_json(output, figures)
    figures["complete"] = failures == 0
    figures["elapsed_s"] = round(time.perf_counter() - started, 1)
    print(f"\nelapsed {figures['elapsed_s']} s" + (f"; wrote {output}" if output else "; no --output, no file written"))
    if output:
        write_json(output, figures)
    print(json.dumps(figures, separators=(",", ":")))
    return 1 if failures else 0


def write_json(path: str, figures: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
