"""Per-member text conditioning in the WebUI stand-in: every member's cross-attention reads the prompt as the WebUI
encodes it with that member's own text encoder (afa/webui/text_conditioning.py).

Checkpoints: tiny-a (loaded); tiny-a-text, tiny-a's UNet and VAE with tiny-b's text encoder; tiny-a2, a copy of
tiny-a; tiny-b.
"""

from __future__ import annotations

import gc
import shutil
import sys
import warnings
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "webui_standin"))

import harness  # noqa: E402

import torch  # noqa: E402

from modules import infotext_utils, sd_models, sd_unet, shared  # noqa: E402

from afa import AggregatorConfig  # noqa: E402
from afa.ensemble import EnsembleUNet  # noqa: E402
from afa.webui import sd_unet_option as afa_unet  # noqa: E402

EXTENSION_ROOT = Path(__file__).resolve().parents[1]
TITLE = "AFA ensemble"
CHECKPOINTS = (("tiny-a", 1), ("tiny-a2", 1), ("tiny-b", 2))
# emphasis, prompt editing, AND, and more than 75 tokens (two chunks)
PROMPT = ("a (red:1.4) cat [sitting:standing:2] on a mat, " + "in a quiet sunny garden with flowers, " * 12
          + "AND a small dog:0.5")
NEGATIVE = "(blurry:1.2), lowres"


def afa(members=("tiny-a", "tiny-a-text"), mode="Block average", weights="") -> dict:
    return {TITLE: [True, list(members), weights, mode, False]}


def pixels(image) -> bytes:
    return image.tobytes()


def write_text_variant(models_dir: Path, name: str, unet_from: str, text_from: str,
                       text_prefix: str = "cond_stage_model.") -> Path:
    """A checkpoint with the UNet and VAE of `unet_from` and the text encoder(s) of `text_from` (installed files; SDXL:
    text_prefix "conditioner.")."""
    tensors = load_file(str(models_dir / f"{unet_from}.safetensors"))
    text = load_file(str(models_dir / f"{text_from}.safetensors"))
    tensors.update({key: value for key, value in text.items() if key.startswith(text_prefix)})
    path = models_dir / f"{name}.safetensors"
    save_file(tensors, str(path))
    shutil.copyfile(models_dir / f"{unet_from}.yaml", path.with_suffix(".yaml"))
    sd_models.list_models()
    return path


def write_moved_copy(models_dir: Path, name: str, source: str) -> Path:
    """`source`'s tensors saved again with a 12-byte tensor stored first: another file (another sha256, so a member
    read from its own file, not the loaded model) with the same UNet and text encoder at other offsets, 12 bytes off
    16-byte boundaries (issue 17: on AVX2 CPUs, MKL rounded matrix-vector products of such unaligned views
    differently, so block averaging of identical members drifted from the member)."""
    tensors = load_file(str(models_dir / f"{source}.safetensors"))
    tensors["aaa_padding"] = torch.zeros(3)  # neither UNet nor text encoder: every reader skips it
    path = models_dir / f"{name}.safetensors"
    save_file(tensors, str(path))
    shutil.copyfile(models_dir / f"{source}.yaml", path.with_suffix(".yaml"))
    sd_models.list_models()
    return path


@pytest.fixture
def webui(tmp_path):
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], checkpoints=CHECKPOINTS) as instance:
        write_text_variant(Path(sd_models.model_path), "tiny-a-text", "tiny-a", "tiny-b")
        write_moved_copy(Path(sd_models.model_path), "tiny-a-moved", "tiny-a")
        yield instance
    assert harness.leaked_patches() == []


class ContextSpy:
    """Records the context of every UNet call of the loaded model, and the members' contexts of every ensemble
    call."""

    def __init__(self, monkeypatch):
        self.loaded: list[torch.Tensor] = []
        self.members: list[list[torch.Tensor]] = []
        original = EnsembleUNet.forward

        def forward(ensemble, x, timesteps=None, context=None, y=None, member_contexts=None, **kwargs):
            self.members.append([c.clone() for c in member_contexts] if member_contexts is not None
                                else [context.clone()] * len(ensemble.members))
            return original(ensemble, x, timesteps, context, y, member_contexts, **kwargs)

        monkeypatch.setattr(EnsembleUNet, "forward", forward)

    def watch_loaded_unet(self, monkeypatch):
        """Every checkpoint switch builds a new model (each has its yaml), so the spy sits on the UNet class's forward
        (the one the WebUI routes through its SD Unet: members are driven block by block and never pass here)."""
        from ldm.modules.diffusionmodules.openaimodel import UNetModel

        routed = UNetModel.forward

        def forward(unet, x, timesteps=None, context=None, *args, **kwargs):
            self.loaded.append(context.clone())
            return routed(unet, x, timesteps, context, *args, **kwargs)

        monkeypatch.setattr(UNetModel, "forward", forward)


def text_encoder_state() -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in shared.sd_model.cond_stage_model.state_dict().items()}


def test_each_member_reads_the_webuis_encoding_by_its_own_text_encoder(webui, monkeypatch):
    """The member with tiny-b's text encoder reads, at every UNet call, exactly the context the WebUI gives the UNet
    when that checkpoint is loaded: emphasis, two 75-token chunks, prompt editing, AND, the negative prompt and the
    padding of cond and uncond to one length, as the WebUI's own conditioning makes them."""
    spy = ContextSpy(monkeypatch)
    spy.watch_loaded_unet(monkeypatch)
    reference = webui.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE,
                              override_settings={"sd_model_checkpoint": "tiny-a-text"})
    expected = list(spy.loaded)
    webui.txt2img(prompt="a cat", steps=1)  # tiny-a loaded again
    before = text_encoder_state()
    spy.loaded.clear()
    processed = webui.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, script_args=afa())
    assert shared.sd_model.sd_checkpoint_info.name_for_extra == "tiny-a"
    assert reference.images and processed.images
    assert len(spy.members) == len(expected) == len(spy.loaded) > 0
    for call, (loaded, members, other) in enumerate(zip(spy.loaded, spy.members, expected)):
        assert members[0] is not None and torch.equal(members[0], loaded), call  # tiny-a: the loaded encoding
        assert torch.equal(members[1], other), call  # tiny-a-text: its own encoder's encoding
        assert not torch.equal(members[1], loaded)
    # the loaded model is left as it was: its own weights, its own conditioning method
    assert all(torch.equal(before[k], v) for k, v in shared.sd_model.cond_stage_model.state_dict().items())
    assert "get_learned_conditioning" not in vars(shared.sd_model)
    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert params["AFA text encoders"] == "Each member's own"
    assert "AFA text notes" not in params


def test_batches_of_different_prompts_and_the_hires_pass_read_each_members_own_encoding(webui, monkeypatch):
    """Two batches of two images with four different prompts (one of them long), and a hires pass with its own
    prompt: every call of every pass and batch, the member with its own encoder reads what the WebUI gives that
    checkpoint. The AFA job takes none of its conditioning from the cache of the reference job before it."""
    prompts = ["a red cat", "a blue dog on a mat", PROMPT, "(green:1.3) bird"]
    job = dict(prompt=prompts, negative_prompt=NEGATIVE, batch_size=2, n_iter=2, steps=2, enable_hr=True,
               hr_scale=2.0, hr_second_pass_steps=1, hr_prompt="a painting", hr_negative_prompt="")
    spy = ContextSpy(monkeypatch)
    spy.watch_loaded_unet(monkeypatch)
    webui.txt2img(**job, override_settings={"sd_model_checkpoint": "tiny-a-text"})
    expected = list(spy.loaded)
    webui.txt2img(**job)  # tiny-a loaded again, and its conditioning of these prompts in the WebUI's cache
    spy.loaded.clear()
    processed = webui.txt2img(**job, script_args=afa())
    assert len(processed.images) - processed.index_of_first_image == 4  # (a grid first)
    assert len(spy.members) == len(expected) == len(spy.loaded) > 0
    for call, (loaded, members, other) in enumerate(zip(spy.loaded, spy.members, expected)):
        assert torch.equal(members[0], loaded), call
        assert torch.equal(members[1], other), call
    assert all("AFA text notes" not in infotext_utils.parse_generation_parameters(text)
               for text in processed.infotexts)


def test_another_text_encoder_changes_the_image_and_the_loaded_ones_does_not(webui):
    """tiny-a and tiny-a-text have one UNet: with the loaded model's encoding for both, block averaging is tiny-a
    bit for bit; with their own encoders, it is not. A copy of tiny-a (same encoder) costs no encoder run."""
    base = webui.txt2img(prompt="a cat")
    shared_text = webui.txt2img(prompt="a cat", script_args=afa(),
                                override_settings={"afa_text_encoders": "The loaded checkpoint's"})
    own_text = webui.txt2img(prompt="a cat", script_args=afa())
    assert pixels(shared_text.images[0]) == pixels(base.images[0])
    assert pixels(own_text.images[0]) != pixels(base.images[0])
    assert infotext_utils.parse_generation_parameters(shared_text.infotexts[0])["AFA text encoders"] == \
        "The loaded checkpoint's"

    seen = []
    harness_probe = lambda params: seen.append(getattr(sd_unet.current_unet, "text_conditioning", "none"))  # noqa: E731
    from modules import script_callbacks
    script_callbacks.on_cfg_denoiser(harness_probe)
    copy_members = webui.txt2img(prompt="a cat", script_args=afa(members=("tiny-a", "tiny-a2")))
    assert pixels(copy_members.images[0]) == pixels(base.images[0])
    assert seen and all(text is None for text in seen)  # no member has an encoder of its own to run
    moved = webui.txt2img(prompt="a cat", script_args=afa(members=("tiny-a", "tiny-a-moved")))
    assert pixels(moved.images[0]) == pixels(base.images[0])  # the same UNet read from its own file


def test_sabw_weights_record_their_text_conditioning_and_a_mismatch_is_reported(webui):
    from test_webui_extension import write_weights

    path = write_weights(webui, "pair.safetensors", ["tiny-a", "tiny-a-text"])
    # write_weights uses the default config: text_conditioning "shared", CLIP skip 1
    assert AggregatorConfig.text_conditioning == "shared"
    shared.opts.CLIP_stop_at_last_layers = 2
    processed = webui.txt2img(prompt="a cat", script_args=afa(mode="SABW", weights=path.name))
    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert params["AFA mode"] == "SABW"
    notes = params["AFA text notes"]
    assert "SABW was trained with one shared text encoding, this job used each member's own text encoder" in notes
    assert "SABW was trained at CLIP skip 1, this job used 2" in notes


def test_a_member_whose_text_encoder_does_not_fit_reads_the_loaded_encoding(webui):
    """A checkpoint without a text encoder (a UNet-only file) still ensembles; the infotext says what it read."""
    models_dir = Path(sd_models.model_path)
    tensors = {k: v for k, v in load_file(str(models_dir / "tiny-b.safetensors")).items()
               if not k.startswith("cond_stage_model.")}
    save_file(tensors, str(models_dir / "tiny-b-unet.safetensors"))
    shutil.copyfile(models_dir / "tiny-b.yaml", models_dir / "tiny-b-unet.yaml")
    sd_models.list_models()
    processed = webui.txt2img(prompt="a cat", script_args=afa(members=("tiny-a", "tiny-b-unet")))
    params = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert params["AFA mode"] == "Block average"
    assert "tiny-b-unet" in params["AFA text notes"] and "reads the loaded model's encoding" in params["AFA text notes"]


def test_an_error_while_encoding_restores_the_loaded_text_encoder(webui, monkeypatch):
    before = text_encoder_state()
    calls = []
    original = afa_unet.AfaUnet.activate

    def activate(self):
        original(self)
        conditioning = self.text_conditioning
        inner = conditioning._original

        def failing(texts):
            calls.append(texts)
            if len(calls) == 2:  # the member pass of the job's first prompt: with the member's weights in place
                raise RuntimeError("encoder failure")
            return inner(texts)

        conditioning._original = failing

    monkeypatch.setattr(afa_unet.AfaUnet, "activate", activate)
    with pytest.raises(Exception):
        webui.txt2img(prompt="a cat", script_args=afa())
    assert all(torch.equal(before[k], v) for k, v in shared.sd_model.cond_stage_model.state_dict().items())
    assert cached_text_encoder_matches_its_file("tiny-a-text")  # the member's pass left its weights as they were
    monkeypatch.undo()
    # the next job cleans up what the failed one left, and runs
    processed = webui.txt2img(prompt="a cat", script_args=afa())
    assert "AFA mode" in infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert "get_learned_conditioning" not in vars(shared.sd_model)


def live_cpu_tensor_bytes() -> int:
    """Bytes of the distinct CPU storages of the tensors Python holds."""
    storages = {}
    with warnings.catch_warnings():  # isinstance() on deprecated torch objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor) and obj.device.type == "cpu"]
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def cached_text_encoder_matches_its_file(name: str) -> bool:
    """The member cache's text-encoder tensors of checkpoint `name` hold the file's values."""
    from afa.webui.member_cache import cache

    path = str(Path(sd_models.model_path) / f"{name}.safetensors")
    cached = [tensors for key, tensors in cache.text_encoders.items() if key[0] == path]
    assert len(cached) == 1, list(cache.text_encoders)
    expected = {k: v for k, v in load_file(path).items() if k.startswith("cond_stage_model.")}
    return cached[0].keys() == expected.keys() and all(
        torch.equal(cached[0][k], v.to(cached[0][k].dtype)) for k, v in expected.items())


def test_a_members_text_encoder_pass_holds_no_copy_of_the_loaded_encoder(webui, monkeypatch):
    """Issue 17: every member pass copied the loaded text encoder aside (for SD 1.x in fp32 0.46 GiB at each
    prompt, which the allocator kept from the OS after the job: +0.09 UNet of RSS in a real A1111). The member's
    weights and the loaded ones now exchange places, so a member pass holds no more tensor memory than the
    WebUI's own pass before it; afterwards the loaded encoder and the member's cached one hold their own values."""
    before = text_encoder_state()
    held = []
    original = afa_unet.AfaUnet.activate

    def activate(self):
        original(self)
        inner = self.text_conditioning._original

        def measured(texts):
            held.append(live_cpu_tensor_bytes())
            return inner(texts)

        self.text_conditioning._original = measured

    monkeypatch.setattr(afa_unet.AfaUnet, "activate", activate)
    processed = webui.txt2img(prompt="a cat", negative_prompt="lowres", script_args=afa())
    assert "AFA mode" in infotext_utils.parse_generation_parameters(processed.infotexts[0])
    from afa.webui.text_conditioning import text_encoder_module

    encoder_bytes = sum(p.numel() * p.element_size() for p in text_encoder_module(shared.sd_model).parameters())
    # the calls alternate: the WebUI's own pass, then the member's (one member has an encoder of its own)
    assert len(held) >= 4 and len(held) % 2 == 0, held
    for loaded_pass, member_pass in zip(held[::2], held[1::2]):
        assert member_pass - loaded_pass < encoder_bytes // 2, (member_pass - loaded_pass, encoder_bytes)
    assert all(torch.equal(before[k], v) for k, v in shared.sd_model.cond_stage_model.state_dict().items())
    assert cached_text_encoder_matches_its_file("tiny-a-text")


def test_a_text_encoder_lora_applies_to_each_members_encoder_and_leaves_the_loaded_one_intact(tmp_path, monkeypatch):
    """A prompt LoRA on the text encoder: the member with its own encoder reads that encoder with the LoRA (what the
    WebUI gives tiny-a-text with the LoRA), and after the job the loaded model's LoRA-merged encoder is as it was,
    so a plain job gives the image it gave before."""
    with harness.webui(tmp_path, extensions=[EXTENSION_ROOT], checkpoints=CHECKPOINTS, builtin_lora=True) as w:
        write_text_variant(Path(sd_models.model_path), "tiny-a-text", "tiny-a", "tiny-b")
        layers = [name for name in harness.lora_network_layer_names() if name.startswith("transformer_text_model_")
                  and isinstance(harness.lora_network_layer_names()[name], torch.nn.Linear)]
        harness.write_lora(w.data_dir / "models" / "Lora" / "words.safetensors", layers, scale=0.5)
        prompt = "a cat <lora:words:1>"
        spy = ContextSpy(monkeypatch)
        spy.watch_loaded_unet(monkeypatch)
        w.txt2img(prompt=prompt, override_settings={"sd_model_checkpoint": "tiny-a-text"})
        expected = list(spy.loaded)
        plain_before = w.txt2img(prompt=prompt)
        assert pixels(plain_before.images[0]) != pixels(w.txt2img(prompt="a cat").images[0])  # the LoRA acts
        w.txt2img(prompt=prompt)
        spy.loaded.clear()
        w.txt2img(prompt=prompt, script_args=afa())
        assert len(spy.members) == len(expected) > 0
        for call, (members, other) in enumerate(zip(spy.members, expected)):
            assert torch.equal(members[1], other), call
        plain_after = w.txt2img(prompt=prompt)
        assert pixels(plain_after.images[0]) == pixels(plain_before.images[0])
    monkeypatch.undo()  # the spy's own patch
    assert harness.leaked_patches() == []


class SdxlLikeModel:
    """What per-member text conditioning reads of a loaded SDXL model (the stand-in cannot load one): `is_sdxl`, the
    `conditioner` whose embedders hold the text encoders' weights (under a hijack-style `wrapped` level), and a
    `get_learned_conditioning` returning {"crossattn": [B x 77 x 8], "vector": [B x 5]} computed from them."""

    is_sdxl = True

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        wrapper = torch.nn.Module()
        wrapper.wrapped = torch.nn.Linear(4, 8)
        self.conditioner = torch.nn.Module()
        self.conditioner.embedders = torch.nn.ModuleList([wrapper, torch.nn.Linear(4, 3)])

    def get_learned_conditioning(self, texts):
        features = torch.tensor([[len(text), text.count("a"), 1.0, -1.0] for text in texts])
        clip_l, big_g = self.conditioner.embedders[0].wrapped, self.conditioner.embedders[1]
        context = clip_l(features)[:, None, :].expand(-1, 77, -1)
        sizes = torch.tensor([[0.5, 0.25]] * len(texts))  # the size embeddings: the same for every encoder
        return {"crossattn": context, "vector": torch.cat([big_g(features), sizes], dim=1)}

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"conditioner." + name.replace("wrapped.", ""): value.detach().clone()
                for name, value in self.conditioner.state_dict().items()}


def test_sdxl_members_get_their_own_context_and_y_from_the_conditioner(webui):
    from afa.webui.text_conditioning import (SDXL_TEXT_ENCODER_PREFIX, MemberTextConditioning, plan_member_texts,
                                             text_encoder_module, text_encoder_prefix)

    loaded_model, member = SdxlLikeModel(1), SdxlLikeModel(2)
    module = text_encoder_module(loaded_model)
    assert module is loaded_model.conditioner and text_encoder_prefix(loaded_model) == SDXL_TEXT_ENCODER_PREFIX
    texts, encoders = plan_member_texts(module, [None, member.checkpoint_tensors(), loaded_model.checkpoint_tensors()],
                                        ["xl-1", "xl-2", "xl-1 copy"], SDXL_TEXT_ENCODER_PREFIX)
    assert [text.slot for text in texts] == [None, 0, None] and len(encoders) == 1
    conditioning = MemberTextConditioning(loaded_model, texts, encoders)
    conditioning.install()
    try:
        prompts = ["a cat", "a lighthouse at dawn"]
        loaded = loaded_model.get_learned_conditioning(prompts)  # through the wrapper
        expected = member.get_learned_conditioning(prompts)
        assert torch.equal(loaded["vector"], SdxlLikeModel(1).get_learned_conditioning(prompts)["vector"])
        contexts = conditioning.member_contexts(loaded["crossattn"])
        vectors = conditioning.member_vectors(loaded["vector"])
        assert contexts[0] is loaded["crossattn"] and contexts[2] is loaded["crossattn"]
        assert torch.equal(contexts[1], expected["crossattn"]) and torch.equal(vectors[1], expected["vector"])
        assert vectors[0] is loaded["vector"] and not torch.equal(vectors[1], vectors[0])
        # the rows in another order (cond/uncond batches), and a row no prompt gave (counted, kept)
        swapped = conditioning.member_vectors(loaded["vector"].flip(0))
        assert torch.equal(swapped[1], expected["vector"].flip(0)) and conditioning.unmatched_chunks == 0
        unknown = torch.randn(1, 5)
        assert torch.equal(conditioning.member_vectors(unknown)[1], unknown) and conditioning.unmatched_chunks == 1
        # the loaded weights are back after every member pass
        assert torch.equal(loaded_model.get_learned_conditioning(prompts)["vector"], loaded["vector"])
    finally:
        conditioning.uninstall()
    assert "get_learned_conditioning" not in vars(loaded_model)
