"""The AFA Ensemble node with FLUX members on the stand-in of ComfyUI 0.3.64: tiny FLUX transformers built as
ComfyUI's loader builds them (`comfy.supported_models.Flux` -> `model_base.Flux`, ModelSamplingFlux; tests/
comfyui_factories.py tiny_flux), conditioning as FluxGuidance leaves it. Identical members give the member's sampling
bit for bit (block average, noise average, SABW with untrained weights; txt2img, img2img), the guidance reaches every
member, SABW through the node equals the core's EnsembleFlux, LoRAs apply per member, the maps name FLUX blocks,
a block replacement (skip-layer guidance's kind) applies to every member, and UNet weights or UNet members are refused.
"""

from __future__ import annotations

import types

import pytest
import torch

import comfyui_factories as cf
from afa.aggregator import Aggregator
from afa.errors import IncompatibleMembersError, MembersMismatchError
from afa.members import MemberRef


@pytest.fixture
def pack(comfy_standin):
    from afa.comfyui import ensemble_model, nodes

    with torch.inference_mode():
        yield types.SimpleNamespace(env=comfy_standin, nodes=nodes, ensemble_model=ensemble_model)


def ensemble(pack, models, mode="Block average", weights="none"):
    extra = {f"model_{index}": model for index, model in enumerate(models[2:], start=3)}
    return pack.nodes.AFAEnsemble().ensemble(models[0], models[1], mode, weights, **extra)


def ksample(model, latent=None, seed=0, steps=2, cfg=2.0, denoise=1.0, guidance=3.5):
    """KSampler as a FLUX workflow runs it: FluxGuidance on the positive prompt, an empty SD3/FLUX latent."""
    import nodes
    latent = cf.flux_latent(32, 32) if latent is None else latent
    positive, negative = cf.flux_conditioning(1, guidance=guidance), cf.flux_conditioning(2, guidance=guidance)
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", positive, negative, latent,
                                 denoise=denoise)[0]["samples"]


def install(pack, aggregator, models, name):
    """A weights file for `models` (their fingerprints, as train.py records them) in models/afa/."""
    from afa.weights import save_weights
    refs = [MemberRef(f"flux-{index}", "0" * 64, pack.ensemble_model.member_fingerprint(model))
            for index, model in enumerate(models)]
    save_weights(pack.env.models_dir / "afa" / name, aggregator, refs)
    return name


def flux_sabw(model, preset="paper", seed=None, **overrides):
    from afa.flux import flux_layout, flux_preset_config
    from afa.members import unet_shapes
    layout = flux_layout(unet_shapes(model.model.diffusion_model))
    aggregator = Aggregator(flux_preset_config(preset, 2, layout, **overrides))
    return aggregator if seed is None else cf.randomize_parameters_(aggregator, seed, 0.05)


@pytest.mark.parametrize("mode", ["Block average", "Noise average", "SABW"])
def test_identical_flux_members_give_the_members_sampling_bit_for_bit(pack, mode):
    model = cf.tiny_flux(seed=1)
    weights = install(pack, flux_sabw(model), [model, model], "untrained.safetensors") if mode == "SABW" else "none"
    expected = ksample(model)
    for members in ([model, cf.twin(model)], [model, model]):
        (ensembled, _) = ensemble(pack, members, mode, weights)
        assert torch.equal(ksample(ensembled), expected)
    # img2img (a partial denoise of a latent) and [schnell]-style members without guidance embedding
    start = {"samples": torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))}
    (ensembled, _) = ensemble(pack, [model, cf.twin(model)], mode, weights)
    assert torch.equal(ksample(ensembled, start, denoise=0.6), ksample(model, start, denoise=0.6))
    if mode != "SABW":
        schnell = cf.tiny_flux(seed=1, guidance_embed=False)
        (ensembled, _) = ensemble(pack, [schnell, cf.twin(schnell)], mode)
        assert torch.equal(ksample(ensembled, cfg=1.0), ksample(schnell, cfg=1.0))


def test_different_flux_members_differ_and_read_fluxguidance(pack):
    first, second = cf.tiny_flux(seed=1), cf.tiny_flux(seed=2)
    (average, _) = ensemble(pack, [first, second])
    result = ksample(average)
    assert all(not torch.allclose(result, ksample(member), atol=1e-4) for member in (first, second))
    assert not torch.equal(ksample(average, guidance=1.0), result)  # FluxGuidance's value reaches the members
    assert not torch.equal(ksample(ensemble(pack, [first, second], "Noise average")[0]), result)


def test_sabw_through_the_node_equals_the_core_ensemble(pack):
    import comfy.patcher_extension

    from afa.flux import EnsembleFlux

    first, second = cf.tiny_flux(seed=1), cf.tiny_flux(seed=2)
    aggregator = flux_sabw(first, seed=4)
    name = install(pack, aggregator, [first, second], "pair.safetensors")
    (sabw, maps) = ensemble(pack, [first, second], "SABW", name)
    assert len(sabw.get_additional_models_with_key("afa_sabw")) == 1
    wrappers = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"afa_ensemble": sabw.get_wrappers(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "afa_ensemble")}}
    generator = torch.Generator().manual_seed(0)
    x, timesteps = torch.randn(2, 16, 6, 10, generator=generator), torch.tensor([0.9, 0.4])
    context, y = torch.randn(2, 5, 24, generator=generator), torch.randn(2, 16, generator=generator)
    guidance = torch.tensor([3.5, 3.5])
    through_node = sabw.model.diffusion_model(x, timesteps, context, y, guidance,
                                              transformer_options={"wrappers": wrappers})
    members = [first.model.diffusion_model, second.model.diffusion_model]
    expected = EnsembleFlux(members, aggregator.eval(), "sabw")(x, timesteps, context, y, guidance)
    assert torch.equal(through_node, expected)
    average = EnsembleFlux(members, mode="average")(x, timesteps, context, y, guidance)
    assert (through_node - average).abs().max() > 1e-4
    # sampling records the maps of the last double block and of the prediction, under FLUX's block names
    result = ksample(sabw, steps=2)
    assert maps.blocks == [1, 3] and maps.block_names[1] == "double_blocks.1"
    (image,) = pack.nodes.AFAAggregationMaps().draw(maps, {"samples": result}, "single_blocks.1", 0)
    assert image.ndim == 4 and image.shape[-1] == 3
    with pytest.raises(ValueError, match="unknown block 'output_blocks.1'; these members' blocks are "
                                         "double_blocks.0-1, single_blocks.0-1"):
        maps.render(["output_blocks.1"])


def test_a_lora_on_a_flux_member_applies_to_that_member_only(pack):
    first = cf.tiny_flux(seed=1)
    twin = cf.twin(first)
    delta = torch.randn(32, 32, generator=torch.Generator().manual_seed(7)) * 0.2

    def patched(model):  # a "diff" patch on one attention projection, as ComfyUI's LoRA loader adds patches
        patcher = model.clone()
        patcher.add_patches({"diffusion_model.double_blocks.0.img_attn.proj.weight": ("diff", (delta,))}, 1.0)
        return patcher

    alone, without = ksample(patched(first)), ksample(first)
    assert not torch.equal(alone, without)
    assert torch.equal(ksample(ensemble(pack, [patched(first), patched(twin)])[0]), alone)
    one = ksample(ensemble(pack, [patched(first), twin])[0])
    assert not torch.equal(one, alone) and not torch.equal(one, without)
    assert torch.equal(ksample(twin), without)


def test_a_block_replacement_applies_to_every_member(pack):
    """A `patches_replace["dit"]` block replacement (what skip-layer guidance sets) runs for each member's block:
    one that returns its input unchanged makes identical members skip the block together, as the member alone."""
    model = cf.tiny_flux(seed=1)

    def skip(args, extra):
        return {"img": args["img"], "txt": args["txt"]}

    def with_skip(patcher):
        patcher = patcher.clone()
        patcher.set_model_patch_replace(skip, "dit", "double_block", 1)
        return patcher

    expected = ksample(with_skip(model))
    assert not torch.equal(expected, ksample(model))
    (ensembled, _) = ensemble(pack, [model, cf.twin(model)])
    assert torch.equal(ksample(with_skip(ensembled)), expected)


def test_flux_refusals(pack, tmp_path):
    from afa.aggregator import preset_config

    flux = cf.tiny_flux(seed=1)
    with pytest.raises(IncompatibleMembersError, match="model_2 is SD15 .eps., model_1 is Flux .flux."):
        ensemble(pack, [flux, cf.tiny_model("sd1", seed=1)])
    with pytest.raises(IncompatibleMembersError, match="model_2 is FluxSchnell .flow., model_1 is Flux .flux."):
        ensemble(pack, [flux, cf.tiny_flux(seed=1, guidance_embed=False)])
    not_flux = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(IncompatibleMembersError, match="model_2 is a SimpleNamespace model, neither a UNet nor a "
                                                       "FLUX.1 transformer"):
        ensemble(pack, [flux, not_flux])
    unet_weights = Aggregator(preset_config("fast", 2, [32] * 7 + [64] * 12 + [32] * 5 + [4], 32,
                                            hidden_channels=32, num_heads=2))
    name = install(pack, unet_weights, [flux, cf.twin(flux)], "unet.safetensors")
    with pytest.raises(MembersMismatchError, match="unet.safetensors were trained for UNet members .SD 1.x, SD 2.x, "
                                                   "SDXL.; these members are FLUX transformer members"):
        ensemble(pack, [flux, cf.twin(flux)], "SABW", name)
    sd1 = cf.tiny_model("sd1", seed=1)
    name = install(pack, flux_sabw(flux), [sd1, cf.twin(sd1)], "flux.safetensors")
    with pytest.raises(MembersMismatchError, match="flux.safetensors were trained for FLUX transformer members; "
                                                   "these members are UNet members"):
        ensemble(pack, [sd1, cf.twin(sd1)], "SABW", name)
    (ensembled, _) = ensemble(pack, [flux, cf.twin(flux)])
    import nodes
    kontext = cf.flux_conditioning(1)
    kontext[0][1]["reference_latents"] = [torch.zeros(1, 16, 4, 4)]
    with pytest.raises(Exception, match="reference latents .FLUX Kontext, ReferenceLatent. are not supported"):
        nodes.common_ksampler(ensembled, 0, 1, 1.0, "euler", "simple", kontext, kontext, cf.flux_latent(32, 32))


def test_each_flux_member_reads_its_own_encoding(pack):
    """AFA Text Encode's stacked per-member conditioning (afa.comfyui.text) with FLUX encodings: member i reads its
    own T5 tokens and pooled CLIP-L, SABW their mean (the core's member_contexts / member_vectors), and sampling
    with it runs; with one encoding for both the conditioning is the plain one."""
    import comfy.patcher_extension

    from afa.comfyui.forward import MEMBER_CONTEXT, MEMBER_POOLED
    from afa.comfyui.text import stack_member_conditioning
    from afa.flux import EnsembleFlux

    first, second = cf.tiny_flux(seed=1), cf.tiny_flux(seed=2)
    own = [cf.flux_conditioning(1), cf.flux_conditioning(3)]
    stacked = stack_member_conditioning(own)
    model_conds = stacked[0][1]["model_conds"]
    assert set(model_conds) >= {MEMBER_CONTEXT, MEMBER_POOLED} and stacked[0][1]["guidance"] == 3.5
    aggregator = flux_sabw(first, seed=4)
    (sabw, _) = ensemble(pack, [first, second], "SABW", install(pack, aggregator, [first, second], "own.safetensors"))
    wrappers = {comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL: {"afa_ensemble": sabw.get_wrappers(
        comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "afa_ensemble")}}
    x, timesteps = torch.randn(1, 16, 6, 10, generator=torch.Generator().manual_seed(0)), torch.tensor([0.7])
    contexts = [conditioning[0][0] for conditioning in own]
    pooled = [conditioning[0][1]["pooled_output"] for conditioning in own]
    guidance = torch.tensor([3.5])
    through_node = sabw.model.diffusion_model(
        x, timesteps, contexts[0], pooled[0], guidance, transformer_options={"wrappers": wrappers},
        **{MEMBER_CONTEXT: model_conds[MEMBER_CONTEXT].cond, MEMBER_POOLED: model_conds[MEMBER_POOLED].cond})
    members = [first.model.diffusion_model, second.model.diffusion_model]
    core = EnsembleFlux(members, aggregator.eval(), "sabw")
    expected = core(x, timesteps, None, None, guidance, member_contexts=contexts, member_vectors=pooled)
    assert torch.equal(through_node, expected)
    assert (expected - core(x, timesteps, contexts[0], pooled[0], guidance)).abs().max() > 1e-4
    import nodes
    latent = cf.flux_latent(32, 32)
    (result,) = nodes.common_ksampler(sabw, 0, 2, 1.0, "euler", "simple", stacked, stacked, latent)
    assert torch.isfinite(result["samples"]).all()


def test_the_flux_example_workflow_is_one_graph_in_both_formats(pack):
    """examples/comfyui/flux-two-members-block-average: its UI file's links and widgets are its API file's inputs
    (what ComfyUI's graphToPrompt gives; the real tier checks that in the browser for the examples it loads), its
    members come from Load Diffusion Model, FluxGuidance feeds the sampler's positive prompt, and CFG is 1."""
    import json
    from pathlib import Path

    folder = Path(__file__).resolve().parent.parent / "examples" / "comfyui"
    ui = json.loads((folder / "flux-two-members-block-average.json").read_text(encoding="utf-8"))
    api = json.loads((folder / "flux-two-members-block-average.api.json").read_text(encoding="utf-8"))
    links = {link[0]: (str(link[1]), link[2]) for link in ui["links"]}
    for node in ui["nodes"]:
        if node["type"] == "Note":
            continue
        inputs = api[str(node["id"])]["inputs"]
        assert api[str(node["id"])]["class_type"] == node["type"]
        assert {entry["name"]: list(links[entry["link"]]) for entry in node["inputs"]} == {
            name: value for name, value in inputs.items() if isinstance(value, list)}
        widgets = [value for name, value in inputs.items() if not isinstance(value, list)]
        assert [value for value in node["widgets_values"] if value not in ("fixed", "randomize")] == widgets
    ensemble_node = next(node for node in api.values() if node["class_type"] == "AFAEnsemble")
    assert ensemble_node["inputs"]["mode"] in pack.nodes.AFAEnsemble.INPUT_TYPES()["required"]["mode"][0]
    assert all(api[ensemble_node["inputs"][name][0]]["class_type"] == "UNETLoader" for name in ("model_1", "model_2"))
    sampler = next(node for node in api.values() if node["class_type"] == "KSampler")
    assert api[sampler["inputs"]["positive"][0]]["class_type"] == "FluxGuidance" and sampler["inputs"]["cfg"] == 1.0
