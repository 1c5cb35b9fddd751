"""SDXL-layout members in the core: a transformer depth per level (SDXL's 0/2/10; here 0/2/3 and a middle depth of
3), the label embedding (`y`: pooled text embedding and size conditioning), 9/1/9 blocks. Built from the sgm yaml
form (`model.params.network_config`, sd_xl_base.yaml's) or from shapes alone, read from WebUI-format checkpoints,
ensembled with `y` reaching every member, and listed by `afa check`.

Without `sgm` (it is not on PyPI) the UNet is ldm's with each level's SpatialTransformer rebuilt at its depth; the
real-WebUI tier compares that build against sgm's own class (tests/webui_real/test_sgm_unet.py).
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from afa import EnsembleUNet, load_member
from afa.members import read_unet_shapes
from afa.modes import AVERAGE
from afa.unet import PRESETS, UNET_KEY_PREFIX, block_layout, build_unet, infer_unet_params
from factories import randomize_

REPO = Path(__file__).resolve().parent.parent
TINY_SDXL = PRESETS["tiny-sdxl"]


def sgm_yaml(params: dict) -> dict:
    """The sd_xl_base.yaml form: the UNet under model.params.network_config."""
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025,
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}}}}


def write_sdxl_checkpoint(path: Path, seed: int, with_yaml: bool) -> Path:
    """A WebUI-format checkpoint holding a random tiny SDXL-layout UNet (model.diffusion_model.*)."""
    torch.manual_seed(seed)
    unet = randomize_(build_unet(TINY_SDXL), seed=seed, scale=0.05)
    save_file({UNET_KEY_PREFIX + k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    if with_yaml:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(sgm_yaml(copy.deepcopy(TINY_SDXL))), encoding="utf-8")
    return path


def inputs(batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=generator)
    timesteps = torch.tensor([10.0, 700.0][:batch])
    context = torch.randn(batch, 77, TINY_SDXL["context_dim"], generator=generator)
    y = torch.randn(batch, TINY_SDXL["adm_in_channels"], generator=generator)
    return x, timesteps, context, y


def test_the_sdxl_layout_has_a_depth_per_level_and_a_label_embedding():
    shapes = {k: tuple(v.shape) for k, v in build_unet(TINY_SDXL, device="meta").state_dict().items()}
    layout = block_layout(shapes)
    assert (layout.num_input_blocks, len(layout)) == (9, 19)  # SDXL's 9/1/9
    assert "label_emb.0.0.weight" in shapes and shapes["label_emb.0.0.weight"][1] == 48
    assert not any(k.startswith("input_blocks.1.1.") for k in shapes)  # level 0: no attention, as in SDXL

    def depth(layer):
        prefix = f"{layer}.transformer_blocks."
        return len({k[len(prefix):].split(".")[0] for k in shapes if k.startswith(prefix)})

    assert [depth(f"input_blocks.{i}.1") for i in (4, 5, 7, 8)] == [2, 2, 3, 3]
    assert depth("middle_block.1") == 3
    assert [depth(f"output_blocks.{i}.1") for i in (0, 1, 2, 3, 4, 5)] == [3, 3, 3, 2, 2, 2]
    # the full-size SDXL preset has SDXL base's tensor count and shapes (2.57B parameters)
    sdxl = build_unet(PRESETS["sdxl"], device="meta")
    assert sum(p.numel() for p in sdxl.parameters()) == 2_567_463_684
    assert tuple(sdxl.state_dict()["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape) == (1280, 2048)


def test_parameters_inferred_from_shapes_rebuild_the_same_unet():
    shapes = {k: tuple(v.shape) for k, v in build_unet(TINY_SDXL, device="meta").state_dict().items()}
    inferred = infer_unet_params(shapes)
    assert inferred["transformer_depth"] == [0, 2, 3] and inferred["transformer_depth_middle"] == 3
    assert inferred["num_classes"] == "sequential" and inferred["adm_in_channels"] == 48
    rebuilt = {k: tuple(v.shape) for k, v in build_unet(inferred, device="meta").state_dict().items()}
    assert rebuilt == shapes
    # SD 1.x keeps one depth
    sd15 = {k: tuple(v.shape) for k, v in build_unet(PRESETS["sd15"], device="meta").state_dict().items()}
    assert infer_unet_params(sd15)["transformer_depth"] == 1 and "transformer_depth_middle" not in infer_unet_params(sd15)


def test_members_load_from_the_sgm_yaml_or_from_shapes_and_ensemble_with_y(tmp_path):
    with_yaml = write_sdxl_checkpoint(tmp_path / "xl-a.safetensors", seed=1, with_yaml=True)
    bare = write_sdxl_checkpoint(tmp_path / "xl-b.safetensors", seed=2, with_yaml=False)
    first, second = load_member(with_yaml), load_member(bare)
    x, timesteps, context, y = inputs()
    with torch.no_grad():
        expected = first(x, timesteps, context, y=y)
        # the file's weights, whichever way the architecture was found
        assert torch.equal(load_member(with_yaml, config=None)(x, timesteps, context, y=y), expected)

        ensemble = EnsembleUNet([first, second], None, AVERAGE)
        output = ensemble(x, timesteps, context, y=y)
        assert output.shape == x.shape and torch.isfinite(output).all()
        # y reaches every member: another y changes the ensemble's output, and each member's alone
        other_y = torch.randn_like(y)
        assert not torch.allclose(ensemble(x, timesteps, context, y=other_y), output)
        for member in (first, second):
            assert not torch.allclose(member(x, timesteps, context, y=other_y), member(x, timesteps, context, y=y))
        with pytest.raises(ValueError, match="pass y"):
            ensemble(x, timesteps, context)


def test_afa_check_accepts_sdxl_members(tmp_path):
    files = [write_sdxl_checkpoint(tmp_path / f"xl-{i}.safetensors", seed=i, with_yaml=i == 0) for i in range(2)]
    assert block_layout(read_unet_shapes(files[0])) == block_layout(read_unet_shapes(files[1]))
    result = subprocess.run([sys.executable, "-m", "afa", "check", *map(str, files)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "2 members can be ensembled" in result.stdout and "output_blocks.8" in result.stdout, result.stdout
