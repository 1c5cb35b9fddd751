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


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the yaml form is the CI factory's
sys.path.insert(1, str(Path(__file__).resolve().parents[2]))  # the extension: afa's UNet presets
from factories import VIT_B_32_OPEN_CLIP, tiny_sdxl_config, tiny_sdxl_unet  # noqa: E402


def sdxl_config(clip_folder: str) -> dict:
    """sd_xl_base.yaml's structure with the tiny UNet, VAE and text encoders (CLIP 32 wide, ViT-B-32's tower)."""
    return tiny_sdxl_config(clip_folder, tiny_sdxl_unet(32, VIT_B_32_OPEN_CLIP))


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
