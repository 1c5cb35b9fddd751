"""How much a running A1111 WebUI's resident memory grows when AFA is enabled for a txt2img (issue 17, item 2).

Drives the WebUI through its API (it must run with --api, on this machine: RSS is read from /proc) and prints the
breakdown in units of one UNet at the WebUI's precision:

    .venv/bin/python tools/bench_webui_memory.py --url http://127.0.0.1:7860 --loaded a.safetensors \\
        --member b.safetensors [--pid PID] [--text-encoders own|loaded] [--bytes-per-param 4]

1. the loaded checkpoint and Settings > AFA Ensemble > Members' text encoders are set (the setting is put back at
   the end) and AFA's cache emptied (POST /afa/v1/unload);
2. the same small txt2img (2 steps, 64 x 64: the weights, not the activations, are measured) runs `--runs` times
   without AFA, then `--runs` times with AFA (Block average of the loaded checkpoint and `--member`, each member
   reading its own text encoder as the settings say), then once more without AFA;
3. after each run: RSS (anonymous and file-backed), the peak of the run (VmHWM, reset before it through
   /proc/PID/clear_refs), and the RSS of checkpoint files the process has mapped (/proc/PID/smaps);
4. POST /afa/v1/unload reports what AFA's member cache held, and RSS is read once more.

The expected growth is one UNet (the member's, read by AFA) plus each member's text encoder that differs from the
loaded one, both counted from the checkpoint files' headers (the text encoders compared byte for byte). The growth
is measured after the last AFA run against the last run without AFA.

Full-size random SD 1.5 checkpoints (fp16, 2 GB each) for this: tests/comfyui_real/random_sd15.py (its docstring
says how to run it; start the WebUI with --disable-nan-check, random UNets may give NaNs, which A1111 refuses
otherwise). Offline, the WebUI needs the SD1 tokenizer (see tests/webui_real/conftest.py and
training/text_encoder.py: `write_text_encoder_folder` writes the files a local copy of openai/clip-vit-large-patch14
needs).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import struct
import time
import urllib.request
from pathlib import Path

UNET_PREFIX = "model.diffusion_model."
TEXT_ENCODER_PREFIX = "cond_stage_model."
SCRIPT_TITLE = "AFA ensemble"
TEXT_OWN, TEXT_LOADED = "Each member's own", "The loaded checkpoint's"  # afa/webui/settings.py
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


# -- the WebUI -------------------------------------------------------------------------------------------------------

def request(url: str, path: str, body=None, timeout: float = 3600):
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def listening_pid(url: str) -> int:
    """The pid of the process listening on the URL's port (/proc/net/tcp*, then each process's sockets)."""
    port = int(re.search(r":(\d+)", url.split("//", 1)[-1]).group(1))
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return int(proc.name)
        except OSError:
            continue
    raise SystemExit(f"no process of this machine listens on port {port}: pass --pid")


# -- memory ----------------------------------------------------------------------------------------------------------

def status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM in bytes."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def mapped_checkpoints(pid: int) -> dict[str, int]:
    """Resident bytes of each checkpoint file the process has mapped."""
    resident, current = {}, None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
            path = fields[5] if len(fields) > 5 else ""
            current = path if path.endswith(CHECKPOINT_SUFFIXES) else None
        elif current and fields and fields[0] == "Rss:":
            resident[current] = resident.get(current, 0) + int(fields[1]) * 1024
    return resident


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS


# -- the checkpoints -------------------------------------------------------------------------------------------------

def safetensors_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as file:
        size = struct.unpack("<Q", file.read(8))[0]
        return json.loads(file.read(size)), 8 + size


def parameter_count(path: Path, prefix: str) -> int:
    header, _ = safetensors_header(path)
    count = 0
    for key, entry in header.items():
        if key.startswith(prefix) and entry["dtype"].startswith(("F", "BF")):
            count += math.prod(entry["shape"])
    return count


def text_encoder_digest(path: Path) -> str:
    """sha256 of the file's text-encoder tensors (names, dtypes, shapes and bytes)."""
    header, start = safetensors_header(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for key in sorted(k for k in header if k.startswith(TEXT_ENCODER_PREFIX)):
            entry = header[key]
            begin, end = entry["data_offsets"]
            file.seek(start + begin)
            digest.update(json.dumps([key, entry["dtype"], entry["shape"]]).encode())
            digest.update(file.read(end - begin))
    return digest.hexdigest()


def checkpoint_path(url: str, name: str) -> Path:
    for model in request(url, "/sdapi/v1/sd-models"):
        if model["title"].startswith(name) or model["model_name"] == Path(name).stem:
            return Path(model["filename"])
    raise SystemExit(f"{name}: not among the WebUI's checkpoints")


# -- the benchmark ---------------------------------------------------------------------------------------------------

GIB = 2 ** 30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--pid", type=int, help="the WebUI's process (default: the one listening on --url's port)")
    parser.add_argument("--loaded", required=True, help="the loaded checkpoint, a member")
    parser.add_argument("--member", required=True, help="the other member")
    parser.add_argument("--mode", default="Block average")
    parser.add_argument("--runs", type=int, default=2, help="runs of each kind (the last one is compared)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--text-encoders", choices=("own", "loaded"), default="own",
                        help="Settings > AFA Ensemble > Members' text encoders for the AFA runs: each member's own "
                             "(the default setting) or the loaded checkpoint's")
    parser.add_argument("--bytes-per-param", type=int, default=4, help="the WebUI's precision (4: fp32, 2: fp16)")
    args = parser.parse_args(argv)
    url = args.url.rstrip("/")
    pid = args.pid or listening_pid(url)

    loaded_path, member_path = checkpoint_path(url, args.loaded), checkpoint_path(url, args.member)
    unet_params = parameter_count(member_path, UNET_PREFIX)
    text_params = parameter_count(member_path, TEXT_ENCODER_PREFIX)
    own_texts = args.text_encoders == "own"
    distinct_texts = int(own_texts and text_encoder_digest(member_path) != text_encoder_digest(loaded_path))
    unet_bytes = unet_params * args.bytes_per_param
    expected = unet_bytes + distinct_texts * text_params * args.bytes_per_param

    setting = request(url, "/sdapi/v1/options")["afa_text_encoders"]
    request(url, "/sdapi/v1/options", {"sd_model_checkpoint": args.loaded, "afa_text_encoders":
                                       TEXT_OWN if own_texts else TEXT_LOADED})
    request(url, "/afa/v1/unload", {})
    payload = dict(prompt="a photo of a cat", negative_prompt="", steps=args.steps, width=args.size,
                   height=args.size, seed=1, sampler_name="Euler", cfg_scale=7, batch_size=1)
    afa_args = [True, [args.loaded, args.member], "None", args.mode, False]

    def units(value: int) -> str:
        return f"{value / unet_bytes:+.3f} UNet ({value / GIB:+.2f} GiB)"

    rows = []

    def run(label: str, afa: bool) -> dict:
        body = dict(payload)
        if afa:
            body["alwayson_scripts"] = {SCRIPT_TITLE: {"args": afa_args}}
        reset_peak(pid)
        started = time.monotonic()
        info = json.loads(request(url, "/sdapi/v1/txt2img", body)["info"])
        seconds = time.monotonic() - started
        time.sleep(1)
        memory = {**status(pid), "mapped": sum(mapped_checkpoints(pid).values()), "seconds": seconds}
        infotext = info["infotexts"][0]
        if afa and ("AFA mode" not in infotext or "AFA not applied" in infotext):
            raise SystemExit(f"AFA did not run: {infotext}")
        rows.append((label, memory))
        return memory

    for index in range(args.runs):
        base = run(f"without AFA #{index + 1}", afa=False)
    for index in range(args.runs):
        ensemble = run(f"with AFA #{index + 1}", afa=True)
    run("without AFA, members cached", afa=False)
    request(url, "/sdapi/v1/options", {"afa_text_encoders": setting})
    freed = request(url, "/afa/v1/unload", {})
    time.sleep(1)
    rows.append(("after /afa/v1/unload", {**status(pid), "mapped": sum(mapped_checkpoints(pid).values()),
                                          "seconds": 0.0}))

    print(f"WebUI pid {pid} at {url}; loaded {loaded_path.name}, member {member_path.name}; "
          f"{args.steps} steps at {args.size} px, {args.mode}, members' text encoders: {args.text_encoders}")
    print(f"one UNet = {unet_params / 1e6:.1f}M params x {args.bytes_per_param} B = {unet_bytes / GIB:.3f} GiB; "
          f"a text encoder = {text_params / 1e6:.1f}M params = {text_params * args.bytes_per_param / unet_bytes:.3f} "
          f"UNet; members' text encoders other than the loaded one: {distinct_texts}")
    print()
    print(f"{'':32} {'RSS':>9} {'anon':>9} {'file':>9} {'ckpt maps':>9} {'run peak':>9} {'time':>6}")
    for label, memory in rows:
        print(f"{label:32} " + " ".join(f"{memory[key] / GIB:8.2f}G" for key in
                                         ("VmRSS", "RssAnon", "RssFile", "mapped", "VmHWM"))
              + f" {memory['seconds']:5.0f}s")
    print()
    growth = ensemble["VmRSS"] - base["VmRSS"]
    peak = ensemble["VmHWM"] - base["VmRSS"]
    print(f"RSS growth with AFA (last AFA run - last run without): {units(growth)}")
    print(f"  anonymous {units(ensemble['RssAnon'] - base['RssAnon'])}, "
          f"file-backed {units(ensemble['RssFile'] - base['RssFile'])}, "
          f"of which checkpoint maps {units(ensemble['mapped'] - base['mapped'])}")
    print(f"peak of the last AFA run over the base RSS: {units(peak)}")
    print(f"AFA's member cache (freed by /afa/v1/unload): {freed['freed_members']} UNet(s), "
          f"{freed['freed_tensors']} tensors, {units(freed['freed_bytes'])}")
    print(f"expected: one UNet + {distinct_texts} text encoder(s) = {units(expected)}; "
          f"measured / expected = {growth / expected:.3f}")


if __name__ == "__main__":
    main()
