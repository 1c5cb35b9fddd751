"""The real-ComfyUI tier: a real ComfyUI (run for real: 0.3.64) started headless with this checkout as a node pack.

Opt-in: `COMFYUI_DIR=<a ComfyUI checkout with its venv at $COMFYUI_DIR/venv> make test-comfyui`. Without COMFYUI_DIR
the test modules skip themselves (at module level, before importing anything heavy), so `make test` stays fast,
and this file imports nothing heavy at import time.

ComfyUI recognises a model family by tensor shapes, so the members are full-width random SD 1.5 checkpoints
(random_sd15.py, run in AFA's own environment), and the SABW weights are trained on two of them by AFA's own
trainer (training/train.py, 64 px, 2 steps). Both are slow to make and 2 GB per checkpoint, so they are cached
outside the repository ($AFA_COMFYUI_TIER_CACHE, default ~/.cache/afa/comfyui-tier/), keyed by the generator's
version and seed, and for the weights by the members, the trainer's command line and the sources of the trainer
and the core; a rerun reuses them. They are made before ComfyUI starts, so the trainer's and ComfyUI's memory
never add up.

The `comfyui` fixture (one per session) then makes a base directory (`--base-directory`: models, custom_nodes,
input, output, temp, user, and the database inside it) with
    models/checkpoints/afa-random-{a,b,c}.safetensors    the random checkpoints of seeds 1, 2, 3 (symlinks to the cache)
    models/checkpoints/afa-random-a-copy.safetensors     checkpoint a again under another name (another file for
                                                         ComfyUI: it is loaded a second time, as its own MODEL)
    models/afa/afa-random-ab.safetensors                 SABW weights trained for members a, b (in that order)
    custom_nodes/comfyui-afa -> this checkout
and starts `$COMFYUI_DIR/venv/bin/python $COMFYUI_DIR/main.py --cpu --fp16-unet` on a free loopback port (UNets
held in fp16: see FP32_UNET_VARIABLE). It never writes into $COMFYUI_DIR (no bytecode either). It fails if the log says the node pack's import failed, and stops ComfyUI at
the end; the run's timings and ComfyUI's peak memory are printed at the end of the session.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from factories import free_port, log_tail  # tests/factories.py: shared by the real tiers

from .comfyui_workflows import CHECKPOINT_SEEDS, SABW_MEMBERS, SABW_WEIGHTS  # plain data

COMFYUI_DIR_VARIABLE = "COMFYUI_DIR"
SKIP_MESSAGE = ("real-ComfyUI tier: set COMFYUI_DIR to a ComfyUI checkout with its venv at $COMFYUI_DIR/venv and run "
                "`COMFYUI_DIR=/path/to/ComfyUI make test-comfyui`")
CACHE_VARIABLE = "AFA_COMFYUI_TIER_CACHE"
REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

PACK_FOLDER = "comfyui-afa"  # this checkout's name in custom_nodes/, as a clone of the repository would be named
# The SABW design's default width (paper: 128): at 64 px SD 1.5's deepest features are 1x1, and a width of 32 puts one
# channel in each of the aggregator's 32 GroupNorm groups, which torch refuses to normalise in training ("Expected more
# than 1 value per channel when training") at batch 1.
# No merge baselines: the fixture needs only the weights, and their search would hold a third full-size UNet.
TRAINING_FLAGS = ("--resolution", "64", "--batch-size", "1", "--max-steps", "2", "--val-split", "0.25",
                  "--num-workers", "0", "--seed", "0", "--merge-baselines", "none")
TRAINING_IMAGES = 4

# ComfyUI's CPU default keeps UNets in fp32 (3.3 GB per SD 1.5 member: about 14 GB for the three-member example,
# more than a shared 24 GB machine reliably has free); --fp16-unet keeps them in fp16 and casts each layer's weights
# to fp32 as it runs (ComfyUI's manual cast, the path GPUs take for fp8 weights), about half of that.
FP32_UNET_VARIABLE = "AFA_COMFYUI_FP32_UNET"  # =1: ComfyUI's default precision instead


def precision_args() -> list[str]:
    return [] if os.environ.get(FP32_UNET_VARIABLE) == "1" else ["--fp16-unet"]


STARTUP_TIMEOUT_S = 300
PROMPT_TIMEOUT_S = 900  # a cold load of two 2 GB checkpoints and a 2-step ensemble on 2 loaded cores


# -- the session's report (printed by pytest_terminal_summary) -------------------------------------------------------

_report: list[str] = []


def report(line: str) -> None:
    _report.append(line)


def pytest_terminal_summary(terminalreporter):
    for line in _report:
        terminalreporter.write_line(f"real-ComfyUI tier: {line}")


def gib(kib: int) -> str:
    return f"{kib / 2 ** 20:.2f} GiB"


def run_measured(command: list[str], log: Path, what: str, timeout: float = 3600) -> None:
    """Runs `command` (output to `log`) and reports its wall time and peak RSS (its own rusage, from wait4);
    raises with the log's tail when it fails."""
    started = time.monotonic()
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=subprocess_env())
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.5)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    if process.returncode != 0:
        raise AssertionError(f"{what} failed (exit {process.returncode}): {shlex.join(command)}\n--- {log} ---\n"
                             f"{log_tail(log)}")
    report(f"{what}: {seconds:.0f} s, peak RSS {gib(usage.ru_maxrss)}")


def subprocess_env() -> dict:
    """AFA's processes: one intra-op thread (oversubscribed OpenMP threads spin on a shared machine; tests/conftest.py
    sets the same), nothing from the hub."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1"}


# -- the cached models ------------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    value = os.environ.get(CACHE_VARIABLE)
    if value:
        folder = Path(value)
    else:
        folder = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "afa" / "comfyui-tier"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def cached_checkpoint(seed: int, logs: Path) -> Path:
    """The random SD 1.5 checkpoint of `seed`, written by random_sd15.py (in a process of its own, which returns
    its 2-3 GB when it ends) unless the cache has it."""
    from . import random_sd15

    path = cache_dir() / f"sd15-random-g{random_sd15.GENERATOR_VERSION}-seed{seed}.safetensors"
    if not path.exists():
        run_measured([sys.executable, str(HERE / "random_sd15.py"), str(path), "--seed", str(seed)],
                     logs / f"random-sd15-seed{seed}.log", f"writing {path.name}")
    else:
        report(f"cached: {path}")
    return path


def sources_digest() -> str:
    """The sha256 of the trainer's and the core's sources (training/, afa/ without the hosts' glue): a change there
    trains the cached weights again."""
    digest = hashlib.sha256()
    files = sorted([*(REPO / "training").glob("*.py"), *(REPO / "afa").glob("*.py")])
    for path in files:
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def cached_sabw_weights(members: dict[str, Path], work: Path) -> Path:
    """SABW weights for `members` (name -> checkpoint, in order) trained by training/train.py (64 px, batch 1, 2
    steps) unless the cache has them. The members are given to the trainer under their names in ComfyUI (symlinks),
    so the file names them as ComfyUI lists them."""
    from factories import write_captioned_images  # tests/factories.py

    key = hashlib.sha256(json.dumps({
        "members": {name: path.name for name, path in members.items()}, "flags": TRAINING_FLAGS,
        "images": TRAINING_IMAGES, "sources": sources_digest()}, sort_keys=True).encode()).hexdigest()[:16]
    prefix = f"sabw-{'-'.join(members)}-"
    path = cache_dir() / f"{prefix}{key}.safetensors"
    if path.exists():
        report(f"cached: {path}")
        return path
    links = work / "members"
    links.mkdir(parents=True)
    for name, target in members.items():
        (links / f"{name}.safetensors").symlink_to(target)
    data = work / "data"
    data.mkdir()
    write_captioned_images(data, count=TRAINING_IMAGES, width=64, height=64)
    temporary = path.with_name(f"partial-{os.getpid()}-{path.name}")  # renamed once complete
    try:
        run_measured([sys.executable, str(REPO / "training" / "train.py"),
                      "--members", *(str(links / f"{name}.safetensors") for name in members),
                      "--data", str(data), *TRAINING_FLAGS, "--output", str(temporary),
                      "--run-dir", str(work / "run")],
                     work / "train.log", f"training {path.name} (training/train.py)")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    # drop weights trained from other sources (85 MB each) once a day old: younger ones may serve another checkout
    for stale in path.parent.glob(f"{prefix}*.safetensors"):
        if stale != path and time.time() - stale.stat().st_mtime > 86400:
            stale.unlink(missing_ok=True)
    return path


def write_base_directory(base: Path, checkpoints: dict[str, Path], weights: Path) -> None:
    models = base / "models"
    (models / "checkpoints").mkdir(parents=True)
    for name, target in checkpoints.items():
        (models / "checkpoints" / f"{name}.safetensors").symlink_to(target)
    (models / "afa").mkdir()
    (models / "afa" / SABW_WEIGHTS).symlink_to(weights)
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / PACK_FOLDER).symlink_to(REPO, target_is_directory=True)
    # a returning user's settings: a new user's first page opens the template browser over the canvas (at a moment
    # of the frontend's choosing) instead of the default workflow
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))


# -- the server -------------------------------------------------------------------------------------------------------

class ComfyUIError(AssertionError):
    pass


@dataclass
class Run:
    """A prompt's end as /history records it: its status, its messages and its outputs (per node id)."""
    prompt_id: str
    entry: dict = field(repr=False)
    server: "ComfyUI" = field(repr=False)

    @property
    def status(self) -> str:
        return self.entry["status"]["status_str"]

    @property
    def messages(self) -> list:
        return self.entry["status"].get("messages", [])

    @property
    def error(self) -> dict | None:
        """The `execution_error` message's data (node_id, node_type, exception_type, exception_message, traceback),
        or None."""
        return next((data for kind, data in self.messages if kind == "execution_error"), None)

    def images(self, node_id: str) -> list:
        """The images node `node_id` output (SaveImage, PreviewImage), fetched through /view, as RGB PIL images."""
        refs = self.entry["outputs"].get(str(node_id), {}).get("images", [])
        return [self.server.view(ref) for ref in refs]

    def image(self, node_id: str):
        images = self.images(node_id)
        assert len(images) == 1, f"node {node_id} output {len(images)} images: {self.entry['outputs']}"
        return images[0]

    def assert_success(self) -> "Run":
        assert self.status == "success" and self.error is None, self.describe()
        return self

    def describe(self) -> str:
        error = self.error
        if error:
            return (f"prompt {self.prompt_id}: {error.get('node_type')} (node {error.get('node_id')}) raised "
                    f"{error.get('exception_type')}: {error.get('exception_message')}\n"
                    + "".join(error.get("traceback") or [])[-3000:])
        return f"prompt {self.prompt_id}: status {self.status}, messages {self.messages}"


@dataclass
class ComfyUI:
    url: str
    comfyui_dir: Path
    base: Path
    log: Path
    process: subprocess.Popen = field(repr=False)
    pack_folder: str = PACK_FOLDER
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    # -- HTTP --

    def request(self, method: str, path: str, body=None, timeout: float = 60, raw: bool = False):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            detail = error.read().decode("utf-8", errors="replace")[:3000]
            raise ComfyUIError(f"{method} {path} -> HTTP {error.code}: {detail}\n--- {self.log} ---\n"
                               f"{log_tail(self.log)}") from None
        except OSError:
            self.check_alive(f"{method} {path}")
            raise
        return payload if raw else json.loads(payload.decode("utf-8"))

    def check_alive(self, when: str) -> None:
        """Raises, with the log's tail, when ComfyUI has exited (SIGKILL: most likely the kernel's OOM killer)."""
        code = self.process.poll()
        if code is not None:
            cause = " (SIGKILL: out of memory?)" if code == -signal.SIGKILL else ""
            raise ComfyUIError(f"ComfyUI exited with code {code}{cause} before {when}\n--- {self.log} ---\n"
                               f"{log_tail(self.log)}")

    def get(self, path: str, **kwargs):
        return self.request("GET", path, **kwargs)

    def object_info(self, node_class: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node_class}" if node_class else ""))

    def view(self, ref: dict):
        """An image of an output (`{"filename", "subfolder", "type"}`) through /view, as an RGB PIL image."""
        from PIL import Image

        query = urllib.parse.urlencode({key: ref[key] for key in ("filename", "subfolder", "type")})
        return Image.open(io.BytesIO(self.request("GET", f"/view?{query}", raw=True))).convert("RGB")

    # -- prompts --

    def queue(self, prompt: dict) -> str:
        """POST /prompt (an API-format prompt); its prompt id. ComfyUI's validation errors raise ComfyUIError."""
        response = self.request("POST", "/prompt", {"prompt": prompt, "client_id": self.client_id})
        if response.get("node_errors"):
            raise ComfyUIError(f"POST /prompt: node errors {response['node_errors']}")
        return response["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S) -> Run:
        """Polls GET /history/<id> until the prompt ended (success or error)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive(f"prompt {prompt_id} ended")
            entry = self.get(f"/history/{prompt_id}").get(prompt_id)
            if entry and entry.get("status", {}).get("status_str") in ("success", "error"):
                return Run(prompt_id, entry, self)
            time.sleep(0.5)
        raise ComfyUIError(f"prompt {prompt_id} did not end within {timeout:.0f} s\n--- {self.log} ---\n"
                           f"{log_tail(self.log)}")

    def run(self, prompt: dict, **kwargs) -> Run:
        return self.wait(self.queue(prompt), **kwargs)

    def peak_rss_kib(self) -> int | None:
        """ComfyUI's peak resident memory so far (VmHWM), while it runs."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


def start_comfyui(comfyui_dir: Path, base: Path, timeout: float = STARTUP_TIMEOUT_S) -> ComfyUI:
    python = comfyui_dir / "venv" / "bin" / "python"
    if not python.exists() or not (comfyui_dir / "main.py").exists():
        raise ComfyUIError(f"{comfyui_dir} is not a ComfyUI checkout with its venv (need main.py and venv/bin/python)")
    port = free_port()
    log = base / "comfyui.log"
    command = [str(python), str(comfyui_dir / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", "--base-directory", str(base),
               # its database too (the default is $COMFYUI_DIR/user/comfyui.db)
               "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}", *precision_args()]
    # no bytecode written into the ComfyUI checkout; offline
    env = {**subprocess_env(), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)
    with open(log, "wb") as log_file:
        process = subprocess.Popen(command, cwd=base, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = ComfyUI(f"http://127.0.0.1:{port}", comfyui_dir, base, log, process)
    try:
        wait_until_ready(server, timeout)
        check_pack_loaded(server)
    except BaseException:
        stop_comfyui(server)
        raise
    return server


def wait_until_ready(server: ComfyUI, timeout: float) -> None:
    """ComfyUI answers HTTP once every node (ours included) is loaded: polls /system_stats until it does."""
    started = time.monotonic()
    last = "no answer yet"
    while time.monotonic() < started + timeout:
        if server.process.poll() is not None:
            raise ComfyUIError(f"ComfyUI exited with code {server.process.returncode} during startup\n"
                               f"--- {server.log} ---\n{log_tail(server.log)}")
        try:
            system = server.get("/system_stats", timeout=10)["system"]
            report(f"ComfyUI {system.get('comfyui_version')} (torch {system.get('pytorch_version')}; "
                   f"{shlex.join(system.get('argv', [])[1:])}) ready in {time.monotonic() - started:.0f} s, "
                   f"base directory {server.base}")
            return
        except (OSError, ComfyUIError, ValueError) as error:
            last = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        time.sleep(1)
    raise ComfyUIError(f"ComfyUI did not answer within {timeout:.0f} s ({last})\n--- {server.log} ---\n"
                       f"{log_tail(server.log)}")


def check_pack_loaded(server: ComfyUI) -> None:
    """Fails when ComfyUI's start-up log says the node pack's import failed (ComfyUI then starts without it)."""
    text = server.log.read_text(encoding="utf-8", errors="replace")
    failed = [line for line in text.splitlines() if "IMPORT FAILED" in line and PACK_FOLDER in line]
    if failed or f"Cannot import {server.base / 'custom_nodes' / PACK_FOLDER}" in text:
        raise ComfyUIError(f"ComfyUI could not import the node pack: {failed}\n--- {server.log} ---\n{text[-8000:]}")


def stop_comfyui(server: ComfyUI) -> None:
    process = server.process
    peak = server.peak_rss_kib()
    if peak:
        report(f"ComfyUI's peak RSS (VmHWM) over the session: {gib(peak)}")
    if process.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# -- fixtures ---------------------------------------------------------------------------------------------------------

def comfyui_dir_or_skip() -> Path:
    value = os.environ.get(COMFYUI_DIR_VARIABLE)
    if not value:
        pytest.skip(SKIP_MESSAGE)
    return Path(value).resolve()


@dataclass
class TierModels:
    """The tier's files: checkpoint name (as ComfyUI lists it, without .safetensors) -> cached file, and the SABW
    weights (trained for SABW_MEMBERS in that order)."""
    checkpoints: dict[str, Path]
    weights: Path
    weights_name: str = SABW_WEIGHTS
    sabw_members: tuple = SABW_MEMBERS


@pytest.fixture(scope="session")
def tier_models(tmp_path_factory) -> TierModels:
    """The random checkpoints and the SABW weights, from the cache or made now (before ComfyUI starts)."""
    comfyui_dir_or_skip()
    logs = tmp_path_factory.mktemp("tier-logs")
    by_seed = {seed: cached_checkpoint(seed, logs) for seed in sorted(set(CHECKPOINT_SEEDS.values()))}
    checkpoints = {name: by_seed[seed] for name, seed in CHECKPOINT_SEEDS.items()}
    weights = cached_sabw_weights({name: checkpoints[name] for name in SABW_MEMBERS},
                                  tmp_path_factory.mktemp("sabw-training"))
    return TierModels(checkpoints, weights)


@pytest.fixture(scope="session")
def comfyui(tier_models, tmp_path_factory) -> ComfyUI:
    comfyui_dir = comfyui_dir_or_skip()
    base = tmp_path_factory.mktemp("comfyui-base")
    write_base_directory(base, tier_models.checkpoints, tier_models.weights)
    server = start_comfyui(comfyui_dir, base)
    try:
        yield server
    finally:
        stop_comfyui(server)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    """Where the browser tests put their screenshots (a folder of the session's pytest temporary folder)."""
    folder = tmp_path_factory.mktemp("screenshots")
    report(f"screenshots: {folder}")
    return folder
