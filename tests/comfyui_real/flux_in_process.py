"""Run by tests/comfyui_real/test_comfyui_flux.py with the real ComfyUI's Python: FLUX members in the real
ComfyUI, in-process (its own loader, detection, model management and sampler; the node pack's code on sys.path).

    $COMFYUI_DIR/venv/bin/python flux_in_process.py COMFYUI_DIR REPO WORK_DIR PROJECT_PYTHON

ComfyUI's detection hard-codes FLUX.1's widths, so the members are full-width FLUX-layout transformers with 1 double
and 1 single block (about 0.5B parameters, 1 GB in bf16), random, written by the core's BFL-layout class
(afa.flux_model) into WORK_DIR and loaded by `comfy.sd.load_diffusion_model` (what "Load Diffusion Model" runs; on
the CPU ComfyUI computes them in float32). The core's class loaded from the same file in float32
(afa.flux_model.load_flux_member) is compared with ComfyUI's FLUX class on the same inputs. SABW weights are trained
on the two member files by training/train.py, run with PROJECT_PYTHON (the project's environment: ldm, its
transformers) through flux_train.py, and picked by name in the AFA Ensemble node. The conditioning is random T5
tokens and a pooled CLIP-L vector with FluxGuidance's guidance (a real T5-XXL is too big here). Prints one JSON line
of results; writes nothing outside WORK_DIR.
"""

import json
import os
import sys
import time

import subprocess  # noqa: E402

comfyui_dir, repo, work, project_python = sys.argv[1:5]
sys.argv = [sys.argv[0], "--cpu", "--base-directory", work]
sys.path[:0] = [comfyui_dir, repo]
sys.dont_write_bytecode = True

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.ldm.common_dit  # noqa: E402
import comfy.ldm.flux.layers  # noqa: E402
import comfy.ldm.flux.math  # noqa: E402
import comfy.sd  # noqa: E402
import node_helpers  # noqa: E402
import nodes  # noqa: E402

from afa.aggregator import Aggregator  # noqa: E402
from afa.comfyui.ensemble_model import build_ensemble, member_fingerprint  # noqa: E402
from afa.errors import MembersMismatchError  # noqa: E402
from afa.flux import flux_layout, flux_preset_config  # noqa: E402
from afa.comfyui.nodes import AFAEnsemble  # noqa: E402
from afa.flux_model import Flux, FluxParams, load_flux_member  # noqa: E402
from afa.members import MemberRef, unet_shapes  # noqa: E402
from afa.weights import save_weights  # noqa: E402

start = time.time()
results = {}
paths = []
for seed in (1, 2):
    torch.manual_seed(seed)
    model = Flux(FluxParams(depth=1, depth_single_blocks=1)).to(torch.bfloat16)
    paths.append(os.path.join(work, f"flux-1-1-seed{seed}.safetensors"))
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, paths[-1])
    del model
# SABW trained by train.py on the two member files (before ComfyUI loads anything: the two never hold memory at once)
trained_by_train_py = os.path.join(work, "models", "afa", "flux-trained-by-train-py.safetensors")
train_start = time.time()
training = subprocess.run([project_python, os.path.join(repo, "tests", "comfyui_real", "flux_train.py"), repo, work,
                           trained_by_train_py, *paths], capture_output=True, text=True)
results["train.py seconds"] = round(time.time() - train_start, 1)
if training.returncode:
    sys.stderr.write(training.stdout[-3000:] + training.stderr[-6000:])
    raise SystemExit(f"train.py failed ({training.returncode})")
a, a_again, b = (comfy.sd.load_diffusion_model(path) for path in (paths[0], paths[0], paths[1]))
results["detected"] = [type(a.model).__name__, type(a.model.model_config).__name__]

# The core's FLUX class equals ComfyUI's on the same weights (both float32) and the same inputs: a batch of two
# latents at two timesteps and guidance values, T5 tokens and pooled CLIP-L vectors.
comfy_flux = a.model.diffusion_model
results["comfyui computes in float32"] = all(p.dtype == torch.float32 for p in comfy_flux.parameters())
core_flux = load_flux_member(paths[0], torch.float32)
generator = torch.Generator().manual_seed(1)
inputs = dict(x=torch.randn(2, 16, 8, 8, generator=generator), timesteps=torch.tensor([0.9, 0.3]),
              context=torch.randn(2, 8, 4096, generator=generator), y=torch.randn(2, 768, generator=generator),
              guidance=torch.tensor([3.5, 1.0]))


def comfy_prediction():
    with torch.inference_mode():
        return comfy_flux(inputs["x"], inputs["timesteps"], inputs["context"], y=inputs["y"],
                          guidance=inputs["guidance"])


with torch.inference_mode():
    core_out = core_flux(**inputs)
del core_flux
comfy_out = comfy_prediction()
results["core vs ComfyUI FLUX max abs difference"] = (core_out - comfy_out).abs().max().item()
results["core vs ComfyUI FLUX output max abs"] = comfy_out.abs().max().item()
results["core vs ComfyUI FLUX bit for bit"] = torch.equal(core_out, comfy_out)
# Not bit for bit in float32 by three op choices: ComfyUI's CPU attention is its sub-quadratic chunked attention
# (attention_sub_quad; the core calls torch's scaled_dot_product_attention), its modulation is torch.addcmul (the
# core: (1 + scale) * x + shift, BFL's) and its RMS norm torch's fused rms_norm (the core writes it out). So the
# tolerance is float32 rounding over 2 blocks: measured 3.6e-7 on outputs up to 1.9; atol and rtol 1e-5.
results["core equals ComfyUI FLUX (fp32, atol 1e-5 rtol 1e-5)"] = bool(
    core_out.shape == comfy_out.shape and torch.allclose(core_out, comfy_out, rtol=1e-5, atol=1e-5))
# ... and nothing else: ComfyUI's class with the core's three ops swapped in predicts the core's bits exactly.
originals = (comfy.ldm.flux.layers.apply_mod, comfy.ldm.flux.math.optimized_attention, comfy.ldm.common_dit.rms_norm)
try:
    comfy.ldm.flux.layers.apply_mod = lambda tensor, m_mult, m_add=None, modulation_dims=None: (
        tensor * m_mult if m_add is None else tensor * m_mult + m_add)
    comfy.ldm.flux.math.optimized_attention = lambda q, k, v, heads, skip_reshape=True, mask=None, **kwargs: (
        rearrange(torch.nn.functional.scaled_dot_product_attention(q, k, v), "b h l d -> b l (h d)"))
    comfy.ldm.common_dit.rms_norm = lambda x, weight, eps=1e-6: (
        x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + eps) * weight.to(x.dtype))
    results["ComfyUI FLUX with the core's attention, modulation and RMS norm: bit for bit"] = torch.equal(
        comfy_prediction(), core_out)
finally:
    comfy.ldm.flux.layers.apply_mod, comfy.ldm.flux.math.optimized_attention, comfy.ldm.common_dit.rms_norm = originals
results["ComfyUI FLUX unchanged after the swap"] = torch.equal(comfy_prediction(), comfy_out)
generator = torch.Generator().manual_seed(0)
cond = [[torch.randn(1, 8, 4096, generator=generator), {"pooled_output": torch.randn(1, 768, generator=generator)}]]
cond = node_helpers.conditioning_set_values(cond, {"guidance": 3.5})  # FluxGuidance
latent = {"samples": torch.zeros(1, 16, 8, 8)}


def sample(model):
    with torch.inference_mode():
        return nodes.common_ksampler(model, 0, 2, 1.0, "euler", "simple", cond, cond, latent)[0]["samples"]


def weights(aggregator, members, name):
    refs = [MemberRef(f"member-{index}", "0" * 64, member_fingerprint(m)) for index, m in enumerate(members)]
    return save_weights(os.path.join(work, name), aggregator, refs)


alone_a, alone_b = sample(a), sample(b)
layout = flux_layout(unet_shapes(a.model.diffusion_model))
untrained = weights(Aggregator(flux_preset_config("paper", 2, layout)), [a, a_again], "untrained.safetensors")
for mode, path in (("Block average", None), ("Noise average", None), ("SABW", untrained)):
    ensemble, _ = build_ensemble([a, a_again], mode, path)
    results[f"identical {mode}"] = torch.equal(sample(ensemble), alone_a)
average = sample(build_ensemble([a, b], "Block average", None)[0])
results["average differs from each member"] = bool((average - alone_a).abs().max() > 1e-3
                                                   and (average - alone_b).abs().max() > 1e-3)
aggregator = Aggregator(flux_preset_config("fast", 2, layout))
torch.nn.init.normal_(aggregator.single_blocks["0"].out[-1].weight, std=0.05)  # a "trained" last block
trained = weights(aggregator, [a, b], "trained.safetensors")
sabw = sample(build_ensemble([a, b], "SABW", trained)[0])
results["sabw finite and differs from the average"] = bool(torch.isfinite(sabw).all()
                                                           and (sabw - average).abs().max() > 1e-4)
# SABW trained by train.py: the node (weights picked by name from models/afa) binds it to the members ComfyUI loaded
# from the files it was trained on, by fingerprint; it samples finite latents that differ from block averaging
with torch.inference_mode():
    node_sabw = sample(AFAEnsemble().ensemble(a, b, "SABW", os.path.basename(trained_by_train_py))[0])
results["train.py SABW max abs difference from the average"] = (node_sabw - average).abs().max().item()
results["train.py SABW finite and differs from the average"] = bool(torch.isfinite(node_sabw).all()
                                                                    and not torch.equal(node_sabw, average))
try:
    build_ensemble([b, a], "SABW", trained_by_train_py)
    results["train.py weights refuse the members in another order"] = False
except MembersMismatchError as error:
    results["train.py weights refuse the members in another order"] = "another order" in str(error)
try:
    build_ensemble([b, a], "SABW", trained)
    results["members in another order refused"] = False
except MembersMismatchError as error:
    results["members in another order refused"] = "another order" in str(error)
results["seconds"] = round(time.time() - start, 1)
print(json.dumps(results))
