"""HTTP routes, registered from `on_app_started` the way A1111 registers its own API routes (modules/api/api.py v1.10,
`Api.add_api_route`): only when the API is on (`--api`, or `--nowebui`), and behind the same HTTP basic auth when
`--api-auth` is set.

    GET  /afa/v1/weights   the weights files in the weights folder with their members (metadata only, no tensors)
    POST /afa/v1/unload    frees the cached member UNets and SABW weights; waits for the running job (queue lock)
    POST /afa/v1/train     starts a training run (body: train.py's flags by name, see training_job.plan_run);
                           400 with the reason when it does not start, 409 when the WebUI or a run is busy
    GET  /afa/v1/train     the run's status: state, step of total, losses, validations, weights written, message
    POST /afa/v1/train/cancel   stops the run after its current step (its state is saved: "resume": true continues)

Generation itself goes through the WebUI's /sdapi/v1/txt2img and /img2img with
`"alwayson_scripts": {"AFA ensemble": {"args": [enabled, members, weights, mode, show_maps]}}`.
"""

from __future__ import annotations

from secrets import compare_digest

from fastapi import Body, Depends, HTTPException
from fastapi.security import HTTPBasic, HTTPBasicCredentials

from modules import call_queue, shared

from afa.errors import AfaError
from afa.weights import read_weights_info

from . import checkpoints, folders
from .member_cache import cache
from .training_job import TrainingBusy, job
from .infotext import public_text


def weights_entry(name: str) -> dict:
    """One weights file as listed by GET /afa/v1/weights."""
    entry = {"name": name, "mode": None, "members": [], "training": {}, "error": None}
    try:
        info = read_weights_info(folders.weights_dir() / name)
    except AfaError as error:  # a damaged file is listed with its error, never fails the listing
        entry["error"] = public_text(str(error))
        return entry
    found, _ = checkpoints.checkpoints_for(info.members)
    installed = {checkpoint.sha256: checkpoint.title for checkpoint in found}
    entry["mode"] = info.mode.label
    entry["members"] = [{"name": ref.name, "sha256": ref.sha256, "checkpoint": installed.get(ref.sha256)}
                        for ref in info.members]
    entry["training"] = info.training
    return entry


def list_weights() -> list[dict]:
    return [weights_entry(name) for name in folders.list_weights()]


def unload() -> dict:
    # the queue lock is what every generation holds: a running job keeps its members until it ends
    with call_queue.queue_lock:
        freed = cache.clear()
    return {"freed_members": freed.members, "freed_tensors": freed.tensors, "freed_bytes": freed.bytes}


def start_training(request: dict = Body(..., examples=[{"members": ["a.safetensors", "b.safetensors"],
                                                             "max_steps": 1000, "batch_size": 8}])) -> dict:
    try:
        return job.start(request)
    except TrainingBusy as error:
        raise HTTPException(status_code=409, detail=public_text(str(error))) from None
    except AfaError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


def training_status() -> dict:
    return job.status.to_dict()


def cancel_training() -> dict:
    return job.cancel()


def basic_auth(api_auth: str):
    """The `--api-auth "user:password,user2:password2"` check of A1111's API (modules/api/api.py v1.10, Api.auth)."""
    credentials = dict(pair.split(":", 1) for pair in api_auth.split(","))

    def check(given: HTTPBasicCredentials = Depends(HTTPBasic())) -> bool:
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password, expected):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def add_routes(app) -> None:
    cmd_opts = shared.cmd_opts
    if not (cmd_opts.api or cmd_opts.nowebui):
        return
    dependencies = [Depends(basic_auth(cmd_opts.api_auth))] if cmd_opts.api_auth else []
    app.add_api_route("/afa/v1/weights", list_weights, methods=["GET"], dependencies=dependencies)
    app.add_api_route("/afa/v1/unload", unload, methods=["POST"], dependencies=dependencies)
    app.add_api_route("/afa/v1/train", start_training, methods=["POST"], dependencies=dependencies)
    app.add_api_route("/afa/v1/train", training_status, methods=["GET"], dependencies=dependencies)
    app.add_api_route("/afa/v1/train/cancel", cancel_training, methods=["POST"], dependencies=dependencies)
