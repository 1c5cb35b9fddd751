"""Self-tests of the ComfyUI 0.3.64 stand-in (tests/comfyui_standin) and the tiny models of tests/comfyui_factories.py:
the stand-in imports on the CPU without ComfyUI, tiny SD1 / SD2-v / SDXL models sample through the real KSampler code,
deterministically, the tiny layouts equal AFA's ldm builds, the core nodes run (LoRA, VAE, SaveImage's PNG metadata,
LoadImage), nothing leaks out of the fixture, and every copied file names its upstream source.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

import comfyui_factories as cf
from factories import lora_pair, randomize_

STANDIN = cf.STANDIN_ROOT
HEADER = re.compile(r"^# stand-in copy of ComfyUI 0\.3\.64 \(commit a125cd8\): (\S+)$")


def test_every_file_names_its_upstream_source():
    python_files = sorted(STANDIN.rglob("*.py"))
    assert len(python_files) > 50
    for path in python_files:
        first_line = path.read_text(encoding="utf-8").splitlines()[0]
        match = HEADER.match(first_line)
        assert match, f"{path.relative_to(STANDIN)}: no upstream header: {first_line!r}"
        assert match.group(1) == path.relative_to(STANDIN).as_posix()
    # data files cannot carry a comment: the README's manifest names each of them
    readme = (STANDIN / "README.md").read_text(encoding="utf-8")
    data_files = [p for p in STANDIN.rglob("*") if p.is_file() and p.suffix != ".py" and p.name != "README.md"
                  and "__pycache__" not in p.parts]
    assert data_files
    for path in data_files:
        assert f"`{path.relative_to(STANDIN).as_posix()}`" in readme, path


def test_imports_as_a_headless_cpu_comfyui(comfy_standin):
    import comfy.cli_args
    import comfy.ldm
    import comfy.model_management
    import comfy_extras.nodes_model_merging
    import folder_paths
    import ldm  # stable-diffusion-sdkit's top-level package: not shadowed by comfy.ldm
    import nodes

    assert comfy.cli_args.args.cpu and comfy.model_management.get_torch_device() == torch.device("cpu")
    assert comfy.cli_args.args.listen == "127.0.0.1"  # the other flags at their defaults (pytest's argv not parsed)
    assert Path(comfy.ldm.__path__[0]) == STANDIN / "comfy" / "ldm"
    assert STANDIN not in Path(ldm.__file__).parents
    assert Path(folder_paths.get_folder_paths("loras")[0]) == comfy_standin.models_dir / "loras"
    assert Path(folder_paths.get_output_directory()).parent == comfy_standin.base_directory
    assert {"CheckpointLoaderSimple", "CLIPTextEncode", "KSampler", "KSamplerAdvanced", "EmptyLatentImage",
            "VAEEncode", "VAEDecode", "VAEEncodeForInpaint", "LatentUpscale", "LoraLoader", "LoraLoaderModelOnly",
            "ConditioningCombine", "SaveImage", "LoadImage"} == set(nodes.NODE_CLASS_MAPPINGS)
    assert "ModelMergeSimple" in comfy_extras.nodes_model_merging.NODE_CLASS_MAPPINGS


def test_fixture_leaves_nothing_behind(tmp_path):
    path_before = list(sys.path)
    others = {name: sys.modules.get(name) for name in ("ldm", "modules", "k_diffusion")}
    with cf.comfyui_standin(tmp_path / "a"):
        import nodes  # noqa: F401
        assert sys.path[0] == str(STANDIN / "comfy")  # nodes.py puts the comfy folder on sys.path, as ComfyUI does
    assert sys.path == path_before
    assert not [name for name in sys.modules if name.split(".")[0] in cf.STANDIN_TOP_LEVEL]
    assert {name: sys.modules.get(name) for name in others} == others
    with cf.comfyui_standin(tmp_path / "b") as second:  # a fresh import, rooted at the new directory
        import folder_paths
        assert Path(folder_paths.base_path) == second.base_directory


@pytest.mark.parametrize("layout", ["sd1", "sd2", "sdxl"])
def test_tiny_layout_equals_afa_ldm_build(comfy_standin, layout):
    """ComfyUI's detection reads AFA's ldm build of the layout as exactly TINY_UNET_CONFIGS, and the ComfyUI model
    with the ldm weights computes the same prediction (keys map 1:1)."""
    import comfy.model_detection
    from afa.unet import PRESETS, build_unet
    from factories import TINY_OPEN_CLIP, TINY_SD2_UNET, tiny_sdxl_unet

    params = {"sd1": PRESETS["tiny"], "sd2": TINY_SD2_UNET, "sdxl": tiny_sdxl_unet(32, TINY_OPEN_CLIP)}[layout]
    ldm_unet = randomize_(build_unet(params), seed=5, scale=0.05).eval()
    state_dict = ldm_unet.state_dict()
    assert comfy.model_detection.detect_unet_config(state_dict, "") == cf.TINY_UNET_CONFIGS[layout]
    model = cf.tiny_model(layout, unet_state_dict=state_dict)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, params["context_dim"], generator=generator)
    extra = {"y": torch.randn(2, params["adm_in_channels"], generator=generator)} if layout == "sdxl" else {}
    timesteps = torch.tensor([10.0, 500.0])
    with torch.no_grad():
        expected = ldm_unet(x, timesteps, context=context, **extra)
        actual = model.model.diffusion_model(x, timesteps, context=context, **extra)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layout", ["sd1", "sdxl", "sd2"])
def test_ksampler_on_tiny_models(comfy_standin, layout):
    import comfy.model_base
    import nodes

    model, clip, _ = cf.tiny_checkpoint(layout, seed=1)
    expected_class = comfy.model_base.SDXL if layout == "sdxl" else comfy.model_base.BaseModel
    assert type(model.model) is expected_class
    assert model.model.model_type == (comfy.model_base.ModelType.V_PREDICTION if layout == "sd2"
                                      else comfy.model_base.ModelType.EPS)
    (positive,) = nodes.CLIPTextEncode().encode(clip, "a prompt")
    (negative,) = nodes.CLIPTextEncode().encode(clip, "")
    cond, extras = positive[0]
    assert cond.shape == (1, 77, cf.TINY_UNET_CONFIGS[layout]["context_dim"])
    assert torch.isfinite(extras["pooled_output"]).all()

    latent = nodes.EmptyLatentImage().generate(64, 64, 1)[0]
    (first,) = nodes.common_ksampler(model, 7, 2, 5.0, "euler", "normal", positive, negative, latent)
    samples = first["samples"]
    assert samples.shape == (1, 4, 8, 8) and torch.isfinite(samples).all() and samples.abs().sum() > 0
    (again,) = nodes.KSampler().sample(model, 7, 2, 5.0, "euler", "normal", positive, negative, latent)
    assert torch.equal(again["samples"], samples)  # deterministic
    other_member = cf.twin(model)
    assert other_member.model is not model.model
    (twin_out,) = nodes.common_ksampler(other_member, 7, 2, 5.0, "euler", "normal", positive, negative, latent)
    assert torch.equal(twin_out["samples"], samples)  # same UNet, different object
    (other_seed,) = nodes.common_ksampler(model, 8, 2, 5.0, "euler", "normal", positive, negative, latent)
    assert not torch.equal(other_seed["samples"], samples)
    different = cf.sample(cf.tiny_model(layout, seed=2), clip, seed=7)
    assert not torch.equal(different, samples)


def test_core_nodes_lora_vae_and_png_metadata(comfy_standin):
    # ComfyUI's PromptExecutor runs a whole prompt, loaders included, in torch.inference_mode() (execution.py)
    with torch.inference_mode():
        _core_nodes(comfy_standin)


def _core_nodes(comfy_standin):
    import nodes
    from PIL import Image
    from safetensors.torch import save_file

    model, clip, vae = cf.tiny_checkpoint("sd1", seed=3)
    positive = cf.encode(clip, "a cat")
    negative = cf.encode(clip, "")
    combined = nodes.ConditioningCombine().combine(positive, negative)[0]
    assert len(combined) == 2
    base = cf.sample(model, clip, "a cat", seed=1)
    weight_before = model.model.diffusion_model.input_blocks[1][1].proj_in.weight.clone()

    # LoraLoaderModelOnly with a kohya LoRA in models/loras (ComfyUI's key map: lora_unet_<module path with _>)
    generator = torch.Generator().manual_seed(0)
    lora = {f"lora_unet_input_blocks_1_1_proj_in.{k}": v
            for k, v in lora_pair(weight_before, rank=2, scale=0.5, generator=generator).items()}
    (comfy_standin.models_dir / "loras").mkdir(parents=True, exist_ok=True)
    save_file(lora, str(comfy_standin.models_dir / "loras" / "tiny.safetensors"))
    (with_lora,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tiny.safetensors", 1.0)
    assert with_lora is not model and with_lora.model is model.model
    lora_samples = cf.sample(with_lora, clip, "a cat", seed=1)
    assert not torch.equal(lora_samples, base)
    assert torch.equal(cf.sample(model, clip, "a cat", seed=1), base)  # the patches are undone for the base patcher
    assert torch.equal(model.model.diffusion_model.input_blocks[1][1].proj_in.weight, weight_before)

    # VAE encode/decode, inpaint encode, latent upscale
    image = torch.rand(1, 64, 64, 3, generator=generator)
    (encoded,) = nodes.VAEEncode().encode(vae, image)
    assert encoded["samples"].shape == (1, 4, 8, 8)
    (upscaled,) = nodes.LatentUpscale().upscale(encoded, "nearest-exact", 128, 128, "disabled")
    assert upscaled["samples"].shape == (1, 4, 16, 16)
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1.0
    (inpaint,) = nodes.VAEEncodeForInpaint().encode(vae, image, mask, grow_mask_by=6)
    assert inpaint["noise_mask"].shape[-2:] == (64, 64)
    (decoded,) = nodes.VAEDecode().decode(vae, {"samples": base})
    assert decoded.shape == (1, 64, 64, 3) and 0.0 <= decoded.min() and decoded.max() <= 1.0

    # SaveImage writes the prompt and the workflow into the PNG's text chunks; LoadImage reads the file back
    prompt = {"3": {"class_type": "KSampler", "inputs": {"seed": 1}}}
    workflow = {"nodes": [{"id": 3, "type": "KSampler"}]}
    result = nodes.SaveImage().save_images(decoded, "afa", prompt=prompt, extra_pnginfo={"workflow": workflow})
    saved = result["ui"]["images"][0]
    path = Path(comfy_standin.base_directory) / "output" / saved["subfolder"] / saved["filename"]
    with Image.open(path) as png:
        assert json.loads(png.text["prompt"]) == prompt
        assert json.loads(png.text["workflow"]) == workflow
    (Path(comfy_standin.base_directory) / "input" / "in.png").write_bytes(path.read_bytes())
    loaded, loaded_mask = nodes.LoadImage().load_image("in.png")
    assert loaded.shape == (1, 64, 64, 3) and loaded_mask.shape == (1, 64, 64)
