"""AFA: ensemble Stable Diffusion checkpoints (UNets, and FLUX.1 transformers) at inference with Adaptive Feature
Aggregation.

The core library. It imports torch, einops, safetensors, PyYAML and ldm's modules -- never the WebUI (`modules`,
`launch`) or gradio; the WebUI glue lives in `afa.webui`, which only the extension's script imports.
"""

from .host import use_webui_ldm

use_webui_ldm()  # in a WebUI's extensions/ folder, outside its process: its vendored ldm, before ldm is imported below

from .aggregator import DEFAULT_PRESET, SABW_PRESETS, Aggregator, AggregatorConfig, preset_config
from .ensemble import EnsembleUNet, mix
from .errors import AfaError, CheckpointError, IncompatibleMembersError, MembersMismatchError, WeightsFileError
from .flux import EnsembleFlux, FluxLayout, flux_layout, flux_preset_config
from .hashing import file_sha256, shorthash
from .modes import MODES, Mode, parse_mode
from .members import MemberRef, check_members, load_member, read_unet_shapes, read_unet_state_dict, unet_shapes
from .unet import PRESETS, BlockLayout, block_layout, build_unet
from .weights import FORMAT_VERSION, WeightsInfo, load_weights, read_weights_info, save_weights

__version__ = "0.1.0"

__all__ = [
    "Aggregator", "AggregatorConfig", "DEFAULT_PRESET", "SABW_PRESETS", "preset_config", "MODES", "Mode",
    "parse_mode", "EnsembleUNet", "EnsembleFlux", "FluxLayout", "flux_layout", "flux_preset_config", "mix", "AfaError",
    "CheckpointError", "IncompatibleMembersError", "MembersMismatchError", "WeightsFileError", "file_sha256",
    "shorthash", "MemberRef",
    "check_members", "load_member", "read_unet_shapes", "read_unet_state_dict", "unet_shapes", "PRESETS",
    "BlockLayout", "block_layout", "build_unet", "FORMAT_VERSION", "WeightsInfo", "load_weights",
    "read_weights_info", "save_weights", "default_config",
]


def default_config(layout: BlockLayout, num_members: int, context_dim: int, preset: str = DEFAULT_PRESET,
                   **overrides) -> AggregatorConfig:
    """The aggregator of a preset for members of a given block layout. SD 1.5: "paper" 42,425,344 parameters for
    2 members, +2,707,072 per extra member; "fast" 37.9M for 2, +3.4M per extra member."""
    return preset_config(preset, num_members, layout.channels, context_dim, **overrides)
