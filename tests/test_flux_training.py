"""training/train.py and training/evaluate.py with FLUX.1 members, on tiny FLUX-layout transformers (width 32, 1
double and 2 single blocks) written as real transformer files, with a tiny FLUX autoencoder, CLIP-L and T5 encoder
and a T5 tokenizer.json: training on the rectified-flow objective, resuming bit for bit, the evaluation table, the
weights file's family (and EnsembleFlux running it), the cached text encodings, and the refusals before anything
loads (UNet and FLUX members mixed, missing components, FLUX members of different layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from factories import write_captioned_images, write_flux_components

ROPE_AXES = ("--rope-axes", "4", "6", "6")


def tiny_flux_params(**overrides):
    from afa.flux_model import FluxParams

    values = dict(in_channels=64, out_channels=64, vec_in_dim=64, context_in_dim=24, hidden_size=32, mlp_ratio=2.0,
                  num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(4, 6, 6))
    return FluxParams(**{**values, **overrides})


def write_flux_member(path: Path, seed: int, **overrides) -> Path:
    """A tiny FLUX-layout transformer file (bare BFL keys, ComfyUI's models/diffusion_models form)."""
    from afa.flux_model import Flux

    torch.manual_seed(seed)
    model = Flux(tiny_flux_params(**overrides))
    with torch.no_grad():  # BFL initialises nothing to zero, but make the final layer matter at this width
        model.final_layer.linear.weight.normal_(0, 0.2)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return path


def write_components(folder: Path) -> dict[str, Path]:
    """A tiny FLUX autoencoder (16 latent channels, downsampling 2), CLIP-L (width 64), T5 encoder (width 24) and a
    word-level T5 tokenizer.json, as files."""
    return write_flux_components(folder, vae_resolution=32, vae_channel_multipliers=[1, 2], clip_width=64,
                                 clip_heads=1, clip_intermediate=128, t5_width=24)


@pytest.fixture(scope="module")
def flux_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    components = write_components(folder)
    members = [write_flux_member(folder / f"flux-{seed}.safetensors", seed) for seed in (1, 2)]
    data = write_captioned_images(tmp_path_factory.mktemp("data"), count=8, width=20, height=16)
    return {"members": members, "data": data, **components}


def component_args(files) -> list[str]:
    return ["--vae", str(files["vae"]), "--clip-l", str(files["clip_l"]), "--t5", str(files["t5"]),
            "--t5-tokenizer", str(files["t5_tokenizer"]), "--t5-max-length", "8", *ROPE_AXES]


def train_args(files, run_folder: Path, name: str, *extra: str) -> list[str]:
    return ["--members", *map(str, files["members"]), "--data", str(files["data"]), "--resolution", "16",
            "--batch-size", "2", "--val-split", "0.25", "--hidden-channels", "32", "--num-workers", "0",
            "--save-dtype", "fp32", "--output", str(run_folder / f"{name}.safetensors"),
            "--run-dir", str(run_folder / name), *component_args(files), *extra]


@pytest.fixture(scope="module")
def baseline(flux_files, tmp_path_factory):
    """4 uninterrupted steps (2 epochs of 3 batches, cut at 4) with the defaults: paper preset, posterior samples,
    random crops, logit-normal t with the shift, guidance 3.5."""
    from training import train

    folder = tmp_path_factory.mktemp("runs")
    assert train.main(train_args(flux_files, folder, "baseline", "--max-steps", "4", "--save-every", "2")) == 0
    return folder / "baseline.safetensors"


def test_training_writes_a_flux_weights_file_that_ensembleflux_runs(baseline, flux_files):
    from afa import load_weights, read_weights_info
    from afa.flux import EnsembleFlux
    from afa.flux_model import load_flux_member

    info = read_weights_info(baseline)
    assert info.config.family == "flux" and info.config.num_double_blocks == 1 and info.config.num_blocks == 3
    assert info.config.context_dim == 24 and info.config.text_conditioning == "shared"
    assert info.training["objective"] == "rectified flow (velocity)" and info.training["guidance"] == 3.5
    assert info.training["steps"] == 4 and all(member.unet for member in info.members)
    aggregator, _ = load_weights(baseline)
    members = [load_flux_member(path, axes_dim=(4, 6, 6)) for path in flux_files["members"]]
    ensemble = EnsembleFlux(members, aggregator, info.mode)
    with torch.no_grad():
        out = ensemble(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), torch.randn(1, 8, 24), torch.randn(1, 64),
                       torch.tensor([3.5]))
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
    # trained: SABW's last conv is no longer zero
    assert any(value.abs().sum() > 0 for key, value in aggregator.state_dict().items() if "out" in key)
    log = [json.loads(line) for line in (baseline.parent / "baseline" / "log.jsonl").read_text().splitlines()]
    validations = [record["validation"] for record in log if "validation" in record]
    assert validations and set(validations[-1]) == {"flux-1", "flux-2", "block average", "AFA"}


def test_resume_continues_bit_for_bit(baseline, flux_files, tmp_path):
    """2 steps, stop; resume to 4: the weights equal the uninterrupted run's. The resumed run encodes no caption
    again (the text cache), and the cache holds one file per distinct caption and the empty one."""
    from training import train

    assert train.main(train_args(flux_files, tmp_path, "resumed", "--max-steps", "2")) == 0
    cache = tmp_path / "resumed" / "text-cache"
    cached = sorted(cache.rglob("*.safetensors"))
    assert len(cached) == 8 + 1
    mtimes = [path.stat().st_mtime_ns for path in cached]
    assert train.main(train_args(flux_files, tmp_path, "resumed", "--max-steps", "4", "--resume", "latest")) == 0
    assert [path.stat().st_mtime_ns for path in sorted(cache.rglob("*.safetensors"))] == mtimes
    expected, resumed = load_file(str(baseline)), load_file(str(tmp_path / "resumed.safetensors"))
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[key], resumed[key]) for key in expected)


def test_resume_refuses_another_guidance(baseline, flux_files):
    from afa import AfaError
    from training import train

    run_folder = baseline.parent
    with pytest.raises(AfaError, match="--guidance: saved 3.5, given 1.0"):
        train.train(train.parse_args(train_args(flux_files, run_folder, "baseline", "--max-steps", "6",
                                                "--resume", "latest", "--guidance", "1.0")))


def test_evaluate_prints_the_flow_matching_table(baseline, flux_files, tmp_path, capsys):
    from training import evaluate

    output = tmp_path / "evaluation"
    assert evaluate.main(["--members", *map(str, flux_files["members"]), "--weights", str(baseline),
                          "--data", str(flux_files["data"]), "--resolution", "16", "--samples", "4", "--draws", "2",
                          "--batch-size", "4", "--output-dir", str(output), *component_args(flux_files)]) == 0
    printed = capsys.readouterr().out
    assert "held-out flow-matching MSE" in printed and "t 0.00-0.25" in printed
    results = json.loads((output / "evaluation.json").read_text())
    assert list(results["models"]) == ["flux-1", "flux-2", "block average", "noise average", "AFA"]
    assert results["family"] == "flux" and results["guidance"] == 3.5
    assert results["timestep_ranges"] == ["t 0.00-0.25", "t 0.25-0.50", "t 0.50-0.75", "t 0.75-1.00"]
    assert all(row["all"] > 0 for row in results["models"].values())


def test_refusals_before_anything_loads(flux_files, checkpoint_factory, tmp_path, monkeypatch):
    from training import flux_training, train

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded a model before refusing")

    monkeypatch.setattr(flux_training, "load_t5", no_loading)
    monkeypatch.setattr(flux_training, "load_flux_vae", no_loading)
    monkeypatch.setattr(flux_training, "load_flux_members", no_loading)

    def refused(argv) -> str:
        with pytest.raises(train.UsageError) as error:
            train.parse_args(argv, exit_on_error=False)
        return str(error.value)

    unet = checkpoint_factory(1)
    mixed = train_args(flux_files, tmp_path, "mixed")
    mixed[mixed.index("--members") + 2] = str(unet)
    assert "mix FLUX transformers (flux-1.safetensors) and UNet checkpoints" in refused(mixed)
    missing = train_args(flux_files, tmp_path, "missing")
    for name in ("--vae", "--t5"):
        position = missing.index(name)
        del missing[position:position + 2]
    assert "give the components they share with --vae, --t5" in refused(missing)
    wide = write_flux_member(tmp_path / "wide.safetensors", 3, depth_single_blocks=3)
    other = train_args(flux_files, tmp_path, "other")
    other[other.index("--members") + 2] = str(wide)
    assert "wide.safetensors cannot be ensembled with flux-1.safetensors" in refused(other)
    unet_args = ["--members", str(unet), str(checkpoint_factory(2)), "--data", str(flux_files["data"]),
                 "--guidance", "3.5"]
    assert "--guidance: for FLUX transformer members only" in refused(unet_args)
    assert "--config: for UNet members only" in refused(train_args(flux_files, tmp_path, "c", "--config", "x.yaml"))


def test_the_comfyui_node_runs_a_trained_flux_file(comfy_standin, flux_files, tmp_path):
    """Members built as ComfyUI's loader builds FLUX transformers (comfy.supported_models.Flux, the stand-in),
    written as transformer files and trained on: the node binds the weights file by the members' fingerprints (the
    trainer records the loaded tensors' fingerprint) and runs SABW, which differs from block averaging."""
    import comfy.model_patcher
    import comfy.supported_models
    import nodes as comfy_nodes

    import comfyui_factories as cf
    from afa.comfyui.nodes import AFAEnsemble
    from training import train

    patchers, files = [], []
    for seed in (1, 2):
        config = comfy.supported_models.Flux(dict(cf.TINY_FLUX_CONFIG, vec_in_dim=64, depth=1))
        config.set_inference_dtype(torch.float32, None)
        model = config.get_model({}, "", device=torch.device("cpu"))
        cf.randomize_parameters_(model.diffusion_model, seed, 0.05)
        model.eval()
        patchers.append(comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                                         offload_device=torch.device("cpu")))
        files.append(tmp_path / f"comfy-flux-{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}, str(files[-1]))
    weights = comfy_standin.models_dir / "afa" / "trained-flux.safetensors"
    arguments = train_args({**flux_files, "members": files}, tmp_path, "comfy", "--max-steps", "2",
                           "--learning-rate", "1e-2")
    arguments[arguments.index("--output") + 1] = str(weights)
    assert train.main(arguments) == 0

    generator = torch.Generator().manual_seed(0)
    conditioning = [[torch.randn(1, 5, 24, generator=generator),
                     {"pooled_output": torch.randn(1, 64, generator=generator), "guidance": 3.5}]]

    def sample(model):
        return comfy_nodes.common_ksampler(model, 0, 2, 1.0, "euler", "simple", conditioning, conditioning,
                                           cf.flux_latent(32, 32))[0]["samples"]

    with torch.inference_mode():
        (sabw, _) = AFAEnsemble().ensemble(patchers[0], patchers[1], "SABW", weights.name)
        (average, _) = AFAEnsemble().ensemble(patchers[0], patchers[1], "Block average", "none")
        sabw_samples, average_samples = sample(sabw), sample(average)
    assert torch.isfinite(sabw_samples).all() and not torch.equal(sabw_samples, average_samples)


def test_gradient_checkpointing_cached_latents_and_bf16(baseline, flux_files, tmp_path):
    """--gradient-checkpointing recomputes the FLUX blocks and ends where the baseline does (rounding aside);
    --cache-latents (posterior moments, centre crops) and --mixed-precision bf16 (CPU autocast) train too, and the
    fast preset with the text-mixing ablation records them in the config."""
    from afa import read_weights_info
    from training import train

    assert train.main(train_args(flux_files, tmp_path, "checkpointed", "--max-steps", "4",
                                 "--gradient-checkpointing")) == 0
    expected, got = load_file(str(baseline)), load_file(str(tmp_path / "checkpointed.safetensors"))
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5)
    assert train.main(train_args(flux_files, tmp_path, "cached", "--max-steps", "2", "--cache-latents", "--crop",
                                 "center", "--mixed-precision", "bf16", "--preset", "fast", "--text-mixing",
                                 "average", "--timestep-sampling", "uniform")) == 0
    info = read_weights_info(tmp_path / "cached.safetensors")
    assert info.config.design == "fast" and info.config.text_mixing == "average"
    assert info.training["timestep_sampling"] == "uniform" and info.training["steps"] == 2
    assert any((tmp_path / "cached" / "latent-cache").iterdir())


def test_flow_draws_are_shifted_by_the_image_size():
    """t is drawn per sample from its own generator (the same for a sample whatever its batch), uniform and unshifted
    for validation, and shifted towards noise by FLUX's mu (0.5 at 256 tokens, 1.15 at 4096 = 1024 px)."""
    from training.diffusion import draw_flow_for_samples, flux_shift_mu, flux_time_shift

    assert flux_shift_mu(256) == pytest.approx(0.5) and flux_shift_mu(4096) == pytest.approx(1.15)
    small = draw_flow_for_samples(list(range(64)), 0, 0, (16, 32, 32), 0.0, "logit-normal")
    large = draw_flow_for_samples(list(range(64)), 0, 0, (16, 128, 128), 0.0, "logit-normal")
    assert (large.timesteps > small.timesteps).all() and 0 < small.timesteps.min() and large.timesteps.max() < 1
    alone = draw_flow_for_samples([5], 0, 0, (16, 32, 32), 0.0, "logit-normal")
    assert torch.equal(alone.timesteps[0], small.timesteps[5]) and torch.equal(alone.noise[0], small.noise[5])
    plain = draw_flow_for_samples(list(range(64)), 0, 0, (16, 128, 128), 0.0, None)
    assert torch.equal(flux_time_shift(torch.tensor([0.0, 0.5, 1.0]), 0.0), torch.tensor([0.0, 0.5, 1.0]))
    assert plain.timesteps.min() >= 0 and plain.timesteps.max() < 1 and not torch.equal(plain.timesteps,
                                                                                        large.timesteps)


def test_text_encoders_load_from_comfyui_style_files(flux_files):
    """CLIP-L and T5 read from their files (T5's tied embedding stored once) encode as transformers' models with
    those weights do; T5's tokens end with </s> and are padded with <pad> to --t5-max-length."""
    from transformers import T5EncoderModel

    from training.flux_training import FluxTextEncoders, T5Tokens, load_clip_l, load_t5, t5_config
    from training.text_encoder import tokenize

    tokens = T5Tokens(flux_files["t5_tokenizer"], 8)
    ids = tokens(["a red thing", "a blue thing number 3 and more words than fit"])
    assert ids[0].tolist() == [3, 4, 7, 1, 0, 0, 0, 0] and ids[1].tolist()[-1] == 1 and ids.shape == (2, 8)
    encoders = FluxTextEncoders(load_clip_l(flux_files["clip_l"]), load_t5(flux_files["t5"]), tokens)
    context, pooled = encoders.encode(["a red thing", ""])
    state = load_file(str(flux_files["t5"]))
    reference = T5EncoderModel(t5_config({k: tuple(v.shape) for k, v in state.items()})).eval()
    reference.load_state_dict({**state, "encoder.embed_tokens.weight": state["shared.weight"]})
    with torch.no_grad():
        expected = reference(input_ids=tokens(["a red thing", ""])).last_hidden_state
        clip = encoders.clip(input_ids=tokenize(["a red thing", ""])).pooler_output
    assert context.shape == (2, 8, 24) and pooled.shape == (2, 64)
    assert torch.equal(context, expected) and torch.equal(pooled, clip)
