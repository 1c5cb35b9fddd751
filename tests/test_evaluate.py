"""training/evaluate.py on tiny checkpoints: identical draws for every model, ties in Figure 1, the weights binding,
and what it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from afa import (AfaError, Aggregator, MemberRef, MembersMismatchError, default_config, load_member, save_weights,
                 unet_shapes)
from afa.maps import TIE, TIE_COLOR, grid_layout, legend_entries
from afa.unet import block_layout
from training import evaluate
from training.metrics import TIMESTEP_RANGES, range_label
from training.sd_checkpoint import load_schedule, read_sd_config

REPO = Path(__file__).resolve().parent.parent
CELL = 40
TIMESTEPS = ["900", "500", "100"]


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Six 32 px captioned images (kohya style: PNG + .txt)."""
    folder = tmp_path_factory.mktemp("held-out")
    generator = np.random.default_rng(0)
    for index in range(6):
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        top, left = generator.integers(0, 20, size=2)
        pixels[top:top + 12, left:left + 12] = generator.integers(60, 255, size=3)
        Image.fromarray(pixels).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a square number {index}", encoding="utf-8")
    return folder


def run_evaluate(members, data: Path, output_dir: Path, *extra: str, merges: bool = False) -> dict:
    """evaluate.main on tiny members; the merge baselines only when asked (their search costs a hundred passes)."""
    code = evaluate.main(["--members", *map(str, members), "--data", str(data), "--resolution", "32",
                          "--draws", "4", "--batch-size", "8", "--figure-images", "2", "--timesteps", *TIMESTEPS,
                          "--figure-draws", "3", "--cell-size", str(CELL), "--output-dir", str(output_dir),
                          *([] if merges else ["--merge-baselines", "none"]), *extra])
    assert code == 0
    return json.loads((output_dir / evaluate.RESULTS_FILE).read_text())


def weights_for(members, path: Path, preset: str = "paper") -> Path:
    """An untrained but non-trivial aggregator of a preset bound to `members` (its output layer is re-drawn, so the
    weights are not all 1/N)."""
    layout = block_layout(unet_shapes(load_member(members[0])))
    torch.manual_seed(0)
    aggregator = Aggregator(default_config(layout, len(members), 32, preset=preset, hidden_channels=32))
    with torch.no_grad():
        for block in [aggregator.block(index) for index in aggregator.config.aggregated_blocks]:
            head = block.out[-1] if isinstance(block.out, torch.nn.Sequential) else block.out  # fast / paper
            head.weight.normal_(0, 0.5)
    return save_weights(path, aggregator, [MemberRef.from_file(member) for member in members])


def test_identical_members_have_equal_errors_and_identical_figure_columns(checkpoint_factory, held_out, tmp_path):
    members = [checkpoint_factory(1, name="twin-a"), checkpoint_factory(1, name="twin-b")]
    results = run_evaluate(members, held_out, tmp_path)
    rows = results["models"]
    assert set(rows) == {"twin-a", "twin-b", "block average", "noise average"}
    # Identical members on identical draws: the members, and both averages of them, are exactly equal.
    assert rows["twin-a"] == rows["twin-b"] == rows["block average"] == rows["noise average"]

    # Figure 1's data: equal per-member error maps, so every pixel is a tie (not a winner picked by order) and
    # every timestep column is the same.
    unets = [load_member(member) for member in members]
    schedule = load_schedule(members[0], read_sd_config(members[0]))
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    noise = evaluate.figure_noise(0, 0, 3, (4, 16, 16))
    errors = evaluate.per_pixel_errors(unets, latents, context, [900, 500, 100], noise, schedule, batch_size=4)
    assert errors.shape == (2, 3, 16, 16) and errors.min() > 0
    assert torch.equal(errors[0], errors[1])
    winners = evaluate.winner_maps(errors)
    assert (winners == TIE).all()
    assert all(torch.equal(winners[0], column) for column in winners)

    # The PNG: the map cells of every row are pixel-identical, all in the tie colour.
    figure = np.asarray(Image.open(tmp_path / evaluate.CAPABILITY_FIGURE))
    legend = legend_entries(["twin-a", "twin-b"]) + [("tie (equal error)", TIE_COLOR)]
    layout = grid_layout(2, 1 + len(TIMESTEPS), CELL, evaluate.FIGURE_LABEL_LINES, legend,
                         evaluate.CAPABILITY_TITLE.format(draws=3))
    assert figure.shape[:2] == layout.size[::-1]
    for row in range(2):
        cells = []
        for column in range(1, 1 + len(TIMESTEPS)):
            left, top = layout.cell_origin(row, column)
            cells.append(figure[top:top + CELL, left:left + CELL])
        assert all(np.array_equal(cells[0], cell) for cell in cells)
        assert (cells[0] == TIE_COLOR).all()


def test_merge_rows_are_searched_on_validation_draws_and_evaluated_on_the_table_draws(checkpoint_factory, held_out,
                                                                                  tmp_path, capsys):
    members = [checkpoint_factory(1), checkpoint_factory(2)]  # seeds 1 and 2: different text encoders too
    results = run_evaluate(members, held_out, tmp_path, "--figure-images", "0", "--merge-ratios", "0",
                           "--mbw-ratios", "0", "1", "--validation-samples", "3", "--validation-draws", "1",
                           merges=True)
    first = results["members"][0]["name"]
    weighted, mbw = results["merges"]
    # Ratio 0 is the first member's UNet and text encoder bit for bit: on the table's draws, its very row.
    assert weighted["row"] == "weighted merge (r=0.00)" and weighted["kind"] == "weighted merge"
    assert results["models"][weighted["row"]] == results["models"][first]
    assert weighted["evaluations"] == 1 and weighted["weights"] == [[1.0, 0.0]] * 26
    # MBW: 25 UNet blocks and BASE (the members' text encoders differ), each trying ratio 1 once after the start.
    assert mbw["row"] == "MBW" and mbw["blocks"][0] == "IN00" and mbw["blocks"][-2:] == ["OUT11", "BASE"]
    assert len(mbw["weights"]) == 26 and mbw["evaluations"] == 1 + 26
    assert mbw["validation_losses"]["sweep 1"] <= mbw["validation_losses"]["start"]
    unet_bytes = sum(value.numel() * value.element_size() for value in load_member(members[0]).state_dict().values())
    assert weighted["extra_memory_bytes"] > unet_bytes  # a UNet and a text encoder
    assert results["best_merge"] in (weighted["row"], "MBW") and results["best_member"] in results["models"]
    assert mbw["validation_error"] == mbw["validation_losses"]["sweep 1"] <= weighted["validation_error"]
    # merges.json, written before the table: the same merges, for work that need not wait for the table.
    early = json.loads((tmp_path / evaluate.MERGES_FILE).read_text())
    assert early["merges"] == results["merges"] and early["validation"] == results["merge_validation"]
    printed = capsys.readouterr().out
    assert "vs best member" in printed and "vs best merge" in printed
    assert "MBW: 26 blocks (IN00..BASE) by coordinate descent" in printed and "this favours the merges" in printed


def test_merges_only_writes_the_search_alone_and_merges_reuses_it_for_the_same_table(checkpoint_factory, held_out,
                                                                                    tmp_path, capsys):
    members = [checkpoint_factory(1), checkpoint_factory(2)]  # different text encoders: BASE is merged too
    search = ("--figure-images", "0", "--merge-ratios", "0.3", "0.6", "--mbw-ratios", "0", "1",
              "--validation-samples", "3", "--validation-draws", "1")
    searched = run_evaluate(members, held_out, tmp_path / "searched", *search, merges=True)

    # --merges-only: the search and its merges.json, nothing else.
    apart = tmp_path / "apart"
    assert evaluate.main(["--members", *map(str, members), "--data", str(held_out), "--resolution", "32",
                          "--batch-size", "8", "--output-dir", str(apart), "--merges-only", *search]) == 0
    assert sorted(path.name for path in apart.iterdir()) == [evaluate.MERGES_FILE]
    written = json.loads((apart / evaluate.MERGES_FILE).read_text())
    assert written["members"] == searched["members"]
    timings = ("search_seconds", "merge_seconds")
    assert ([{key: value for key, value in merge.items() if key not in timings} for merge in written["merges"]]
            == [{key: value for key, value in merge.items() if key not in timings} for merge in searched["merges"]])
    assert "wrote " + str(apart / evaluate.MERGES_FILE) in capsys.readouterr().out

    # --merges: the same merges rebuilt, no search, so the same table bit for bit.
    reused = run_evaluate(members, held_out, tmp_path / "reused", *search[:2], "--merges",
                          str(apart / evaluate.MERGES_FILE), merges=True)
    assert reused["models"] == searched["models"]
    assert reused["merges"] == written["merges"] and reused["best_merge"] == searched["best_merge"]
    assert reused["merge_validation"] == {**written["validation"], "merges_file": str(apart / evaluate.MERGES_FILE)}
    printed = capsys.readouterr().out
    assert f"merges from {apart / evaluate.MERGES_FILE}" in printed and "choosing the merges' weights" not in printed

    # Refused before any work: other members, a file that is not a merges.json, weights that do not fit.
    with pytest.raises(AfaError, match=r"was searched for the members .*\[.*\], .*, not for these"):
        run_evaluate([members[0], checkpoint_factory(3)], held_out, tmp_path / "other", "--merges",
                     str(apart / evaluate.MERGES_FILE), merges=True)
    not_merges = tmp_path / "evaluation.json"
    not_merges.write_text(json.dumps(searched))
    with pytest.raises(AfaError, match="not a merges.json"):
        run_evaluate(members, held_out, tmp_path / "other", "--merges", str(not_merges), merges=True)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps({**written, "merges": [{**written["merges"][0],
                                                         "weights": written["merges"][0]["weights"][:25]}]}))
    with pytest.raises(AfaError, match="25 weight vectors of 2 members; these 2 members take 26 vectors"):
        run_evaluate(members, held_out, tmp_path / "other", "--merges", str(edited), merges=True)
    for flags in (["--merges", str(edited), "--merges-only"], ["--merges", str(edited), "--merge-baselines", "none"],
                  ["--merges", str(tmp_path / "missing.json")]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--members", *map(str, members), "--data", str(held_out), *flags])


def test_per_pixel_errors_tell_different_members_apart(checkpoint_factory):
    unets = [load_member(checkpoint_factory(seed)) for seed in (1, 2)]
    schedule = load_schedule(checkpoint_factory(1), read_sd_config(checkpoint_factory(1)))
    generator = torch.Generator().manual_seed(0)
    latents, context = torch.randn(1, 4, 16, 16, generator=generator), torch.randn(1, 77, 32, generator=generator)
    noise = torch.randn(2, 4, 16, 16, generator=generator)
    errors = evaluate.per_pixel_errors(unets, latents, context, [500, 100], noise, schedule, batch_size=1)
    assert set(evaluate.winner_maps(errors).unique().tolist()) == {0, 1}
    # Batching changes nothing but rounding.
    torch.testing.assert_close(errors, evaluate.per_pixel_errors(unets, latents, context, [500, 100], noise,
                                                                 schedule, batch_size=3))


def test_results_json_has_every_model_and_range_and_the_pngs_their_size(checkpoint_factory, held_out, tmp_path):
    members = [checkpoint_factory(1), checkpoint_factory(2)]
    weights = weights_for(members, tmp_path / "afa.safetensors")
    results = run_evaluate(members, held_out, tmp_path / "out", "--weights", str(weights), "--map-blocks",
                           "input_blocks.0", "middle_block", "output_blocks.10")
    names = [member["name"] for member in results["members"]]
    assert set(results["models"]) == {*names, "block average", "noise average", "AFA"}
    ranges = ["all"] + [range_label(low, high) for low, high in TIMESTEP_RANGES]
    for name, row in results["models"].items():
        assert list(row) == ranges, name
        assert all(value > 0 for value in row.values())
    assert results["models"]["AFA"] != results["models"]["block average"]  # the weights are not uniform
    weights_entry, = results["weights"]
    assert weights_entry["mode"] == "sabw" and weights_entry["row"] == "AFA" and weights_entry["design"] == "paper"
    assert results["images"] == 6 and results["draws_per_image"] == 4

    capability = Image.open(tmp_path / "out" / evaluate.CAPABILITY_FIGURE)
    legend = legend_entries(names) + [("tie (equal error)", TIE_COLOR)]
    assert capability.size == grid_layout(2, 1 + len(TIMESTEPS), CELL, evaluate.FIGURE_LABEL_LINES, legend,
                                          evaluate.CAPABILITY_TITLE.format(draws=3)).size
    maps = Image.open(tmp_path / "out" / evaluate.MAPS_FIGURE)
    assert maps.size == grid_layout(2, 1 + 3 * len(TIMESTEPS), CELL, evaluate.FIGURE_LABEL_LINES,
                                    legend_entries(names), evaluate.MAPS_TITLE).size


def test_several_weights_files_give_a_row_and_maps_each_on_the_same_draws(checkpoint_factory, held_out, tmp_path):
    members = [checkpoint_factory(1), checkpoint_factory(2)]
    paper = weights_for(members, tmp_path / "a.safetensors", "paper")
    fast = weights_for(members, tmp_path / "b.safetensors", "fast")
    results = run_evaluate(members, held_out, tmp_path / "both", "--weights", str(paper), str(fast),
                           "--figure-images", "1")
    assert [(entry["row"], entry["design"]) for entry in results["weights"]] == [("AFA (paper)", "paper"),
                                                                                  ("AFA (fast)", "fast")]
    assert results["figures"]["aggregation_maps AFA (paper)"] == "aggregation-maps-paper.png"
    assert (tmp_path / "both" / "aggregation-maps-fast.png").is_file()
    assert not (tmp_path / "both" / evaluate.MAPS_FIGURE).exists()
    alone = run_evaluate(members, held_out, tmp_path / "paper", "--weights", str(paper), "--figure-images", "0")
    assert results["models"]["AFA (paper)"] == alone["models"]["AFA"]  # the same draws, whatever else is evaluated
    assert results["models"]["AFA (fast)"] != results["models"]["AFA (paper)"]
    # Same designs: the rows are named by file.
    twice = run_evaluate(members, held_out, tmp_path / "twice", "--weights", str(paper), str(paper),
                         "--figure-images", "0")
    assert {"AFA (a)", "AFA (a (2))"} <= set(twice["models"])


def test_last_block_weights_evaluate_in_their_mode(checkpoint_factory, held_out, tmp_path):
    members = [checkpoint_factory(1), checkpoint_factory(2)]
    layout = block_layout(unet_shapes(load_member(members[0])))
    aggregator = Aggregator(default_config(layout, 2, 32, hidden_channels=32, only_last_block=True,
                                           text_conditioning="per_member"))  # as noise averaging reads the prompt
    weights = save_weights(tmp_path / "last.safetensors", aggregator, [MemberRef.from_file(m) for m in members])
    results = run_evaluate(members, held_out, tmp_path / "out", "--weights", str(weights), "--figure-images", "1")
    assert [entry["mode"] for entry in results["weights"]] == ["last-block"]
    # Zero-initialised SABW gives 1/2 each: the last-block ensemble then equals noise averaging.
    assert results["models"]["AFA"] == pytest.approx(results["models"]["noise average"], rel=1e-5)
    maps = Image.open(tmp_path / "out" / evaluate.MAPS_FIGURE)  # only the last block has maps
    assert maps.size == grid_layout(1, 1 + len(TIMESTEPS), CELL, evaluate.FIGURE_LABEL_LINES,
                                    legend_entries([m["name"] for m in results["members"]]), evaluate.MAPS_TITLE).size


def test_weights_of_another_member_set_are_refused(checkpoint_factory, held_out, tmp_path):
    weights = weights_for([checkpoint_factory(1), checkpoint_factory(2)], tmp_path / "afa.safetensors")
    others = [checkpoint_factory(1), checkpoint_factory(3)]
    with pytest.raises(MembersMismatchError, match="trained for 2 other members"):
        run_evaluate(others, held_out, tmp_path / "out", "--weights", str(weights))

    # From the command line: the core's message, no traceback, exit status 2.
    result = subprocess.run([sys.executable, "training/evaluate.py", "--members", *map(str, others),
                             "--weights", str(weights), "--data", str(held_out), "--output-dir", str(tmp_path / "cli")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert "error:" in result.stderr and "trained for 2 other members" in result.stderr
    assert "Traceback" not in result.stderr


def test_user_errors_in_flags_are_reported_clearly(checkpoint_factory, held_out, tmp_path):
    members = [str(checkpoint_factory(1)), str(checkpoint_factory(2))]
    weights = weights_for([checkpoint_factory(1), checkpoint_factory(2)], tmp_path / "afa.safetensors")
    with pytest.raises(AfaError, match="output_blocks.12"):
        run_evaluate(members, held_out, tmp_path / "out", "--weights", str(weights), "--map-blocks", "output_blocks.12")
    with pytest.raises(AfaError, match="timesteps 0 to 999"):
        run_evaluate(members, held_out, tmp_path / "out", "--timesteps", "1000")


def test_help_documents_every_flag():
    result = subprocess.run([sys.executable, "training/evaluate.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0
    for flag in ("--members", "--weights", "--data", "--resolution", "--samples", "--seed", "--output-dir",
                 "--draws", "--timesteps", "--figure-images", "--figure-draws", "--map-blocks", "--cell-size",
                 "--text-conditioning", "--clip-skip", "--components", "--merge-baselines", "--validation-data",
                 "--validation-samples", "--validation-draws", "--merge-ratios", "--mbw-ratios", "--mbw-sweeps",
                 "--merges", "--merges-only"):
        assert flag in result.stdout
    assert "(default: 256)" in result.stdout  # ArgumentDefaultsHelpFormatter


def test_noise_averaging_reuses_the_member_rows_and_equals_the_ensemble_bit_for_bit(checkpoint_factory, held_out):
    from afa import EnsembleUNet
    from afa.comparison import NOISE_AVERAGE
    from afa.modes import NOISE
    from training.data import ImageCaptionDataset, SkipReport, collate, index_captioned_images
    from training.metrics import ensemble_reading, prepare_batch
    from training.sd_checkpoint import load_frozen_models

    frozen = load_frozen_models([checkpoint_factory(1), checkpoint_factory(2)])  # different text encoders too
    images = ImageCaptionDataset(index_captioned_images(held_out, SkipReport()), 32)
    batch = collate([{**images[index], "index": index} for index in range(4)])
    inputs = prepare_batch(batch, frozen.vae, frozen.text_encoders, frozen.schedule, seed=0,
                           device=torch.device("cpu"))
    arguments = (inputs["noisy"], inputs["timesteps"], inputs["member_contexts"], inputs["member_vectors"])
    passes = [0, 0]
    hooks = [member.register_forward_hook(lambda *_, index=index: passes.__setitem__(index, passes[index] + 1))
             for index, member in enumerate(frozen.members)]
    models = evaluate.comparison_models(frozen.members, ["one", "two"])
    rows = {name: models[name](*arguments) for name in ("one", "two", NOISE_AVERAGE)}
    assert passes == [1, 1]  # the noise average read the member rows' predictions
    for hook in hooks:
        hook.remove()
    expected = ensemble_reading(EnsembleUNet(frozen.members, None, NOISE), "per_member")(*arguments)
    assert torch.equal(rows[NOISE_AVERAGE], expected)
    # A new batch (new tensors) is computed anew, not read from the last one.
    noisy = inputs["noisy"] + 1
    assert not torch.equal(models["one"](noisy, *arguments[1:]), rows["one"])
