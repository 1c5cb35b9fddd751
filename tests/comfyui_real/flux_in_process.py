"""Run by tests/comfyui_real/test_comfyui_flux.py with the real ComfyUI's Python: FLUX members in the real
ComfyUI, in-process (its own loader, detection, model management and sampler; the node pack's code on sys.path).

    $COMFYUI_DIR/venv/bin/python flux_in_process.py COMFYUI_DIR REPO WORK_DIR

ComfyUI's detection hard-codes FLUX.1's widths, so the members are full-width FLUX-layout transformers with 1 double
and 1 single block (about 0.5B parameters, 1 GB in bf16), random, written by the core's BFL-layout class
(afa.flux_model) into WORK_DIR and loaded by `comfy.sd.load_diffusion_model` (what "Load Diffusion Model" runs).
The conditioning is random T5 tokens and a pooled CLIP-L vector with FluxGuidance's guidance (a real T5-XXL is too
big here). Prints one JSON line of results; writes nothing outside WORK_DIR.
"""

import json
import os
import sys
import time

comfyui_dir, repo, work = sys.argv[1:4]
sys.argv = [sys.argv[0], "--cpu", "--base-directory", work]
sys.path[:0] = [comfyui_dir, repo]
sys.dont_write_bytecode = True

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import comfy.sd  # noqa: E402
import node_helpers  # noqa: E402
import nodes  # noqa: E402

from afa.aggregator import Aggregator  # noqa: E402
from afa.comfyui.ensemble_model import build_ensemble, member_fingerprint  # noqa: E402
from afa.errors import MembersMismatchError  # noqa: E402
from afa.flux import flux_layout, flux_preset_config  # noqa: E402
from afa.flux_model import Flux, FluxParams  # noqa: E402
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
a, a_again, b = (comfy.sd.load_diffusion_model(path) for path in (paths[0], paths[0], paths[1]))
results["detected"] = [type(a.model).__name__, type(a.model.model_config).__name__]
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
try:
    build_ensemble([b, a], "SABW", trained)
    results["members in another order refused"] = False
except MembersMismatchError as error:
    results["members in another order refused"] = "another order" in str(error)
results["seconds"] = round(time.time() - start, 1)
print(json.dumps(results))
