"""Per-member text conditioning in training and evaluation: each member reads the prompt as its own checkpoint's text
encoder encodes it, members with identical encoders share one that runs once per batch, "shared" feeds every member
the first member's encoding, and the weights file records the text conditioning and the CLIP skip.

The tiny members of seeds 1 and 2 have different text encoders (each checkpoint's is drawn from its own seed); the
"same encoder" pair puts member 1's text encoder into member 2's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ldm.modules.attention import SpatialTransformer

from factories import write_captioned_images

from afa import Aggregator, MemberRef, default_config, read_weights_info, save_weights
from training import evaluate, metrics, train
from training.data import ImageCaptionDataset, SkipReport, collate, index_captioned_images
from training.metrics import denoising_errors, member_alone, prepare_batch
from training.sd_checkpoint import (TEXT_ENCODER_PREFIX, TINY_TEXT_ENCODER_FOLDER_NAME, load_frozen_models,
                                    tiny_sd_config, tiny_sd_state_dict, write_webui_checkpoint)
from training.text_encoder import encode, tokenize

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """12 captioned 32 px images."""
    return write_captioned_images(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def distinct_members(checkpoint_factory) -> list[Path]:
    return [checkpoint_factory(1), checkpoint_factory(2)]


@pytest.fixture(scope="module")
def same_encoder_members(checkpoint_factory, tmp_path_factory) -> list[Path]:
    """Member 1, and member 2's UNet with member 1's text encoder."""
    folder = tmp_path_factory.mktemp("same-encoder")
    state_dict = tiny_sd_state_dict(2)
    state_dict.update({key: value for key, value in tiny_sd_state_dict(1).items()
                       if key.startswith(TEXT_ENCODER_PREFIX)})
    second = write_webui_checkpoint(folder / "unet2-encoder1.safetensors", state_dict,
                                    tiny_sd_config(folder / TINY_TEXT_ENCODER_FOLDER_NAME))
    return [checkpoint_factory(1), second]


class EncodingSpy:
    """Stands in for training.metrics.encode and records every call: (encoder module, clip_skip, context)."""

    def __init__(self):
        self.calls: list[tuple[torch.nn.Module, int, torch.Tensor]] = []

    def __call__(self, encoder, token_ids, clip_skip=1):
        context = encode(encoder, token_ids, clip_skip)
        self.calls.append((encoder, clip_skip, context))
        return context

    def contexts_of(self, encoder) -> list[torch.Tensor]:
        return [context for module, _, context in self.calls if module is encoder]


@pytest.fixture
def encoding_spy(monkeypatch) -> EncodingSpy:
    spy = EncodingSpy()
    monkeypatch.setattr(metrics, "encode", spy)
    return spy


def spy_on_member_contexts(frozen) -> list[list[torch.Tensor]]:
    """Records the context each member's first cross-attention layer reads, one list per member."""
    seen: list[list[torch.Tensor]] = [[] for _ in frozen.members]
    for index, member in enumerate(frozen.members):
        transformer = next(module for module in member.modules() if isinstance(module, SpatialTransformer))
        # TimestepEmbedSequential calls it as layer(x, context)
        transformer.register_forward_pre_hook(lambda module, inputs, index=index: seen[index].append(inputs[1]))
    return seen


def batch_of(dataset: Path, count: int) -> dict:
    records = index_captioned_images(dataset, SkipReport())[:count]
    images = ImageCaptionDataset(records, 32)
    return collate([images[index] for index in range(count)])


def is_among(context: torch.Tensor, contexts: list[torch.Tensor]) -> bool:
    return any(context.shape == other.shape and torch.equal(context, other) for other in contexts)


def test_identical_text_encoders_share_one_module_that_runs_once_per_batch(same_encoder_members, distinct_members,
                                                                          dataset, encoding_spy):
    batch = batch_of(dataset, 3)
    same = load_frozen_models(same_encoder_members)
    assert same.text_encoders[0] is same.text_encoders[1] and same.distinct_text_encoders == 1
    inputs = prepare_batch(batch, same.vae, same.text_encoders, same.schedule, seed=0, device=CPU)
    assert len(encoding_spy.calls) == 1
    assert inputs["member_contexts"][0] is inputs["member_contexts"][1]

    encoding_spy.calls.clear()
    distinct = load_frozen_models(distinct_members)
    assert distinct.text_encoders[0] is not distinct.text_encoders[1] and distinct.distinct_text_encoders == 2
    inputs = prepare_batch(batch, distinct.vae, distinct.text_encoders, distinct.schedule, seed=0, device=CPU)
    assert [module for module, _, _ in encoding_spy.calls] == distinct.text_encoders  # each once
    first, second = inputs["member_contexts"]
    assert not torch.equal(first, second)  # (SABW reads their mean: tests/test_aggregator.py)

    # "shared": every member reads the first member's encoding, and only that encoder runs.
    encoding_spy.calls.clear()
    inputs = prepare_batch(batch, distinct.vae, distinct.text_encoders_for("shared"), distinct.schedule, seed=0,
                           device=CPU)
    assert [module for module, _, _ in encoding_spy.calls] == [distinct.text_encoders[0]]
    assert inputs["member_contexts"][0] is inputs["member_contexts"][1]


def test_clip_skip_changes_the_context(distinct_members, dataset):
    frozen = load_frozen_models(distinct_members)
    batch = batch_of(dataset, 2)
    last = prepare_batch(batch, frozen.vae, frozen.text_encoders, frozen.schedule, seed=0, device=CPU)
    skipped = prepare_batch(batch, frozen.vae, frozen.text_encoders, frozen.schedule, seed=0, device=CPU, clip_skip=2)
    token_ids = tokenize(batch["captions"])
    for index, encoder in enumerate(frozen.text_encoders):
        assert torch.equal(last["member_contexts"][index], encode(encoder, token_ids))
        assert torch.equal(skipped["member_contexts"][index], encode(encoder, token_ids, clip_skip=2))
        assert not torch.equal(skipped["member_contexts"][index], last["member_contexts"][index])


def run_spied_training(monkeypatch, members, dataset, tmp: Path, *extra: str):
    """train.main with spies on the members' cross-attention contexts; returns (frozen models, contexts seen by
    each member, the weights file)."""
    loaded = []

    def load_and_spy(*args, **kwargs):
        frozen = load_frozen_models(*args, **kwargs)
        loaded.append((frozen, spy_on_member_contexts(frozen)))
        return frozen

    monkeypatch.setattr(train, "load_frozen_models", load_and_spy)
    output = tmp / "afa.safetensors"
    assert train.main(["--members", *map(str, members), "--data", str(dataset), "--resolution", "32",
                       "--batch-size", "4", "--max-steps", "2", "--hidden-channels", "32", "--num-workers", "0",
                       "--save-dtype", "fp32", "--output", str(output), "--run-dir", str(tmp / "run"), *extra]) == 0
    (frozen, seen), = loaded
    return frozen, seen, output


def test_a_per_member_run_feeds_each_member_its_own_encoding(monkeypatch, distinct_members, dataset, tmp_path,
                                                             encoding_spy):
    """Training steps and the epoch-end validation (9 training images: 2 batches of 4 are one epoch): every call of
    member i, alone or in an ensemble, reads what member i's text encoder made, never the other one's."""
    # Without the merge baselines: they are deep copies of member 1 (this spy's hooks included) that read their own
    # merged text encoder (tests/test_merge_search.py).
    frozen, seen, output = run_spied_training(monkeypatch, distinct_members, dataset, tmp_path, "--val-split", "0.25",
                                              "--merge-baselines", "none")
    for index, encoder in enumerate(frozen.text_encoders):
        own = encoding_spy.contexts_of(encoder)
        other = encoding_spy.contexts_of(frozen.text_encoders[1 - index])
        assert seen[index] and all(is_among(context, own) and not is_among(context, other)
                                   for context in seen[index])
    # Each encoder ran once per batch: 2 training batches and 1 validation batch.
    assert [len(encoding_spy.contexts_of(encoder)) for encoder in frozen.text_encoders] == [3, 3]
    config = read_weights_info(output).config
    assert config.text_conditioning == "per_member" and config.clip_skip == 1


def test_a_shared_run_feeds_every_member_the_first_encoding_at_its_clip_skip(monkeypatch, distinct_members, dataset,
                                                                             tmp_path, encoding_spy):
    frozen, seen, output = run_spied_training(monkeypatch, distinct_members, dataset, tmp_path, "--val-split", "0",
                                              "--text-conditioning", "shared", "--clip-skip", "2")
    first = encoding_spy.contexts_of(frozen.text_encoders[0])
    assert len(first) == 2 and not encoding_spy.contexts_of(frozen.text_encoders[1])
    assert {clip_skip for _, clip_skip, _ in encoding_spy.calls} == {2}
    assert all(seen[index] and all(is_among(context, first) for context in seen[index]) for index in (0, 1))
    config = read_weights_info(output).config
    assert config.text_conditioning == "shared" and config.clip_skip == 2


def test_identical_encoders_run_once_per_training_batch(monkeypatch, same_encoder_members, dataset, tmp_path,
                                                        encoding_spy):
    frozen, seen, _ = run_spied_training(monkeypatch, same_encoder_members, dataset, tmp_path, "--val-split", "0")
    assert len(encoding_spy.calls) == 2  # 2 steps, one encoder
    assert all(len(contexts) == 2 for contexts in seen)


def untrained_weights(members, path: Path, text_conditioning: str) -> Path:
    """Zero-initialised SABW (every member weighted 1/N): its ensemble computes exactly block averaging."""
    frozen = load_frozen_models(members)
    config = default_config(frozen.layout, len(members), 32, hidden_channels=32, text_conditioning=text_conditioning)
    return save_weights(path, Aggregator(config), [MemberRef.from_file(member) for member in members])


def run_evaluation(members, dataset: Path, output_dir: Path, *extra: str) -> dict:
    import json

    assert evaluate.main(["--members", *map(str, members), "--data", str(dataset), "--resolution", "32",
                          "--draws", "2", "--batch-size", "8", "--figure-images", "0", "--output-dir",
                          str(output_dir), *extra]) == 0
    return json.loads((output_dir / evaluate.RESULTS_FILE).read_text())


def test_evaluation_members_read_their_own_encoders_and_ensembles_as_configured(distinct_members, dataset, tmp_path):
    per_member = untrained_weights(distinct_members, tmp_path / "per.safetensors", "per_member")
    shared = untrained_weights(distinct_members, tmp_path / "shared.safetensors", "shared")
    results = run_evaluation(distinct_members, dataset, tmp_path / "a", "--weights", str(per_member), str(shared))
    rows = results["models"]
    assert [entry["row"] for entry in results["weights"]] == ["AFA (per)", "AFA (shared)"]  # same design: file names
    assert [entry["text_conditioning"] for entry in results["weights"]] == ["per_member", "shared"]
    # Uniform weights: each AFA row is block averaging read its file's way.
    assert rows["AFA (per)"] == rows["block average"]
    assert rows["AFA (shared)"] != rows["block average"]
    shared_averages = run_evaluation(distinct_members, dataset, tmp_path / "b", "--text-conditioning", "shared")
    assert shared_averages["averages_text_conditioning"] == "shared"
    assert shared_averages["models"]["block average"] == rows["AFA (shared)"]

    # Members alone read their own encoders whatever --text-conditioning says.
    names = [member["name"] for member in results["members"]]
    assert all(shared_averages["models"][name] == rows[name] for name in names)
    frozen = load_frozen_models(distinct_members)
    records = index_captioned_images(dataset, SkipReport())
    loader = torch.utils.data.DataLoader(evaluate.RepeatedDraws(ImageCaptionDataset(records, 32), 2), batch_size=8,
                                         collate_fn=collate)
    second = frozen.members[1]
    expected = denoising_errors({"own": member_alone(second, 1), "first's": member_alone(second, 0)}, loader,
                                frozen.vae, frozen.text_encoders, frozen.schedule, 0, CPU)
    assert rows[names[1]]["all"] == pytest.approx(expected["own"]["all"], rel=1e-6)
    assert rows[names[1]]["all"] != pytest.approx(expected["first's"]["all"], rel=1e-4)


def test_evaluation_uses_the_weights_files_clip_skip(distinct_members, dataset, tmp_path):
    frozen = load_frozen_models(distinct_members)
    refs = [MemberRef.from_file(member) for member in distinct_members]

    def weights(name: str, clip_skip: int) -> Path:
        config = default_config(frozen.layout, 2, 32, hidden_channels=32, clip_skip=clip_skip)
        return save_weights(tmp_path / name, Aggregator(config), refs)

    skip_two = weights("two.safetensors", 2)
    assert run_evaluation(distinct_members, dataset, tmp_path / "a", "--weights", str(skip_two))["clip_skip"] == 2
    assert run_evaluation(distinct_members, dataset, tmp_path / "b")["clip_skip"] == 1
    with pytest.raises(evaluate.AfaError, match="CLIP skips \\[1, 2\\]"):
        run_evaluation(distinct_members, dataset, tmp_path / "c", "--weights", str(skip_two),
                       str(weights("one.safetensors", 1)))
