"""The merge baselines of the evaluation: a weighted merge and MBW, their weights chosen on validation data.

A user with N checkpoints can merge them (one UNet at inference) instead of ensembling them with AFA (N UNets), so
the evaluation shows the best merges it can find beside AFA (the paper's Weighted Merging and MBW, Tables 2 and 8):

* weighted merge: one weight vector for the whole model. Two members: the ratio r of (1 - r) A + r B, the best of a
  few ratios (default 0.1, 0.2, ..., 0.9; 0 and 1 are the members' own rows). More members: the uniform average
  and every leave-one-out average (the others, uniformly), the best of them.
* MBW: one weight vector per MBW block (afa.merge: 25 for SD 1.x/2.x, 19 for SDXL, plus BASE, the text encoder's,
  when the members carry different text encoders), by coordinate descent from the weighted merge's weights: each
  block in turn tries every candidate (two members: the ratios 0, 0.25, 0.5, 0.75, 1; more: the weighted merge's
  candidates and each member alone) and keeps the best, for a number of sweeps over the blocks.

A candidate's score is the denoising error (MSE of the eps/v prediction, training/metrics.py's measure) on fixed
validation draws -- the same draws for every candidate, drawn with their own key (MERGE_SEARCH_EPOCH) so they are
not the table's. Each merge is held in one preallocated copy of a member (afa.merge.MergedModel), rewritten in place
for every candidate (MBW: only the block that changed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from afa.comparison import MBW, WEIGHTED_MERGE
from afa.errors import AfaError
from afa.merge import MergedModel, Weights, mbw_block_names, ratio_weights

from .diffusion import VALIDATION_EPOCH, NoiseSchedule, per_sample_mse
from .metrics import encode_for_members, prepare_batch, reads_captions
from .text_encoder import tokenize

MERGE_SEARCH_EPOCH = VALIDATION_EPOCH - 1
"""The draw key ("epoch") of the search's validation draws: apart from the table's (VALIDATION_EPOCH)."""
MERGE_BASELINES = ("all", "weighted", "none")
"""What --merge-baselines takes: both merges (MBW starts from the weighted merge's ratio), the weighted merge, none."""
DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_MBW_RATIOS = (0.0, 0.25, 0.5, 0.75, 1.0)
TEXT_ENCODER_BLOCK = "BASE"  # the MBW tools' name of the text encoder's ratio


@dataclass(frozen=True)
class Candidate:
    """A weight vector to try, and how the table names it ("r=0.40", "uniform", "without cool-expert")."""

    label: str
    weights: Weights


def format_ratio(ratio: float) -> str:
    return f"r={ratio:.2f}"


def weighted_merge_candidates(member_names: Sequence[str], ratios: Sequence[float] = DEFAULT_RATIOS) \
        -> list[Candidate]:
    """Two members: one candidate per ratio r, (1 - r) of the first and r of the second. More: the uniform
    average and each leave-one-out average."""
    count = len(member_names)
    if count == 2:
        return [Candidate(format_ratio(ratio), ratio_weights(ratio)) for ratio in ratios]
    candidates = [Candidate("uniform", (1.0 / count,) * count)]
    for left_out, name in enumerate(member_names):
        candidates.append(Candidate(f"without {name}", tuple(0.0 if index == left_out else 1.0 / (count - 1)
                                                              for index in range(count))))
    return candidates


def mbw_candidates(member_names: Sequence[str], ratios: Sequence[float] = DEFAULT_MBW_RATIOS) -> list[Candidate]:
    """What each MBW block may take: two members, the ratios; more, the weighted merge's candidates and each member
    alone."""
    count = len(member_names)
    if count == 2:
        return [Candidate(format_ratio(ratio), ratio_weights(ratio)) for ratio in ratios]
    alone = [Candidate(name, tuple(float(index == member) for index in range(count)))
             for member, name in enumerate(member_names)]
    return weighted_merge_candidates(member_names) + alone


# -- scoring -------------------------------------------------------------------------------------------------------

class ValidationScorer:
    """The mean denoising error of one model (a merge) on fixed validation batches.

    Args:
        batches: prepared once (`prepare_validation_batches`): per batch "noisy", "target" [B x C x h x w],
            "timesteps" [B], "captions" (B texts), "sizes" [B x 6] or None, and the first member's "context"
            [B x 77 x D] and "vector" [B x adm] or None -- what a merge reads when the members share one text encoder.
        clip_skip: of the text encodings.
    """

    def __init__(self, batches: list[dict], clip_skip: int = 1):
        self.batches = batches
        self.clip_skip = clip_skip
        self.evaluations = 0
        self._encoded: dict[int, tuple[object, torch.Tensor, torch.Tensor | None]] = {}

    @property
    def samples(self) -> int:
        return sum(int(batch["timesteps"].shape[0]) for batch in self.batches)

    @torch.no_grad()
    def _conditioning(self, index: int, text_encoder: nn.Module | None, text_key: object):
        batch = self.batches[index]
        if text_encoder is None:  # the members share one encoder: its encoding, computed once
            return batch["context"], batch["vector"]
        cached = self._encoded.get(index)
        if cached is None or cached[0] != text_key:  # the merged encoder's weights changed: encode again
            contexts, vectors = encode_for_members([text_encoder], tokenize(batch["captions"]), self.clip_skip,
                                                   batch["sizes"])
            cached = (text_key, contexts[0], vectors[0] if vectors is not None else None)
            self._encoded[index] = cached
        return cached[1], cached[2]

    @torch.no_grad()
    def __call__(self, unet: nn.Module, text_encoder: nn.Module | None = None, text_key: object = None) -> float:
        """The mean squared error of `unet` reading `text_encoder`'s encodings (None: the shared encoder's);
        `text_key` names the text encoder's current weights, so its encodings are recomputed only when it changes."""
        total, count = 0.0, 0
        for index, batch in enumerate(self.batches):
            context, vector = self._conditioning(index, text_encoder, text_key)
            prediction = unet(batch["noisy"], batch["timesteps"], context, y=vector)
            total += per_sample_mse(prediction, batch["target"]).sum().item()
            count += int(batch["timesteps"].shape[0])
        self.evaluations += 1
        return total / count


@torch.no_grad()
def prepare_validation_batches(loader: Iterable[dict], vae, text_encoders: Sequence[nn.Module],
                               schedule: NoiseSchedule, seed: int, device: torch.device, clip_skip: int = 1) \
        -> list[dict]:
    """The search's validation batches (ValidationScorer's form) from batches of training/data.py's `collate`, with
    the draws of MERGE_SEARCH_EPOCH (not the table's)."""
    prepared = []
    for batch in loader:
        if not batch["indices"]:
            continue
        inputs = prepare_batch(batch, vae, text_encoders[:1], schedule, seed, device, epoch=MERGE_SEARCH_EPOCH,
                               clip_skip=clip_skip)
        sizes = batch.get("sizes")
        prepared.append({
            "noisy": inputs["noisy"], "timesteps": inputs["timesteps"], "target": inputs["target"],
            "captions": list(batch["captions"]), "sizes": sizes.to(device) if sizes is not None else None,
            "context": inputs["member_contexts"][0],
            "vector": inputs["member_vectors"][0] if inputs["member_vectors"] is not None else None})
    return prepared


# -- the merges ----------------------------------------------------------------------------------------------------

@dataclass
class Merge:
    """A merge baseline and how it was found.

    Attributes:
        row: its row in the table, e.g. "weighted merge (r=0.40)", "MBW".
        kind: WEIGHTED_MERGE or MBW.
        unet: the merged UNet (MergedModel.model holds it).
        text: the merged text encoder, or None when the members share one (the merge then reads it).
        label: its weights in words ("r=0.40"; MBW: each block's).
        weights: per MBW block (UNet blocks in forward order, then BASE when the text encoders merge).
        losses: validation error of each candidate tried (weighted merge) or after each sweep (MBW).
        search_seconds: the search, merging included; merge_seconds: the merge arithmetic alone.
    """

    row: str
    kind: str
    unet: MergedModel
    text: MergedModel | None
    label: str
    weights: list[Weights]
    losses: dict[str, float]
    evaluations: int
    search_seconds: float
    merge_seconds: float
    description: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def text_encoder(self) -> nn.Module | None:
        return self.text.model if self.text is not None else None

    @property
    def nbytes(self) -> int:
        """The merge's own memory: its UNet copy, and its text encoder copy when the text encoders merge."""
        return self.unet.nbytes + (self.text.nbytes if self.text is not None else 0)

    def summary(self) -> dict:
        """What evaluation.json records of it."""
        return {"row": self.row, "kind": self.kind, "label": self.label,
                "weights": [list(weights) for weights in self.weights], "validation_losses": self.losses,
                "validation_error": min(self.losses.values()),
                "evaluations": self.evaluations, "search_seconds": round(self.search_seconds, 2),
                "merge_seconds": round(self.merge_seconds, 3), "extra_memory_bytes": self.nbytes,
                "search": self.description, **self.extra}


class _Timed:
    """Adds up the time spent in merge arithmetic."""

    def __init__(self):
        self.seconds = 0.0

    def set(self, merge: MergedModel | None, weights) -> None:
        if merge is None:
            return
        started = time.perf_counter()
        merge.set_weights(weights)
        self.seconds += time.perf_counter() - started


def text_merge_for(text_encoders: Sequence[nn.Module]) -> MergedModel | None:
    """A merge of the members' text encoders, or None, and the merge then reads the first member's encoder unchanged:
    when they share one module (identical weights: sd_checkpoint.load_text_encoders gives them one object), or when
    they are a host's own encoders that read the captions as text (ComfyUI's CLIPs, afa/comfyui/training.py), which
    are not modules this merges in place (a ComfyUI user merging MODELs with ModelMergeSimple keeps one CLIP too)."""
    if len({id(encoder) for encoder in text_encoders}) == 1 or any(reads_captions(encoder)
                                                                  for encoder in text_encoders):
        return None
    return MergedModel(text_encoders)


def search_weighted_merge(members: Sequence[nn.Module], text_encoders: Sequence[nn.Module],
                          member_names: Sequence[str], scorer: ValidationScorer,
                          ratios: Sequence[float] = DEFAULT_RATIOS) -> Merge:
    """The weighted merge with the lowest validation error among `weighted_merge_candidates`; the text encoders
    (when they differ) are merged with the same weights, as the merge tools' single ratio does."""
    started, timer, evaluations = time.perf_counter(), _Timed(), scorer.evaluations
    unet, text = MergedModel.of_unets(members), text_merge_for(text_encoders)
    candidates = weighted_merge_candidates(member_names, ratios)
    losses = {}
    for candidate in candidates:
        timer.set(unet, candidate.weights)
        timer.set(text, candidate.weights)
        losses[candidate.label] = scorer(unet.model, text.model if text else None, candidate.weights)
    best = min(candidates, key=lambda candidate: losses[candidate.label])
    timer.set(unet, best.weights)
    timer.set(text, best.weights)
    if len(member_names) == 2:
        space = (f"(1-r)·{member_names[0]} + r·{member_names[1]}, r the best of "
                 f"{', '.join(f'{ratio:g}' for ratio in ratios)}")
    else:
        space = "the best of the uniform average and each leave-one-out average"
    description = (f"{space} on {scorer.samples} validation samples ({len(candidates)} evaluations"
                   + (", text encoders merged with the same weights" if text else "") + ")")
    weights = [best.weights] * (unet.num_groups + (1 if text else 0))
    return Merge(f"{WEIGHTED_MERGE} ({best.label})", WEIGHTED_MERGE, unet, text, best.label, weights, losses,
                 scorer.evaluations - evaluations, time.perf_counter() - started, timer.seconds, description)


def search_mbw(members: Sequence[nn.Module], text_encoders: Sequence[nn.Module], member_names: Sequence[str],
               scorer: ValidationScorer, start: Weights, ratios: Sequence[float] = DEFAULT_MBW_RATIOS,
               sweeps: int = 1) -> Merge:
    """MBW by coordinate descent: from `start` in every block (the weighted merge's weights), each block in forward
    order (then BASE, the text encoder, when the members' differ) tries every candidate of `mbw_candidates` and
    keeps the one with the lowest validation error (ties keep the current); `sweeps` passes over the blocks."""
    started, timer, evaluations = time.perf_counter(), _Timed(), scorer.evaluations
    unet, text = MergedModel.of_unets(members), text_merge_for(text_encoders)
    candidates = mbw_candidates(member_names, ratios)
    names = list(mbw_block_names((unet.num_groups - 1) // 2)) + ([TEXT_ENCODER_BLOCK] if text else [])
    block_weights = [start] * unet.num_groups
    text_weights = start
    timer.set(unet, block_weights)
    timer.set(text, text_weights)

    def score() -> float:
        return scorer(unet.model, text.model if text else None, text_weights)

    best_loss = score()
    losses = {"start": best_loss}
    for sweep in range(sweeps):
        for block, name in enumerate(names):
            current = text_weights if name == TEXT_ENCODER_BLOCK else block_weights[block]
            scored = current  # its error is best_loss already
            for candidate in candidates:
                if candidate.weights == scored:
                    continue
                if name == TEXT_ENCODER_BLOCK:
                    text_weights = candidate.weights
                    timer.set(text, text_weights)
                else:
                    block_weights[block] = candidate.weights
                    timer.set(unet, block_weights)
                loss = score()
                if loss < best_loss:
                    best_loss, current = loss, candidate.weights
            if name == TEXT_ENCODER_BLOCK:  # back to the best found
                text_weights = current
                timer.set(text, text_weights)
            else:
                block_weights[block] = current
                timer.set(unet, block_weights)
        losses[f"sweep {sweep + 1}"] = best_loss
    weights = block_weights + ([text_weights] if text else [])
    label_of = {candidate.weights: candidate.label for candidate in candidates}
    label_of.setdefault(start, format_ratio(start[1]) if len(member_names) == 2 else "start")
    label = ", ".join(f"{name} {label_of.get(block, block)}" for name, block in zip(names, weights))
    space = (f"ratios {', '.join(f'{ratio:g}' for ratio in ratios)}" if len(member_names) == 2
             else "uniform, leave-one-out or one member")
    description = (f"{len(names)} blocks ({names[0]}..{names[-1]}) by coordinate descent from the weighted merge, "
                   f"{space} per block, {sweeps} sweep{'s' if sweeps != 1 else ''} on {scorer.samples} validation "
                   f"samples ({scorer.evaluations - evaluations} evaluations)")
    return Merge(MBW, MBW, unet, text, label, weights, losses, scorer.evaluations - evaluations,
                 time.perf_counter() - started, timer.seconds, description, {"blocks": names})


def search_merges(members: Sequence[nn.Module], text_encoders: Sequence[nn.Module], member_names: Sequence[str],
                  scorer: ValidationScorer, baselines: str = "all", ratios: Sequence[float] = DEFAULT_RATIOS,
                  mbw_ratios: Sequence[float] = DEFAULT_MBW_RATIOS, mbw_sweeps: int = 1) -> Iterator[Merge]:
    """The merges of `baselines` (MERGE_BASELINES), one at a time: the weighted merge, then (with "all") MBW
    searched from its weights. The weighted merge's copy is let go before MBW allocates its own, so a caller that
    drops each merge before asking for the next holds one extra UNet at a time."""
    if baselines not in MERGE_BASELINES:
        raise ValueError(f"merge baselines are one of {', '.join(MERGE_BASELINES)}, got {baselines!r}")
    if baselines == "none":
        return
    weighted = search_weighted_merge(members, text_encoders, member_names, scorer, ratios)
    start = weighted.weights[0]
    yield weighted
    weighted = None  # noqa: F841 -- the generator's own reference, before MBW's copy exists
    if baselines == "all":
        yield search_mbw(members, text_encoders, member_names, scorer, start, mbw_ratios, mbw_sweeps)


def restore_merges(summaries: Sequence[dict], members: Sequence[nn.Module],
                   text_encoders: Sequence[nn.Module]) -> list[Merge]:
    """The merges of an earlier search, rebuilt on `members` from their `Merge.summary`s (evaluate.py's merges.json)
    with the weights found then: no search. Row, losses, evaluations and times stay the search's.

    Raises:
        AfaError: a summary whose weights do not fit these members (another member count, or MBW blocks of another
            family, or a text encoder ratio where the members share one encoder, or none where they differ).
    """
    merges = []
    for summary in summaries:
        unet, text = MergedModel.of_unets(members), text_merge_for(text_encoders)
        weights = [tuple(float(weight) for weight in group) for group in summary["weights"]]
        expected = unet.num_groups + (1 if text is not None else 0)
        if len(weights) != expected or any(len(group) != len(members) for group in weights):
            takes = (f"{expected} vectors ({unet.num_groups} UNet blocks"
                     + (" and BASE: their text encoders differ)" if text is not None else "; one text encoder)"))
            raise AfaError(f"{summary['row']} in the merges file has {len(weights)} weight vectors of "
                           f"{'/'.join(str(size) for size in sorted({len(group) for group in weights}))} members; "
                           f"these {len(members)} members take {takes}")
        unet.set_weights(weights[:unet.num_groups])
        if text is not None:
            text.set_weights(weights[unet.num_groups])
        extra = {key: summary[key] for key in ("blocks",) if key in summary}
        merges.append(Merge(summary["row"], summary["kind"], unet, text, summary["label"], weights,
                            dict(summary["validation_losses"]), summary["evaluations"], summary["search_seconds"],
                            summary["merge_seconds"], summary["search"], extra))
    return merges


def merged_text_encoders(text_encoders: Sequence[nn.Module], merges: Sequence[Merge]) -> list[nn.Module]:
    """The text encoders a table encodes each prompt with: each member's, then each merge's (its merged encoder, or
    the members' shared one, which then runs once for all): a merge's row reads the contexts after the members'."""
    return list(text_encoders) + [merge.text_encoder or text_encoders[0] for merge in merges]


def describe_merge(merge: Merge) -> str:
    """What a table's merge row is, how it was searched, in how long and with how much memory."""
    return (f"{merge.row}: {merge.description}; {merge.search_seconds:.1f} s (merging {merge.merge_seconds:.2f} s "
            f"of it), holds one extra {'UNet and text encoder' if merge.text else 'UNet'} "
            f"({merge.nbytes / 2 ** 20:.1f} MiB)" + (f"; blocks: {merge.label}" if merge.kind == MBW else ""))
