"""The AFA Train node (afa/comfyui/training.py) on the stand-in of ComfyUI 0.3.64: training/train.py's trainer on the
MODELs, CLIPs and VAE the graph loaded, with images ComfyUI's own SaveImage wrote (their prompts read from the PNGs'
workflow metadata); ComfyUI's progress bar, Interrupt, resume to the same weights bit for bit, the refusals, and the
trained weights sampled by the AFA Ensemble node.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import comfyui_factories as cf

PROMPTS = ("a red circle", "a blue square", "a green circle", "a red square")


@pytest.fixture
def pack(comfy_standin):
    """The stand-in plus the node pack, under inference mode as ComfyUI's executor runs nodes."""
    from afa.comfyui import nodes, training

    with torch.inference_mode():
        yield types.SimpleNamespace(env=comfy_standin, nodes=nodes, training=training, core=comfy_standin.nodes)


def api_prompt(text: str, negative: str = "ugly, blurry") -> dict:
    """A txt2img graph in ComfyUI's API format, as the `prompt` PNG chunk holds it (ids as the default workflow)."""
    return {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20, "cfg": 7.0, "sampler_name": "euler",
                                                   "scheduler": "normal", "denoise": 1.0, "model": ["4", 0],
                                                   "positive": ["6", 0], "negative": ["7", 0],
                                                   "latent_image": ["5", 0]}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "member.safetensors"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}},
    }


def editor_workflow(text: str) -> dict:
    """The same graph in the editor's format (the `workflow` chunk): nodes with widget values and links."""
    return {"nodes": [
        {"id": 3, "type": "KSampler", "inputs": [{"name": "model", "link": 1}, {"name": "positive", "link": 4},
                                                 {"name": "negative", "link": 6}], "widgets_values": [1, "fixed"]},
        {"id": 6, "type": "CLIPTextEncode", "inputs": [{"name": "clip", "link": 3}], "widgets_values": [text]},
        {"id": 7, "type": "CLIPTextEncode", "inputs": [{"name": "clip", "link": 5}], "widgets_values": ["ugly"]},
        {"id": 4, "type": "CheckpointLoaderSimple", "inputs": [], "widgets_values": ["member.safetensors"]},
    ], "links": [[1, 4, 0, 3, 0, "MODEL"], [3, 4, 1, 6, 0, "CLIP"], [4, 6, 0, 3, 1, "CONDITIONING"],
                 [5, 4, 1, 7, 0, "CLIP"], [6, 7, 0, 3, 2, "CONDITIONING"]]}


def pattern(index: int, size: int = 64) -> torch.Tensor:
    """An IMAGE [1 x H x W x 3] in 0..1: a coloured disc or square on grey, placed by `index`."""
    rng = np.random.default_rng(index)
    pixels = np.full((size, size, 3), 0.5, dtype=np.float32) + rng.normal(0, 0.05, (size, size, 3))
    colour = [(0.9, 0.1, 0.1), (0.1, 0.1, 0.9), (0.1, 0.8, 0.1)][index % 3]
    y, x = np.mgrid[:size, :size]
    cy, cx = 20 + (index * 7) % 24, 20 + (index * 11) % 24
    shape = ((y - cy) ** 2 + (x - cx) ** 2 < 100) if index % 2 == 0 else ((abs(y - cy) < 9) & (abs(x - cx) < 9))
    pixels[shape] = colour
    return torch.from_numpy(np.clip(pixels, 0, 1).astype(np.float32))[None]


def save_images(pack, count: int = 10, prefix: str = "ComfyUI", prompt=api_prompt, workflow=editor_workflow):
    """`count` images saved by ComfyUI's own SaveImage (stand-in copy of nodes.SaveImage) into the output folder,
    each with the `prompt` and `workflow` chunks ComfyUI writes; returns the file names."""
    names = []
    for index in range(count):
        text = f"{PROMPTS[index % len(PROMPTS)]}, number {index}"
        extra = {"workflow": workflow(text)} if workflow else None
        result = pack.core.SaveImage().save_images(pattern(index), prefix, prompt=prompt(text) if prompt else None,
                                                   extra_pnginfo=extra)
        names += [image["filename"] for image in result["ui"]["images"]]
    return names


def members(layout: str = "sd1"):
    """Two tiny members, their CLIPs and member 1's VAE, as checkpoint loaders give them."""
    first, clip_1, vae = cf.tiny_checkpoint(layout, seed=1)
    second, clip_2, _ = cf.tiny_checkpoint(layout, seed=2)
    return [first, second], [clip_1, clip_2], vae


SHORT = dict(data="output", validation_share=0.2, epochs=1, max_steps=4, batch_size=4, precision="auto",
             gradient_checkpointing=False, design="fast", resolution=64, training_seed=0,
             extra_flags="--hidden-channels 32 --save-every 1 --save-dtype fp32")


def run_node(pack, models, clips, vae, **settings):
    inputs = dict(SHORT, output_name="pair", resume=False)
    inputs.update(settings)
    extra = {f"model_{index}": model for index, model in enumerate(models[2:], start=3)}
    extra.update({f"clip_{index}": clip for index, clip in enumerate(clips[1:], start=2)})
    return pack.nodes.AFATrain().train(models[0], models[1], clips[0], vae, **extra, **inputs)


# -- prompts from ComfyUI's PNG metadata ------------------------------------------------------------------------

def test_prompts_come_from_the_pngs_comfyui_saved(pack):
    from training.data import SkipReason, SkipReport, index_captioned_images

    names = save_images(pack, 4)
    output = Path(pack.env.folder_paths.get_output_directory())
    save_images(pack, 1, prefix="workflow-only", prompt=None)  # only the editor's graph (the workflow chunk)
    save_images(pack, 1, prefix="no-metadata", prompt=None, workflow=None)
    report = SkipReport()
    records = index_captioned_images(output, report)
    captions = {record.image_path.name: record.caption for record in records}
    for index, name in enumerate(names):
        assert captions[name] == f"{PROMPTS[index % len(PROMPTS)]}, number {index}"  # the positive, not "ugly"
    assert [caption for name, caption in captions.items() if name.startswith("workflow-only")] == \
        ["a red circle, number 0"]
    assert report.counts() == {SkipReason.MISSING_CAPTION: 1}
    assert "no-metadata" in report.sources(SkipReason.MISSING_CAPTION)[0]


def test_the_positive_prompt_is_followed_through_the_graph():
    from training.data import caption_from_comfyui_metadata as caption

    graph = api_prompt("unused")
    # KSampler <- ConditioningSetArea <- ConditioningCombine(conditioning_1 <- AFA Text Encode <- a string node)
    graph["3"]["inputs"]["positive"] = ["20", 0]
    graph["20"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["21", 0], "width": 64}}
    graph["21"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["22", 0],
                                                                    "conditioning_2": ["7", 0]}}
    graph["22"] = {"class_type": "AFATextEncode", "inputs": {"text": ["23", 0], "clip_1": ["4", 1]}}
    graph["23"] = {"class_type": "PrimitiveStringMultiline", "inputs": {"value": "a castle at dawn"}}
    assert caption({"prompt": json.dumps(graph)}) == "a castle at dawn"
    sdxl = {"1": {"class_type": "KSamplerAdvanced", "inputs": {"positive": ["2", 0], "negative": ["3", 0]}},
            "2": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "a fox", "text_l": "fox"}},
            "3": {"class_type": "CLIPTextEncodeSDXL", "inputs": {"text_g": "bad", "text_l": "bad"}}}
    assert caption({"prompt": json.dumps(sdxl)}) == "a fox"
    # no sampler (an upscale-and-save graph), a damaged chunk, an empty prompt: no caption
    assert caption({"prompt": json.dumps({"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}}})}) == ""
    assert caption({"prompt": "{not json"}) == ""
    assert caption({"prompt": json.dumps(api_prompt("   "))}) == ""
    # the prompt chunk wins over the workflow chunk
    assert caption({"prompt": json.dumps(api_prompt("from prompt")),
                    "workflow": json.dumps(editor_workflow("from workflow"))}) == "from prompt"


# -- training ---------------------------------------------------------------------------------------------------

def test_training_reports_progress_and_its_weights_run_in_the_ensemble(pack, monkeypatch):
    import comfy.utils

    from afa.weights import read_weights_info

    save_images(pack, 10)
    models, clips, vae = members()
    hooks = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK",
                        lambda value, total, preview, node_id=None: hooks.append((value, total)))
    weights_name, table, curves = run_node(pack, models, clips, vae)
    assert weights_name == "pair.safetensors"
    assert hooks[0] == (0, 4) and hooks[-1] == (4, 4) and [v for v, _ in hooks] == [0, 1, 2, 3, 4]
    assert "AFA" in table and "block average" in table and "model_1" in table and "step 4" in table
    # the merge baselines (issue 19): a weighted merge of the members' UNets and MBW, each reading member 1's CLIP
    assert "weighted merge (r=" in table and "\n  MBW " in table and "vs best merge" in table, table
    assert curves.ndim == 4 and curves.shape[0] == 1 and curves.shape[-1] == 3 and curves.dtype == torch.float32
    info = read_weights_info(pack.env.models_dir / "afa" / weights_name)
    from afa.comfyui.ensemble_model import member_fingerprint
    assert [m.unet for m in info.members] == [member_fingerprint(model) for model in models]
    assert info.config.design == "fast" and info.training["steps"] == 4

    # the weights name feeds AFA Ensemble, which samples with them
    (sabw, _) = pack.nodes.AFAEnsemble().ensemble(models[0], models[1], "SABW", "none", weights_name=weights_name)
    positive = pack.nodes.AFATextEncode().encode("a red circle", clips[0], clip_2=clips[1])[0]
    negative = pack.nodes.AFATextEncode().encode("", clips[0], clip_2=clips[1])[0]
    import nodes
    (latent,) = nodes.common_ksampler(sabw, 0, 2, 5.0, "euler", "normal", positive, negative, cf.empty_latent())
    assert torch.isfinite(latent["samples"]).all()


def weights_tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def test_interrupt_keeps_the_state_and_resume_ends_as_the_uninterrupted_run(pack, monkeypatch):
    import comfy.model_management
    import comfy.utils

    from afa.errors import AfaError

    save_images(pack, 10)
    models, clips, vae = members()
    weights = pack.env.models_dir / "afa"
    run_node(pack, models, clips, vae, output_name="whole")

    seen, interrupted = [], []

    def interrupt_at_step_2(value, total, preview, node_id=None):
        seen.append(value)
        if value == 2 and not interrupted:
            interrupted.append(True)
            comfy.model_management.interrupt_current_processing(True)  # what ComfyUI's /interrupt does

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", interrupt_at_step_2)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run_node(pack, models, clips, vae, output_name="split")
    assert seen[-1] == 2  # stopped after the step that was running
    assert not comfy.model_management.processing_interrupted()  # the flag is consumed, as ComfyUI's nodes do
    assert not (weights / "split.safetensors").exists()
    from training.service import saved_arguments
    assert saved_arguments(pack.training.runs_dir() / "split")["step"] == 2

    # without resume, the name is taken
    with pytest.raises(pack.training.TrainingRefused, match="saved training state .step 2.*resume"):
        run_node(pack, models, clips, vae, output_name="split")
    with pytest.raises(AfaError, match="trained with members"):
        run_node(pack, models[::-1], clips[::-1], vae, output_name="split", resume=True)  # members swapped
    with pytest.raises(AfaError, match="--batch-size: saved 4, given 2"):
        run_node(pack, models, clips, vae, output_name="split", resume=True, batch_size=2)
    seen.clear()
    save_images(pack, 3, prefix="later")  # images saved since do not change the resumed run (its data snapshot)
    weights_name, table, _ = run_node(pack, models, clips, vae, output_name="split", resume=True)
    assert seen[0] == 2 and seen[-1] == 4 and "resumed" in table
    whole, split = weights_tensors(weights / "whole.safetensors"), weights_tensors(weights / weights_name)
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)


def test_refusals_come_before_any_work(pack, monkeypatch, tmp_path):
    import comfy.model_management

    from afa.errors import AfaError

    models, clips, vae = members()
    train = pack.training.train_members
    Request = pack.training.Request
    SETTINGS = {("seed" if k == "training_seed" else k): v for k, v in SHORT.items()}
    request = Request(**SETTINGS, output_name="refused")

    loaded_before = list(comfy.model_management.current_loaded_models)  # the CLIPs load when they are made

    def refused(models_, clips_=clips, request_=request) -> str:
        with pytest.raises(AfaError) as error:
            train(models_, clips_, vae, request_)
        assert comfy.model_management.current_loaded_models == loaded_before  # nothing more was loaded
        return str(error.value)

    assert "2 to 6 members, got 1" in refused(models[:1])
    mixed = refused([models[0], cf.tiny_model("sd2", seed=3)])
    assert "model_2 is SD20" in mixed and "model_1 is SD15" in mixed
    assert "one CLIP per member" in refused(models + [cf.twin(models[0])], clips)
    import comfy.model_base
    flow = [cf.tiny_model("sd1", seed=4), cf.tiny_model("sd1", seed=5)]
    for model in flow:  # a prediction type the trainer has no loss for
        model.model.model_type = comfy.model_base.ModelType.FLOW
    assert "model_1 predicts FLOW" in refused(flow)
    assert "AFA Train trains SABW for SD 1.x, SD 2.x and SDXL" in refused([cf.tiny_flux(1), cf.tiny_flux(2)])
    from test_comfyui_nodes import tiny_lora, with_lora
    # one loaded checkpoint connected twice, with a LoRA on one connection: ComfyUI holds one copy of its weights
    assert "same loaded checkpoint with different patches" in refused(
        [models[0], with_lora(models[0], tiny_lora(models[0]))])
    # no usable images: the counts and the reasons
    save_images(pack, 2, prefix="bare", prompt=None, workflow=None)
    save_images(pack, 1, prefix="nosampler", prompt=lambda text: {"1": {"class_type": "LoadImage",
                                                                           "inputs": {"image": "x.png"}}},
                workflow=None)
    message = refused(models)
    assert "no usable images" in message and "Skipped 3 images" in message
    assert "3 no caption" in message and "has no sampler with a positive text prompt" in message
    assert not (pack.training.runs_dir() / "refused").exists()  # the refused snapshot is removed
    # too few to fill a batch
    save_images(pack, 3)
    assert "3 training images do not fill one batch of 4" in refused(
        models, request_=Request(**{**SETTINGS, "validation_share": 0.0}, output_name="refused"))
    save_images(pack, 7, prefix="more")
    # an existing weights file without resume
    (pack.env.models_dir / "afa").mkdir(parents=True, exist_ok=True)
    (pack.env.models_dir / "afa" / "taken.safetensors").write_bytes(b"")
    assert "already exist" in refused(models, request_=Request(**SETTINGS, output_name="taken"))
    # precision that does not fit the members as loaded, a flag the node sets itself, a bad name
    assert "fp16 needs a CUDA device" in refused(models, request_=Request(**{**SETTINGS, "precision": "fp16"},
                                                                           output_name="refused"))
    assert "--batch-size is set by the node" in refused(models, request_=Request(
        **{**SETTINGS, "extra_flags": "--batch-size 2"}, output_name="refused"))
    assert "output name" in refused(models, request_=Request(**SETTINGS, output_name="../escape"))
    # too little disk
    from training import service
    monkeypatch.setattr(service.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    assert "not enough free disk" in refused(models)


@pytest.mark.parametrize("layout", ["sd2", "sdxl"])
def test_sd2_v_and_sdxl_members_train(pack, layout):
    """SD 2.x (v prediction) and SDXL members (per-member CLIPs; SDXL's y from each CLIP's pooled output and the
    images' sizes through the model's own encode_adm)."""
    from afa.weights import read_weights_info

    save_images(pack, 10)
    models, clips, vae = members(layout)
    weights_name, table, _ = run_node(pack, models, clips, vae, max_steps=2)
    info = read_weights_info(pack.env.models_dir / "afa" / weights_name)
    assert info.training["steps"] == 2 and info.config.text_conditioning == "per_member"
    assert "AFA" in table


def test_the_trainers_vae_and_text_encoders_read_as_comfyui_does(pack):
    """The trainer's latents are VAE Encode's latents scaled as the model scales them (process_latent_in), and its
    text encodings are CLIPTextEncode's."""
    models, clips, vae = members("sdxl")
    with torch.inference_mode(False):
        frozen = pack.training.comfy_frozen_models(models, clips, vae, torch.device("cpu"))
    pixels = torch.cat([pattern(0), pattern(1)])  # [B x H x W x 3] in 0..1
    expected = models[0].model.process_latent_in(vae.encode(pixels))
    latents = frozen.vae.encode(pixels.movedim(-1, 1) * 2 - 1)
    assert torch.allclose(latents, expected, atol=1e-5)
    mean, std = frozen.vae.posterior(pixels.movedim(-1, 1) * 2 - 1)
    assert torch.allclose(mean, expected, atol=1e-5) and (std > 0).all()
    sizes = torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)
    for clip, encoder in zip(clips, frozen.text_encoders):
        context, vector = encoder.encode_captions(["a red circle", ""], sizes, [False, False])
        for row, text in enumerate(["a red circle", ""]):
            ((cond, extra),) = cf.encode(clip, text)
            assert torch.equal(context[row:row + 1], cond)
            assert torch.equal(vector[row:row + 1, :64], extra["pooled_output"])
    assert frozen.text_encoders[0] is not frozen.text_encoders[1]
    assert frozen.schedule.parameterization == "eps" and frozen.schedule.num_timesteps == 1000


def test_the_example_workflow_fits_the_nodes(pack):
    """examples/comfyui/sd15-train-then-sample (API and UI format): every AFA node's inputs are its INPUT_TYPES'
    (required ones present, choices valid), the UI format has one widget value per widget, and AFA Train's
    weights name feeds AFA Ensemble."""
    root = Path(__file__).resolve().parent.parent / "examples" / "comfyui"
    api = json.loads((root / "sd15-train-then-sample.api.json").read_text(encoding="utf-8"))
    ui = json.loads((root / "sd15-train-then-sample.json").read_text(encoding="utf-8"))
    mappings = pack.nodes.NODE_CLASS_MAPPINGS
    widget_types = ("INT", "FLOAT", "BOOLEAN", "STRING")

    def widgets(spec: dict) -> list[str]:
        inputs = {**spec["required"], **spec.get("optional", {})}
        return [name for name, (kind, *options) in inputs.items()
                if (isinstance(kind, list) or kind in widget_types) and not (options and options[0].get("forceInput"))]

    for node in api.values():
        if node["class_type"] not in mappings:
            continue
        spec = mappings[node["class_type"]].INPUT_TYPES()
        given = node["inputs"]
        assert set(spec["required"]) <= set(given), node
        assert set(given) <= set(spec["required"]) | set(spec.get("optional", {})), node
        for name, value in given.items():
            kind = {**spec["required"], **spec.get("optional", {})}[name][0]
            if isinstance(kind, list) and not isinstance(value, list) and name != "weights":
                assert value in kind, (name, value)
    train = next(node for node in api.values() if node["class_type"] == "AFATrain")
    ensemble = next(node for node in api.values() if node["class_type"] == "AFAEnsemble")
    train_id = next(key for key, node in api.items() if node is train)
    assert ensemble["inputs"]["weights_name"] == [train_id, 0] and train["inputs"]["resume"] is True
    for node in ui["nodes"]:
        if node["type"] in mappings:
            assert len(node["widgets_values"]) == len(widgets(mappings[node["type"]].INPUT_TYPES())), node["type"]
    links = {link[0] for link in ui["links"]}
    assert all(slot["link"] in links for node in ui["nodes"] for slot in node["inputs"])
