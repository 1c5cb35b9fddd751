"""Writes tiny SDXL checkpoints in the WebUI's form: sgm's DiffusionEngine built from a tiny sd_xl_base.yaml-shaped
config (written beside each checkpoint), with random UNet weights. Run with the python of an A1111 install whose
repositories are on PYTHONPATH (sgm is not on PyPI):

    PYTHONPATH=<webui>/repositories/generative-models:<webui>/repositories/stable-diffusion-stability-ai \\
        <webui>/venv/bin/python tests/webui_real/sdxl_checkpoint.py OUT.safetensors TEXT_ENCODER_FOLDER SEED

The model has SDXL's structure at test size: the UNet's transformer depths per level are 0/2/3 (SDXL: 0/2/10) with
a middle depth of 3, the label embedding reads the pooled text embedding and the size conditioning; the
conditioner's first text encoder is AFA's tiny CLIP (width 32, the folder the yaml names), the second open_clip's
ViT-B-32 text tower (width 512, its pooled projection 512), so the context is 544 wide and `y` 512 + 3 x 512 = 2048.
Nothing is downloaded: the text models are built from their configs and their weights are the file's.
"""

import sys
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file


SIZE_CONDITIONS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
UNET = dict(adm_in_channels=2048, num_classes="sequential", in_channels=4, out_channels=4, model_channels=64,
            attention_resolutions=[4, 2], num_res_blocks=2, channel_mult=[1, 2, 2], num_head_channels=64,
            use_spatial_transformer=True, use_linear_in_transformer=True, transformer_depth=[0, 2, 3],
            transformer_depth_middle=3, context_dim=544, spatial_transformer_attn_type="softmax", legacy=False)
VAE_DDCONFIG = dict(attn_type="vanilla", double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], dropout=0.0)
SGM = "sgm.modules.diffusionmodules."


def sdxl_config(clip_folder: str) -> dict:
    """sd_xl_base.yaml's structure with the tiny UNet, VAE and text encoders."""
    text_encoders = [
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
         "params": {"layer": "hidden", "layer_idx": 1, "version": clip_folder}},
        {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
         "params": {"arch": "ViT-B-32", "version": "laion2b_s34b_b79k", "freeze": True, "layer": "penultimate",
                    "always_return_pooled": True, "legacy": False}},
    ]
    sizes = [{"is_trainable": False, "input_key": key, "params": {"outdim": 256},
              "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"} for key in SIZE_CONDITIONS]
    denoiser = {"num_idx": 1000, "weighting_config": {"target": SGM + "denoiser_weighting.EpsWeighting"},
                "scaling_config": {"target": SGM + "denoiser_scaling.EpsScaling"},
                "discretization_config": {"target": SGM + "discretizer.LegacyDDPMDiscretization"}}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": SGM + "denoiser.DiscreteDenoiser", "params": denoiser},
        "network_config": {"target": SGM + "openaimodel.UNetModel", "params": UNET},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner",
                               "params": {"emb_models": text_encoders + sizes}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper", "params": {
            "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": VAE_DDCONFIG,
            "lossconfig": {"target": "torch.nn.Identity"}}}}}}


def offline_text_models() -> None:
    """The text models built from their configs, weights not fetched (the WebUI does the same when the checkpoint
    holds their weights)."""
    import open_clip
    import transformers

    transformers.CLIPTextModel.from_pretrained = classmethod(
        lambda cls, name, **kwargs: cls(transformers.CLIPTextConfig.from_pretrained(name)))
    create = open_clip.create_model_and_transforms
    open_clip.create_model_and_transforms = lambda *args, pretrained=None, **kwargs: create(*args, pretrained=None,
                                                                                             **kwargs)


def main(out: Path, clip_folder: str, seed: int) -> None:
    from sgm.util import instantiate_from_config

    offline_text_models()
    config = sdxl_config(clip_folder)
    torch.manual_seed(seed)
    model = instantiate_from_config(OmegaConf.create(config)["model"])
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, tensor in model.state_dict().items():
        if key.startswith("model.diffusion_model.") and tensor.is_floating_point():  # zero-initialised layers too
            tensor = torch.randn(tensor.shape, generator=generator) * 0.05
        state[key] = tensor.contiguous()
    save_file(state, str(out))
    out.with_suffix(".yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
