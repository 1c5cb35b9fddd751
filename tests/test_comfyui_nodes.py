"""The ComfyUI node pack (afa/comfyui) on the stand-in of ComfyUI 0.3.64 (tests/comfyui_standin), with tiny models
built as ComfyUI's loader builds them (tests/comfyui_factories.py): identical members give the member's sampling bit
for bit (txt2img, batches, img2img, a hires pass, LoRAs), SABW through the node equals the core's EnsembleUNet on
ldm members of the same weights, weights trained by training/train.py bind to the ComfyUI members by their UNet
fingerprints, each member reads its own CLIP's encoding, and every refusal names what was expected and found.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import comfyui_factories as cf
from factories import lora_pair, write_captioned_images

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = ("sd1", "sd2", "sdxl")


@pytest.fixture
def pack(comfy_standin):
    """The stand-in plus the node pack's modules, under inference mode as ComfyUI's executor runs nodes."""
    from afa.comfyui import ensemble_model, nodes, text

    with torch.inference_mode():
        yield types.SimpleNamespace(env=comfy_standin, nodes=nodes, ensemble_model=ensemble_model, text=text,
                                    core=comfy_standin.nodes)


def ensemble(pack, models, mode="Block average", weights="none"):
    extra = {f"model_{index}": model for index, model in enumerate(models[2:], start=3)}
    return pack.nodes.AFAEnsemble().ensemble(models[0], models[1], mode, weights, **extra)


def ksample(model, positive, negative, latent=None, seed=0, steps=2, denoise=1.0):
    import nodes
    latent = cf.empty_latent() if latent is None else latent
    return nodes.common_ksampler(model, seed, steps, 5.0, "euler", "normal", positive, negative, latent,
                                 denoise=denoise)[0]


# -- identical members give the member's image --------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", ["Block average", "Noise average"])
def test_identical_members_give_the_base_models_sampling_bit_for_bit(pack, layout, mode):
    model, clip, _ = cf.tiny_checkpoint(layout, seed=1)
    positive, negative = cf.encode(clip, "a red circle"), cf.encode(clip, "")
    expected = ksample(model, positive, negative)["samples"]
    # another file with the same UNet (its own objects), and the same model connected twice
    for members in ([model, cf.twin(model)], [model, model], [model, cf.twin(model), cf.twin(model)][:2]):
        (ensembled, _) = ensemble(pack, members, mode)
        assert torch.equal(ksample(ensembled, positive, negative)["samples"], expected)


def test_different_members_differ_and_depend_on_the_mode(pack):
    first, clip, _ = cf.tiny_checkpoint("sd1", seed=1)
    second = cf.tiny_model("sd1", seed=2)
    positive, negative = cf.encode(clip, "a red circle"), cf.encode(clip, "")
    alone = [ksample(model, positive, negative)["samples"] for model in (first, second)]
    mixed = {mode: ksample(ensemble(pack, [first, second], mode)[0], positive, negative)["samples"]
             for mode in ("Block average", "Noise average")}
    for samples in mixed.values():
        assert torch.isfinite(samples).all()
        assert not any(torch.equal(samples, member) for member in alone)
    assert not torch.equal(mixed["Block average"], mixed["Noise average"])


def test_batches_img2img_and_a_hires_pass_of_identical_members_are_the_members(pack):
    import nodes

    model, clip, vae = cf.tiny_checkpoint("sd1", seed=3)
    (ensembled, _) = ensemble(pack, [model, cf.twin(model)])
    positive, negative = cf.encode(clip, "a blue square"), cf.encode(clip, "ugly")

    def pipeline(unet):
        batch = ksample(unet, positive, negative, cf.empty_latent(batch_size=2), seed=5)
        (larger,) = nodes.LatentUpscale().upscale(batch, "nearest-exact", 96, 96, "disabled")
        hires = ksample(unet, positive, negative, larger, seed=6, denoise=0.5)
        (image,) = nodes.VAEDecode().decode(vae, hires)
        (encoded,) = nodes.VAEEncode().encode(vae, image)
        return hires["samples"], ksample(unet, positive, negative, encoded, seed=7, denoise=0.6)["samples"]

    expected, got = pipeline(model), pipeline(ensembled)
    assert expected[0].shape == (2, 4, 12, 12)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def tiny_lora(model, seed: int = 0) -> dict:
    """A kohya LoRA (ComfyUI's `lora_unet_<ldm key>` names) on two layers of a tiny SD1 UNet."""
    unet = model.model.diffusion_model
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for name in ("input_blocks.1.1.proj_in", "output_blocks.11.1.transformer_blocks.0.attn2.to_q"):
        for key, value in lora_pair(unet.get_submodule(name).weight, 2, 0.5, generator).items():
            lora[f"lora_unet_{name.replace('.', '_')}.{key}"] = value
    return lora


def with_lora(model, lora):
    import comfy.sd
    return comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0)[0]  # what LoraLoaderModelOnly does


def test_a_lora_on_a_member_applies_to_that_member_only(pack):
    model, clip, _ = cf.tiny_checkpoint("sd1", seed=1)
    twin = cf.twin(model)
    lora = tiny_lora(model)
    positive, negative = cf.encode(clip, "a red circle"), cf.encode(clip, "")
    patched = with_lora(model, lora)
    lora_alone = ksample(patched, positive, negative)["samples"]
    without = ksample(model, positive, negative)["samples"]
    assert not torch.equal(lora_alone, without)
    both = ksample(ensemble(pack, [patched, with_lora(twin, lora)])[0], positive, negative)["samples"]
    assert torch.equal(both, lora_alone)
    one = ksample(ensemble(pack, [patched, twin])[0], positive, negative)["samples"]
    assert not torch.equal(one, lora_alone) and not torch.equal(one, without)
    assert torch.equal(ksample(twin, positive, negative)["samples"], without)  # not patched by the other's LoRA


# -- memory: members are additional models, held once --------------------------------------------------------------

def test_members_are_additional_models_and_a_model_connected_twice_is_held_once(pack):
    model, _, _ = cf.tiny_checkpoint("sd1", seed=1)
    other = cf.tiny_model("sd1", seed=2)
    (ensembled, _) = ensemble(pack, [model, other, model, other])
    members = ensembled.get_additional_models_with_key("afa_members")
    assert [m.model for m in members] == [other.model]
    assert ensembled.model is model.model  # a clone of member 1: its weights, not a copy
    assert ensembled.get_additional_models_with_key("afa_sabw") == []


# -- SABW -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(checkpoint_factory, tmp_path_factory):
    """SABW weights trained by training/train.py (4 steps) for two tiny SD1 checkpoints, and the checkpoints."""
    from training import train

    members = [checkpoint_factory(1), checkpoint_factory(2)]
    data = write_captioned_images(tmp_path_factory.mktemp("comfy-data"), width=32, height=32)
    tmp = tmp_path_factory.mktemp("comfy-train")
    args = ["--members", *map(str, members), "--data", str(data), "--resolution", "32", "--batch-size", "4",
            "--val-split", "0.25", "--hidden-channels", "32", "--num-workers", "0", "--save-dtype", "fp32",
            "--output", str(tmp / "pair.safetensors"), "--run-dir", str(tmp / "run"), "--max-steps", "4"]
    assert train.main(args) == 0
    return members, tmp / "pair.safetensors"


def comfy_member(path, seed=0):
    """The ComfyUI model of a tiny ldm checkpoint's UNet (the same tensors, loaded as ComfyUI loads weights)."""
    from afa.members import read_unet_state_dict
    return cf.tiny_model("sd1", seed, unet_state_dict=read_unet_state_dict(path))


def install_weights(pack, path, name="pair.safetensors"):
    folder = pack.env.models_dir / "afa"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, folder / name)
    return name


def test_weights_trained_by_train_py_bind_by_fingerprint_and_run_as_sabw(pack, trained):
    from afa.weights import read_weights_info

    member_files, weights_path = trained
    assert all(member.unet for member in read_weights_info(weights_path).members)
    name = install_weights(pack, weights_path)
    assert name in pack.nodes.AFAEnsemble.INPUT_TYPES()["required"]["weights"][0]
    first, second = (comfy_member(path) for path in member_files)
    clip = cf.tiny_clip("sd1", seed=1)
    positive, negative = cf.encode(clip, "a red circle"), cf.encode(clip, "")
    (sabw, maps) = ensemble(pack, [first, second], "SABW", name)
    assert len(sabw.get_additional_models_with_key("afa_sabw")) == 1
    result = ksample(sabw, positive, negative, steps=3)["samples"]
    average = ksample(ensemble(pack, [first, second])[0], positive, negative, steps=3)["samples"]
    assert torch.isfinite(result).all() and not torch.equal(result, average)
    (image,) = pack.nodes.AFAAggregationMaps().draw(maps, {"samples": result}, "", 1)
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and image.dtype == torch.float32
    assert [step for step, _ in maps.steps] == [0, 1, 2]  # one conditional call per step was recorded


def test_sabw_through_the_node_equals_the_core_ensemble_on_ldm_members(pack, trained):
    import comfy.patcher_extension

    from afa import EnsembleUNet, load_member, load_weights

    member_files, weights_path = trained
    name = install_weights(pack, weights_path)
    members = [comfy_member(path) for path in member_files]
    (sabw, _) = ensemble(pack, members, "SABW", name)
    wrappers = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"afa_ensemble": sabw.get_wrappers(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "afa_ensemble")}}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([999.0, 321.0])
    context = torch.randn(2, 77, 32, generator=generator)
    through_node = sabw.model.diffusion_model(x, timesteps, context=context,
                                              transformer_options={"wrappers": wrappers})
    aggregator, _ = load_weights(weights_path)
    core = EnsembleUNet([load_member(path) for path in member_files], aggregator, mode="sabw")
    expected = core(x, timesteps, context)
    # ComfyUI's attention and ldm's round differently: the same computation within float32 noise
    assert torch.allclose(through_node, expected, rtol=1e-4, atol=1e-5), (through_node - expected).abs().max()


def test_sabw_refusals_name_what_was_expected_and_found(pack, trained, tmp_path):
    from afa.errors import AfaError, IncompatibleMembersError, MembersMismatchError
    from afa.members import MemberRef
    from afa.weights import load_weights, read_weights_info, save_weights

    member_files, weights_path = trained
    name = install_weights(pack, weights_path)
    first, second = (comfy_member(path) for path in member_files)
    with pytest.raises(AfaError, match="mode SABW needs SABW weights"):
        ensemble(pack, [first, second], "SABW")
    with pytest.raises(MembersMismatchError, match="same members in another order; connect them as member 1"):
        ensemble(pack, [second, first], "SABW", name)
    stranger = cf.tiny_model("sd1", seed=9)
    with pytest.raises(MembersMismatchError, match=r"other members(.|\n)*expected: .*\n  given:    model_1"):
        ensemble(pack, [first, stranger], "SABW", name)
    with pytest.raises(MembersMismatchError, match="for 2 members"):
        ensemble(pack, [first, second, first], "SABW", name)
    # a file written before fingerprints binds by architecture only; one for other blocks is refused
    aggregator, info = load_weights(weights_path)
    legacy = [MemberRef(m.name, m.sha256) for m in info.members]
    install_weights(pack, save_weights(tmp_path / "legacy.safetensors", aggregator, legacy), "legacy.safetensors")
    assert ensemble(pack, [second, first], "SABW", "legacy.safetensors")[0] is not None  # unchecked order: a warning
    sdxl = cf.tiny_model("sdxl", seed=1)
    with pytest.raises(IncompatibleMembersError, match="model_2 is SDXL"):
        ensemble(pack, [first, sdxl], "SABW", "legacy.safetensors")
    with pytest.raises(MembersMismatchError, match="does not fit these members"):
        ensemble(pack, [sdxl, cf.twin(sdxl)], "SABW", "legacy.safetensors")
    assert read_weights_info(pack.env.models_dir / "afa" / name).members == info.members  # files untouched


# -- refusals without weights ---------------------------------------------------------------------------------------

def test_members_that_cannot_be_ensembled_are_refused_by_name(pack):
    from afa.comfyui.ensemble_model import build_ensemble
    from afa.errors import AfaError, IncompatibleMembersError

    sd1 = cf.tiny_model("sd1", seed=1)
    with pytest.raises(IncompatibleMembersError, match="2 to 6 members, got 1"):
        build_ensemble([sd1], "Block average", None)
    with pytest.raises(IncompatibleMembersError, match="2 to 6 members, got 7"):
        build_ensemble([sd1] * 7, "Block average", None)
    with pytest.raises(IncompatibleMembersError, match="model_2 is SD20 .v-prediction., model_1 is SD15 .eps."):
        ensemble(pack, [sd1, cf.tiny_model("sd2", seed=1)])
    with pytest.raises(IncompatibleMembersError, match="model_2 is SD20 .eps."):
        ensemble(pack, [cf.tiny_model("sd2", seed=1), cf.tiny_model("sd2", seed=2, parameterization="eps")])
    not_a_unet = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(IncompatibleMembersError,
                       match="model_2 is a SimpleNamespace model, neither a UNet nor a FLUX.1 transformer"):
        ensemble(pack, [sd1, not_a_unet])
    (nested, _) = ensemble(pack, [sd1, cf.twin(sd1)])
    with pytest.raises(IncompatibleMembersError, match="model_1 is already an AFA ensemble"):
        ensemble(pack, [nested, sd1])
    with pytest.raises(AfaError, match="unknown AFA mode"):
        ensemble(pack, [sd1, cf.twin(sd1)], "Median")
    # the same loaded model with a LoRA on one connection only
    with pytest.raises(AfaError, match="model_2 and model_1 are the same loaded checkpoint with different patches"):
        ensemble(pack, [sd1, with_lora(sd1, tiny_lora(sd1))])


# -- per-member text encoders ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_members_encoding_is_its_own_clips(pack, layout):
    clips = [cf.tiny_clip(layout, seed=seed) for seed in (1, 2, 3)]
    (conditioning,) = pack.nodes.AFATextEncode().encode("a red circle", clips[0], clip_2=clips[1], clip_3=clips[2])
    own = [cf.encode(clip, "a red circle") for clip in clips]
    cond, options = conditioning[0]
    assert torch.equal(cond, own[0][0][0])  # what every other node reads: member 1's encoding
    stacked = options["model_conds"]["afa_member_context"].cond
    assert stacked.shape[1] == 3
    assert all(torch.equal(stacked[:, index], own[index][0][0]) for index in range(3))
    pooled = options["model_conds"]["afa_member_pooled"].cond
    assert all(torch.equal(pooled[:, index], own[index][0][1]["pooled_output"]) for index in range(3))
    # one CLIP (or the same CLIP for every member): exactly CLIPTextEncode's conditioning
    (single,) = pack.nodes.AFATextEncode().encode("a red circle", clips[0], clip_2=clips[0])
    assert torch.equal(single[0][0], own[0][0][0]) and "model_conds" not in single[0][1]


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_each_member_reads_its_own_encoding_while_sampling(pack, layout):
    """Noise averaging of A (reading CLIP a) and B (reading CLIP b) is the mean of A's prediction for a's encoding
    and B's for b's: the diffusion model calls are spied on."""
    first, second = cf.tiny_model(layout, seed=1), cf.tiny_model(layout, seed=2)
    clip_a, clip_b = cf.tiny_clip(layout, seed=1), cf.tiny_clip(layout, seed=2)
    (conditioning,) = pack.nodes.AFATextEncode().encode("a red circle", clip_a, clip_2=clip_b)
    negative = pack.nodes.AFATextEncode().encode("", clip_a, clip_2=clip_b)[0]
    own = [cf.encode(clip, "a red circle")[0][0] for clip in (clip_a, clip_b)]
    seen = {0: [], 1: []}
    for index, member in enumerate((first, second)):
        # ComfyUI calls a SpatialTransformer as layer(x, context, transformer_options)
        transformer = next(module for module in member.model.diffusion_model.modules()
                           if type(module).__name__ == "SpatialTransformer")
        transformer.register_forward_pre_hook(lambda module, args, index=index: seen[index].append(args[1]))
    (noise_average, _) = ensemble(pack, [first, second], "Noise average")
    ksample(noise_average, conditioning, negative, steps=1)
    for index in (0, 1):
        rows = [row for context in seen[index] for row in context]
        assert any(torch.equal(row[None], own[index]) for row in rows)
        assert not any(torch.equal(row[None], own[1 - index]) for row in rows)
    # the same prompt encoded for 3 members does not fit a 2-member ensemble
    three = pack.nodes.AFATextEncode().encode("a red circle", clip_a, clip_2=clip_b, clip_3=clip_a)[0]
    with pytest.raises(Exception, match="encoded for 3 members"):
        ksample(noise_average, three, negative, steps=1)


def test_per_member_text_of_identical_encoders_is_the_shared_encoding(pack):
    model, clip, _ = cf.tiny_checkpoint("sdxl", seed=1)
    same_weights = cf.tiny_clip("sdxl", seed=1)  # another object with the same weights
    (ensembled, _) = ensemble(pack, [model, cf.twin(model)])
    positive = pack.nodes.AFATextEncode().encode("a red circle", clip, clip_2=same_weights)[0]
    negative = pack.nodes.AFATextEncode().encode("", clip, clip_2=same_weights)[0]
    expected = ksample(model, cf.encode(clip, "a red circle"), cf.encode(clip, ""))["samples"]
    assert torch.equal(ksample(ensembled, positive, negative)["samples"], expected)


# -- the pack's entry point, folders and install.py -----------------------------------------------------------------

def test_comfyui_loads_the_repository_as_a_node_pack(pack, tmp_path):
    """As nodes.load_custom_node does: the repository's __init__.py imported as a package from custom_nodes/."""
    folder = tmp_path / "custom_nodes" / "afa-ensemble"
    folder.parent.mkdir()
    folder.symlink_to(REPO, target_is_directory=True)
    spec = importlib.util.spec_from_file_location("afa-ensemble", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert set(module.NODE_CLASS_MAPPINGS) == {"AFAEnsemble", "AFATextEncode", "AFAAggregationMaps", "AFATrain"}
    assert module.NODE_DISPLAY_NAME_MAPPINGS["AFAEnsemble"] == "AFA Ensemble"
    import folder_paths
    assert Path(folder_paths.get_folder_paths("afa")[0]) == pack.env.models_dir / "afa"
    extra = tmp_path / "shared-afa"  # what extra_model_paths.yaml's `afa:` key adds
    extra.mkdir()
    shutil.copy(REPO / "tests" / "data" / "weights-format-1.safetensors", extra / "old.safetensors")
    (extra / "notes.txt").write_text("not a weights file")
    folder_paths.add_model_folder_path("afa", str(extra))
    assert pack.nodes.weights_choices() == ["none", "old.safetensors"]


def test_install_py_does_nothing_outside_a1111(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "install.py")], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert run.returncode == 0 and run.stdout == "" and run.stderr == ""


def test_only_the_comfyui_glue_imports_comfyui():
    import re
    imports_comfy = re.compile(r"^\s*(import|from)\s+(comfy|comfy_extras|comfy_api|folder_paths|nodes|server|"
                               r"execution|node_helpers)\b", re.M)
    offenders = [path.relative_to(REPO).as_posix() for folder in ("afa", "training", "scripts")
                 for path in (REPO / folder).rglob("*.py")
                 if imports_comfy.search(path.read_text(encoding="utf-8"))
                 and "afa/comfyui" not in path.relative_to(REPO).as_posix()]
    assert offenders == []
    assert "import comfy" not in (REPO / "__init__.py").read_text()  # the entry point only registers
