"""The SDXL UNet AFA builds without sgm (ldm's UNetModel with each level's SpatialTransformer rebuilt at its depth,
afa/unet.py) against sgm's own class, in a real A1111 1.10 install's venv with its repositories on the path: the
same key names and shapes, and the same outputs for the same weights and inputs (tiny SDXL layout, depths 0/2/3).

Opt-in, like the rest of tests/webui_real (its fixtures skip without AFA_WEBUI_DIR):
AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui
"""

import textwrap


SCRIPT = textwrap.dedent("""
    import torch
    from afa.unet import PRESETS, build_unet, _ldm_unet_with_level_depths
    params = dict(PRESETS["tiny-sdxl"], use_fp16=False)
    torch.manual_seed(0)
    sgm_unet = build_unet(params)
    assert type(sgm_unet).__module__ == "sgm.modules.diffusionmodules.openaimodel", type(sgm_unet)
    ours = _ldm_unet_with_level_depths(dict(params))
    assert type(ours).__module__ == "ldm.modules.diffusionmodules.openaimodel", type(ours)
    expected = {k: tuple(v.shape) for k, v in sgm_unet.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert expected == found, sorted(set(expected) ^ set(found))[:8]
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in sgm_unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    ours.load_state_dict(sgm_unet.state_dict(), strict=True)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    t = torch.tensor([10, 700])
    context = torch.randn(2, 77, 32, generator=generator)
    y = torch.randn(2, 48, generator=generator)
    with torch.no_grad():
        a, b = sgm_unet(x, timesteps=t, context=context, y=y), ours(x, t, context, y=y)
    difference = (a - b).abs().max().item()
    print(f"max |sgm - ours| = {difference:.3g} over {len(expected)} tensors")
    assert difference < 1e-5, difference
""")


def test_the_sdxl_unet_without_sgm_equals_sgms_own(webui_python):
    print(webui_python("-c", SCRIPT).stdout.strip())
