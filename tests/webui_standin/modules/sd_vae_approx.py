"""Stand-in of modules/sd_vae_approx.py (v1.10): `cheap_approximation` (real coefficients); the "Approx NN" model
is not available (`model()` returns None; live previews are not produced by the stand-in)."""

import torch


def model():
    return None


# modules/sd_vae_approx.py (v1.10): cheap_approximation (SD1/SD2 coefficients)
def cheap_approximation(sample):
    # https://discuss.huggingface.co/t/decoding-latents-to-rgb-without-upscaling/23204/2

    coefs = torch.tensor([
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]).to(sample.device)

    x_sample = torch.einsum("...lxy,lr -> ...rxy", sample, coefs)

    return x_sample
