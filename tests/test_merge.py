"""afa/merge.py: the weighted merge and MBW arithmetic, and the MBW blocks of each UNet family; training/
merge_search.py: the searches pick what their scores say."""

from __future__ import annotations

import pytest
import torch

from afa.merge import (MergedModel, check_weights, mbw_block_index, mbw_block_map, mbw_block_names, merge_tensor_,
                       ratio_weights)
from afa.unet import PRESETS, block_layout, build_unet
from factories import TINY_SD2_UNET, randomize_
from training import merge_search
from training.sd_checkpoint import build_tiny_text_encoder

FAMILIES = {"sd1": (PRESETS["tiny"], 25), "sd2": (TINY_SD2_UNET, 25), "sdxl": (PRESETS["tiny-sdxl"], 19)}


def unet(family: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(build_unet(FAMILIES[family][0]), seed=seed).eval()


def text_encoder(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_(build_tiny_text_encoder(), seed=seed, scale=0.05).eval()


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that -0.0 and 0.0 (equal as numbers) differ."""
    return tensor.contiguous().view(torch.uint8)


def bitwise_equal(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(
        first[key].dtype == second[key].dtype and torch.equal(bits(first[key]), bits(second[key])) for key in first)


@pytest.mark.parametrize("kind", ["unet", "text encoder"])
def test_a_zero_one_merge_is_the_member_bit_for_bit(kind):
    members = [unet("sd1", 1), unet("sd1", 2)] if kind == "unet" else [text_encoder(1), text_encoder(2)]
    with torch.no_grad():  # a negative zero, which summing 1 * a + 0 * b would turn into +0.0
        next(members[0].parameters()).view(-1)[0] = -0.0
    merge = MergedModel.of_unets(members) if kind == "unet" else MergedModel(members)
    for weights, member in [((1.0, 0.0), members[0]), ((0.0, 1.0), members[1]), ((1.0, 0.0), members[0])]:
        merge.set_weights(weights)
        assert bitwise_equal(merge.model.state_dict(), member.state_dict()), weights
    if kind == "text encoder":  # integer buffers are copied, never weighted
        buffers = [key for key, value in merge.model.state_dict().items() if not value.is_floating_point()]
        assert buffers and all(merge.model.state_dict()[key].dtype == torch.int64 for key in buffers)


def test_a_half_merge_is_the_average_and_the_members_stay_untouched():
    members = [unet("sd1", 1), unet("sd1", 2)]
    before = [{key: value.clone() for key, value in member.state_dict().items()} for member in members]
    merge = MergedModel.of_unets(members)
    merge.set_weights(ratio_weights(0.5))
    first, second = (member.state_dict() for member in members)
    for key, value in merge.model.state_dict().items():
        assert torch.equal(value, (first[key] + second[key]) / 2), key
    merge.set_weights(ratio_weights(0.25))
    for key, value in merge.model.state_dict().items():
        torch.testing.assert_close(value, 0.75 * first[key] + 0.25 * second[key], rtol=0, atol=1e-6)
    assert all(bitwise_equal(member.state_dict(), state) for member, state in zip(members, before))
    # The merge owns its memory: one UNet's worth.
    assert merge.nbytes == sum(value.numel() * value.element_size() for value in first.values())
    assert all(value.data_ptr() not in {tensor.data_ptr() for tensor in first.values()}
               for value in merge.model.state_dict().values())


def test_three_members_and_low_precision_members_merge_in_float32():
    members = [unet("sd1", seed).half() for seed in (1, 2, 3)]
    merge = MergedModel.of_unets(members)
    merge.set_weights((0.5, 0.25, 0.25))
    states = [member.state_dict() for member in members]
    for key, value in merge.model.state_dict().items():
        assert value.dtype == torch.float16
        expected = 0.5 * states[0][key].float() + 0.25 * states[1][key].float() + 0.25 * states[2][key].float()
        assert torch.equal(value, expected.half()), key  # summed in float32, rounded once


@pytest.mark.parametrize("family", FAMILIES)
def test_the_mbw_blocks_are_the_unets_blocks(family):
    model = unet(family, 0)
    keys = list(model.state_dict())
    layout = block_layout({key: tuple(value.shape) for key, value in model.state_dict().items()})
    names = mbw_block_names(layout.num_input_blocks)
    assert len(names) == len(layout) == FAMILIES[family][1]
    assert names[0] == "IN00" and names[layout.num_input_blocks] == "M00" and names[-1] == f"OUT{len(names) // 2 - 1:02d}"
    block_of = mbw_block_map(keys)
    assert list(block_of) == keys  # every key, once
    for index, name in enumerate(layout.names):
        inside = {key for key in keys if key.startswith(name + ".")}
        extra = {key for key in keys if key.startswith(("time_embed.", "label_emb."))} if index == 0 else \
            {key for key in keys if key.startswith("out.")} if index == len(layout) - 1 else set()
        assert inside, name
        assert {key for key, block in block_of.items() if block == index} == inside | extra, name
    if family == "sdxl":  # the label embedding of `y` goes with the time embedding, into IN00
        assert any(key.startswith("label_emb.") and block_of[key] == 0 for key in keys)
    # Merging one block from the second member changes exactly that ldm module.
    second = unet(family, 1)
    merge = MergedModel.of_unets([model, second])
    block = layout.num_input_blocks + 2  # OUT01
    weights = [(1.0, 0.0)] * len(names)
    weights[block] = (0.0, 1.0)
    merge.set_weights(weights)
    merged, first_state, second_state = merge.model.state_dict(), model.state_dict(), second.state_dict()
    for key in keys:
        source = second_state if key.startswith(layout.names[block] + ".") else first_state
        assert torch.equal(merged[key], source[key]), key


def test_mbw_re_merges_only_the_blocks_that_change():
    members = [unet("sd1", 1), unet("sd1", 2)]
    merge = MergedModel.of_unets(members)
    everything = merge.set_weights(ratio_weights(0.5))
    assert everything == len(members[0].state_dict())
    weights = [ratio_weights(0.5)] * 25
    assert merge.set_weights(weights) == 0
    weights[12] = ratio_weights(1.0)
    block_of = mbw_block_map(members[0].state_dict())
    assert merge.set_weights(weights) == sum(block == 12 for block in block_of.values())
    assert torch.equal(merge.model.middle_block[0].in_layers[2].weight, members[1].middle_block[0].in_layers[2].weight)


def test_bad_weights_keys_and_members_are_refused():
    with pytest.raises(ValueError, match="sum to 1"):
        check_weights((0.5, 0.6), 2)
    with pytest.raises(ValueError, match="3 merge weights for 2 members"):
        check_weights((0.2, 0.3, 0.5), 2)
    merge = MergedModel.of_unets([unet("sd1", 1), unet("sd1", 2)])
    with pytest.raises(ValueError, match="24 weight vectors for 25 merge groups"):
        merge.set_weights([(0.5, 0.5)] * 24)
    with pytest.raises(ValueError, match="input_blocks.12"):
        mbw_block_index("input_blocks.12.0.weight", 12)
    with pytest.raises(ValueError, match="not a key"):
        mbw_block_index("first_stage_model.encoder.conv_in.weight", 12)
    with pytest.raises(ValueError, match="other tensors"):
        MergedModel([unet("sd1", 1), unet("sd2", 1)])


def test_merge_tensor_copies_integer_tensors():
    target = torch.zeros(3, dtype=torch.int64)
    merge_tensor_(target, [torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])], (0.5, 0.5))
    assert target.tolist() == [1, 2, 3]


# -- the searches --------------------------------------------------------------------------------------------------

class FixedScorer:
    """Scores a merged UNet by how far its weights are from a target merge (distance of one tensor per block), so
    the best candidates are known."""

    def __init__(self, members, target_ratios):
        self.samples, self.evaluations = 4, 0
        merge = MergedModel.of_unets(members)
        merge.set_weights([ratio_weights(ratio) for ratio in target_ratios])
        self.target = {key: value.clone() for key, value in merge.model.state_dict().items()}

    def __call__(self, unet, text_encoder=None, text_key=None):
        self.evaluations += 1
        state = unet.state_dict()
        return sum((state[key] - value).square().sum().item() for key, value in self.target.items())


def test_the_weighted_merge_search_takes_the_best_ratio_and_mbw_the_best_per_block():
    members = [unet("sd1", 1), unet("sd1", 2)]
    shared_text = [text_encoder(1)] * 2
    target = [0.75] * 25
    target[3], target[20] = 0.0, 1.0
    scorer = FixedScorer(members, target)
    weighted = merge_search.search_weighted_merge(members, shared_text, ["a", "b"], scorer, (0.25, 0.5, 0.75))
    assert weighted.row == "weighted merge (r=0.75)" and weighted.text is None
    assert min(weighted.losses, key=weighted.losses.get) == "r=0.75" and weighted.evaluations == 3
    assert weighted.unet.weights == [ratio_weights(0.75)] * 25
    mbw = merge_search.search_mbw(members, shared_text, ["a", "b"], scorer, weighted.weights[0], (0.0, 0.75, 1.0))
    assert mbw.weights == [ratio_weights(ratio) for ratio in target]
    assert mbw.losses["sweep 1"] == 0.0 and mbw.losses["start"] > 0
    assert mbw.evaluations == 1 + 25 * 2  # the start, then each block's two other ratios
    assert "IN03 r=0.00" in mbw.label and "OUT07 r=1.00" in mbw.label
    assert mbw.nbytes == MergedModel.of_unets(members).nbytes


def test_distinct_text_encoders_merge_with_the_unet_and_get_a_base_block():
    members, texts = [unet("sd1", 1), unet("sd1", 2)], [text_encoder(1), text_encoder(2)]
    scorer = FixedScorer(members, [0.5] * 25)
    weighted = merge_search.search_weighted_merge(members, texts, ["a", "b"], scorer, (0.5,))
    assert weighted.text is not None and weighted.text.weights == [ratio_weights(0.5)]
    mbw = merge_search.search_mbw(members, texts, ["a", "b"], scorer, ratio_weights(0.5), (0.0, 1.0))
    assert mbw.extra["blocks"][-1] == "BASE" and len(mbw.weights) == 26
    assert mbw.evaluations == 1 + 26 * 2


def test_candidates_for_more_members():
    names = ["a", "b", "c"]
    weighted = merge_search.weighted_merge_candidates(names)
    assert [candidate.label for candidate in weighted] == ["uniform", "without a", "without b", "without c"]
    assert weighted[2].weights == (0.5, 0.0, 0.5)
    mbw = merge_search.mbw_candidates(names)
    assert [candidate.label for candidate in mbw][-3:] == names and mbw[-1].weights == (0.0, 0.0, 1.0)
