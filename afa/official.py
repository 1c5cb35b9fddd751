"""Importing the authors' trained aggregators (GitHub Tenvence/afa) as an AFA weights file.

Their training (`train.py`, `models/model.py`) saves, beside the diffusers pipeline of the members, one folder per
aggregation point and a small model config:

    OUTPUT/model_config.json                        {"num_models": N, "num_aggregators": K}
    OUTPUT/aggregator_{i}/config.json               in_channels, hidden_size, num_experts, num_layers,
                                                    num_attn_heads, cross_attn_dim, temb_channels
    OUTPUT/aggregator_{i}/aggregator.safetensors    diffusers key names (conv_in.*, res_block.*, transformer.*,
                                                    conv_out.weight)

for i = 0 .. K-1 in forward order (SD 1.x: K = 25: conv_in, every down-block layer including the downsamplers, the
mid block, every up-block layer, the last one on the noise prediction after conv_out). That is exactly AFA's block
order (`input_blocks.0` .. `output_blocks.11`, the last block including the output head), and their `Aggregator`
is AFA's "paper" design module for module (`afa.aggregator`), so aggregator_i becomes the SABW block of block i
with its tensors renamed (`official_key`).

Only safetensors are read (never a pickle), the input folder is never written to, and every mismatch is refused
with a message that names the aggregator, its block and the file: the member count (`num_models`, `num_experts`),
the block count, each block's channels, the widths shared by every block, and each tensor's name and shape.

The members must be given in the order of the training's `--model_files`: aggregator weights are per member (the
input projection reads the members' features concatenated in that order, the output has one logit map per member).
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open

from .aggregator import Aggregator, AggregatorConfig, preset_config
from .errors import WeightsFileError
from .members import MemberRef, check_members, describe_difference, owned_tensor, read_unet_shapes
from .unet import BlockLayout
from .weights import save_weights

MODEL_CONFIG = "model_config.json"
AGGREGATOR_CONFIG = "config.json"
AGGREGATOR_WEIGHTS = "aggregator.safetensors"
AGGREGATOR_CONFIG_FIELDS = ("in_channels", "hidden_size", "num_experts", "num_layers", "num_attn_heads",
                            "cross_attn_dim", "temb_channels")
# The fields every aggregator of one model shares (AFA's config has one value of each for all blocks).
SHARED_FIELDS = ("hidden_size", "num_experts", "num_layers", "num_attn_heads", "cross_attn_dim", "temb_channels")
SOURCE = "Tenvence/afa"

# Our block-relative parameter names -> theirs (diffusers'): the first matching pattern applies.
_KEY_RULES = [(re.compile(pattern), replacement) for pattern, replacement in (
    (r"^input_proj\.", "conv_in."),
    (r"^resnet\.in_layers\.0\.", "res_block.norm1."),
    (r"^resnet\.in_layers\.2\.", "res_block.conv1."),
    (r"^resnet\.emb_layers\.1\.", "res_block.time_emb_proj."),
    (r"^resnet\.out_layers\.0\.", "res_block.norm2."),
    (r"^resnet\.out_layers\.2\.", "res_block.conv2."),
    (r"^transformer\.blocks\.(\d+)\.self_attention\.to_out\.", r"transformer.transformer_blocks.\1.attn1.to_out.0."),
    (r"^transformer\.blocks\.(\d+)\.self_attention\.", r"transformer.transformer_blocks.\1.attn1."),
    (r"^transformer\.blocks\.(\d+)\.cross_attention\.to_out\.", r"transformer.transformer_blocks.\1.attn2.to_out.0."),
    (r"^transformer\.blocks\.(\d+)\.cross_attention\.", r"transformer.transformer_blocks.\1.attn2."),
    (r"^transformer\.blocks\.(\d+)\.ff_in\.", r"transformer.transformer_blocks.\1.ff.net.0.proj."),
    (r"^transformer\.blocks\.(\d+)\.ff_out\.", r"transformer.transformer_blocks.\1.ff.net.2."),
    (r"^transformer\.blocks\.(\d+)\.(norm[123])\.", r"transformer.transformer_blocks.\1.\2."),
    (r"^transformer\.(norm|proj_in|proj_out)\.", r"transformer.\1."),
    (r"^out\.weight$", "conv_out.weight"),
)]


def official_key(key: str) -> str:
    """The authors' (diffusers') name of a parameter of one of our paper-design SABW blocks, e.g.
    `resnet.emb_layers.1.weight` -> `res_block.time_emb_proj.weight`, `transformer.blocks.0.cross_attention.to_out.
    bias` -> `transformer.transformer_blocks.0.attn2.to_out.0.bias`."""
    for pattern, replacement in _KEY_RULES:
        if pattern.search(key):
            return pattern.sub(replacement, key, count=1)
    raise KeyError(f"no official name for SABW parameter {key!r} (afa.official does not know this layer)")


@dataclass
class ImportedWeights:
    """What `import_official` wrote."""

    path: Path
    config: AggregatorConfig
    members: list[MemberRef]
    parameters: int
    training: dict


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise WeightsFileError(f"{path}: not found ({what})")
    try:
        values = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WeightsFileError(f"{path}: not readable JSON: {error}") from None
    if not isinstance(values, dict):
        raise WeightsFileError(f"{path}: expected a JSON object, found {type(values).__name__}")
    return values


def _integer_fields(path: Path, values: dict, fields: Sequence[str], label: str) -> dict[str, int]:
    missing = [name for name in fields if name not in values]
    unknown = sorted(set(values) - set(fields))
    if missing or unknown:
        raise WeightsFileError(f"{path}: {label}: not the authors' config: lacks {missing} / has unknown {unknown}")
    bad = [name for name in fields if isinstance(values[name], bool) or not isinstance(values[name], int)
           or values[name] < 1]
    if bad:
        raise WeightsFileError(f"{path}: {label}: {', '.join(f'{n} {values[n]!r}' for n in bad)} must be "
                               f"positive integers")
    return {name: values[name] for name in fields}


def _member_dims(shapes: dict[str, tuple]) -> tuple[int | None, int | None]:
    """(context_dim, time_embed_dim) of an ldm UNet from its shapes (None when it has no such layer)."""
    context = next((shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")), None)
    time_embed = shapes.get("time_embed.2.weight")
    return context, (time_embed[0] if time_embed else None)


def _aggregator_indices(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for entry in folder.iterdir()
                  if entry.is_dir() and (m := re.fullmatch(r"aggregator_(\d+)", entry.name)))


def _weights_file(folder: Path, label: str) -> Path:
    path = folder / AGGREGATOR_WEIGHTS
    if path.is_file():
        return path
    others = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
    hint = (f"; found {', '.join(others)}, but AFA reads only .safetensors (a pickle could run code): convert it "
            f"with a tool you trust" if others else "")
    raise WeightsFileError(f"{path}: {label}: not found{hint}")


def _read_tensors(path: Path, label: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: owned_tensor(handle.get_tensor(key)) for key in handle.keys()}
    except Exception as error:  # safetensors_rust.SafetensorError and I/O errors
        raise WeightsFileError(f"{path}: {label}: not a readable safetensors file (truncated or corrupt?): "
                               f"{error}") from None


def import_official(folder: str | Path, member_paths: Sequence[str | Path], output: str | Path,
                    dtype: torch.dtype | None = None, overwrite: bool = False) -> ImportedWeights:
    """Converts the authors' trained aggregators into an AFA weights file bound to the given members.

    Args:
        folder: their training output folder (`model_config.json`, `aggregator_0/` ...).
        member_paths: the member checkpoints, in the order of the training's `--model_files`.
        output: the `.safetensors` weights file to write (atomically; never inside `folder`).
        dtype: cast the tensors to this dtype (None keeps the stored dtype; float32 if the files mix dtypes).
        overwrite: replace `output` if it exists.
    Returns:
        what was written (path, config, members, parameter count, training metadata).
    Raises:
        WeightsFileError: the folder is missing or does not fit the members (the message names the aggregator, its
            block and the file); CheckpointError / IncompatibleMembersError: for the members.
    """
    folder, output = Path(folder), Path(output)
    if not folder.is_dir():
        raise WeightsFileError(f"{folder}: not a folder (expected the authors' training output, with "
                               f"{MODEL_CONFIG} and aggregator_0/ ...)")
    if output.suffix != ".safetensors":
        raise WeightsFileError(f"{output}: the output must be a .safetensors file")
    if output.resolve().is_relative_to(folder.resolve()):
        raise WeightsFileError(f"{output}: is inside the folder being imported ({folder}); write it elsewhere")
    if output.exists() and not overwrite:
        raise WeightsFileError(f"{output}: already exists (overwrite it explicitly)")

    shapes = [(Path(path).name, read_unet_shapes(path)) for path in member_paths]
    layout: BlockLayout = check_members(shapes)
    num_members, num_blocks = len(shapes), len(layout)
    member_context, member_time_embed = _member_dims(shapes[0][1])

    model_config_path = folder / MODEL_CONFIG
    model_config = _integer_fields(model_config_path, _read_json(model_config_path, "the authors' model config"),
                                   ("num_models", "num_aggregators"), "model config")
    if model_config["num_models"] != num_members:
        raise WeightsFileError(f"{model_config_path}: num_models {model_config['num_models']}, but {num_members} "
                               f"member checkpoints were given (give the members of the training's --model_files, "
                               f"in that order)")
    if model_config["num_aggregators"] != num_blocks:
        raise WeightsFileError(f"{model_config_path}: num_aggregators {model_config['num_aggregators']}, but the "
                               f"members have {num_blocks} blocks ({layout.names[0]} .. {layout.names[-1]}): these "
                               f"aggregators were trained for another UNet architecture")
    indices = _aggregator_indices(folder)
    missing = [i for i in range(num_blocks) if i not in indices]
    extra = [i for i in indices if i >= num_blocks]
    if missing or extra:
        raise WeightsFileError(f"{folder}: expected the folders aggregator_0 .. aggregator_{num_blocks - 1} (one per "
                               f"block of the members); "
                               + "; ".join(([f"missing {', '.join(f'aggregator_{i}' for i in missing)}"]
                                            if missing else [])
                                           + ([f"unexpected {', '.join(f'aggregator_{i}' for i in extra)}"]
                                              if extra else [])))

    configs = []
    for index in range(num_blocks):
        label = f"aggregator_{index} ({layout.names[index]})"
        path = folder / f"aggregator_{index}" / AGGREGATOR_CONFIG
        values = _integer_fields(path, _read_json(path, f"the config of {label}"), AGGREGATOR_CONFIG_FIELDS, label)
        if values["num_experts"] != num_members:
            raise WeightsFileError(f"{path}: {label}: num_experts {values['num_experts']}, but {num_members} members "
                                   f"were given")
        if values["in_channels"] != layout.channels[index]:
            raise WeightsFileError(f"{path}: {label}: in_channels {values['in_channels']}, but the members' "
                                   f"{layout.names[index]} has {layout.channels[index]} channels")
        for name in SHARED_FIELDS:
            if configs and values[name] != configs[0][name]:
                raise WeightsFileError(f"{path}: {label}: {name} {values[name]} differs from aggregator_0's "
                                       f"{configs[0][name]}; AFA's paper design has one {name} for all blocks")
        configs.append(values)

    first = configs[0]
    if member_context is not None and first["cross_attn_dim"] != member_context:
        raise WeightsFileError(f"{folder}: cross_attn_dim {first['cross_attn_dim']}, but the members' text context "
                               f"has {member_context} channels")
    if member_time_embed is not None and first["temb_channels"] != member_time_embed:
        raise WeightsFileError(f"{folder}: temb_channels {first['temb_channels']}, but the members' time embeddings "
                               f"have {member_time_embed} channels")
    try:
        config = preset_config("paper", num_members, layout.channels, first["cross_attn_dim"],
                               hidden_channels=first["hidden_size"], num_heads=first["num_attn_heads"],
                               transformer_depth=first["num_layers"], member_time_embed_dim=first["temb_channels"],
                               text_conditioning="per_member", max_resolution=None, norm_eps=1e-6)
    except ValueError as error:
        raise WeightsFileError(f"{folder}: AFA cannot rebuild these aggregators: {error}") from None

    with torch.device("meta"):
        expected = Aggregator(config).state_dict()
    state_dict: dict[str, torch.Tensor] = {}
    for index in range(num_blocks):
        name = layout.names[index]
        label = f"aggregator_{index} ({name})"
        ours = {key[len(name) + 1:]: tuple(value.shape) for key, value in expected.items()
                if key.startswith(name + ".")}
        theirs_to_ours = {official_key(key): key for key in ours}
        path = _weights_file(folder / f"aggregator_{index}", label)
        tensors = _read_tensors(path, label)
        describe_difference({official_key(key): shape for key, shape in ours.items()},
                            {key: tuple(tensor.shape) for key, tensor in tensors.items()},
                            what=f"{path}: {label}: tensors do not match its {AGGREGATOR_CONFIG}",
                            expected_label="the authors' Aggregator of that config", found_label="the file",
                            error=WeightsFileError)
        not_float = sorted(key for key, tensor in tensors.items() if not tensor.is_floating_point())
        if not_float:
            raise WeightsFileError(f"{path}: {label}: non-floating-point tensors {', '.join(not_float[:3])}")
        for key, tensor in tensors.items():
            state_dict[f"{name}.{theirs_to_ours[key]}"] = tensor

    stored = {tensor.dtype for tensor in state_dict.values()}
    target = dtype if dtype is not None else (stored.pop() if len(stored) == 1 else torch.float32)
    state_dict = {key: tensor.to(target) for key, tensor in state_dict.items()}
    with torch.device("meta"):
        aggregator = Aggregator(config)
    aggregator.load_state_dict(state_dict, strict=True, assign=True)

    members = [MemberRef.from_file(path, with_unet=True) for path in member_paths]
    training = {
        "imported_from": SOURCE,
        "source_folder": str(folder.resolve()),
        "source_format": "aggregator_{i}/aggregator.safetensors + config.json, model_config.json",
        "imported": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    written = save_weights(output, aggregator, members, training=training)
    return ImportedWeights(written, config, members, sum(p.numel() for p in aggregator.parameters()), training)
