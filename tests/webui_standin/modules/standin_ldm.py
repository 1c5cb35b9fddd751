"""Stand-ins of the `ldm` classes an SD1 checkpoint is built from in the WebUI, where the real ones cannot be used.

* `LatentDiffusion` / `DiffusionWrapper` stand in for ldm.models.diffusion.ddpm.LatentDiffusion / DiffusionWrapper
  (the real module needs pytorch_lightning, which the WebUI has and CI does not). Same constructor parameters
  (the yaml's `model.params`), same submodule names (`model.diffusion_model`, `first_stage_model`,
  `cond_stage_model`), same schedule buffers, and the real `apply_model` / `DiffusionWrapper.forward` logic, so the
  UNet (a real ldm `UNetModel`) is called exactly as in the WebUI: `self.model(x, t, c_crossattn=[...])` ->
  `diffusion_model(x, t, context=cc)`.
* `AutoencoderKL` keeps the real VAE modules (weights are loaded from the checkpoint) but `decode`/`encode` use the
  WebUI's "Approx cheap" linear latent<->RGB map (modules/sd_vae_approx.py: cheap_approximation) with an 8x
  nearest upsampling / average pooling, so a latent of H/8 x W/8 gives an H x W image as with a real SD VAE.
* `FrozenCLIPEmbedder` stands in for ldm.modules.encoders.modules.FrozenCLIPEmbedder: the real signature, and
  transformers' `CLIPTokenizer` and `CLIPTextModel` built from the local folder the yaml's `version` names (the
  tiny test text encoder's config and SD1's tokenizer files, written by training/sd_checkpoint.py: tiny_sd_config),
  as the WebUI builds them; never from the hub (SD1 yamls name openai/clip-vit-large-patch14, a download).
* `FrozenOpenCLIPEmbedder` stands in for SD 2.x's ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import torch

from ldm.util import instantiate_from_config


# ldm/models/diffusion/ddpm.py: DiffusionWrapper
class DiffusionWrapper(torch.nn.Module):
    def __init__(self, diff_model_config, conditioning_key):
        super().__init__()
        self.sequential_cross_attn = False
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key
        assert self.conditioning_key in [None, 'concat', 'crossattn', 'hybrid', 'adm', 'hybrid-adm', 'crossattn-adm']

    def forward(self, x, t, c_concat: list = None, c_crossattn: list = None, c_adm=None):
        if self.conditioning_key is None:
            out = self.diffusion_model(x, t)
        elif self.conditioning_key == 'concat':
            xc = torch.cat([x] + c_concat, dim=1)
            out = self.diffusion_model(xc, t)
        elif self.conditioning_key == 'crossattn':
            if not self.sequential_cross_attn:
                cc = torch.cat(c_crossattn, 1)
            else:
                cc = c_crossattn
            out = self.diffusion_model(x, t, context=cc)
        elif self.conditioning_key == 'hybrid':
            xc = torch.cat([x] + c_concat, dim=1)
            cc = torch.cat(c_crossattn, 1)
            out = self.diffusion_model(xc, t, context=cc)
        elif self.conditioning_key == 'adm':
            cc = c_crossattn[0]
            out = self.diffusion_model(x, t, y=cc)
        else:
            raise NotImplementedError()

        return out


# ldm/modules/diffusionmodules/util.py: make_beta_schedule ("linear")
def make_beta_schedule(n_timestep, linear_start=1e-4, linear_end=2e-2):
    return torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2


# modules/sd_vae_approx.py (v1.10): cheap_approximation coefficients (SD1/SD2)
CHEAP_COEFS = torch.tensor([
    [0.298, 0.207, 0.208],
    [0.187, 0.286, 0.173],
    [-0.158, 0.189, 0.264],
    [-0.184, -0.271, -0.473],
])


class DiagonalGaussianDistribution:
    """ldm/modules/distributions/distributions.py: DiagonalGaussianDistribution, with zero variance."""

    def __init__(self, mean):
        self.mean = mean

    def sample(self):
        return self.mean

    def mode(self):
        return self.mean


class AutoencoderKL(torch.nn.Module):
    """ldm.models.autoencoder.AutoencoderKL's modules; decode/encode are the cheap linear approximation (see module doc)."""

    def __init__(self, ddconfig, embed_dim, lossconfig=None, **ignored):
        super().__init__()
        from ldm.modules.diffusionmodules.model import Encoder, Decoder

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = torch.nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim

    @property
    def dtype(self):  # a LightningModule property on the real class
        return self.post_quant_conv.weight.dtype

    @property
    def device(self):
        return self.post_quant_conv.weight.device

    def decode(self, z):
        """latent [B, 4, h, w] -> image [B, 3, 8h, 8w] in about [-1, 1]"""
        coefs = CHEAP_COEFS.to(z.device, z.dtype)
        x = torch.einsum("blxy,lr->brxy", z, coefs)
        return torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")

    def encode(self, x):
        """image [B, 3, H, W] in [-1, 1] -> DiagonalGaussianDistribution of a latent [B, 4, H/8, W/8]"""
        x = torch.nn.functional.avg_pool2d(x.float(), 8)
        pinv = torch.linalg.pinv(CHEAP_COEFS.to(x.device))  # [3, 4]
        z = torch.einsum("brxy,rl->blxy", x, pinv)
        return DiagonalGaussianDistribution(z)

    def forward(self, input):
        return self.decode(self.encode(input).sample())


# ldm/modules/encoders/modules.py: FrozenCLIPEmbedder
class FrozenCLIPEmbedder(torch.nn.Module):
    """ldm.modules.encoders.modules.FrozenCLIPEmbedder: the real constructor signature (an unknown yaml param is a
    TypeError, as in the WebUI), tokenizer and text model from `version`.

    The real class calls `CLIPTokenizer.from_pretrained(version)` and `CLIPTextModel.from_pretrained(version)`, and
    the WebUI's model loading (sd_disable_initialization) turns the latter into a model built from `version`'s
    config alone, whose weights the checkpoint then supplies. The stand-in does the same, with `local_files_only`:
    `version` must be a local folder (training/text_encoder.py: write_text_encoder_folder), never a hub download.
    """

    LAYERS = ["last", "pooled", "hidden"]

    def __init__(self, version="openai/clip-vit-large-patch14", device="cuda", max_length=77, freeze=True,
                 layer="last", layer_idx=None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        assert layer in self.LAYERS
        self.tokenizer = CLIPTokenizer.from_pretrained(version, local_files_only=True)
        self.transformer = CLIPTextModel(CLIPTextConfig.from_pretrained(version, local_files_only=True))
        self.device = device
        self.max_length = max_length
        if freeze:
            self.freeze()
        self.layer = layer
        self.layer_idx = layer_idx
        if layer == "hidden":
            assert layer_idx is not None
            assert 0 <= abs(layer_idx) <= 12

    def freeze(self):
        self.transformer = self.transformer.eval()
        for param in self.parameters():
            param.requires_grad = False

    def forward(self, text):
        batch_encoding = self.tokenizer(text, truncation=True, max_length=self.max_length, return_length=True,
                                        return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        # The real class moves the tokens to `self.device` ("cuda" unless the yaml says otherwise); the WebUI never
        # calls this forward on SD1 (its FrozenCLIPEmbedderWithCustomWords wraps the model), so the stand-in uses
        # the text model's device.
        tokens = batch_encoding["input_ids"].to(self.transformer.device)
        outputs = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            z = outputs.last_hidden_state
        elif self.layer == "pooled":
            z = outputs.pooler_output[:, None, :]
        else:
            z = outputs.hidden_states[self.layer_idx]
        return z

    def encode(self, text):
        return self(text)


# ldm/modules/encoders/modules.py: FrozenOpenCLIPEmbedder (SD 2.x)
class FrozenOpenCLIPEmbedder(torch.nn.Module):
    """ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder: the real signature; open_clip's text tower (whose package
    needs torchvision) is training/open_clip_text.py's, in open_clip's key layout, sized by `arch` from the
    architectures the stand-in knows (modules/standin_sgm.py: open_clip_architectures)."""

    LAYERS = ["last", "penultimate"]

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77, freeze=True,
                 layer="last"):
        super().__init__()
        from modules.standin_sgm import open_clip_tower

        assert layer in self.LAYERS
        self.model = open_clip_tower(arch)
        self.device = device
        self.max_length = max_length
        if freeze:
            self.model.eval().requires_grad_(False)
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1

    def encode_with_transformer(self, text):
        x = self.model.token_embedding(text) + self.model.positional_embedding
        for i, r in enumerate(self.model.transformer.resblocks):
            if i == len(self.model.transformer.resblocks) - self.layer_idx:
                break
            x = r(x, self.model.attn_mask)
        return self.model.ln_final(x)


def _instantiate_cond_stage(config):
    target = config["target"]
    params = dict(config.get("params", {}) or {})
    if target in ("ldm.modules.encoders.modules.FrozenCLIPEmbedder", __name__ + ".FrozenCLIPEmbedder"):
        return FrozenCLIPEmbedder(**params)
    if target == "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder":
        return FrozenOpenCLIPEmbedder(**params)
    raise NotImplementedError(f"stand-in: cond stage {target} is not reproduced (SD1's FrozenCLIPEmbedder and "
                              f"SD 2.x's FrozenOpenCLIPEmbedder only)")


class InferenceModel(torch.nn.Module):
    """What ldm's LatentDiffusion (a LightningModule) and sgm's DiffusionEngine both offer the WebUI: the device and
    dtype of the diffusion model (`self.model`), and an EMA scope that does nothing for inference."""

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype

    @contextlib.contextmanager
    def ema_scope(self, context=None):
        yield None


# ldm/models/diffusion/ddpm.py: LatentDiffusion (the parts used for inference)
class LatentDiffusion(InferenceModel):
    def __init__(self, unet_config, first_stage_config, cond_stage_config, linear_start=1e-4, linear_end=2e-2,
                 timesteps=1000, conditioning_key=None, cond_stage_key="image", first_stage_key="image",
                 image_size=256, channels=3, parameterization="eps", scale_factor=1.0, use_ema=True,
                 cond_stage_trainable=False, scale_by_std=False, beta_schedule="linear", **ignored):
        super().__init__()
        assert parameterization in ["eps", "x0", "v"], 'currently only supporting "eps" and "x0" and "v"'
        if conditioning_key is None:
            conditioning_key = 'concat' if ignored.get("concat_mode", True) is False else 'crossattn'
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = False
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_ema = use_ema
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.scale_factor = scale_factor
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_forward = None
        self.register_schedule(beta_schedule=beta_schedule, timesteps=timesteps, linear_start=linear_start,
                               linear_end=linear_end)
        self.first_stage_model = AutoencoderKL(**dict(first_stage_config["params"]))
        self.cond_stage_model = _instantiate_cond_stage(cond_stage_config)

    # ldm/models/diffusion/ddpm.py: DDPM.register_schedule (buffers only)
    def register_schedule(self, given_betas=None, beta_schedule="linear", timesteps=1000, linear_start=1e-4,
                          linear_end=2e-2, cosine_s=8e-3):
        betas = make_beta_schedule(timesteps, linear_start=linear_start, linear_end=linear_end).numpy() \
            if given_betas is None else np.asarray(given_betas)
        alphas = 1. - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1., alphas_cumprod[:-1])

        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end

        to_torch = functools.partial(torch.tensor, dtype=torch.float32)

        self.register_buffer('betas', to_torch(betas))
        self.register_buffer('alphas_cumprod', to_torch(alphas_cumprod))
        self.register_buffer('alphas_cumprod_prev', to_torch(alphas_cumprod_prev))
        self.register_buffer('sqrt_alphas_cumprod', to_torch(np.sqrt(alphas_cumprod)))
        self.register_buffer('sqrt_one_minus_alphas_cumprod', to_torch(np.sqrt(1. - alphas_cumprod)))
        self.register_buffer('log_one_minus_alphas_cumprod', to_torch(np.log(1. - alphas_cumprod)))
        self.register_buffer('sqrt_recip_alphas_cumprod', to_torch(np.sqrt(1. / alphas_cumprod)))
        self.register_buffer('sqrt_recipm1_alphas_cumprod', to_torch(np.sqrt(1. / alphas_cumprod - 1)))

    # ldm/models/diffusion/ddpm.py: LatentDiffusion.get_learned_conditioning
    def get_learned_conditioning(self, c):
        if self.cond_stage_forward is None:
            if hasattr(self.cond_stage_model, 'encode') and callable(self.cond_stage_model.encode):
                c = self.cond_stage_model.encode(c)
                if isinstance(c, DiagonalGaussianDistribution):
                    c = c.mode()
            else:
                c = self.cond_stage_model(c)
        else:
            assert hasattr(self.cond_stage_model, self.cond_stage_forward)
            c = getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        return c

    # ldm/models/diffusion/ddpm.py: LatentDiffusion.apply_model
    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if isinstance(cond, dict):
            # hybrid case, cond is expected to be a dict
            pass
        else:
            if not isinstance(cond, list):
                cond = [cond]
            key = 'c_concat' if self.model.conditioning_key == 'concat' else 'c_crossattn'
            cond = {key: cond}

        x_recon = self.model(x_noisy, t, **cond)

        if isinstance(x_recon, tuple) and not return_ids:
            return x_recon[0]
        else:
            return x_recon

    # ldm/models/diffusion/ddpm.py: LatentDiffusion.decode_first_stage / encode_first_stage / get_first_stage_encoding
    @torch.no_grad()
    def decode_first_stage(self, z, predict_cids=False, force_not_quantize=False):
        z = 1. / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior):
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise NotImplementedError(f"encoder_posterior of type '{type(encoder_posterior)}' not yet implemented")
        return self.scale_factor * z
