"""The ldm UNet as AFA sees it: constructor parameters, presets, and the block layout.

A Stable Diffusion 1.x/2.x UNet (`ldm.modules.diffusionmodules.openaimodel.UNetModel`) is a chain of K blocks:
`input_blocks.0..11`, `middle_block`, `output_blocks.0..11` (SDXL: 9/1/9). AFA mixes the members' features after
every block, so it needs each block's output channels; `block_layout` reads them off tensor shapes alone (a
safetensors header is enough), which works for every variant the WebUI loads and never runs the model.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from .errors import CheckpointError

UNET_KEY_PREFIX = "model.diffusion_model."
UNET_TARGET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"

# UNetModel constructor parameters of the architectures `python -m afa bench` can build with random weights.
# sd15/sd21 are the `unet_config.params` of the WebUI's v1-inference.yaml and v2-inference(-v).yaml; tiny is the
# test architecture: the same 12/1/12 block layout as SD at model_channels 32 and context_dim 32.
PRESETS: dict[str, dict] = {
    "sd15": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
        transformer_depth=1, context_dim=768, use_checkpoint=False, legacy=False,
    ),
    "sd21": dict(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_head_channels=64, use_spatial_transformer=True,
        use_linear_in_transformer=True, transformer_depth=1, context_dim=1024, use_checkpoint=False, legacy=False,
    ),
    "tiny": dict(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[4, 2, 1],
        num_res_blocks=2, channel_mult=[1, 1, 2, 2], num_heads=2, use_spatial_transformer=True,
        transformer_depth=1, context_dim=32, use_checkpoint=False, legacy=False,
    ),
}


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of a UNet in forward order (K = 2 * num_input_blocks + 1).

    Attributes:
        names: ldm module names, e.g. `input_blocks.3`, `middle_block`, `output_blocks.11`.
        channels: output channels of each block; the last block includes the output head `out`, so its channels
            are the UNet's `out_channels` (the predicted noise).
        downsampling: the block output's spatial size divided into the input's (1, 2, 4, 8 for SD).
    """

    names: tuple[str, ...]
    channels: tuple[int, ...]
    downsampling: tuple[int, ...]

    @property
    def num_input_blocks(self) -> int:
        return (len(self.names) - 1) // 2

    def __len__(self) -> int:
        return len(self.names)


def block_name(block_index: int, num_input_blocks: int) -> str:
    """The ldm module name of block `block_index` (0-based, forward order)."""
    if block_index < num_input_blocks:
        return f"input_blocks.{block_index}"
    if block_index == num_input_blocks:
        return "middle_block"
    return f"output_blocks.{block_index - num_input_blocks - 1}"


def _layer_out_channels(shapes: dict[str, tuple], layer: str) -> int | None:
    """Output channels of one layer inside a block (ResBlock, SpatialTransformer, Down/Upsample or plain conv)."""
    for suffix in ("out_layers.3.weight", "norm.weight", "op.weight", "conv.weight", "weight"):
        shape = shapes.get(f"{layer}.{suffix}")
        if shape is not None:
            return shape[0]
    return None


def block_layout(shapes: dict[str, tuple]) -> BlockLayout:
    """Reads the block layout off a UNet state dict's shapes (keys without the `model.diffusion_model.` prefix).

    Raises:
        CheckpointError: the keys are not those of an ldm/sgm UNetModel.
    """
    def count(prefix: str) -> int:
        pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
        indices = {int(m.group(1)) for key in shapes if (m := pattern.match(key))}
        return max(indices) + 1 if indices else 0

    num_input, num_output = count("input_blocks"), count("output_blocks")
    if num_input == 0 or num_input != num_output or "out.2.weight" not in shapes:
        raise CheckpointError(
            f"not a Stable Diffusion UNet: found {num_input} input blocks, {num_output} output blocks, "
            f"output head {'present' if 'out.2.weight' in shapes else 'missing'}"
        )
    names, channels, downsampling = [], [], []
    factor = 1
    for block_index in range(2 * num_input + 1):
        name = block_name(block_index, num_input)
        block_channels = channels[-1] if channels else None
        for layer_index in range(count(name)):
            layer = f"{name}.{layer_index}"
            layer_channels = _layer_out_channels(shapes, layer)
            if f"{layer}.op.weight" in shapes:
                factor *= 2  # Downsample
            if f"{layer}.conv.weight" in shapes:
                factor //= 2  # Upsample
            if layer_channels is not None:
                block_channels = layer_channels
        if block_index == 2 * num_input:
            block_channels = shapes["out.2.weight"][0]
        names.append(name)
        channels.append(block_channels)
        downsampling.append(factor)
    return BlockLayout(tuple(names), tuple(channels), tuple(downsampling))


def infer_unet_params(shapes: dict[str, tuple]) -> dict:
    """Infers `UNetModel` constructor parameters from a UNet state dict's shapes.

    Shapes fix everything except the attention head count; the SD conventions fill it in: 8 heads for conv
    projections (SD 1.x), 64 channels per head for linear projections (SD 2.x). Use a yaml config for anything else.
    """
    layout = block_layout(shapes)
    try:
        model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
        out_channels = shapes["out.2.weight"][0]
    except KeyError as error:
        raise CheckpointError(f"not a Stable Diffusion UNet: key {error} is missing") from None

    channel_mult, num_res_blocks, attention_resolutions = [], [], set()
    level_blocks = 0
    transformer_depth = 1
    for block_index in range(1, layout.num_input_blocks):
        name = layout.names[block_index]
        if f"{name}.0.op.weight" in shapes or f"{name}.0.in_layers.0.weight" not in shapes:
            num_res_blocks.append(level_blocks)
            level_blocks = 0
            continue
        if level_blocks == 0:
            channel_mult.append(layout.channels[block_index] // model_channels)
        level_blocks += 1
        if f"{name}.1.norm.weight" in shapes:
            attention_resolutions.add(layout.downsampling[block_index])
            depth = len({k.split(".")[4] for k in shapes if k.startswith(f"{name}.1.transformer_blocks.")})
            transformer_depth = max(transformer_depth, depth)
    num_res_blocks.append(level_blocks)

    params = dict(
        image_size=32, in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        attention_resolutions=sorted(attention_resolutions, reverse=True), num_res_blocks=num_res_blocks[0]
        if len(set(num_res_blocks)) == 1 else num_res_blocks, channel_mult=channel_mult,
        use_checkpoint=False, legacy=False,
    )
    context_keys = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    if context_keys:  # every Stable Diffusion UNet; class-conditional ldm UNets without text have none
        params["use_spatial_transformer"] = True
        params["transformer_depth"] = transformer_depth
        params["context_dim"] = shapes[context_keys[0]][1]
        proj_in = next(shapes[k] for k in shapes if k.endswith(".proj_in.weight"))
        if len(proj_in) == 2:
            params.update(use_linear_in_transformer=True, num_head_channels=64)
        else:
            params["num_heads"] = 8
    if "label_emb.weight" in shapes:
        params["num_classes"] = shapes["label_emb.weight"][0]
    elif "label_emb.0.0.weight" in shapes:
        params.update(num_classes="sequential", adm_in_channels=shapes["label_emb.0.0.weight"][1])
    return params


def unet_params_from_yaml(path: str | Path) -> dict:
    """Reads `model.params.unet_config.params` from an ldm config yaml (the WebUI's v1-inference.yaml format)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        unet_config = config["model"]["params"]["unet_config"]
        params = dict(unet_config["params"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config file not found") from None
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not an ldm model config (need model.params.unet_config.params): {error}") \
            from None
    if not str(unet_config.get("target", UNET_TARGET)).endswith("openaimodel.UNetModel"):
        raise CheckpointError(f"{path}: unet_config.target is {unet_config['target']}, not an ldm UNetModel")
    return params


def build_unet(params: dict, device: torch.device | str | None = None) -> torch.nn.Module:
    """Constructs an ldm `UNetModel` from constructor parameters.

    With device="meta" no memory is allocated, so `load_state_dict(..., assign=True)` can then adopt tensors
    that are already in their final dtype (no fp32 copy of a member ever exists). Gradient checkpointing and fp16
    flags of the config are turned off: the ensemble has its own checkpointing and dtype handling, and ldm's
    checkpoint function cannot take gradients through frozen parameters.
    """
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = copy.deepcopy(params)
    params.update(use_checkpoint=False, use_fp16=False)
    params.pop("use_bf16", None)
    if device is None:
        return UNetModel(**params)
    with torch.device(device):
        return UNetModel(**params)
