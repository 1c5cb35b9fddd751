"""The WebUI glue of AFA: everything that talks to AUTOMATIC1111's `modules.*` or to gradio.

Only `scripts/afa_script.py` imports this package (the rest of `afa/` never imports the WebUI). Modules:

    settings   the "AFA Ensemble" settings section and the values the other modules read from it
    folders    the SABW weights folder (`--afa-dir`, default `models/AFA`): listing and name resolution
    members    member names -> the WebUI's CheckpointInfo, and the cache of member UNets between jobs
    request    what a job asked for (script args, XYZ overrides) and its resolution into an EnsemblePlan
    job        the explicit per-job state (`job.current`), which `create_unet()` reads because it gets no `p`
    unet       the `[AFA] Ensemble` SdUnetOption and the SdUnet around the core's EnsembleUNet
    hooks      what the Script's hooks and the WebUI callbacks do, in job order
    infotext   the `AFA:` infotext value, and pasting it back into the accordion
    maps       aggregation-map images for the gallery (rendered by afa.maps)
    ui         the txt2img/img2img accordion
    xyz        the X/Y/Z plot axes
    api        the /afa/v1 routes
"""
