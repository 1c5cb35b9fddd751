"""API-format prompts for the real-ComfyUI tier: the example workflows (examples/comfyui/*.api.json) made to run on
the tier's files and fast (64x64 px, 2 steps), and small graphs built node by node for the other checks.

Plain data only (json, no torch): the test modules import it before they know whether the tier runs.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples" / "comfyui"

SIZE = 64
STEPS = 2
POSITIVE = "a lighthouse on a cliff at sunset"
NEGATIVE = "blurry"

# The tier's files in ComfyUI's model folders (conftest.py writes them): checkpoint name (without .safetensors) ->
# the seed of its random SD 1.5 weights (random_sd15.py); a-copy is checkpoint a under another file name.
CHECKPOINT_SEEDS = {"afa-random-a": 1, "afa-random-b": 2, "afa-random-c": 3, "afa-random-a-copy": 1}
SABW_MEMBERS = ("afa-random-a", "afa-random-b")
SABW_WEIGHTS = "afa-random-ab.safetensors"  # in models/afa/: trained by training/train.py for a, b in this order

# What the examples name -> the tier's files.
EXAMPLE_FILES = {
    "member-a.safetensors": "afa-random-a.safetensors",
    "member-b.safetensors": "afa-random-b.safetensors",
    "member-c.safetensors": "afa-random-c.safetensors",
    "sd15-pair.safetensors": SABW_WEIGHTS,
}
# The examples the tier cannot run, and why (their graphs are still loaded in the browser: test_browser.py).
NOT_RUN = {
    "sdxl-per-member-text-encoders": "needs two SDXL checkpoints: random full-width ones are 6.9 GB files, and two "
                                     "SDXL UNets take 10 GB (fp16) to 20 GB (fp32) in ComfyUI on the CPU, more than "
                                     "the 24 GB machine this tier was made on holds beside its other processes; its "
                                     "graph is loaded in the browser (test_comfyui_browser.py)",
    "sd15-train-then-sample": "trains on images saved first, and is interrupted and resumed: "
                              "test_comfyui_training.py runs it",
    "flux-two-members-block-average": "needs two FLUX.1 transformer files, CLIP-L, T5-XXL and FLUX's VAE, which the "
                                      "tier does not make yet (FLUX members in the real tier: issue 21's next step); "
                                      "its graph is loaded in the browser (test_comfyui_browser.py)",
}


# -- the examples -----------------------------------------------------------------------------------------------------

def example_names() -> list[str]:
    """The example workflows by name (each has `<name>.json`, the UI format, and `<name>.api.json`)."""
    return sorted(path.name[:-len(".api.json")] for path in EXAMPLES.glob("*.api.json"))


def load_example(name: str, api: bool = True) -> dict:
    return json.loads((EXAMPLES / f"{name}{'.api' if api else ''}.json").read_text(encoding="utf-8"))


def example_checkpoints(prompt: dict) -> list[str]:
    """The checkpoint names an API-format prompt's loaders name, in node order."""
    return [node["inputs"]["ckpt_name"] for node in prompt.values() if "ckpt_name" in node.get("inputs", {})]


def for_the_tier(prompt: dict, names: dict[str, str], size: int = SIZE, steps: int = STEPS) -> dict:
    """A copy of an API-format prompt with its checkpoint and SABW weights names replaced through `names` (a name
    missing there raises KeyError: every file the prompt names must be mapped), empty latents of `size` px and
    samplers of `steps` steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = names[inputs["ckpt_name"]]
        if node["class_type"] == "AFAEnsemble" and inputs.get("weights", "none") != "none":
            inputs["weights"] = names[inputs["weights"]]
        if node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            inputs["steps"] = steps
    return prompt


def nodes_of(prompt: dict, class_type: str) -> list[str]:
    """The ids of the prompt's nodes of `class_type`."""
    return [node_id for node_id, node in prompt.items() if node["class_type"] == class_type]


# -- graphs built node by node ----------------------------------------------------------------------------------------

class Graph:
    """An API-format prompt under construction: `add` returns the new node's id; `out(node, index)` is a link."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def add(self, class_type: str, **inputs) -> str:
        node_id = str(len(self.nodes) + 1)
        self.nodes[node_id] = {"class_type": class_type, "inputs": inputs}
        return node_id

    @staticmethod
    def out(node_id: str, index: int = 0) -> list:
        return [node_id, index]

    def prompt(self) -> dict:
        return copy.deepcopy(self.nodes)


def txt2img(checkpoints: Sequence[str], *, mode: str | None = None, weights: str = "none", seed: int = 1,
            text_clips: Sequence[int] | None = None, hires: bool = False, size: int = SIZE,
            steps: int = STEPS) -> tuple[dict, str]:
    """A txt2img prompt at `size` px, `steps` euler steps, cfg 7, seed `seed`; returns (prompt, id of its SaveImage).

    One checkpoint and no `mode`: that checkpoint alone (the reference image). Otherwise AFA Ensemble over the
    checkpoints in order (one loader per distinct name) in `mode` with `weights`.
    Text: `text_clips` None encodes both prompts with CLIPTextEncode and the first member's CLIP; a list of member
    indices (0-based) encodes them with AFA Text Encode and those members' CLIPs, in that order.
    `hires`: a second pass (the latent upscaled 1.5x, then KSampler with denoise 0.5 on the same MODEL).
    """
    graph = Graph()
    loaders: dict[str, str] = {}
    for name in checkpoints:
        if name not in loaders:
            loaders[name] = graph.add("CheckpointLoaderSimple", ckpt_name=f"{name}.safetensors")
    members = [loaders[name] for name in checkpoints]
    if mode is None:
        assert len(checkpoints) == 1, "more than one checkpoint needs an ensemble mode"
        model = graph.out(members[0], 0)
    else:
        links = {f"model_{index}": graph.out(member, 0) for index, member in enumerate(members, start=1)}
        model = graph.out(graph.add("AFAEnsemble", mode=mode, weights=weights, **links), 0)

    def encode(text: str) -> list:
        if text_clips is None:
            return graph.out(graph.add("CLIPTextEncode", text=text, clip=graph.out(members[0], 1)))
        clips = {f"clip_{index}": graph.out(members[member], 1) for index, member in enumerate(text_clips, start=1)}
        return graph.out(graph.add("AFATextEncode", text=text, **clips))

    positive, negative = encode(POSITIVE), encode(NEGATIVE)
    latent = graph.out(graph.add("EmptyLatentImage", width=size, height=size, batch_size=1))
    sampler = dict(seed=seed, steps=steps, cfg=7.0, sampler_name="euler", scheduler="normal", model=model,
                   positive=positive, negative=negative)
    samples = graph.out(graph.add("KSampler", denoise=1.0, latent_image=latent, **sampler))
    if hires:
        hires_size = size * 3 // 2 // 8 * 8
        upscaled = graph.out(graph.add("LatentUpscale", samples=samples, upscale_method="nearest-exact",
                                       width=hires_size, height=hires_size, crop="disabled"))
        samples = graph.out(graph.add("KSampler", denoise=0.5, latent_image=upscaled, **sampler))
    image = graph.out(graph.add("VAEDecode", samples=samples, vae=graph.out(members[0], 2)))
    save = graph.add("SaveImage", images=image, filename_prefix="afa-tier/txt2img")
    return graph.prompt(), save


def train_example_for_tier(data: str, output_name: str, max_steps: int, size: int = SIZE, steps: int = STEPS) -> dict:
    """examples/comfyui/sd15-train-then-sample on the tier's members a and b: AFA Train on the output folder's
    `data` subfolder at `size` px, batch 1, `max_steps` steps, a quarter held out, the fast design, a training state
    after every step; the ensemble then samples at `size` px with `steps` steps."""
    prompt = for_the_tier(load_example("sd15-train-then-sample"), EXAMPLE_FILES, size, steps)
    (train,) = nodes_of(prompt, "AFATrain")
    prompt[train]["inputs"].update(data=data, output_name=output_name, resolution=size, batch_size=1,
                                   max_steps=max_steps, validation_share=0.25, design="fast",
                                   extra_flags="--save-every 1")
    return prompt
