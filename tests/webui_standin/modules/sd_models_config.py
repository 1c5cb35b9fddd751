"""Stand-in of modules/sd_models_config.py (v1.10): which yaml config a checkpoint is built from.

`find_checkpoint_config` / `find_checkpoint_config_near_filename` are the real logic (a `<checkpoint>.yaml` beside
the file wins). `guess_model_config_from_state_dict` only knows the stand-in's SD1 config (`config_default`, which
the harness points at its generated tiny-architecture config, harness.default_config_file()): SD2/SDXL/inpainting
checkpoints are not reproduced.
"""

import os

from modules import paths

sd_configs_path = paths.sd_configs_path
config_default = paths.sd_default_config


def guess_model_config_from_state_dict(sd, filename):
    if any(k.startswith("conditioner.embedders.") for k in sd):
        raise NotImplementedError("stand-in: SDXL checkpoints are not reproduced")

    if any(k.startswith("cond_stage_model.model.") for k in sd):
        raise NotImplementedError("stand-in: SD2 checkpoints are not reproduced")

    diffusion_model_input = sd.get('model.diffusion_model.input_blocks.0.0.weight', None)
    if diffusion_model_input is not None and diffusion_model_input.shape[1] != 4:
        raise NotImplementedError("stand-in: inpainting/instruct-pix2pix checkpoints are not reproduced")

    return config_default


def find_checkpoint_config(state_dict, info):
    if info is None:
        return guess_model_config_from_state_dict(state_dict, "")

    config = find_checkpoint_config_near_filename(info)
    if config is not None:
        return config

    return guess_model_config_from_state_dict(state_dict, info.filename)


def find_checkpoint_config_near_filename(info):
    if info is None:
        return None

    config = f"{os.path.splitext(info.filename)[0]}.yaml"
    if os.path.exists(config):
        return config

    return None
