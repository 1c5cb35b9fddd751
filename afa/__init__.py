"""AFA: ensemble Stable Diffusion checkpoints at inference with Adaptive Feature Aggregation.

The core library. It imports torch, einops, safetensors, PyYAML and ldm's modules -- never the WebUI (`modules`,
`launch`) or gradio; the WebUI glue lives in `afa.webui`, which only the extension's script imports.
"""

from .host import use_webui_ldm

use_webui_ldm()  # in a WebUI's extensions/ folder, outside its process: its vendored ldm, before ldm is imported below

from .aggregator import Aggregator, AggregatorConfig
from .ensemble import EnsembleUNet, mix
from .errors import AfaError, CheckpointError, IncompatibleMembersError, MembersMismatchError, WeightsFileError
from .hashing import file_sha256, shorthash
from .modes import MODES, Mode, parse_mode
from .members import MemberRef, check_members, load_member, read_unet_shapes, read_unet_state_dict, unet_shapes
from .unet import PRESETS, BlockLayout, block_layout, build_unet
from .weights import FORMAT_VERSION, WeightsInfo, load_weights, read_weights_info, save_weights

__version__ = "0.1.0"

__all__ = [
    "Aggregator", "AggregatorConfig", "MODES", "Mode", "parse_mode", "EnsembleUNet", "mix", "AfaError",
    "CheckpointError", "IncompatibleMembersError", "MembersMismatchError", "WeightsFileError", "file_sha256",
    "shorthash", "MemberRef",
    "check_members", "load_member", "read_unet_shapes", "read_unet_state_dict", "unet_shapes", "PRESETS",
    "BlockLayout", "block_layout", "build_unet", "FORMAT_VERSION", "WeightsInfo", "load_weights",
    "read_weights_info", "save_weights", "default_config",
]


def default_config(layout: BlockLayout, num_members: int, context_dim: int, **overrides) -> AggregatorConfig:
    """The default aggregator for members of a given block layout (SD 1.5, N=2: 37.9M parameters, +3.4M per extra member)."""
    return AggregatorConfig(num_members=num_members, block_channels=list(layout.channels),
                            context_dim=context_dim, **overrides)
