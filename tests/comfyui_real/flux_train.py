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

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from factories import write_captioned_images  # noqa: E402

WORDS = ["a", "red", "blue", "green", "thing", "number"] + [str(n) for n in range(12)]


def write_components(folder: Path) -> list[str]:
    """The component flags of tiny-depth, full-width FLUX components written into `folder`."""
    from ldm.modules.diffusionmodules.model import Decoder, Encoder
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(100)
    ddconfig = dict(double_z=True, z_channels=16, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 1, 1],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    vae = {f"encoder.{k}": v for k, v in Encoder(**ddconfig).state_dict().items()}
    vae.update({f"decoder.{k}": v for k, v in Decoder(**ddconfig).state_dict().items()})
    save_file(vae, str(folder / "ae.safetensors"))
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=12, max_position_embeddings=77))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(folder / "clip_l.safetensors"))
    t5 = T5EncoderModel(T5Config(vocab_size=len(WORDS) + 3, d_model=4096, d_kv=8, d_ff=32, num_layers=1,
                                 num_heads=2, feed_forward_proj="gated-gelu"))
    state = {k: v.contiguous() for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(state, str(folder / "t5xxl_tiny.safetensors"))  # ComfyUI's files store the tied embedding once
    vocabulary = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{word: index + 3 for index, word in enumerate(WORDS)}}
    tokenizer = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    (folder / "t5_tokenizer").mkdir(exist_ok=True)
    tokenizer.save(str(folder / "t5_tokenizer" / "tokenizer.json"))
    return ["--vae", str(folder / "ae.safetensors"), "--clip-l", str(folder / "clip_l.safetensors"),
            "--t5", str(folder / "t5xxl_tiny.safetensors"), "--t5-tokenizer", str(folder / "t5_tokenizer"),
            "--t5-max-length", "8"]


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
