"""Command line: `python -m afa {inspect,check,bench,import-official}`; run `python -m afa --help`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from .aggregator import DEFAULT_PRESET, SABW_PRESETS, Aggregator
from .errors import AfaError, CheckpointError
from .flux import FluxLayout, flux_layout, flux_preset_config, flux_shapes, is_flux
from .hashing import file_sha256, shorthash
from .members import check_members, read_shapes, read_unet_shapes, resolve_unet_params
from .unet import PRESETS, BlockLayout, block_layout
from .weights import read_weights_info

BENCH_ARCHITECTURES = list(PRESETS)  # label-conditioned (SDXL) presets get a random y as well
FLUX_BENCH_ARCHITECTURES = ("flux-dev", "flux-tiny")  # FLOPs only (afa.bench.run_flux_bench)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _print_layout(layout: BlockLayout) -> None:
    print(f"{'block':<4}{'name':<18}{'channels':>9}{'downsampling':>14}")
    for index, (name, channels, factor) in enumerate(zip(layout.names, layout.channels, layout.downsampling)):
        print(f"{index:<4}{name:<18}{channels:>9}{'1/' + str(factor):>14}")


def _sabw_parameters(config) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in Aggregator(config).parameters())


def _is_weights_file(path: Path) -> bool:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return "afa_format_version" in (handle.metadata() or {})
    except Exception:
        return False  # let the checkpoint reader report what is wrong with the file


def command_inspect(args) -> None:
    path = Path(args.file)
    if _is_weights_file(path):
        info = read_weights_info(path)
        print(f"AFA weights file {path}")
        print(f"format version {info.format_version}; mode {info.mode}; "
              f"SABW parameters {_sabw_parameters(info.config) / 1e6:.2f}M")
        print("members (in order):")
        for index, member in enumerate(info.members):
            print(f"  {index}: {member.name}  sha256 {member.sha256}")
        print("config: " + json.dumps(info.config.to_dict()))
        if info.training:
            print("training: " + json.dumps(info.training))
        return
    all_shapes = read_shapes(path)
    if is_flux(all_shapes):
        _inspect_flux(path, flux_shapes(all_shapes))
        return
    shapes = read_unet_shapes(path)
    params = resolve_unet_params(path, shapes, args.config)
    sha256 = file_sha256(path)
    print(f"checkpoint {path}")
    print(f"sha256 {sha256} (shorthash {shorthash(sha256)})")
    print(f"UNet parameters {sum(_numel(s) for s in shapes.values()) / 1e6:.2f}M; architecture: "
          + json.dumps(params))
    _print_layout(block_layout(shapes))


def _inspect_flux(path: Path, shapes: dict[str, tuple]) -> None:
    layout = flux_layout(shapes)
    sha256 = file_sha256(path)
    print(f"FLUX-layout transformer {path}")
    print(f"sha256 {sha256} (shorthash {shorthash(sha256)})")
    print(f"transformer parameters {sum(_numel(s) for s in shapes.values()) / 1e6:.2f}M; layout: "
          + json.dumps(dataclasses.asdict(layout)))
    _print_flux_layout(layout)


def _print_flux_layout(layout: FluxLayout) -> None:
    print(f"{'block':<4}{'name':<18}{'channels':>9}")
    for index, (name, channels) in enumerate(zip(layout.names, layout.channels)):
        print(f"{index:<4}{name:<18}{channels:>9}" + ("  (with final_layer: the prediction)"
                                                       if index == layout.num_blocks - 1 else ""))


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def command_check(args) -> None:
    from . import default_config

    first_shapes = read_shapes(args.members[0])
    if is_flux(first_shapes):
        _check_flux(args, first_shapes)
        return
    members = [(Path(path).name, read_unet_shapes(path)) for path in args.members]
    layout = check_members(members)
    context_keys = [k for k in members[0][1] if k.endswith("attn2.to_k.weight")]
    context_dim = members[0][1][context_keys[0]][1] if context_keys else 768
    config = default_config(layout, len(members), context_dim, preset=args.preset,
                            **({"hidden_channels": args.hidden} if args.hidden else {}))
    print(f"{len(members)} members can be ensembled: " + ", ".join(name for name, _ in members))
    _print_layout(layout)
    print(f"SABW parameters for them: {_sabw_parameters(config) / 1e6:.2f}M (preset {args.preset}: design "
          f"{config.design}, hidden {config.hidden_channels}, depth {config.transformer_depth}, context {context_dim})")


def _check_flux(args, first_shapes: dict[str, tuple]) -> None:
    members = [(Path(args.members[0]).name, flux_shapes(first_shapes))]
    for path in args.members[1:]:
        shapes = read_shapes(path)
        if not is_flux(shapes):
            raise CheckpointError(f"{Path(path).name} is not a FLUX-layout transformer, "
                                  f"{members[0][0]} is: members must be of one architecture")
        members.append((Path(path).name, flux_shapes(shapes)))
    layout = check_members(members, flux_layout)
    config = flux_preset_config(args.preset, len(members), layout,
                                **({"hidden_channels": args.hidden} if args.hidden else {}))
    print(f"{len(members)} FLUX members can be ensembled: " + ", ".join(name for name, _ in members))
    _print_flux_layout(layout)
    print(f"SABW parameters for them: {_sabw_parameters(config) / 1e6:.2f}M (preset {args.preset}: design "
          f"{config.design}, hidden {config.hidden_channels}, depth {config.transformer_depth}, context "
          f"{layout.context_dim}, text tokens mixed by {config.text_mixing})")


def command_bench(args) -> None:
    from .bench import run_bench, run_flux_bench, run_train_bench

    if args.arch in FLUX_BENCH_ARCHITECTURES:
        if args.train_step:
            raise AfaError("--train-step is for UNet architectures; FLUX architectures count FLOPs only")
        run_flux_bench(args.arch, args.members, args.latent, args.batch, preset=args.preset)
        return

    max_resolution = "default" if args.max_resolution is None else (
        None if args.max_resolution == 0 else args.max_resolution)
    if args.train_step:
        run_train_bench(args.arch, args.members, args.latent, args.batch, args.repeats, DTYPES[args.dtype],
                        args.hidden, max_resolution, args.gradient_checkpointing, args.seed, preset=args.preset)
    else:
        run_bench(args.arch, args.members, args.latent, args.batch, args.repeats, DTYPES[args.dtype], args.hidden,
                  max_resolution, args.seed, preset=args.preset)


def command_import_official(args) -> None:
    from .official import import_official

    imported = import_official(args.folder, args.members, args.output,
                               dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.force)
    config = imported.config
    print(f"wrote {imported.path}")
    print(f"imported from {args.folder} ({imported.training['imported_from']}'s training output): "
          f"{config.num_blocks} SABW blocks, paper design (hidden {config.hidden_channels}, {config.num_heads} "
          f"heads, depth {config.transformer_depth}, context {config.context_dim}), "
          f"{imported.parameters:,} parameters")
    print("members (in order):")
    for index, member in enumerate(imported.members):
        print(f"  {index}: {member.name}  sha256 {member.sha256}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m afa", description=__doc__.split(";")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    inspect = commands.add_parser("inspect", help="describe a checkpoint (architecture, blocks, sha256) or an AFA "
                                  "weights file (members, config, parameters)",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    inspect.add_argument("file", help="a .safetensors/.ckpt checkpoint or an AFA weights .safetensors")
    inspect.add_argument("--config", help="ldm yaml for the checkpoint (default: <name>.yaml beside it, else "
                         "inferred from shapes)")
    inspect.set_defaults(run=command_inspect)

    check = commands.add_parser("check", help="confirm that checkpoints can be ensembled (reads shapes only)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    check.add_argument("members", nargs="+", help="member checkpoints (at least 2)")
    check.add_argument("--preset", choices=sorted(SABW_PRESETS), default=DEFAULT_PRESET, help="SABW design "
                       "to count the parameters of: paper (the authors' aggregator) or fast (AFA's cheaper one)")
    check.add_argument("--hidden", type=int, help="SABW hidden width for the parameter count (default: the "
                       "preset's)")
    check.set_defaults(run=command_check)

    bench = commands.add_parser("bench", help="time one UNet vs the ensemble in every mode, random weights",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench.add_argument("--arch", choices=sorted(BENCH_ARCHITECTURES) + list(FLUX_BENCH_ARCHITECTURES),
                       default="sd15", help="member architecture (flux-*: FLOPs only, on meta tensors; latent 128 = "
                       "1024 px)")
    bench.add_argument("--members", type=int, default=2, help="number of members N")
    bench.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px for SD)")
    bench.add_argument("--batch", type=int, default=1, help="batch size (the WebUI's CFG batches 2 per image)")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per variant (median reported)")
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="members' and SABW's dtype")
    bench.add_argument("--preset", choices=sorted(SABW_PRESETS), default=DEFAULT_PRESET, help="SABW design: "
                       "paper (the authors' aggregator) or fast (AFA's cheaper one)")
    bench.add_argument("--hidden", type=int, help="SABW hidden width (default: the preset's)")
    bench.add_argument("--max-resolution", type=int, help="SABW pooling size (default: the preset's, full "
                       "resolution for paper and 32 for fast; 0 = full resolution)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    bench.add_argument("--train-step", action="store_true", help="time a SABW training step (forward + backward) "
                       "against an ensemble forward instead of the modes")
    bench.add_argument("--gradient-checkpointing", action="store_true", help="with --train-step: recompute member "
                       "blocks in the backward pass")
    bench.set_defaults(run=command_bench)

    official = commands.add_parser("import-official", help="convert the authors' trained aggregators (Tenvence/afa: "
                                   "aggregator_{i}/ folders and model_config.json) into an AFA weights file",
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    official.add_argument("folder", help="their training output folder (model_config.json, aggregator_0/ ...)")
    official.add_argument("--members", nargs="+", required=True, help="the member checkpoints, in the order of "
                          "their training's --model_files")
    official.add_argument("--output", required=True, help="the AFA weights .safetensors to write")
    official.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights to this dtype (not given: as "
                          "stored)")
    official.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    official.set_defaults(run=command_import_official)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except AfaError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
