"""The real-WebUI tier: a real AUTOMATIC1111 1.10 install started with this checkout as an extension.

Opt-in: `AFA_WEBUI_DIR=<an A1111 checkout with its venv at $AFA_WEBUI_DIR/venv> make test-webui`. Without
AFA_WEBUI_DIR the test modules skip themselves (at module level, before importing anything heavy), so `make test`
stays fast and never imports playwright.

The `webui` fixture (one per session) writes a temporary data dir (`--data-dir`): six tiny SD1-layout checkpoints
(tiny-a, tiny-a2 = an identical copy of tiny-a, tiny-b, tiny-c, tiny-a-text = tiny-a with tiny-b's text encoder,
tiny-a-moved = tiny-a's tensors at other offsets, another sha256), a SABW weights file for tiny-b + tiny-c
(models/AFA/pair.safetensors), a strong random LoRA (models/Lora/strong.safetensors), 8 captioned images
(training-images/) and extensions/afa -> this
checkout; then starts the WebUI on a free loopback port with the API on, on the CPU, and loads tiny-a. Everything
the WebUI writes (config.json, cache.json, params.txt, its log webui.log) stays in that data dir.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from factories import free_port, log_tail  # tests/factories.py: shared by the real tiers

WEBUI_DIR_VARIABLE = "AFA_WEBUI_DIR"
SKIP_MESSAGE = ("real-WebUI tier: set AFA_WEBUI_DIR to an A1111 1.10 checkout with its venv at $AFA_WEBUI_DIR/venv "
                "and run `AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui`")
REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")

CHECKPOINTS = {"tiny-a": 1, "tiny-a2": 1, "tiny-b": 2, "tiny-c": 3}  # name -> seed (tiny-a2 is a copy of tiny-a)
TEXT_VARIANT, TEXT_VARIANT_OF, TEXT_VARIANT_ENCODER = "tiny-a-text", "tiny-a", "tiny-b"
MOVED_COPY, MOVED_COPY_OF = "tiny-a-moved", "tiny-a"
PAIR_MEMBERS = ("tiny-b", "tiny-c")  # the members models/AFA/pair.safetensors was "trained" for
LOADED = "tiny-a"
SCRIPT_TITLE = "AFA ensemble"

STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 300

DEFAULT_PAYLOAD = dict(prompt="a photo of a cat", steps=2, width=64, height=64, seed=1, sampler_name="Euler",
                       cfg_scale=7)


# -- the data dir ----------------------------------------------------------------------------------------------------

def write_checkpoints(folder: Path) -> dict[str, Path]:
    """The tiny checkpoints (with their yamls and the tiny text encoder folder the yamls name) in `folder`."""
    import torch

    from training.sd_checkpoint import (TINY_TEXT_ENCODER_FOLDER_NAME, tiny_sd_config, tiny_sd_state_dict,
                                        write_webui_checkpoint)

    config = tiny_sd_config(folder / TINY_TEXT_ENCODER_FOLDER_NAME)
    paths, states = {}, {}
    for name, seed in CHECKPOINTS.items():
        state_dict = tiny_sd_state_dict(seed)
        # as tests/webui_standin/harness.py tiny_checkpoint_file: a freshly initialised text encoder ends in a
        # LayerNorm with zero bias, and the WebUI's "Original" emphasis then divides by a mean of ~0 (NaN images)
        bias_key = "cond_stage_model.transformer.text_model.final_layer_norm.bias"
        generator = torch.Generator().manual_seed(seed)
        state_dict[bias_key] = 0.5 + 0.1 * torch.randn(state_dict[bias_key].shape, generator=generator)
        paths[name] = write_webui_checkpoint(folder / f"{name}.safetensors", state_dict, config)
        states[name] = state_dict
    # tiny-a's UNet and VAE with tiny-b's text encoder: a "fine-tune" that changed only the text encoder
    variant = dict(states[TEXT_VARIANT_OF])
    variant.update({k: v for k, v in states[TEXT_VARIANT_ENCODER].items() if k.startswith("cond_stage_model.")})
    paths[TEXT_VARIANT] = write_webui_checkpoint(folder / f"{TEXT_VARIANT}.safetensors", variant, config)
    # tiny-a again with a 12-byte tensor stored first: another sha256 (a member the WebUI reads from its own file, not
    # the loaded model) with the same UNet, its tensors 12 bytes off 16-byte boundaries in the file (issue 17)
    moved = {"aaa_padding": torch.zeros(3), **states[MOVED_COPY_OF]}
    paths[MOVED_COPY] = write_webui_checkpoint(folder / f"{MOVED_COPY}.safetensors", moved, config)
    return paths


def write_pair_weights(path: Path, member_paths: list[Path], context_dim: int = 32) -> Path:
    """A SABW weights file for the given checkpoints with random, non-uniform weights (as
    tests/test_webui_extension.py write_weights); members named by file stem, bound by sha256."""
    import torch

    from afa import Aggregator, MemberRef, default_config, file_sha256, save_weights
    from afa.members import read_unet_shapes
    from afa.unet import block_layout
    from factories import randomize_  # tests/factories.py

    refs = [MemberRef(member.stem, file_sha256(member)) for member in member_paths]
    layout = block_layout(read_unet_shapes(member_paths[0]))
    config = default_config(layout, len(member_paths), context_dim=context_dim, hidden_channels=32, num_heads=2)
    torch.manual_seed(0)
    aggregator = randomize_(Aggregator(config), seed=0, scale=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_weights(path, aggregator, refs)


def write_strong_lora(path: Path, seed: int = 0, rank: int = 4, scale: float = 0.5) -> Path:
    """A random kohya-format LoRA for every attention/projection/feed-forward Linear and Conv2d of the tiny UNet,
    strong enough to change a 2-step image visibly."""
    import torch
    from safetensors.torch import save_file

    from afa.unet import PRESETS, build_unet
    from factories import lora_pair  # tests/factories.py

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module_name, module in build_unet(PRESETS["tiny"]).named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if not any(part in module_name for part in ("attn", "proj", "ff")):
            continue
        key = "lora_unet_" + module_name.replace(".", "_")
        pair = lora_pair(module.weight, rank, scale, generator)
        tensors.update({f"{key}.{suffix}": tensor for suffix, tensor in pair.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


TRAINING_IMAGES = "training-images"  # in the data dir: what the training tests train on


def members_data_dir(tmp_path_factory, name: str, members, write_member) -> tuple[Path, list[Path]]:
    """A data dir of its own for `own_webui`: `write_member(path, seed)` writes each member's checkpoint (seeds 1,
    2, ...) into models/Stable-diffusion, and the training images go beside them. Returns (data dir, files)."""
    data_dir = tmp_path_factory.mktemp(name)
    folder = data_dir / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    files = []
    for seed, member in enumerate(members, start=1):
        files.append(folder / f"{member}.safetensors")
        write_member(files[-1], seed)
    write_training_images(data_dir / TRAINING_IMAGES)
    return data_dir, files


def train_through_api(server, members, output: str, timeout: float = 600) -> dict:
    """A short run (4 steps, 32 px, the `fast` design) through POST /afa/v1/train on the data dir's training images,
    polled until it ends; its final status, which must be "finished"."""
    import time

    status = server.post("/afa/v1/train", {
        "members": list(members), "data": str(server.data_dir / TRAINING_IMAGES), "resolution": 32,
        "batch_size": 2, "max_steps": 4, "val_split": 0.25, "preset": "fast", "hidden_channels": 32,
        "output": output})
    deadline = time.time() + timeout
    while status["state"] not in ("finished", "cancelled", "failed"):
        assert time.time() < deadline, status
        time.sleep(0.5)
        status = server.get("/afa/v1/train")
    assert status["state"] == "finished", status["message"]
    return status


def write_training_images(folder: Path, count: int = 8) -> Path:
    """`count` random 40x40 PNGs with kohya-style .txt captions."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a {['red', 'blue'][index % 2]} thing number {index}")
    return folder


def write_data_dir(data_dir: Path) -> None:
    models = data_dir / "models"
    checkpoints = write_checkpoints(models / "Stable-diffusion")
    write_pair_weights(models / "AFA" / "pair.safetensors", [checkpoints[name] for name in PAIR_MEMBERS])
    write_strong_lora(models / "Lora" / "strong.safetensors")
    write_training_images(data_dir / TRAINING_IMAGES)
    (data_dir / "extensions").mkdir(parents=True, exist_ok=True)
    (data_dir / "extensions" / "afa").symlink_to(REPO, target_is_directory=True)


# -- the server ------------------------------------------------------------------------------------------------------

class WebUIError(AssertionError):
    pass


@dataclass
class Generation:
    """A txt2img response: the images (PIL), their infotexts, and the response's info JSON."""
    images: list = field(repr=False)
    infotexts: list[str]
    info: dict = field(repr=False)

    @property
    def image(self):
        return self.images[0]

    @property
    def infotext(self) -> str:
        return self.infotexts[0]

    @property
    def params(self) -> dict:
        return parse_infotext(self.infotext)

    def same_image(self, other: "Generation") -> bool:
        """The first images have the same pixels (bit for bit)."""
        return same_pixels(self.image, other.image)

    def max_diff(self, other: "Generation") -> int:
        return max_pixel_diff(self.image, other.image)


@dataclass
class WebUI:
    url: str
    webui_dir: Path
    data_dir: Path
    log: Path
    process: subprocess.Popen = field(repr=False)
    repo: Path = REPO
    pair_members: tuple = PAIR_MEMBERS

    # -- HTTP --

    def request(self, method: str, path: str, body=None, timeout: float = REQUEST_TIMEOUT_S):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace")[:2000]
            raise WebUIError(f"{method} {path} -> HTTP {error.code}: {detail}\n--- webui.log ---\n"
                             f"{log_tail(self.log)}") from None

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, body=None, **kwargs):
        return self.request("POST", path, {} if body is None else body, **kwargs)

    # -- generation --

    def txt2img(self, afa: list | None = None, **overrides) -> Generation:
        """txt2img with DEFAULT_PAYLOAD and `overrides`; `afa` = the AFA script's args (None: no alwayson_scripts)."""
        payload = {**DEFAULT_PAYLOAD, **overrides}
        if afa is not None:
            payload.setdefault("alwayson_scripts", {})[SCRIPT_TITLE] = {"args": afa}
        response = self.post("/sdapi/v1/txt2img", payload)
        info = json.loads(response["info"])
        return Generation([decode_image(image) for image in response["images"]], info["infotexts"], info)


def decode_image(base64_png: str):
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(base64_png.split(",", 1)[-1]))).convert("RGB")


def same_pixels(a, b) -> bool:
    return a.size == b.size and a.tobytes() == b.tobytes()


def max_pixel_diff(a, b) -> int:
    import numpy as np

    assert a.size == b.size
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


# A1111 1.10's infotext parameter syntax (modules/infotext_utils.py re_param): `key: value` or `key: "quoted"`.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict:
    """The `key: value` entries of an infotext's last line (quoted values unquoted), plus "Prompt"."""
    lines = text.strip().split("\n")
    params = {"Prompt": lines[0]}
    for key, value in _PARAM.findall(lines[-1]):
        value = value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        params[key.strip()] = value
    return params


def start_webui(webui_dir: Path, data_dir: Path, port: int | None = None,
                timeout: float = STARTUP_TIMEOUT_S) -> WebUI:
    """Starts A1111 from `webui_dir` (its venv python) on `data_dir`; returns when the 4 checkpoints are listed and
    tiny-a is loaded. On failure the process is stopped and the error carries the log's tail."""
    python = webui_dir / "venv" / "bin" / "python"
    if not python.exists() or not (webui_dir / "launch.py").exists():
        raise WebUIError(f"{webui_dir} is not an A1111 checkout with its venv (need launch.py and venv/bin/python)")
    port = port or free_port()
    log = data_dir / "webui.log"
    command = [str(python), "launch.py", "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test",
               "--use-cpu", "all", "--no-half", "--api", "--server-name", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir), "--no-download-sd-model"]
    # no bytecode written into the WebUI checkout; offline (the tiny text encoder is a local folder)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=webui_dir, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    webui = WebUI(f"http://127.0.0.1:{port}", webui_dir, data_dir, log, process)
    try:
        wait_until_ready(webui, timeout)
        webui.post("/sdapi/v1/options", {"sd_model_checkpoint": LOADED})
        loaded = webui.get("/sdapi/v1/options")["sd_model_checkpoint"]
        if not str(loaded).startswith(LOADED):
            raise WebUIError(f"sd_model_checkpoint is {loaded!r} after setting {LOADED!r}")
    except BaseException:
        stop_webui(webui)
        raise
    return webui


STARTED_LINE = "Startup time:"
"""What webui.py prints once the API is added and the app_started callbacks (the extension's routes) ran."""
MODEL_LOADED_LINE = "Model loaded in "
"""What sd_models.load_model prints when the checkpoint it loads at startup (in a thread) is in place."""


def wait_until_ready(webui: WebUI, timeout: float) -> None:
    """Waits for the startup and model-loaded lines in the log, then for the checkpoint list. No request is sent
    before both: the first request builds the app's middleware stack, and A1111 adds its API middleware after
    gradio's launch (an early request makes it fail with "Cannot add middleware after an application has
    started"); and a checkpoint switch while the startup load runs fails inside A1111 ("dictionary changed size
    during iteration" in sd_disable_initialization), leaving sd_model_checkpoint unset."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if webui.process.poll() is not None:
            raise WebUIError(f"the WebUI exited with code {webui.process.returncode} during startup\n"
                             f"--- {webui.log} ---\n{log_tail(webui.log)}")
        log = webui.log.read_text(encoding="utf-8", errors="replace")
        missing = [line for line in (STARTED_LINE, MODEL_LOADED_LINE) if line not in log]
        if missing:
            last = f"no {missing[0]!r} line in the log yet"
            time.sleep(0.5)
            continue
        try:
            models = webui.get("/sdapi/v1/sd-models", timeout=10)
            names = {model["model_name"] for model in models}
            if set(CHECKPOINTS) <= names:
                return
            last = f"checkpoints listed: {sorted(names)}"
        except (OSError, WebUIError, ValueError) as error:
            last = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        time.sleep(1)
    raise WebUIError(f"the WebUI did not list the checkpoints within {timeout:.0f} s ({last})\n"
                     f"--- {webui.log} ---\n{log_tail(webui.log)}")


def stop_webui(webui: WebUI) -> None:
    process = webui.process
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- fixtures --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def webui(tmp_path_factory):
    value = os.environ.get(WEBUI_DIR_VARIABLE)
    if not value:
        pytest.skip(SKIP_MESSAGE)
    data_dir = tmp_path_factory.mktemp("webui-data")
    write_data_dir(data_dir)
    server = start_webui(Path(value).resolve(), data_dir)
    try:
        yield server
    finally:
        stop_webui(server)


_screenshot_dirs: list[Path] = []


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Where the browser tests put their screenshots (a folder of the session's pytest temporary folder)."""
    folder = tmp_path_factory.mktemp("screenshots")
    _screenshot_dirs.append(folder)
    return folder


def pytest_terminal_summary(terminalreporter):
    for folder in _screenshot_dirs:
        terminalreporter.write_line(f"real-WebUI tier screenshots: {folder}")


@pytest.fixture(scope="session")
def infotext_parser():
    """parse_infotext (test modules reach the helpers through fixtures: every conftest.py is a module "conftest")."""
    return parse_infotext


@pytest.fixture(scope="session")
def base(webui) -> Generation:
    """The image of the default request without the AFA script's args (tiny-a alone)."""
    return webui.txt2img()


# -- WebUIs of their own and the WebUI's python, for the other families' tests (test_sd2.py, test_sdxl.py, ...) ----

def webui_repositories_path(webui_dir: Path, *extra: Path) -> str:
    """A PYTHONPATH with `extra` and the WebUI's repositories (its ldm and sgm), as the WebUI puts them on sys.path."""
    repositories = webui_dir / "repositories"
    return os.pathsep.join([*map(str, extra), str(repositories / "generative-models"),
                            str(repositories / "stable-diffusion-stability-ai")])


@pytest.fixture(scope="session")
def webui_python():
    """Runs a python script (text) or file in the WebUI's venv with its repositories and this checkout on the path;
    returns the completed process (check=True)."""
    value = os.environ.get(WEBUI_DIR_VARIABLE)
    if not value:
        pytest.skip(SKIP_MESSAGE)
    webui_dir = Path(value).resolve()

    def run(*arguments: str, timeout: float = 600) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": webui_repositories_path(webui_dir, REPO), "PYTHONDONTWRITEBYTECODE": "1",
               "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([str(webui_dir / "venv" / "bin" / "python"), *arguments], cwd=REPO,
                                capture_output=True, text=True, timeout=timeout, env=env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result

    return run


@pytest.fixture(scope="session")
def own_webui():
    """Starts a WebUI of its own on a data dir the caller filled with checkpoints (`members`, the first loaded),
    with this checkout as its extension; a context manager."""
    import contextlib

    value = os.environ.get(WEBUI_DIR_VARIABLE)
    if not value:
        pytest.skip(SKIP_MESSAGE)

    @contextlib.contextmanager
    def start(data_dir: Path, members: tuple[str, ...]):
        global LOADED, CHECKPOINTS
        (data_dir / "extensions").mkdir(parents=True, exist_ok=True)
        (data_dir / "extensions" / "afa").symlink_to(REPO, target_is_directory=True)
        saved = LOADED, CHECKPOINTS
        LOADED, CHECKPOINTS = members[0], {name: 0 for name in members}
        try:
            server = start_webui(Path(value).resolve(), data_dir)
        finally:
            LOADED, CHECKPOINTS = saved
        try:
            yield server
        finally:
            stop_webui(server)

    return start


@pytest.fixture(scope="session")
def tier_helpers():
    """This module's writers for test modules, which cannot import it by name (pytest also has tests/conftest.py
    as a `conftest`)."""
    from types import SimpleNamespace
    return SimpleNamespace(write_pair_weights=write_pair_weights, write_training_images=write_training_images,
                           train_through_api=train_through_api, members_data_dir=members_data_dir,
                           TRAINING_IMAGES=TRAINING_IMAGES)
