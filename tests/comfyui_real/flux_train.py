"""Run by tests/comfyui_real/flux_in_process.py with the project's Python (not ComfyUI's: the trainer needs ldm and
the project's transformers): trains SABW with training/train.py on the two full-width FLUX-layout members the real
tier loads in ComfyUI, so the weights file is the trainer's own, bound to the members by their fingerprints.

    PROJECT_PYTHON flux_train.py REPO WORK_DIR OUTPUT MEMBER_1 MEMBER_2

ComfyUI's FLUX detection hard-codes FLUX.1's widths, so the components the trainer reads are tiny in depth but of
FLUX.1's output widths: a T5 encoder of width 4096 (1 layer, d_ff 32, a word-level vocabulary), a CLIP-L text model
of width 768 (1 layer; its pooled output is the members' 768-wide `vec` input), a 16-channel autoencoder with
FLUX's downsampling by 8 (ch 32, one res block per level) and a word-level T5 tokenizer.json; 4 captioned 64 px
images. Everything is written under WORK_DIR; the trainer's output goes to OUTPUT.
"""

import subprocess
import sys
import time
from pathlib import Path

repo, work, output, *members = sys.argv[1:]
repo, work = Path(repo), Path(work)
sys.path[:0] = [str(repo / "tests"), str(repo)]
sys.dont_write_bytecode = True

from factories import write_captioned_images, write_flux_components  # noqa: E402


def write_components(folder: Path) -> list[str]:
    """The component flags of tiny-depth, full-width FLUX components written into `folder`."""
    paths = write_flux_components(folder, vae_resolution=64, vae_channel_multipliers=[1, 1, 1, 1], clip_width=768,
                                  clip_heads=12, clip_intermediate=64, t5_width=4096)
    return ["--vae", str(paths["vae"]), "--clip-l", str(paths["clip_l"]), "--t5", str(paths["t5"]),
            "--t5-tokenizer", str(paths["t5_tokenizer"]), "--t5-max-length", "8"]


start = time.time()
Path(output).parent.mkdir(parents=True, exist_ok=True)
components = write_components(work / "components")
data = work / "captioned"
data.mkdir(exist_ok=True)
write_captioned_images(data, count=4, width=64, height=64)
command = [sys.executable, str(repo / "training" / "train.py"), "--members", *members, "--data", str(data),
           "--resolution", "64", "--batch-size", "2", "--val-split", "0", "--max-steps", "2",
           "--learning-rate", "1e-2", "--merge-baselines", "none", "--mixed-precision", "no", "--save-dtype", "fp32",
           "--num-workers", "0", "--output", output, "--run-dir", str(work / "flux-run"), *components]
run = subprocess.run(command, cwd=work, capture_output=True, text=True)
sys.stdout.write(run.stdout[-3000:])
sys.stderr.write(run.stderr[-6000:])
print(f"train.py exited {run.returncode} after {time.time() - start:.1f} s")
sys.exit(run.returncode)
