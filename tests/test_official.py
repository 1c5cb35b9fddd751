"""Importing the authors' trained aggregators (Tenvence/afa) with `afa.official` and `python -m afa import-official`.

The authors' `Aggregator` (models/modules/aggregator.py) is rebuilt here as their code builds it, from diffusers'
`ResnetBlock2D` and `Transformer2DModel` (diffusers is a test-only dependency, requirements/dev.txt; `afa` never
imports it), given random weights everywhere (conv_out included), and saved in their training output layout. The
imported AFA weights file must give the same weight maps as their modules at every block.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import randomize_
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors.torch import load_file, save_file

from afa import (Aggregator, MemberRef, WeightsFileError, block_layout, load_weights, preset_config,
                 read_unet_shapes, read_weights_info)
from afa.errors import IncompatibleMembersError
from afa.official import import_official, official_key
from afa.unet import block_name

REPO = Path(__file__).resolve().parent.parent
HIDDEN, HEADS, LAYERS, CONTEXT, TEMB = 64, 4, 2, 32, 128  # tiny members: model_channels 32, context_dim 32
LATENT = 16


class TheirAggregator(nn.Module):
    """The authors' `Aggregator`, as in their models/modules/aggregator.py (save/load as theirs too)."""

    def __init__(self, in_channels: int, hidden_size: int, num_experts: int, num_layers: int, num_attn_heads: int,
                 cross_attn_dim: int, temb_channels: int):
        super().__init__()
        self.config = {
            'in_channels': in_channels,
            'hidden_size': hidden_size,
            'num_experts': num_experts,
            'num_layers': num_layers,
            'num_attn_heads': num_attn_heads,
            'cross_attn_dim': cross_attn_dim,
            'temb_channels': temb_channels,
        }
        self.conv_in = nn.Conv2d(in_channels=in_channels * num_experts, out_channels=hidden_size, kernel_size=1)
        self.res_block = ResnetBlock2D(in_channels=hidden_size, temb_channels=temb_channels)
        self.transformer = Transformer2DModel(
            num_attention_heads=num_attn_heads,
            attention_head_dim=hidden_size // num_attn_heads,
            in_channels=hidden_size,
            out_channels=None,
            cross_attention_dim=cross_attn_dim,
            num_layers=num_layers,
        )
        self.conv_out = nn.Conv2d(hidden_size, num_experts, kernel_size=1, bias=False)
        nn.init.zeros_(self.conv_out.weight)

    def forward(self, features, temb, encoder_hidden_states):
        batch_size, num_models, num_channels, h, w = features.shape
        hidden_states = features.reshape(batch_size, num_models * num_channels, h, w)
        hidden_states = self.conv_in(hidden_states)
        hidden_states = self.res_block(hidden_states, temb)
        # Theirs reads `.sample` of the output object; return_dict=False is the same tensor without the deprecated
        # output class of newer diffusers.
        hidden_states = self.transformer(hidden_states, encoder_hidden_states, return_dict=False)[0]
        hidden_states = self.conv_out(hidden_states)
        attn_map = torch.softmax(hidden_states, dim=1)
        aggregated_features = torch.sum(features * attn_map[:, :, None, :, :], dim=1)
        return aggregated_features, attn_map

    def save_pretrained(self, directory):
        Path(directory).mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), os.path.join(directory, 'aggregator.safetensors'))
        json.dump(self.config, open(os.path.join(directory, 'config.json'), 'w'))


def write_official_folder(folder: Path, num_members: int, channels, seed: int = 0, **config) -> list[TheirAggregator]:
    """Their training output: aggregator_{i}/ for every block (random weights), model_config.json."""
    values = dict(hidden_size=HIDDEN, num_experts=num_members, num_layers=LAYERS, num_attn_heads=HEADS,
                  cross_attn_dim=CONTEXT, temb_channels=TEMB)
    values.update(config)
    torch.manual_seed(seed)
    aggregators = [randomize_(TheirAggregator(in_channels=c, **values), seed=seed + i).eval()
                   for i, c in enumerate(channels)]
    for i, aggregator in enumerate(aggregators):
        aggregator.save_pretrained(folder / f"aggregator_{i}")
    (folder / "model_config.json").write_text(json.dumps({"num_models": num_members,
                                                          "num_aggregators": len(aggregators)}))
    return aggregators


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def members(checkpoint_factory) -> list[Path]:
    return [checkpoint_factory(seed) for seed in (0, 1, 2)]


@pytest.fixture(scope="module")
def layout(members):
    return block_layout(read_unet_shapes(members[0]))


@pytest.fixture(scope="module")
def official_pair(tmp_path_factory, members, layout) -> Path:
    """A read-only official folder for the first two members; tests that break it copy it first."""
    folder = tmp_path_factory.mktemp("official") / "output"
    write_official_folder(folder, 2, layout.channels, seed=5)
    return folder


def broken_copy(official_pair: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "output"
    shutil.copytree(official_pair, folder)
    return folder


@pytest.mark.parametrize("num_members", [2, 3])
def test_imported_weights_give_their_maps_at_every_block(num_members, members, layout, tmp_path):
    folder = tmp_path / "official"
    theirs = write_official_folder(folder, num_members, layout.channels, seed=10 * num_members)
    before = snapshot(folder)
    paths = members[:num_members]
    output = tmp_path / "imported.safetensors"
    imported = import_official(folder, paths, output)
    assert imported.path == output and output.is_file()
    assert snapshot(folder) == before  # the input folder is never modified

    refs = [MemberRef.from_file(p, with_unet=True) for p in paths]  # imported files record UNet fingerprints too
    aggregator, info = load_weights(output, members=refs)  # strict: keys, shapes and the members' binding
    config = info.config
    assert info.members == refs == imported.members
    assert (config.design, config.hidden_channels, config.num_heads, config.transformer_depth) == \
        ("paper", HIDDEN, HEADS, LAYERS)
    assert (config.context_dim, config.member_time_embed_dim, config.text_conditioning) == \
        (CONTEXT, TEMB, "per_member")
    assert config.max_resolution is None and config.norm_eps == 1e-6 and config.use_timestep and config.use_text
    assert config.block_channels == list(layout.channels) and config.num_members == num_members
    assert info.training["imported_from"] == "Tenvence/afa"
    assert info.training["source_folder"] == str(folder.resolve())
    assert imported.parameters == sum(p.numel() for p in aggregator.parameters()) \
        == sum(p.numel() for t in theirs for p in t.parameters())

    generator = torch.Generator().manual_seed(num_members)
    batch = 2
    member_embeddings = [torch.randn(batch, TEMB, generator=generator) for _ in range(num_members)]
    temb = aggregator.embed_time(torch.tensor([999.0, 1.0]), member_embeddings)
    assert torch.allclose(temb, torch.stack(member_embeddings).mean(dim=0))
    context = torch.randn(batch, 77, CONTEXT, generator=generator)
    for index, their in enumerate(theirs):
        name = layout.names[index]
        ours = {k[len(name) + 1:]: v for k, v in aggregator.state_dict().items() if k.startswith(name + ".")}
        their_state = their.state_dict()
        assert len(ours) == len(their_state)
        assert all(torch.equal(value, their_state[official_key(key)]) for key, value in ours.items())

        size = LATENT // layout.downsampling[index]
        features = torch.randn(batch, num_members, layout.channels[index], size, size, generator=generator)
        with torch.no_grad():
            _, expected = their(features, torch.stack(member_embeddings).mean(dim=0), context)
            got = aggregator(index, list(features.unbind(dim=1)), temb, context)
        assert got.shape == expected.shape == (batch, num_members, size, size)
        assert (got - expected).abs().max().item() < 1e-5, f"aggregator_{index} ({name})"
        assert expected.std(dim=1).mean() > 1e-3  # the maps are far from uniform: conv_out is not zero


def test_cli_import_official(members, layout, official_pair, tmp_path):
    output = tmp_path / "out" / "afa.safetensors"
    result = subprocess.run([sys.executable, "-m", "afa", "import-official", str(official_pair), "--members",
                             str(members[0]), str(members[1]), "--output", str(output)],
                            cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    info = read_weights_info(output)
    parameters = sum(t.numel() for t in load_file(output).values())
    assert f"wrote {output}" in result.stdout and f"{parameters:,} parameters" in result.stdout
    for index, member in enumerate(info.members):
        assert f"{index}: {member.name}  sha256 {member.sha256}" in result.stdout
    assert [m.sha256 for m in info.members] == [MemberRef.from_file(p).sha256 for p in members[:2]]

    again = subprocess.run([sys.executable, "-m", "afa", "import-official", str(official_pair), "--members",
                            str(members[0]), str(members[1]), "--output", str(output)],
                           cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "PYTHONPATH": str(REPO)})
    assert again.returncode == 2 and again.stderr.startswith("error: ") and "already exists" in again.stderr


def test_overwrite_and_dtype(members, official_pair, tmp_path):
    output = tmp_path / "w.safetensors"
    import_official(official_pair, members[:2], output)
    imported = import_official(official_pair, members[:2], output, dtype=torch.float16, overwrite=True)
    aggregator, _ = load_weights(imported.path)
    assert {p.dtype for p in aggregator.parameters()} == {torch.float16}


def test_refuses_a_missing_folder(members, tmp_path):
    with pytest.raises(WeightsFileError, match="nowhere: not a folder"):
        import_official(tmp_path / "nowhere", members[:2], tmp_path / "w.safetensors")


def test_refuses_another_member_count(members, official_pair, tmp_path):
    output = tmp_path / "w.safetensors"
    with pytest.raises(WeightsFileError, match=r"model_config.json: num_models 2, but 3 member checkpoints"):
        import_official(official_pair, members, output)
    with pytest.raises(IncompatibleMembersError, match="at least 2 members"):
        import_official(official_pair, members[:1], output)

    folder = broken_copy(official_pair, tmp_path)  # model_config says 3, but one aggregator was built for 2
    (folder / "model_config.json").write_text(json.dumps({"num_models": 3, "num_aggregators": 25}))
    for index in range(25):
        path = folder / f"aggregator_{index}" / "config.json"
        values = json.loads(path.read_text())
        path.write_text(json.dumps({**values, "num_experts": 2 if index == 4 else 3}))
    with pytest.raises(WeightsFileError, match=r"aggregator_4 \(input_blocks\.4\): num_experts 2, but 3 members"):
        import_official(folder, members, output)
    assert not output.exists()


def test_refuses_a_block_whose_channels_do_not_fit(members, layout, tmp_path):
    channels = list(layout.channels)
    assert channels[7] == 64
    channels[7] = 32  # trained for members whose input_blocks.7 had 32 channels
    folder = tmp_path / "official"
    write_official_folder(folder, 2, channels)
    with pytest.raises(WeightsFileError, match=r"aggregator_7 \(input_blocks\.7\): in_channels 32, but the "
                                               r"members' input_blocks\.7 has 64 channels"):
        import_official(folder, members[:2], tmp_path / "w.safetensors")


def test_refuses_another_block_count(members, official_pair, tmp_path):
    folder = broken_copy(official_pair, tmp_path)
    shutil.rmtree(folder / "aggregator_24")
    with pytest.raises(WeightsFileError, match="missing aggregator_24"):
        import_official(folder, members[:2], tmp_path / "w.safetensors")
    (folder / "model_config.json").write_text(json.dumps({"num_models": 2, "num_aggregators": 24}))
    with pytest.raises(WeightsFileError, match="num_aggregators 24, but the members have 25 blocks"):
        import_official(folder, members[:2], tmp_path / "w.safetensors")


@pytest.mark.parametrize("change, message", [
    ("drop", r"aggregator_12 \(middle_block\): tensors do not match.*1 keys missing from the file, "
             r"e\.g\. transformer\.transformer_blocks\.1\.attn2\.to_k\.weight"),
    ("add", r"aggregator_12 \(middle_block\): tensors do not match.*1 keys only in the file, e\.g\. conv_out\.bias"),
    ("reshape", r"aggregator_12 \(middle_block\): tensors do not match.*first differing key "
                r"transformer\.proj_in\.weight: \(64, 64, 1, 1\) in the authors' Aggregator of that config, "
                r"\(64, 64, 3, 3\) in the file"),
])
def test_refuses_tensors_that_do_not_map(change, message, members, official_pair, tmp_path):
    folder = broken_copy(official_pair, tmp_path)
    path = folder / "aggregator_12" / "aggregator.safetensors"
    tensors = load_file(path)
    if change == "drop":
        del tensors["transformer.transformer_blocks.1.attn2.to_k.weight"]
    elif change == "add":
        tensors["conv_out.bias"] = torch.zeros(2)
    else:
        tensors["transformer.proj_in.weight"] = torch.zeros(64, 64, 3, 3)
    save_file(tensors, path)
    with pytest.raises(WeightsFileError, match=message) as error:
        import_official(folder, members[:2], tmp_path / "w.safetensors")
    assert str(path) in str(error.value)


def test_refuses_pickles_and_bad_configs(members, official_pair, tmp_path):
    folder = broken_copy(official_pair, tmp_path)
    weights = folder / "aggregator_3" / "aggregator.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(WeightsFileError, match=r"aggregator_3 \(input_blocks\.3\): not found; found aggregator\.bin,"
                                               r" but AFA reads only \.safetensors"):
        import_official(folder, members[:2], tmp_path / "w.safetensors")

    config = folder / "aggregator_9" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 96}))
    with pytest.raises(WeightsFileError, match=r"aggregator_9 \(input_blocks\.9\): hidden_size 96 differs from "
                                               r"aggregator_0's 64"):
        import_official(folder, members[:2], tmp_path / "w.safetensors")
    config.write_text("{not json")
    with pytest.raises(WeightsFileError, match=r"aggregator_9.config\.json: not readable JSON"):
        import_official(folder, members[:2], tmp_path / "w.safetensors")


def test_refuses_to_write_into_the_input_folder(members, official_pair):
    with pytest.raises(WeightsFileError, match="inside the folder being imported"):
        import_official(official_pair, members[:2], official_pair / "afa.safetensors")


def test_their_sd15_aggregators_count_as_the_paper_design():
    """The authors' SD 1.5 aggregators as their train.py builds them (hidden 128, 8 heads, the depth 2 their loop
    leaves in num_layers) have exactly the paper design's parameters, 42,425,344 for 2 members."""
    channels = [320] * 4 + [640] * 3 + [1280] * 12 + [640] * 3 + [320] * 2 + [4]
    with torch.device("meta"):
        theirs = [TheirAggregator(c, 128, 2, 2, 8, 768, 1280) for c in channels]
        ours = Aggregator(preset_config("paper", 2, channels, 768))
    their_keys = [{k: tuple(v.shape) for k, v in t.state_dict().items()} for t in theirs]
    our_keys = [{official_key(k[len(name) + 1:]): tuple(v.shape) for k, v in ours.state_dict().items()
                 if k.startswith(name + ".")} for name in (block_name(i, 12) for i in range(25))]
    assert their_keys == our_keys
    assert sum(p.numel() for t in theirs for p in t.parameters()) == 42_425_344

def test_afa_never_imports_diffusers():
    for path in sorted((REPO / "afa").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not any(name.split(".")[0] == "diffusers" for name in imported), path
