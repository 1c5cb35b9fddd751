"""HTTP routes (registered from `on_app_started`, like the built-in Lora extension's /sdapi/v1/loras):

    GET  /afa/v1/weights   the weights files in the weights folder with their members (metadata only, no tensors)
    POST /afa/v1/unload    frees the cached member UNets and SABW weights (a running job keeps what it uses)

Generation itself goes through the WebUI's /sdapi/v1/txt2img and /img2img with
`"alwayson_scripts": {"AFA ensemble": {"args": [enabled, members, weights, mode, show_maps]}}`.
"""

from __future__ import annotations

from afa.weights import read_weights_info

from . import folders, members
from .request import MODE_LAST_BLOCK, MODE_SABW


def weights_entry(name: str) -> dict:
    """One weights file as listed by GET /afa/v1/weights."""
    entry = {"name": name, "mode": None, "members": [], "training": {}, "error": None}
    try:
        info = read_weights_info(folders.weights_dir() / name)
    except Exception as error:  # a damaged file is listed with its error, never fails the listing
        entry["error"] = str(error)
        return entry
    found, _ = members.checkpoints_for(info.members)
    installed = {checkpoint.sha256: checkpoint.title for checkpoint in found}
    entry["mode"] = MODE_LAST_BLOCK if info.mode == "last-block" else MODE_SABW
    entry["members"] = [{"name": ref.name, "sha256": ref.sha256, "checkpoint": installed.get(ref.sha256)}
                        for ref in info.members]
    entry["training"] = info.training
    return entry


def list_weights() -> list[dict]:
    return [weights_entry(name) for name in folders.list_weights()]


def unload() -> dict:
    freed = members.cache.clear()
    return {"freed_members": freed.members, "freed_tensors": freed.tensors, "freed_bytes": freed.bytes}


def add_routes(app) -> None:
    app.add_api_route("/afa/v1/weights", list_weights, methods=["GET"])
    app.add_api_route("/afa/v1/unload", unload, methods=["POST"])
