"""Per-member text conditioning in the WebUI: member i's cross-attention reads the prompt as member i's own text
encoder encodes it, as in the authors' code (SABW reads the mean of the encodings: afa.ensemble).

The encodings come from the WebUI's own conditioning, never a re-implementation: while an AFA job runs, the loaded
model's `get_learned_conditioning` (what prompt_parser calls for every prompt, negative prompt, prompt-editing step
and AND part, v1.10) is wrapped. The wrapper returns the WebUI's result unchanged and, for each distinct member
encoder, runs the same call again with that member's weights copied into the loaded text encoder (and the loaded
weights copied back right after). Emphasis, chunks of 75 tokens, CLIP skip, textual-inversion embeddings, prompt
editing and AND are therefore what the WebUI makes of them, for every member.

At a UNet call the context is [B x 77k x D]: the WebUI encodes each 75-token chunk on its own (77 with BOS/EOS) and
concatenates them; it pads a shorter cond or uncond with the empty prompt's chunk, and lengthens the shorter parts
of an AND prompt by repeating their last token vector. So the loaded encoding is looked up chunk by chunk (exact
equality, after the cast the WebUI applies before the UNet) in a table filled by the wrapper, each member gets its
own chunks, and a repeated last vector is repeated from each member's own. A chunk that is not in the table
(another extension made the conditioning) keeps the loaded encoding for every member, and the job's infotext says
so.

SDXL: the conditioning is a dict, {"crossattn": [B x 77k x D], "vector": [B x adm]}, of the `conditioner`'s two
text encoders (both are swapped for a member's pass) and the size embeddings. Its context is mapped chunk by chunk
as above, and its `y` row by row (exact equality): each member's label embedding reads the row the same prompt and
sizes gave with its own encoders.

Members whose encoder equals the loaded one (the loaded checkpoint itself, or a fine-tune that kept its text
encoder) read the loaded encoding and cost nothing. The rest cost one extra text-encoder pass each per prompt, and
their weights in RAM (SD 1.x: 123M parameters, 0.25 GB in fp16; SDXL's pair: 817M, 1.6 GB).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from modules import devices, sd_models

TEXT_ENCODER_PREFIX = "cond_stage_model."
SDXL_TEXT_ENCODER_PREFIX = "conditioner."
CHUNK_TOKENS = 77  # tokens per encoded chunk: BOS + 75 + EOS (sd_hijack_clip, v1.10)

PER_MEMBER, SHARED = "per_member", "shared"


def text_encoder_module(sd_model) -> torch.nn.Module | None:
    """The loaded model's text encoder(s) as the checkpoint names them (keys relative to `text_encoder_prefix`): the
    module the WebUI's hijack wraps (ldm's FrozenCLIPEmbedder for SD 1.x, FrozenOpenCLIPEmbedder for SD 2.x), or
    SDXL's `conditioner` (sgm's GeneralConditioner, whose embedders the hijack wraps in place). None for a model
    without either."""
    if getattr(sd_model, "is_sdxl", False):
        return getattr(sd_model, "conditioner", None)
    cond_stage = getattr(sd_model, "cond_stage_model", None)
    if cond_stage is None:
        return None
    return getattr(cond_stage, "wrapped", cond_stage)


def text_encoder_prefix(sd_model) -> str:
    """Where the checkpoint keeps the tensors of `text_encoder_module`."""
    return SDXL_TEXT_ENCODER_PREFIX if getattr(sd_model, "is_sdxl", False) else TEXT_ENCODER_PREFIX


def _checkpoint_name(name: str) -> str:
    """A module path under its checkpoint name: the hijack wraps the token embedding in `EmbeddingsWithFixes`
    (sd_hijack.py, v1.10), which adds a `.wrapped` level the checkpoint does not have."""
    return ".".join(part for part in name.split(".") if part != "wrapped")


def checkpoint_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The module's parameters under their checkpoint names."""
    return {_checkpoint_name(name): parameter for name, parameter in module.named_parameters()}


_LORA_STATE = ("network_current_names", "network_weights_backup", "network_bias_backup")
"""What the built-in Lora extension keeps on a layer it merges into (networks.py v1.10)."""


def _member_backup(module: torch.nn.Module, name: str, encoder: dict[str, torch.Tensor]):
    """A member's weights in the form of the layer's `network_weights_backup` (a tuple for MultiheadAttention)."""
    if isinstance(module, torch.nn.MultiheadAttention):
        return (encoder[f"{name}.in_proj_weight"].clone(), encoder[f"{name}.out_proj.weight"].clone())
    return encoder[f"{name}.weight"].clone()


def _exchange(first: torch.Tensor, second: torch.Tensor) -> None:
    """Exchanges the values of two tensors of one shape and dtype in place (each keeps its storage and device)."""
    held = first.detach().clone()
    first.copy_(second)
    second.copy_(held)


def checkpoint_key(key: str) -> str:
    """A text-encoder key as the WebUI loads it (old SD 1.x files lack `text_model.`: sd_models.py, v1.10)."""
    return sd_models.transform_checkpoint_dict_key(key, sd_models.checkpoint_dict_replacements_sd1)


@dataclass
class MemberText:
    """What one member's cross-attention reads: `slot` indexes the distinct member encoders, None = the loaded
    encoding. `note` says why a member with an encoder of its own reads the loaded one."""

    slot: int | None
    note: str | None = None


def plan_member_texts(module: torch.nn.Module, member_tensors: list[dict[str, torch.Tensor] | None],
                      labels: list[str], prefix: str = TEXT_ENCODER_PREFIX) \
        -> tuple[list[MemberText], list[dict[str, torch.Tensor]]]:
    """Groups the members by text encoder.

    Args:
        module: the loaded text encoder (`text_encoder_module`).
        member_tensors: per member, its checkpoint's text-encoder tensors (full keys starting with `prefix`,
            `text_encoder_prefix`), or None for a member that is the loaded checkpoint.
        labels: the members' names, for the notes.
    Returns:
        (one MemberText per member, the distinct encoders' tensors in the loaded parameters' names, dtypes, on CPU).
    """
    parameters = checkpoint_parameters(module)
    distinct: list[dict[str, torch.Tensor]] = []
    texts = []
    for label, tensors in zip(labels, member_tensors):
        if tensors is None:
            texts.append(MemberText(None))
            continue
        tensors = {checkpoint_key(key)[len(prefix):]: value for key, value in tensors.items()}
        missing = sorted(name for name in parameters if name not in tensors)
        mismatched = sorted(name for name, parameter in parameters.items()
                            if name in tensors and tuple(tensors[name].shape) != tuple(parameter.shape))
        if missing or mismatched:
            what = (f"lacks {len(missing)} of its tensors ({missing[0]}, ...)" if missing else
                    f"has other shapes ({mismatched[0]}: {tuple(tensors[mismatched[0]].shape)} vs "
                    f"{tuple(parameters[mismatched[0]].shape)})")
            texts.append(MemberText(None, f"{label}: its checkpoint's text encoder {what} than the loaded model's; "
                                          f"it reads the loaded model's encoding"))
            continue
        own = {name: tensors[name].to(device="cpu", dtype=parameter.dtype) for name, parameter in parameters.items()}
        if all(torch.equal(own[name], parameter.detach().cpu()) for name, parameter in parameters.items()):
            texts.append(MemberText(None))  # the loaded encoder: nothing to run
            continue
        for slot, other in enumerate(distinct):
            if all(torch.equal(own[name], other[name]) for name in own):
                texts.append(MemberText(slot))
                break
        else:
            distinct.append(own)
            texts.append(MemberText(len(distinct) - 1))
    return texts, distinct


class MemberTextConditioning:
    """The text side of one AFA SdUnet: wraps the loaded model's conditioning while the ensemble is active and maps
    the loaded encoding of each UNet call to every member's.

    Attributes:
        texts: one MemberText per member.
        unmatched_chunks: chunks of UNet contexts that were not found in the table (they kept the loaded encoding).
    """

    def __init__(self, sd_model, texts: list[MemberText], encoders: list[dict[str, torch.Tensor]]):
        self.sd_model = sd_model
        self.texts = texts
        self.encoders = encoders
        self.module = text_encoder_module(sd_model)
        self.parameters = checkpoint_parameters(self.module)
        self.lora_modules = {_checkpoint_name(name): module for name, module in self.module.named_modules()
                             if getattr(module, "network_layer_name", None) is not None}
        self.keys: list[torch.Tensor] = []  # loaded chunks [77 x D]
        self.values: list[list[torch.Tensor]] = [[] for _ in encoders]  # per distinct encoder, its chunks
        self._stacked: dict[tuple, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        # SDXL's `y`: loaded rows [adm] and, per distinct encoder, the rows of the same prompts
        self.vector_keys: list[torch.Tensor] = []
        self.vector_values: list[list[torch.Tensor]] = [[] for _ in encoders]
        self.unmatched_chunks = 0
        self._original = None

    @property
    def needed(self) -> bool:
        """Whether any member reads an encoding other than the loaded one."""
        return bool(self.encoders)

    # -- the conditioning wrapper ------------------------------------------------------------------------------------

    def install(self) -> None:
        """Wraps `sd_model.get_learned_conditioning` (an instance attribute shadowing the class's method) and
        encodes the empty prompt, which the WebUI uses to pad cond and uncond to one length."""
        if not self.needed or self._original is not None:
            return
        self._original = self.sd_model.get_learned_conditioning
        self.sd_model.get_learned_conditioning = self.get_learned_conditioning
        empty = getattr(self.sd_model, "cond_stage_model_empty_prompt", None)
        with devices.autocast(), torch.no_grad():
            loaded = self.get_learned_conditioning([""])
        if isinstance(loaded, dict):  # SDXL: the empty prompt's padding is its context
            loaded = loaded["crossattn"]
        if isinstance(empty, torch.Tensor) and not torch.equal(empty.to(loaded.device, loaded.dtype), loaded):
            # computed at model load, maybe under another autocast: its exact values map to the same member chunks
            self._remember(empty, [chunks[-1] for chunks in self.values])

    def uninstall(self) -> None:
        if self._original is None:
            return
        if vars(self.sd_model).get("get_learned_conditioning") == self.get_learned_conditioning:
            del self.sd_model.get_learned_conditioning
        self._original = None

    def get_learned_conditioning(self, texts):
        """The WebUI's conditioning of `texts` [B x 77k x D] (SDXL: {"crossattn", "vector"}), unchanged; each
        distinct member encoder's is kept."""
        loaded = self._original(texts)
        if not isinstance(loaded, (torch.Tensor, dict)):
            return loaded
        members = []
        for encoder in self.encoders:
            with self._weights(encoder):
                members.append(self._original(texts))
        if isinstance(loaded, dict):
            self._remember(loaded["crossattn"], [member["crossattn"] for member in members])
            self._remember_vectors(loaded["vector"], [member["vector"] for member in members])
        else:
            self._remember(loaded, members)
        return loaded

    @contextlib.contextmanager
    def _weights(self, encoder: dict[str, torch.Tensor]):
        """The loaded text encoder with a member's weights for one pass; on exit (also on errors) every parameter
        and the Lora extension's state get back exactly what they held, and so does `encoder`. The values move
        into the parameters wherever they are (--lowvram moves the encoder to the GPU only while it runs).

        Without a LoRA merged into the loaded encoder, each parameter exchanges its values with the member's tensor
        (the loaded weights wait in the member's tensors during the pass): one tensor's temporary at a time, where a
        copy of the loaded encoder would take its full size (0.46 GiB for SD 1.x in fp32) at every prompt, memory
        the allocator keeps from the OS after the job.

        Prompt LoRAs: the built-in Lora extension merges a LoRA into a layer's weight on its first forward and keeps
        the unmerged weight as `network_weights_backup` (networks.py v1.10: network_apply_weights). Then the loaded
        (merged) weights are copied aside and the member's copied in; the backups become the member's weights and
        the layers are marked unmerged, so Lora merges the same LoRA into the member's weights; afterwards the
        loaded merged weights, backups and marks are put back."""
        lora_states = {name: (module, {key: getattr(module, key) for key in _LORA_STATE if hasattr(module, key)})
                       for name, module in self.lora_modules.items()}
        merged = any(state.get("network_current_names") for _, state in lora_states.values())
        saved = {name: parameter.detach().clone() for name, parameter in self.parameters.items()} if merged else {}
        exchanged = []
        try:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    if merged:
                        parameter.copy_(encoder[name])
                    else:
                        _exchange(parameter, encoder[name])
                        exchanged.append(name)
            for name, (module, state) in lora_states.items() if merged else ():
                if state.get("network_weights_backup") is not None:
                    module.network_weights_backup = _member_backup(module, name, encoder)
                    bias = encoder.get(f"{name}.bias")
                    if state.get("network_bias_backup") is not None and bias is not None:
                        module.network_bias_backup = bias.to(state["network_bias_backup"].dtype)
                module.network_current_names = ()
            yield
        finally:
            with torch.no_grad():
                for name in reversed(exchanged):
                    _exchange(self.parameters[name], encoder[name])
                for name, parameter in self.parameters.items() if merged else ():
                    parameter.copy_(saved[name])
            for module, state in lora_states.values() if merged else ():
                for key in _LORA_STATE:
                    if key in state:
                        setattr(module, key, state[key])
                    elif hasattr(module, key):
                        delattr(module, key)

    def _remember(self, loaded: torch.Tensor, members: list[torch.Tensor]) -> None:
        """Adds the chunks of encodings [B x 77k x D] (loaded, and the same prompts per distinct encoder)."""
        if loaded.dim() == 2:
            loaded, members = loaded[None], [m[None] for m in members]
        if loaded.shape[1] % CHUNK_TOKENS:
            return
        loaded_chunks = loaded.detach().reshape(-1, CHUNK_TOKENS, loaded.shape[-1])
        member_chunks = [m.detach().reshape(-1, CHUNK_TOKENS, m.shape[-1]) for m in members]
        for index in range(loaded_chunks.shape[0]):
            self.keys.append(loaded_chunks[index])
            for slot, chunks in enumerate(member_chunks):
                self.values[slot].append(chunks[index])
        self._stacked.clear()

    def _remember_vectors(self, loaded: torch.Tensor, members: list[torch.Tensor]) -> None:
        """Adds SDXL's `y` rows [B x adm] (loaded, and the same prompts and sizes per distinct encoder)."""
        for index in range(loaded.shape[0]):
            self.vector_keys.append(loaded[index].detach())
            for slot, vectors in enumerate(members):
                self.vector_values[slot].append(vectors[index].detach())
        self._stacked.clear()

    # -- the UNet call -----------------------------------------------------------------------------------------------

    def member_vectors(self, y: torch.Tensor | None) -> list[torch.Tensor] | None:
        """SDXL's y [B x adm] (the loaded conditioning's, as the UNet gets it) -> one per member, each [B x adm]: a
        row is looked up (exact equality, after the same cast) among the rows the wrapper kept; a row not found
        keeps the loaded one for every member (counted in `unmatched_chunks`). None without y or a vector table."""
        if y is None or not self.vector_keys:
            return None
        keys, values = self._stacked_rows(y.dtype, y.device)
        per_slot = [y.clone() for _ in values]
        for row in range(y.shape[0]):
            hits = (keys == y[row].reshape(1, -1)).all(dim=1).nonzero()
            if not len(hits):
                self.unmatched_chunks += 1
                continue
            for member, table in zip(per_slot, values):
                member[row] = table[int(hits[0])]
        return [y if text.slot is None else per_slot[text.slot] for text in self.texts]

    def _stacked_rows(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        key = ("vector", dtype, device)
        if key not in self._stacked:
            def stack(rows):
                return torch.stack([r.to(device=device, dtype=dtype) for r in rows])
            self._stacked[key] = stack(self.vector_keys), [stack(rows) for rows in self.vector_values]
        return self._stacked[key]

    def member_contexts(self, context: torch.Tensor) -> list[torch.Tensor]:
        """context [B x 77k x D] (the loaded encoding, as the UNet gets it) -> one context per member, each
        [B x 77k x D]; members that read the loaded encoding get `context` itself, members sharing an encoder share
        one tensor."""
        per_slot = self._contexts_by_slot(context) if self.needed else []
        return [context if text.slot is None else per_slot[text.slot] for text in self.texts]

    def _contexts_by_slot(self, context: torch.Tensor) -> list[torch.Tensor]:
        batch, length, width = context.shape
        if length % CHUNK_TOKENS or not self.keys:
            self.unmatched_chunks += batch * max(1, length // CHUNK_TOKENS)
            return [context] * len(self.encoders)
        keys, values = self._stacked_table(context.dtype, context.device)
        chunks = context.reshape(batch, length // CHUNK_TOKENS, CHUNK_TOKENS, width)
        contexts = [torch.empty_like(chunks) for _ in values]
        for row in range(batch):
            for index in range(chunks.shape[1]):
                chunk = chunks[row, index]
                hits = (keys == chunk.reshape(1, -1)).all(dim=1).nonzero()
                if len(hits):
                    for member, table in zip(contexts, values):
                        member[row, index] = table[int(hits[0])].reshape(CHUNK_TOKENS, width)
                elif index > 0 and bool((chunk == chunks[row, index - 1, -1]).all()):
                    # prompt_parser's stack_conds (and the v0 cond/uncond padding) lengthen a shorter conditioning
                    # by repeating its last token vector: each member repeats its own
                    for member in contexts:
                        member[row, index] = member[row, index - 1, -1]
                else:
                    self.unmatched_chunks += 1
                    for member in contexts:
                        member[row, index] = chunk
        return [member.reshape(batch, length, width) for member in contexts]

    def _stacked_table(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The table as [M x 77*D] tensors in the context's dtype and device (the WebUI casts the conditioning to
        the UNet's dtype before the UNet; the same cast of the table gives the same values)."""
        key = (dtype, device)
        if key not in self._stacked:
            def stack(chunks):
                return torch.stack([c.to(device=device, dtype=dtype) for c in chunks]).flatten(1)
            self._stacked[key] = stack(self.keys), [stack(chunks) for chunks in self.values]
        return self._stacked[key]
