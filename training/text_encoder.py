"""The SD1 text encoder of a WebUI checkpoint, as the trainer uses it: tokenizer, model, and encoding.

Everything here is built offline. The WebUI's SD1 `FrozenCLIPEmbedder` downloads `openai/clip-vit-large-patch14`
from the hub; the trainer instead builds the same tokenizer from the BPE vocabulary open_clip_torch ships, and the
same text model (transformers' `CLIPTextModel`) from a config written out here or read from the local folder the
checkpoint's yaml names, with the weights taken from the checkpoint itself (`cond_stage_model.transformer.*`).
`write_text_encoder_folder` writes such a folder (a text config and SD1's tokenizer files) for AFA's tiny models.

Conditioning matches the WebUI's for plain prompts (no emphasis syntax, at most 75 tokens) at any CLIP skip (`encode`;
the trainer's --clip-skip, the WebUI's "Clip skip" setting, 1 by default). Two WebUI behaviours are not reproduced:
`(word:1.2)` emphasis, and prompts longer than 75 tokens, which the WebUI splits into several 75-token chunks and
concatenates (the context grows to 154, 231, ... tokens); here they are truncated to 75 tokens, as ldm's own
`FrozenCLIPEmbedder` does.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from afa.errors import CheckpointError

from .sd_checkpoint import TEXT_ENCODER_PREFIX

logger = logging.getLogger(__name__)

# The WebUI's SD2 text encoder (open_clip's text tower) lives under this prefix; SDXL's under `conditioner.`.
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CONDITIONER_PREFIX = "conditioner.embedders."

CONTEXT_LENGTH = 77  # BOS + 75 prompt tokens + EOS: SD1's (and the WebUI's per-chunk) context
START_OF_TEXT_ID = 49406
END_OF_TEXT_ID = 49407
# Merges of the CLIP vocabulary: 49408 ids = 256 byte symbols + 256 `</w>` variants + 48894 merges + 2 specials.
NUM_BPE_MERGES = 49152 - 256 - 2

# openai/clip-vit-large-patch14's text config (SD1's text encoder), written out so nothing is read from the hub.
SD1_CLIP_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768,
    pad_token_id=1, bos_token_id=0, eos_token_id=2,
)

# Older SD1 checkpoints (saved with transformers < 4.x) lack `text_model.` in their text-encoder keys. The WebUI maps
# them with these prefix replacements (`checkpoint_dict_replacements_sd1` in modules/sd_models.py) before loading.
_OLD_TEXT_ENCODER_KEY_PREFIXES = {
    TEXT_ENCODER_PREFIX + "embeddings.": TEXT_ENCODER_PREFIX + "text_model.embeddings.",
    TEXT_ENCODER_PREFIX + "encoder.": TEXT_ENCODER_PREFIX + "text_model.encoder.",
    TEXT_ENCODER_PREFIX + "final_layer_norm.": TEXT_ENCODER_PREFIX + "text_model.final_layer_norm.",
}
_POSITION_IDS_KEY = "text_model.embeddings.position_ids"


class UnsupportedTextEncoderError(CheckpointError, NotImplementedError):
    """The checkpoint's text encoder is of a family the trainer cannot build yet (SD2's OpenCLIP, SDXL's pair)."""


# -- tokenizer -----------------------------------------------------------------------------------------------------

def _open_clip_bpe_path() -> Path:
    """The BPE vocabulary file shipped inside open_clip_torch, found without importing open_clip (its __init__
    imports torchvision, which is kept out of this environment)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "The SD1 tokenizer is built from the BPE vocabulary that open_clip_torch ships "
            "(bpe_simple_vocab_16e6.txt.gz), and open_clip_torch is not installed. "
            "Install it with: pip install --no-deps open-clip-torch==2.20.0")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"open_clip_torch is installed but its BPE vocabulary is missing: {path}")
    return path


@functools.lru_cache(maxsize=None)
def sd1_tokenizer() -> CLIPTokenizer:
    """openai/clip-vit-large-patch14's tokenizer (the one SD1 and the WebUI use), built offline.

    The vocabulary is derived from open_clip's merges list exactly as CLIP defines it: the 256 byte-level symbols,
    the same with `</w>`, one token per merge in merge order, then `<|startoftext|>` (49406) and `<|endoftext|>`
    (49407). transformers' `CLIPTokenizer` reads vocab.json/merges.txt files, so they are written to a temporary
    folder that is removed once the tokenizer has read them.
    """
    with gzip.open(_open_clip_bpe_path(), "rt", encoding="utf-8") as bpe_file:
        lines = bpe_file.read().split("\n")
    merges = lines[1:1 + NUM_BPE_MERGES]  # line 0 is the "#version" header
    # imported here: transformers 5 (which ComfyUI may run) no longer has it, and only this tokenizer needs it
    from transformers.models.clip.tokenization_clip import bytes_to_unicode
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [symbol + "</w>" for symbol in byte_symbols]
    tokens += ["".join(merge.split()) for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocabulary = {token: token_id for token_id, token in enumerate(tokens)}
    assert len(vocabulary) == 49408 and vocabulary["<|startoftext|>"] == START_OF_TEXT_ID \
        and vocabulary["<|endoftext|>"] == END_OF_TEXT_ID, len(vocabulary)

    with tempfile.TemporaryDirectory(prefix="afa-clip-tokenizer-") as folder:
        vocab_file, merges_file = Path(folder) / "vocab.json", Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(vocabulary), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        # pad_token = <|endoftext|>: SD1 pads with EOS (the hub tokenizer's config says the same).
        return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>",
                             model_max_length=CONTEXT_LENGTH)


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Token ids of prompts as SD1 feeds them to its text encoder.

    Each row is BOS, the prompt's first 75 tokens, EOS, then EOS padding to 77 (an empty prompt is BOS EOS EOS ...).
    This is ldm's `FrozenCLIPEmbedder.forward` tokenization, which the WebUI reproduces for prompts of at most 75
    tokens.

    :param prompts: B prompt strings.
    :return: LongTensor [B x 77].
    """
    if isinstance(prompts, str):
        raise TypeError("tokenize() takes a list of prompts, not a single string")
    encoded = sd1_tokenizer()(list(prompts), truncation=True, max_length=CONTEXT_LENGTH, padding="max_length",
                              return_tensors="pt")
    return encoded["input_ids"]


# -- a text encoder folder, as an ldm yaml's `version` names one -----------------------------------------------------

TEXT_CONFIG_FILE = "config.json"


@functools.lru_cache(maxsize=None)
def _sd1_tokenizer_files() -> tuple[tuple[str, bytes], ...]:
    """The SD1 tokenizer's files (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json) as
    `CLIPTokenizer.save_pretrained` writes them: what `CLIPTokenizer.from_pretrained(folder)` reads back as the same
    tokenizer (pad token <|endoftext|>, model_max_length 77)."""
    with tempfile.TemporaryDirectory(prefix="afa-clip-tokenizer-") as folder:
        sd1_tokenizer().save_pretrained(folder)
        return tuple((path.name, path.read_bytes()) for path in sorted(Path(folder).iterdir()))


def text_encoder_folder_files(text_config: Mapping) -> dict[str, bytes]:
    """The files of a text encoder folder (see `write_text_encoder_folder`), by name."""
    config = CLIPTextConfig(**{"architectures": ["CLIPTextModel"], **dict(text_config)})
    files = dict(_sd1_tokenizer_files())
    files[TEXT_CONFIG_FILE] = config.to_json_string().encode("utf-8")
    return files


def write_text_encoder_folder(folder: str | Path, text_config: Mapping) -> Path:
    """Writes a folder that transformers reads as a CLIP text model with SD1's tokenizer, and returns its absolute
    path: `config.json` (the `CLIPTextConfig` of `text_config`, CLIPTextConfig arguments) and the tokenizer files.

    This is what an ldm yaml's `cond_stage_config.params.version` names for a text encoder that is not on the hub
    (AFA's tiny models): ldm's `FrozenCLIPEmbedder` calls `CLIPTokenizer.from_pretrained(version)` and
    `CLIPTextModel.from_pretrained(version)`, and the WebUI, while it builds a model, turns the latter into
    `from_pretrained(None, config=version, state_dict={})` (a model from config.json alone) and then loads the
    checkpoint's own tensors. So the folder holds no weights, and `sd1_text_config` reads the same config.json.

    Idempotent, and safe with parallel writers and readers: a file that is missing or differs is written under a
    temporary name in the folder and renamed over the old one, so nobody reads part of a file; a call returns once
    every file is complete. Writing another `text_config` into the same folder changes what every yaml naming the
    folder means, so use one folder per text config.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in text_encoder_folder_files(text_config).items():
        target = folder / name
        if target.is_file() and target.read_bytes() == content:
            continue
        descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(content)
            os.chmod(temporary, 0o644)  # mkstemp makes it private; the WebUI may run as another user
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return folder


# -- text model ----------------------------------------------------------------------------------------------------

def _cond_stage_config(config_yaml: Mapping | None) -> Mapping:
    """`model.params.cond_stage_config` of an ldm config (a dict or OmegaConf object), or {} when absent."""
    if not config_yaml:
        return {}
    params = (config_yaml.get("model") or {}).get("params") or {}
    return params.get("cond_stage_config") or {}


def sd1_text_config(config_yaml: Mapping | None, search_dirs: Sequence[str | Path] = ()) \
        -> tuple[CLIPTextConfig, str]:
    """The text model config for a checkpoint and where it came from (for error messages).

    The yaml's `cond_stage_config.params.version` is what ldm's `FrozenCLIPEmbedder` hands to `from_pretrained`.
    When it names a local folder, that folder's config.json is the text config (AFA's tiny models name one, see
    `write_text_encoder_folder`; a local copy of openai/clip-vit-large-patch14 works too). A hub name (every SD1 yaml
    says openai/clip-vit-large-patch14), or no version or no yaml at all, means SD1's CLIP ViT-L/14 text config,
    written out in this module: nothing is ever read from the hub. Yamls AFA wrote before carry the text config
    inline as `clip_text_config` (the WebUI cannot build those); they are still read.

    :raises CheckpointError: `version` is a path (absolute, or starting with ".") that is not a folder, or its
        folder holds no readable config.json.
    :raises UnsupportedTextEncoderError: the yaml's text encoder is SD2's OpenCLIP.
    """
    cond_stage = _cond_stage_config(config_yaml)
    if "OpenCLIP" in str(cond_stage.get("target", "")):
        raise UnsupportedTextEncoderError(
            f"the config's text encoder is {cond_stage['target']} (SD2), but the checkpoint holds no OpenCLIP text "
            f"tower ({OPEN_CLIP_PREFIX}* keys)")
    params = cond_stage.get("params") or {}
    inline_text_config = params.get("clip_text_config")
    if inline_text_config:
        return CLIPTextConfig(**dict(inline_text_config)), "the yaml's cond_stage_config.params.clip_text_config"
    version = params.get("version")
    if version is not None and (os.path.isdir(str(version)) or os.path.isabs(str(version))
                                or str(version).startswith(".")):
        return _text_config_from_folder(Path(str(version)))
    for folder in search_dirs:  # a relative folder: the WebUI resolves it from its own directory
        candidate = Path(folder) / str(version)
        if version is not None and (candidate / TEXT_CONFIG_FILE).is_file():
            return _text_config_from_folder(candidate)
    return CLIPTextConfig(**SD1_CLIP_TEXT_CONFIG), SD1_CONFIG_SOURCE


SD1_CONFIG_SOURCE = "SD1's CLIP ViT-L/14 text config"
CLIP_HEAD_WIDTH = 64  # every CLIP text tower (ViT-B 512/8, ViT-L 768/12, ViT-H 1024/16, ViT-bigG 1280/20)


def inferred_text_config(tensors: Mapping[str, torch.Tensor], checkpoint_name: str = "checkpoint") \
        -> tuple[CLIPTextConfig, str]:
    """The CLIP text config the tensors (named as `CLIPTextModel.state_dict()` names them) have: width and vocabulary
    from the token embedding, context from the position embedding, layers and MLP width from the encoder; the head
    count, which shapes do not hold, by CLIP's convention of 64 channels per head.

    :raises CheckpointError: the width is not a multiple of 64 (no convention gives its heads), or a tensor the
        inference needs is missing.
    """
    try:
        vocab_size, hidden_size = tensors["text_model.embeddings.token_embedding.weight"].shape
        context_length = tensors["text_model.embeddings.position_embedding.weight"].shape[0]
        intermediate_size = tensors["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    except KeyError as error:
        raise CheckpointError(f"{checkpoint_name}: cannot infer its text encoder's config: {error} is missing") \
            from None
    layers = {key.split(".")[3] for key in tensors if key.startswith("text_model.encoder.layers.")}
    if hidden_size % CLIP_HEAD_WIDTH:
        raise CheckpointError(
            f"{checkpoint_name}: its text encoder is {hidden_size} wide, which gives no CLIP head count (64 channels "
            f"per head); give the checkpoint a yaml whose cond_stage_config.params.version names a folder holding "
            f"the encoder's config.json, as the WebUI needs too")
    config = dict(SD1_CLIP_TEXT_CONFIG, vocab_size=vocab_size, hidden_size=hidden_size,
                  intermediate_size=intermediate_size, num_hidden_layers=len(layers),
                  num_attention_heads=hidden_size // CLIP_HEAD_WIDTH, max_position_embeddings=context_length,
                  projection_dim=hidden_size)
    return CLIPTextConfig(**config), (f"the text config inferred from its tensors ({len(layers)} layers, width "
                                      f"{hidden_size}, {hidden_size // CLIP_HEAD_WIDTH} heads)")


def _text_config_from_folder(folder: Path) -> tuple[CLIPTextConfig, str]:
    """The text config in `folder`/config.json (the folder a yaml's `version` names), read without the hub."""
    config_file = folder / TEXT_CONFIG_FILE
    source = f"the text config {config_file} (the yaml's cond_stage_config.params.version)"
    if not config_file.is_file():
        what = "holds no config.json" if folder.is_dir() else "does not exist"
        raise CheckpointError(f"the yaml's cond_stage_config.params.version names the text encoder folder {folder}, "
                              f"which {what}")
    try:
        return CLIPTextConfig.from_pretrained(str(folder), local_files_only=True), source
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_file}: not a readable CLIP text config: {error}") from None


def text_encoder_state_dict(state_dict: Mapping[str, torch.Tensor], checkpoint_name: str = "checkpoint") \
        -> dict[str, torch.Tensor]:
    """The text encoder's tensors of a WebUI checkpoint, named as `CLIPTextModel.state_dict()` names them.

    :raises UnsupportedTextEncoderError: for SDXL checkpoints (their pair: training/sdxl_text.py).
    :raises CheckpointError: when the checkpoint holds no SD1 text encoder.
    """
    if any(key.startswith(SDXL_CONDITIONER_PREFIX) for key in state_dict):
        raise UnsupportedTextEncoderError(
            f"{checkpoint_name}: its text encoders are SDXL's pair ({SDXL_CONDITIONER_PREFIX}* keys), not one SD1 "
            "encoder: read them with training.sdxl_text.load_sdxl_text_encoders")
    tensors = {}
    for key, tensor in state_dict.items():
        for old_prefix, new_prefix in _OLD_TEXT_ENCODER_KEY_PREFIXES.items():
            if key.startswith(old_prefix):
                key = new_prefix + key[len(old_prefix):]
                break
        if key.startswith(TEXT_ENCODER_PREFIX):
            tensors[key[len(TEXT_ENCODER_PREFIX):]] = tensor
    if not tensors:
        raise CheckpointError(f"{checkpoint_name}: no SD1 text encoder in the checkpoint (no {TEXT_ENCODER_PREFIX}* "
                              "keys)")
    return tensors


def load_text_encoder(state_dict: Mapping[str, torch.Tensor], config_yaml: Mapping | None,
                      checkpoint_name: str = "checkpoint", search_dirs: Sequence[str | Path] = ()) -> torch.nn.Module:
    """The text encoder of an SD 1.x or SD 2.x WebUI checkpoint, frozen, in eval mode, float32, on the CPU: SD1's
    `CLIPTextModel`, or SD 2.x's OpenCLIP tower (`cond_stage_model.model.*`, training/open_clip_text.py).

    :param state_dict: the checkpoint's flat state dict (other models' keys are ignored). Text-encoder keys with or
        without `text_model.` (older checkpoints) are accepted; `position_ids` may be absent.
    :param config_yaml: the checkpoint's ldm config (parsed yaml), or None.
    :param checkpoint_name: names the checkpoint in error messages.
    :param search_dirs: where a relative `version` folder of the yaml is looked for (the WebUI's own directory,
        from which the WebUI resolves it, and the checkpoint's folder).
    :raises CheckpointError: when keys or shapes do not match the config (the message names the key and shapes).
    :raises UnsupportedTextEncoderError: for SDXL checkpoints (training/sdxl_text.py reads their pair), or an
        OpenCLIP yaml over a checkpoint without an OpenCLIP tower.
    """
    if any(key.startswith(OPEN_CLIP_PREFIX) for key in state_dict):  # SD 2.x
        from .open_clip_text import load_open_clip_text_encoder
        return load_open_clip_text_encoder({key[len(OPEN_CLIP_PREFIX):]: value for key, value in state_dict.items()
                                            if key.startswith(OPEN_CLIP_PREFIX)}, checkpoint_name)
    tensors = text_encoder_state_dict(state_dict, checkpoint_name)
    config, config_source = sd1_text_config(config_yaml, search_dirs)
    if config_source == SD1_CONFIG_SOURCE:
        # No folder names the encoder's config: ViT-L unless its own shapes say it is another CLIP text tower.
        shape_fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                        "max_position_embeddings")
        inferred, inferred_source = inferred_text_config(tensors, checkpoint_name)
        if any(getattr(inferred, name) != getattr(config, name) for name in shape_fields):
            config, config_source = inferred, inferred_source
    # Shapes come from a model built on the meta device (no memory, no weight init), so a mismatch is reported
    # before SD1's 123M parameters are allocated.
    with torch.device("meta"):
        expected = CLIPTextModel(config).state_dict()

    if _POSITION_IDS_KEY in expected and _POSITION_IDS_KEY not in tensors:
        # A constant (0..76, shape [1 x 77]) that many checkpoints omit.
        tensors[_POSITION_IDS_KEY] = torch.arange(config.max_position_embeddings).expand(1, -1)
    elif _POSITION_IDS_KEY not in expected:
        tensors.pop(_POSITION_IDS_KEY, None)  # transformers >= 4.31 no longer stores it
    elif not torch.equal(tensors[_POSITION_IDS_KEY].to(torch.int64).flatten(),
                         torch.arange(config.max_position_embeddings)):
        # Some merged checkpoints carry float position_ids that truncate to wrong positions. The WebUI loads them
        # as they are, so the trainer does too (its conditioning must match the WebUI's), and says so.
        logger.warning("%s: its text encoder's position_ids are not 0..%d; loading them anyway, as the WebUI does",
                       checkpoint_name, config.max_position_embeddings - 1)

    # Shapes first: a width mismatch (the usual wrong-config case) says more than the missing layers that come with it.
    for key, tensor in tensors.items():
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{checkpoint_name}: text encoder tensor {TEXT_ENCODER_PREFIX}{key} has shape {tuple(tensor.shape)}, "
                f"but {config_source} (hidden size {config.hidden_size}) needs {tuple(expected[key].shape)}")
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise CheckpointError(
            f"{checkpoint_name}: its text encoder does not match {config_source} "
            f"({config.num_hidden_layers} layers, hidden size {config.hidden_size}): "
            f"missing {len(missing)} keys {missing[:4]}, unexpected {len(unexpected)} keys {unexpected[:4]} "
            f"(names relative to {TEXT_ENCODER_PREFIX})")

    text_encoder = CLIPTextModel(config)
    # load_state_dict copies into the float32 parameters, so fp16/bf16 checkpoints are upcast here.
    text_encoder.load_state_dict(tensors, strict=True)
    return text_encoder.requires_grad_(False).eval()


def encode(text_encoder: torch.nn.Module, token_ids: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
    """The cross-attention context of tokenized prompts: SD1's CLIPTextModel, or SD 2.x's OpenCLIP tower
    (training/open_clip_text.py: the ids padded with 0 after EOS, the penultimate layer; CLIP skip does not apply,
    as in the WebUI).

    Like the WebUI, CLIP skip 1 (its default) is the final layer's output after `final_layer_norm`
    (`last_hidden_state`); CLIP skip n takes the n-th hidden state from the end and applies `final_layer_norm` to it.
    No attention mask is passed: SD1 attends to the EOS padding too (with CLIP's causal mask only).

    :param token_ids: LongTensor [B x 77] from `tokenize`.
    :return: [B x 77 x hidden] in the text encoder's dtype and device (hidden 768 for SD1); no gradient.
    """
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be at least 1, got {clip_skip}")
    if not isinstance(text_encoder, CLIPTextModel):  # SD 2.x's OpenCLIP tower: the WebUI ignores CLIP skip there
        from .open_clip_text import pad_after_end
        with torch.no_grad():
            return text_encoder.encode(pad_after_end(token_ids, END_OF_TEXT_ID))
    token_ids = token_ids.to(text_encoder.device)
    with torch.no_grad():
        if clip_skip == 1:
            return text_encoder(input_ids=token_ids).last_hidden_state
        hidden_states = text_encoder(input_ids=token_ids, output_hidden_states=True).hidden_states
        return text_encoder.text_model.final_layer_norm(hidden_states[-clip_skip])
