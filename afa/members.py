"""Ensemble members: reading UNets out of WebUI checkpoints, and checking that members can be ensembled.

Checkpoints are `.safetensors` (preferred) or `.ckpt`. A `.ckpt` is read with `torch.load(weights_only=True)`: a
file that needs pickle code execution is refused, never executed. Keys are `model.diffusion_model.*` (a full
WebUI checkpoint) or a bare UNet state dict. The architecture comes from an ldm yaml (given, or `<name>.yaml`
beside the checkpoint, as the WebUI does) or is inferred from tensor shapes.

Members are read one tensor at a time and cast on the way (`dtype`), then adopted by a UNet built on the meta device,
so loading an fp16 member never holds an fp32 copy of it. Every tensor read is a fresh allocation that owns its memory
(`owned_tensor`), never a view into the file's memory map.
"""

from __future__ import annotations

import contextlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from safetensors import safe_open

from .errors import CheckpointError, IncompatibleMembersError
from .hashing import file_sha256, shorthash, unet_fingerprint
from .unet import UNET_KEY_PREFIX, BlockLayout, block_layout, build_unet, infer_unet_params, unet_params_from_yaml

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass(frozen=True)
class MemberRef:
    """How a weights file names a member: a display name, the full-file sha256 that binds it in the WebUI and the
    trainer, and (files written since ComfyUI support) the fingerprint of its UNet tensors (`afa.hashing.
    unet_fingerprint`) that binds it where a model does not carry its file."""

    name: str
    sha256: str
    unet: str | None = None

    def __str__(self) -> str:
        return f"{self.name} [{shorthash(self.sha256)}]"

    @classmethod
    def from_file(cls, path: str | Path, with_unet: bool = False) -> "MemberRef":
        """The file's name and sha256 (and, `with_unet`, its UNet's fingerprint, which reads the UNet)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        return cls(path.stem, file_sha256(path), unet_fingerprint_of_file(path) if with_unet else None)


# -- reading tensors -----------------------------------------------------------------------------------------------

def _unet_key(key: str, bare: bool) -> str | None:
    """The UNet-relative name of a checkpoint key, or None when the key belongs to the VAE, text encoder, ..."""
    if bare:
        return key
    return key[len(UNET_KEY_PREFIX):] if key.startswith(UNET_KEY_PREFIX) else None


@contextlib.contextmanager
def _open_tensors(path: Path) -> Iterator[tuple[list[str], callable, callable]]:
    """Yields (keys, get_tensor(key), get_shape(key)) for a checkpoint, translating read errors."""
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                yield (list(handle.keys()), handle.get_tensor,
                       lambda key: tuple(handle.get_slice(key).get_shape()))
        except CheckpointError:
            raise
        except Exception as error:  # safetensors_rust.SafetensorError and I/O errors
            raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {error}") \
                from None
        return
    state_dict = _torch_load(path)
    yield list(state_dict), state_dict.__getitem__, lambda key: tuple(state_dict[key].shape)


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A pickled checkpoint, without executing code (weights_only); mmap'd when the format allows."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refusing to load: this .ckpt needs pickle code execution, which could run arbitrary code "
            f"({str(error).splitlines()[-1] if str(error) else 'unsafe pickle'}). Convert it to .safetensors with a "
            f"tool you trust, or use a .safetensors version of the model."
        ) from None
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint: {error}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise CheckpointError(f"{path}: not a state dict (found {type(loaded).__name__})")
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def _unet_keys(path: Path, keys: list[str]) -> tuple[list[str], bool]:
    bare = not any(k.startswith(UNET_KEY_PREFIX) for k in keys)
    unet_keys = [k for k in keys if _unet_key(k, bare) is not None]
    if bare and "input_blocks.0.0.weight" not in keys:
        raise CheckpointError(
            f"{path}: no Stable Diffusion UNet in this file (expected keys model.diffusion_model.* or a bare UNet "
            f"state dict; found e.g. {', '.join(sorted(keys)[:3]) or 'no tensors'})")
    return unet_keys, bare


def read_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's key -> shape (UNet, VAE, text encoders, or a transformer file's). .safetensors: the header."""
    path = Path(path)
    with _open_tensors(path) as (keys, _, get_shape):
        return {key: get_shape(key) for key in keys}


def read_unet_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """UNet key (without prefix) -> shape. For .safetensors this reads only the header."""
    path = Path(path)
    with _open_tensors(path) as (keys, _, get_shape):
        unet_keys, bare = _unet_keys(path, keys)
        return {_unet_key(k, bare): get_shape(k) for k in unet_keys}


def checkpoint_keys(path: str | Path) -> list[str]:
    """Every tensor name in a checkpoint (for .safetensors, read from the header only)."""
    with _open_tensors(Path(path)) as (keys, _, _):
        return keys


def read_prefixed_tensors(path: str | Path, prefix: str, dtype: torch.dtype | None = None) \
        -> dict[str, torch.Tensor]:
    """The tensors whose keys start with `prefix` (e.g. `first_stage_model.` for the VAE), prefix removed, each cast
    to `dtype` as it is read."""
    path = Path(path)
    with _open_tensors(path) as (keys, get_tensor, _):
        return {key[len(prefix):]: owned_tensor(get_tensor(key), dtype) for key in keys if key.startswith(prefix)}


def owned_tensor(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of `tensor` in memory of its own (floating point ones cast to `dtype` when given), contiguous.

    safetensors and torch.load(mmap=True) return views into a private memory map of the file, at whatever offset
    the tensor has in it (often not 16-byte aligned). Adopting such views ties the model to the file (rewriting it
    in place while the model is cached) and, on the CPU, BLAS kernels round differently for unaligned matrices
    (MKL's sgemv on AVX2 machines): an ensemble of identical members then differs from the member by a few ulps.
    PyTorch's allocator aligns every fresh tensor to 64 bytes, so one copy (the cast itself, when there is one)
    removes both. The copy replaces the view, so peak memory grows by one tensor at a time, not by a model."""
    target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(dtype=target, memory_format=torch.contiguous_format, copy=True)


def unet_fingerprint_of_file(path: str | Path) -> str:
    """`afa.hashing.unet_fingerprint` of a checkpoint's UNet, read one tensor at a time."""
    path = Path(path)
    with _open_tensors(path) as (keys, get_tensor, _):
        unet_keys, bare = _unet_keys(path, keys)
        by_name = {_unet_key(key, bare): key for key in unet_keys}
        return unet_fingerprint(by_name, lambda name: get_tensor(by_name[name]))


def read_unet_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The UNet tensors of a checkpoint (without prefix), each cast to `dtype` as it is read."""
    path = Path(path)
    with _open_tensors(path) as (keys, get_tensor, _):
        unet_keys, bare = _unet_keys(path, keys)
        return {_unet_key(key, bare): owned_tensor(get_tensor(key), dtype) for key in unet_keys}


# -- architecture ---------------------------------------------------------------------------------------------------

def config_beside(path: str | Path) -> Path | None:
    """`<name>.yaml` next to a checkpoint, as the WebUI looks for it."""
    candidate = Path(path).with_suffix(".yaml")
    return candidate if candidate.is_file() else None


def resolve_unet_params(path: str | Path, shapes: dict[str, tuple], config: str | Path | None = None) -> dict:
    """UNetModel parameters for a checkpoint: from `config`, else the yaml beside it, else inferred from shapes."""
    config = config or config_beside(path)
    return unet_params_from_yaml(config) if config is not None else infer_unet_params(shapes)


def load_member(path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str = "cpu",
                config: str | Path | None = None) -> torch.nn.Module:
    """Loads the UNet of a checkpoint as a frozen ldm `UNetModel` in eval mode.

    Args:
        dtype: cast floating-point weights to this dtype while reading (None keeps the file's dtype).
        config: ldm yaml; default `<name>.yaml` beside the checkpoint, else inferred from shapes.
    """
    path = Path(path)
    state_dict = read_unet_state_dict(path, dtype)
    params = resolve_unet_params(path, {k: tuple(v.shape) for k, v in state_dict.items()}, config)
    try:
        unet = build_unet(params, device="meta")
    except Exception as error:  # a yaml naming parameters this ldm version lacks, etc.
        raise CheckpointError(f"{path}: cannot build its UNet from the config: {error}") from None
    expected = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    describe_difference(expected, found, what=f"{path}: the UNet weights do not match its architecture config",
                        expected_label="the config", found_label="the file", error=CheckpointError)
    unet.load_state_dict(state_dict, strict=True, assign=True)
    return unet.to(device).eval().requires_grad_(False)


# -- compatibility ---------------------------------------------------------------------------------------------------

def describe_difference(expected: dict[str, tuple], found: dict[str, tuple], what: str, expected_label: str,
                        found_label: str, error: type[Exception]) -> None:
    """Raises `error` naming missing/unexpected keys and the first shape difference, if the two key->shape maps
    differ."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    reshaped = [k for k in expected if k in found and tuple(expected[k]) != tuple(found[k])]
    if not (missing or unexpected or reshaped):
        return
    details = []
    if reshaped:
        key = reshaped[0]
        details.append(f"first differing key {key}: {tuple(expected[key])} in {expected_label}, "
                       f"{tuple(found[key])} in {found_label} ({len(reshaped)} keys differ in shape)")
    if missing:
        details.append(f"{len(missing)} keys missing from {found_label}, e.g. {', '.join(missing[:3])}")
    if unexpected:
        details.append(f"{len(unexpected)} keys only in {found_label}, e.g. {', '.join(unexpected[:3])}")
    raise error(f"{what}: " + "; ".join(details))


MIN_MEMBERS, MAX_MEMBERS = 2, 6
"""How many members an ensemble takes (the WebUI's accordion, the trainer and the evaluator all check these)."""


def check_members(shapes: Sequence[tuple[str, dict[str, tuple]]], layout: Callable = block_layout):
    """Confirms that members (name, UNet or FLUX transformer shapes) can be ensembled: at least two, all shaped like
    the first.

    Returns the shared layout, `layout(shapes)` (a UNet's BlockLayout; afa.flux.flux_layout for FLUX). Raises
    IncompatibleMembersError naming the first differing key and both shapes (e.g. an SD2 member among SD1 members:
    `...attn2.to_k.weight: (320, 768) vs (320, 1024)`).
    """
    if len(shapes) < 2:
        raise IncompatibleMembersError(f"an ensemble needs at least 2 members, got {len(shapes)}"
                                       + (f" ({shapes[0][0]})" if shapes else ""))
    first_name, first = shapes[0]
    for name, member in shapes[1:]:
        describe_difference(first, member, what=f"{name} cannot be ensembled with {first_name}: different "
                            f"architecture", expected_label=first_name, found_label=name,
                            error=IncompatibleMembersError)
    return layout(first)


def unet_shapes(unet: torch.nn.Module) -> dict[str, tuple]:
    """A loaded UNet's key -> shape map, comparable with `read_unet_shapes`."""
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}
