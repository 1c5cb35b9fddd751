"""Shared fixtures: tiny WebUI-format checkpoints written to disk, and tiny UNets built from them.

The tiny architecture (`afa.unet.PRESETS["tiny"]`) has SD's 12/1/12 block layout at model_channels 32 and
context_dim 32, so every test exercises the same block loop as SD 1.5 in milliseconds.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

# One intra-op thread for the tests and every subprocess they start: the models are tiny, and on a shared 2-core
# machine oversubscribed OpenMP threads spin and can make a run 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from afa.unet import PRESETS  # noqa: E402
from factories import randomize_  # noqa: E402,F401  (tests import it from here)
from training.sd_checkpoint import (TINY_TEXT_ENCODER_FOLDER_NAME, tiny_sd_config, tiny_sd_state_dict,  # noqa: E402
                                    write_webui_checkpoint)


@pytest.fixture(autouse=True, scope="session")
def _hash_cache(tmp_path_factory):
    """Keep the sha256 cache of the tests out of the user's home."""
    os.environ["AFA_HASH_CACHE"] = str(tmp_path_factory.mktemp("hash-cache") / "sha256.json")


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """make(seed, name=None, suffix=".safetensors", dtype=None, unet_params=None, with_yaml=True) -> Path.

    Writes a complete tiny SD1-style WebUI checkpoint (UNet, VAE, text encoder, schedule buffers) with its ldm yaml
    beside it; the yamls name the text encoder folder `tiny-clip-text/` beside the checkpoints. Files are cached per
    argument set for the whole session; tests must not modify them.
    """
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[tuple, Path] = {}

    def make(seed: int, name: str | None = None, suffix: str = ".safetensors", dtype: torch.dtype | None = None,
             unet_params: dict | None = None, with_yaml: bool = True) -> Path:
        key = (seed, name, suffix, dtype, repr(unet_params), with_yaml)
        if key not in made:
            config = tiny_sd_config(root / TINY_TEXT_ENCODER_FOLDER_NAME)
            if unet_params is not None:
                config["model"]["params"]["unet_config"]["params"] = copy.deepcopy(unet_params)
            filename = (name or f"member{seed}-{len(made)}") + suffix
            made[key] = write_webui_checkpoint(root / filename, tiny_sd_state_dict(seed, unet_params),
                                               config if with_yaml else None, dtype=dtype)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_text_encoder_folder(tmp_path_factory) -> Path:
    """A folder holding the tiny text encoder's config and SD1's tokenizer files, as tiny_sd_config(folder) writes."""
    folder = tmp_path_factory.mktemp("text-encoder") / TINY_TEXT_ENCODER_FOLDER_NAME
    tiny_sd_config(folder)
    return folder


@pytest.fixture
def tiny_config(tiny_text_encoder_folder) -> dict:
    """tiny_sd_config() naming `tiny_text_encoder_folder`; a fresh dict per test, which the test may modify."""
    return tiny_sd_config(tiny_text_encoder_folder)


@pytest.fixture(scope="session")
def tiny_params() -> dict:
    return copy.deepcopy(PRESETS["tiny"])


def random_inputs(batch: int = 2, size: int = 16, context_dim: int = 32, in_channels: int = 4, seed: int = 0):
    """x [B x C x size x size], timesteps [B], context [B x 77 x context_dim]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    timesteps = torch.linspace(1, 999, batch)
    context = torch.randn(batch, 77, context_dim, generator=generator)
    return x, timesteps, context


@pytest.fixture
def comfy_standin(tmp_path):
    """The ComfyUI 0.3.64 stand-in (tests/comfyui_standin) imported for one test, as `main.py --cpu` would with
    `--base-directory <tmp_path>/comfyui` (folder_paths' models/, input/, output/ there); removed from sys.modules and
    sys.path afterwards. Yields comfyui_factories.comfyui_standin's namespace (`.nodes`, `.folder_paths`, `.args`,
    `.models_dir`, ...); build tiny models with tests/comfyui_factories.py."""
    from comfyui_factories import comfyui_standin

    with comfyui_standin(tmp_path / "comfyui") as standin:
        yield standin
