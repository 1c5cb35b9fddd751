"""The ldm UNet as AFA sees it: constructor parameters, presets, and the block layout.

A Stable Diffusion 1.x/2.x UNet (`ldm.modules.diffusionmodules.openaimodel.UNetModel`) is a chain of K blocks:
`input_blocks.0..11`, `middle_block`, `output_blocks.0..11` (SDXL: 9/1/9). AFA mixes the members' features after
every block, so it needs each block's output channels; `block_layout` reads them off tensor shapes alone (a
safetensors header is enough), which works for every variant the WebUI loads and never runs the model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
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
    # sd_xl_base.yaml's network_config.params (sgm): a transformer depth per level, the label embedding of the
    # pooled text embedding and size conditioning (adm_in_channels), 9/1/9 blocks.
    "sdxl": dict(
        adm_in_channels=2816, num_classes="sequential", in_channels=4, out_channels=4, model_channels=320,
        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 4], num_head_channels=64,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[1, 2, 10],
        context_dim=2048, use_checkpoint=False, legacy=False,
    ),
    # The SDXL layout at test size: depths 0/2/3 (level 0 has no attention, as in SDXL), middle depth 3.
    "tiny-sdxl": dict(
        adm_in_channels=48, num_classes="sequential", in_channels=4, out_channels=4, model_channels=64,
        attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=64,
        use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[0, 2, 3],
        transformer_depth_middle=3, context_dim=32, use_checkpoint=False, legacy=False,
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

    def depth_of(layer: str) -> int:
        """The number of transformer blocks of the SpatialTransformer `layer`."""
        prefix = f"{layer}.transformer_blocks."
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

    channel_mult, num_res_blocks, attention_resolutions = [], [], set()
    level_blocks = 0
    level_depths = [0]  # per level: the transformer depth of its attention blocks (0: none)
    for block_index in range(1, layout.num_input_blocks):
        name = layout.names[block_index]
        if f"{name}.0.op.weight" in shapes or f"{name}.0.in_layers.0.weight" not in shapes:
            num_res_blocks.append(level_blocks)
            level_blocks = 0
            level_depths.append(0)
            continue
        if level_blocks == 0:
            channel_mult.append(layout.channels[block_index] // model_channels)
        level_blocks += 1
        if f"{name}.1.norm.weight" in shapes:
            attention_resolutions.add(layout.downsampling[block_index])
            level_depths[-1] = max(level_depths[-1], depth_of(f"{name}.1"))
    num_res_blocks.append(level_blocks)
    middle_depth = depth_of("middle_block.1")
    attention_depths = {depth for depth in level_depths if depth} | ({middle_depth} if middle_depth else set())

    params = dict(
        image_size=32, in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        attention_resolutions=sorted(attention_resolutions, reverse=True), num_res_blocks=num_res_blocks[0]
        if len(set(num_res_blocks)) == 1 else num_res_blocks, channel_mult=channel_mult,
        use_checkpoint=False, legacy=False,
    )
    context_keys = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    if context_keys:  # every Stable Diffusion UNet; class-conditional ldm UNets without text have none
        params["use_spatial_transformer"] = True
        if len(attention_depths) <= 1:  # SD 1.x/2.x: one depth everywhere
            params["transformer_depth"] = attention_depths.pop() if attention_depths else 1
        else:  # SDXL: one per level (0/2/10), and the middle block's (10)
            params["transformer_depth"] = level_depths
            params["transformer_depth_middle"] = middle_depth
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
    """Reads the UNet's constructor parameters from a model config yaml: `model.params.unet_config.params` (ldm,
    the WebUI's v1-inference.yaml and v2-inference.yaml format) or `model.params.network_config.params` (sgm, SDXL's
    sd_xl_base.yaml format)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        model_params = config["model"]["params"]
        unet_config = model_params["unet_config"] if "unet_config" in model_params else model_params["network_config"]
        params = dict(unet_config["params"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: config file not found") from None
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: not a model config (need model.params.unet_config.params, or "
                              f"model.params.network_config.params for SDXL): {error}") from None
    if not str(unet_config.get("target", UNET_TARGET)).endswith("openaimodel.UNetModel"):
        raise CheckpointError(f"{path}: the UNet's target is {unet_config['target']}, not an ldm/sgm UNetModel")
    return params


# Constructor parameters only sgm's UNetModel (SDXL) takes; ldm's is built without them and then given them.
SGM_ONLY_PARAMS = ("transformer_depth_middle", "spatial_transformer_attn_type")


def needs_per_level_depth(params: dict) -> bool:
    """Whether a UNet has transformer depths per level (SDXL's 0/2/10), which ldm's UNetModel cannot build alone."""
    return isinstance(params.get("transformer_depth"), (list, tuple)) or "transformer_depth_middle" in params


def build_unet(params: dict, device: torch.device | str | None = None) -> torch.nn.Module:
    """Constructs a UNetModel from constructor parameters.

    SD 1.x/2.x: ldm's `UNetModel`. SDXL (a depth per level): sgm's `UNetModel`, the class the WebUI loads SDXL with,
    when `sgm` is importable (inside a WebUI: repositories/generative-models); elsewhere ldm's, with each level's
    and the middle block's SpatialTransformer rebuilt at its depth -- the same modules, key names and shapes.

    With device="meta" no memory is allocated, so `load_state_dict(..., assign=True)` can then adopt tensors
    that are already in their final dtype (no fp32 copy of a member ever exists). Gradient checkpointing and fp16
    flags of the config are turned off: the ensemble has its own checkpointing and dtype handling, and ldm's
    checkpoint function cannot take gradients through frozen parameters.
    """
    params = copy.deepcopy(params)
    params.update(use_checkpoint=False, use_fp16=False)
    params.pop("use_bf16", None)
    context = torch.device(device) if device is not None else contextlib.nullcontext()
    with context:
        if not needs_per_level_depth(params) and not any(key in params for key in SGM_ONLY_PARAMS):
            return _ldm_unet(params)
        if importlib.util.find_spec("sgm") is not None:
            from sgm.modules.diffusionmodules.openaimodel import UNetModel as SgmUNetModel
            params.pop("image_size", None)  # an ldm parameter (inferred parameters carry it); sgm takes none
            return SgmUNetModel(**params)
        return _ldm_unet_with_level_depths(params)


def _ldm_unet_with_level_depths(params: dict) -> torch.nn.Module:
    """ldm's UNetModel for sgm parameters (SDXL): built at depth 1, then every SpatialTransformer is rebuilt with its
    level's depth (input and output blocks) or the middle depth, as sgm's constructor would make it."""
    depths = params.pop("transformer_depth", 1)
    channel_mult = list(params["channel_mult"])
    depths = list(depths) if isinstance(depths, (list, tuple)) else [depths] * len(channel_mult)
    middle_depth = params.pop("transformer_depth_middle", None)
    middle_depth = depths[-1] if middle_depth is None else middle_depth
    params.pop("spatial_transformer_attn_type", None)
    unet = _ldm_unet({**params, "transformer_depth": 1})

    num_res_blocks = params["num_res_blocks"]
    num_res_blocks = list(num_res_blocks) if isinstance(num_res_blocks, (list, tuple)) \
        else [num_res_blocks] * len(channel_mult)
    index = 1
    for level in range(len(channel_mult)):
        for _ in range(num_res_blocks[level]):
            _set_depth(unet.input_blocks[index], depths[level])
            index += 1
        index += level != len(channel_mult) - 1  # the level's Downsample
    _set_depth(unet.middle_block, middle_depth)
    index = 0
    for level in reversed(range(len(channel_mult))):
        for _ in range(num_res_blocks[level] + 1):
            _set_depth(unet.output_blocks[index], depths[level])
            index += 1
    return unet


def _ldm_unet(params: dict) -> torch.nn.Module:
    """ldm's UNetModel. Older ldm copies (PyPI's stable-diffusion-sdkit) lack the "sequential" label embedding of
    the stablediffusion repo the WebUI vendors (SDXL's and SD 2.x unCLIP's `y`): it is then added here, with the same
    modules and key names (`label_emb.0.0`, `label_emb.0.2`), which ldm's forward adds to the time embedding."""
    import inspect

    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    params = {"image_size": 32, **params}  # sgm configs have none; ldm requires it (and only stores it)
    if params.get("num_classes") != "sequential" or "adm_in_channels" in inspect.signature(UNetModel).parameters:
        return UNetModel(**params)
    params.pop("num_classes")
    adm_in_channels = params.pop("adm_in_channels")
    unet = UNetModel(**params)
    time_embed_dim = unet.model_channels * 4
    unet.num_classes = "sequential"
    unet.label_emb = torch.nn.Sequential(torch.nn.Sequential(
        torch.nn.Linear(adm_in_channels, time_embed_dim), torch.nn.SiLU(),
        torch.nn.Linear(time_embed_dim, time_embed_dim)))
    return unet


@functools.lru_cache(maxsize=None)
def _deep_spatial_transformer_class():
    """ldm's SpatialTransformer for depths above 1: ldm indexes its context per transformer block (`context[i]`)
    but wraps a single tensor into a list of one, so a second block fails; sgm's gives every block the same
    context, as this does. Same modules, same key names."""
    from ldm.modules.attention import SpatialTransformer

    class DeepSpatialTransformer(SpatialTransformer):
        def forward(self, x, context=None):
            if not isinstance(context, list):
                context = [context] * len(self.transformer_blocks)
            return super().forward(x, context=context)

    return DeepSpatialTransformer


def _set_depth(block: torch.nn.Module, depth: int) -> None:
    """Rebuilds the SpatialTransformer of a block with `depth` transformer blocks (same widths, heads, context)."""
    from ldm.modules.attention import SpatialTransformer

    for position, module in enumerate(block):
        if not isinstance(module, SpatialTransformer) or len(module.transformer_blocks) == depth:
            continue
        first = module.transformer_blocks[0]
        heads = first.attn1.heads
        block[position] = _deep_spatial_transformer_class()(
            module.in_channels, heads, first.attn1.to_q.out_features // heads, depth=depth,
            # one context width per transformer block (ldm indexes a list by depth; a single width fails past 1)
            context_dim=[first.attn2.to_k.in_features] * depth, disable_self_attn=first.disable_self_attn,
            use_linear=module.use_linear, use_checkpoint=False)
