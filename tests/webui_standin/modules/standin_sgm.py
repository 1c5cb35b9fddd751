"""Stand-ins of the `sgm` classes an SDXL checkpoint is built from in the WebUI (sgm, Stability-AI's
generative-models, is not on PyPI), and of the WebUI's modules/sd_models_xl.py additions to them.

* `DiffusionEngine` stands in for sgm.models.diffusion.DiffusionEngine: the yaml's `model.params` (network_config,
  conditioner_config, first_stage_config, denoiser_config, scale_factor), the same submodule names
  (`model.diffusion_model`, `conditioner.embedders.N`, `first_stage_model`), sgm's `OpenAIWrapper` call
  (`diffusion_model(x, timesteps=t, context=c["crossattn"], y=c["vector"])`), and the WebUI's
  `get_learned_conditioning` / `apply_model` / `get_first_stage_encoding` / `extend_sdxl` (sd_models_xl.py, v1.10)
  copied as they are.
* The UNet of `network_config` (sgm's openaimodel.UNetModel) is AFA's build of the same parameters without sgm
  (afa/unet.py: ldm's UNetModel with each level's transformers at their depth and the label embedding of `y`):
  the real-WebUI tier checks it against sgm's own class (tests/webui_real/test_sgm_unet.py, equal within 4e-8).
  It is an ldm UNetModel, so the class-level forward switch of sd_hijack routes it (in the WebUI, sgm's class
  has the same switch).
* `GeneralConditioner`: sgm's forward (outputs of dimension 2 -> "vector", 3 -> "crossattn", concatenated;
  `force_zero_embeddings`), plus the WebUI's additions (tokenize, process_texts, ...).
* `FrozenCLIPEmbedder` (sgm's signature, transformers' CLIP from the local `version` folder, as the ldm stand-in),
  `FrozenOpenCLIPEmbedder2` (open_clip's text tower, whose package needs torchvision: training/open_clip_text.py's
  tower in open_clip's key layout, compared with open_clip's in the real-WebUI tier; the architectures the
  stand-in knows are OPEN_CLIP_ARCHITECTURES), `ConcatTimestepEmbedderND` (sgm's size embeddings).
"""

from __future__ import annotations

import math

import torch

from modules import devices, shared
from modules import standin_ldm


def open_clip_architectures() -> dict[str, dict]:
    """open_clip text-tower sizes by architecture name: open_clip's ViT-B-32, and the tiny test tower of
    tests/factories.py under a name only the stand-in knows (the real WebUI's open_clip would refuse it)."""
    from factories import TINY_OPEN_CLIP, TINY_OPEN_CLIP_ARCH, VIT_B_32_OPEN_CLIP

    return {"ViT-B-32": VIT_B_32_OPEN_CLIP, TINY_OPEN_CLIP_ARCH: TINY_OPEN_CLIP}


def open_clip_tower(arch: str) -> torch.nn.Module:
    """open_clip's text tower of architecture `arch` (weights from the checkpoint), as the WebUI's open_clip builds
    it (training/open_clip_text.py's module: the same key layout)."""
    from training.open_clip_text import OpenClipTextEncoder

    architectures = open_clip_architectures()
    if arch not in architectures:
        raise NotImplementedError(f"stand-in: open_clip architecture {arch} is not reproduced "
                                  f"({', '.join(architectures)})")
    return OpenClipTextEncoder(**architectures[arch])


def _instantiate(config):
    target = config["target"]
    params = dict(config.get("params", {}) or {})
    name = target.rsplit(".", 1)[-1]
    if name not in STANDIN_CLASSES:
        raise NotImplementedError(f"stand-in: sgm class {target} is not reproduced")
    return STANDIN_CLASSES[name](**params)


# sgm/modules/encoders/modules.py: FrozenCLIPEmbedder (ldm's, with sgm's `always_return_pooled`)
class FrozenCLIPEmbedder(standin_ldm.FrozenCLIPEmbedder):
    def __init__(self, *args, always_return_pooled=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.return_pooled = always_return_pooled


# sgm/modules/encoders/modules.py: FrozenOpenCLIPEmbedder2 (legacy=False: a dict of layers and the pooled output)
class FrozenOpenCLIPEmbedder2(torch.nn.Module):
    LAYERS = ["pooled", "last", "penultimate"]

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77, freeze=True,
                 layer="last", always_return_pooled=False, legacy=True):
        super().__init__()
        assert layer in self.LAYERS
        if legacy or layer != "penultimate":
            raise NotImplementedError("stand-in: only SDXL's embedder (layer penultimate, legacy False) is reproduced")
        self.model = open_clip_tower(arch)
        self.device = device
        self.max_length = max_length
        self.return_pooled = always_return_pooled
        if freeze:
            self.model.eval().requires_grad_(False)
        self.layer = layer
        self.layer_idx = 1
        self.legacy = legacy

    def encode_with_transformer(self, text):
        """{"penultimate": the last block's input, "pooled": the projected EOS embedding}: sgm's dict (the tower's
        own `penultimate` and `pooled`, training/open_clip_text.py)."""
        penultimate = self.model.penultimate(text)
        return {"penultimate": penultimate, "pooled": self.model.pooled(penultimate, text)}


# sgm/modules/encoders/modules.py: ConcatTimestepEmbedderND (sgm's timestep_embedding: cos half, then sin half)
class ConcatTimestepEmbedderND(torch.nn.Module):
    def __init__(self, outdim):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        if x.ndim == 1:
            x = x[:, None]
        batch, dims = x.shape
        values = x.reshape(-1).float()
        half = self.outdim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        args = values[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return emb.reshape(batch, dims * self.outdim)


# sgm/modules/encoders/modules.py: GeneralConditioner (ucg left out: the WebUI sets every ucg_rate to 0)
class GeneralConditioner(torch.nn.Module):
    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models):
        super().__init__()
        embedders = []
        for embconfig in emb_models:
            embedder = _instantiate(embconfig)
            embedder.is_trainable = embconfig.get("is_trainable", False)
            embedder.ucg_rate = embconfig.get("ucg_rate", 0.0)
            embedder.input_key = embconfig["input_key"]
            embedder.legacy_ucg_val = embconfig.get("legacy_ucg_value", None)
            embedders.append(embedder)
        self.embedders = torch.nn.ModuleList(embedders)

    def forward(self, batch, force_zero_embeddings=None):
        output = {}
        force_zero_embeddings = force_zero_embeddings or []
        for embedder in self.embedders:
            with torch.no_grad():
                emb_out = embedder(batch[embedder.input_key])
            if not isinstance(emb_out, (list, tuple)):
                emb_out = [emb_out]
            for emb in emb_out:
                out_key = self.OUTPUT_DIM2KEYS[emb.dim()]
                if embedder.input_key in force_zero_embeddings:
                    emb = torch.zeros_like(emb)
                if out_key in output:
                    output[out_key] = torch.cat((output[out_key], emb), self.KEY2CATDIM[out_key])
                else:
                    output[out_key] = emb
        return output

    # modules/sd_models_xl.py (v1.10): the WebUI's additions, so that the conditioner works as cond_stage_model
    def tokenize(self, texts):
        for embedder in [embedder for embedder in self.embedders if hasattr(embedder, 'tokenize')]:
            return embedder.tokenize(texts)
        raise AssertionError('no tokenizer available')

    def process_texts(self, texts):
        for embedder in [embedder for embedder in self.embedders if hasattr(embedder, 'process_texts')]:
            return embedder.process_texts(texts)

    def get_target_prompt_token_count(self, token_count):
        for embedder in [embedder for embedder in self.embedders if hasattr(embedder, 'get_target_prompt_token_count')]:
            return embedder.get_target_prompt_token_count(token_count)


class _Scaling:
    """sgm.modules.diffusionmodules.denoiser_scaling's EpsScaling / VScaling: what extend_sdxl reads."""

    def __init__(self, target: str):
        self.is_v = target.endswith("VScaling")


class _Denoiser(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        params = config.get("params", {})
        self.scaling = _Scaling(params.get("scaling_config", {}).get("target", "EpsScaling"))


# sgm/modules/diffusionmodules/wrappers.py: OpenAIWrapper
class OpenAIWrapper(torch.nn.Module):
    def __init__(self, diffusion_model):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, x, t, c, **kwargs):
        x = torch.cat((x, c.get("concat", torch.Tensor([]).type_as(x))), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn", None), y=c.get("vector", None),
                                    **kwargs)


# sgm/models/diffusion.py: DiffusionEngine (the parts used for inference)
class DiffusionEngine(standin_ldm.InferenceModel):
    def __init__(self, network_config, denoiser_config, first_stage_config, conditioner_config=None,
                 scale_factor=1.0, disable_first_stage_autocast=False, **ignored):
        super().__init__()
        from afa.unet import build_unet

        self.model = OpenAIWrapper(build_unet(dict(network_config["params"])))
        self.denoiser = _Denoiser(denoiser_config)
        self.conditioner = GeneralConditioner(**dict(conditioner_config["params"]))
        self.first_stage_model = standin_ldm.AutoencoderKL(**dict(first_stage_config["params"]))
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = disable_first_stage_autocast

    @torch.no_grad()
    def decode_first_stage(self, z):
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.scale_factor * self.first_stage_model.encode(x).sample()

    # modules/sd_models_xl.py (v1.10): get_learned_conditioning, apply_model, get_first_stage_encoding
    def get_learned_conditioning(self, batch):
        for embedder in self.conditioner.embedders:
            embedder.ucg_rate = 0.0

        width = getattr(batch, 'width', 1024) or 1024
        height = getattr(batch, 'height', 1024) or 1024
        is_negative_prompt = getattr(batch, 'is_negative_prompt', False)
        aesthetic_score = shared.opts.sdxl_refiner_low_aesthetic_score if is_negative_prompt else shared.opts.sdxl_refiner_high_aesthetic_score

        devices_args = dict(device=devices.device, dtype=devices.dtype)

        sdxl_conds = {
            "txt": batch,
            "original_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
            "crop_coords_top_left": torch.tensor([shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left], **devices_args).repeat(len(batch), 1),
            "target_size_as_tuple": torch.tensor([height, width], **devices_args).repeat(len(batch), 1),
            "aesthetic_score": torch.tensor([aesthetic_score], **devices_args).repeat(len(batch), 1),
        }

        force_zero_negative_prompt = is_negative_prompt and all(x == '' for x in batch)
        c = self.conditioner(sdxl_conds, force_zero_embeddings=['txt'] if force_zero_negative_prompt else [])

        return c

    def apply_model(self, x, t, cond):
        if self.is_sdxl_inpaint:
            x = torch.cat([x] + cond['c_concat'], dim=1)

        return self.model(x, t, cond)

    def get_first_stage_encoding(self, x):
        return x


# modules/sd_models_xl.py (v1.10): extend_sdxl (sgm's LegacyDDPMDiscretization is ldm's linear schedule)
def extend_sdxl(model):
    """this adds a bunch of parameters to make SDXL model look a bit more like SD1.5 to the rest of the codebase."""
    dtype = next(model.model.diffusion_model.parameters()).dtype
    model.model.diffusion_model.dtype = dtype
    model.model.conditioning_key = 'crossattn'
    model.cond_stage_key = 'txt'
    # model.cond_stage_model will be set in sd_hijack

    model.parameterization = "v" if model.denoiser.scaling.is_v else "eps"

    betas = standin_ldm.make_beta_schedule(1000, linear_start=0.00085, linear_end=0.012)
    model.alphas_cumprod = torch.asarray(torch.cumprod(1.0 - betas.double(), dim=0), device=devices.device,
                                         dtype=torch.float32)

    model.conditioner.wrapped = torch.nn.Module()


STANDIN_CLASSES = {cls.__name__: cls for cls in (FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder2,
                                                 ConcatTimestepEmbedderND)}
