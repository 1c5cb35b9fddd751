"""Stand-in of modules/sd_hijack_open_clip.py (v1.10): the wrappers of SD 2.x's OpenCLIP text encoder
(`FrozenOpenCLIPEmbedderWithCustomWords`) and SDXL's (embedders.1, `FrozenOpenCLIPEmbedder2WithCustomWords`): the same chunks, emphasis and BREAK as SD1's wrapper (sd_hijack_clip),
open_clip's token ids (BPE of the same vocabulary; 0 padding after EOS), the layer the yaml names and the pooled
output of the first chunk. The tokenizer is CLIP's tokenizer of open_clip's vocabulary (training/text_encoder.py:
sd1_tokenizer), as open_clip's own package needs torchvision.
"""

import torch

from modules import sd_hijack_clip


class _OpenClipWords(sd_hijack_clip.FrozenCLIPEmbedderWithCustomWords):
    """What both wrappers share (the real ones derive from FrozenCLIPEmbedderWithCustomWordsBase)."""

    def __init__(self, wrapped, hijack):
        from training.text_encoder import sd1_tokenizer

        torch.nn.Module.__init__(self)
        self.hijack = hijack
        self.wrapped = wrapped
        self.chunk_length = 75
        self.is_trainable = getattr(wrapped, 'is_trainable', False)
        self.input_key = getattr(wrapped, 'input_key', 'txt')
        self.return_pooled = getattr(self.wrapped, 'return_pooled', False)
        self.legacy_ucg_val = None  # for sgm codebase

        self.tokenizer = sd1_tokenizer()
        vocab = self.tokenizer.get_vocab()
        self.comma_token = vocab.get(',</w>', None)
        self.id_start = self.tokenizer.bos_token_id
        self.id_end = self.tokenizer.eos_token_id
        self.id_pad = 0

    def tokenize(self, texts):
        return self.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]


# modules/sd_hijack_open_clip.py (v1.10): FrozenOpenCLIPEmbedderWithCustomWords (SD 2.x)
class FrozenOpenCLIPEmbedderWithCustomWords(_OpenClipWords):
    def encode_with_transformers(self, tokens):
        # set self.wrapped.layer_idx here according to opts.CLIP_stop_at_last_layers
        z = self.wrapped.encode_with_transformer(tokens)

        return z


# modules/sd_hijack_open_clip.py (v1.10): FrozenOpenCLIPEmbedder2WithCustomWords (SDXL's embedders.1)
class FrozenOpenCLIPEmbedder2WithCustomWords(_OpenClipWords):
    def encode_with_transformers(self, tokens):
        d = self.wrapped.encode_with_transformer(tokens)
        z = d[self.wrapped.layer]

        pooled = d.get("pooled")
        if pooled is not None:
            z.pooled = pooled

        return z
