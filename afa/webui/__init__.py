"""The WebUI glue of AFA: everything that talks to AUTOMATIC1111's `modules.*` or to gradio.

Only `scripts/afa_script.py` imports this package (the rest of `afa/` never imports the WebUI). Modules, each one
role:

    settings        the "AFA Ensemble" settings section and the values the other modules read from it
    folders         the SABW weights folder (`--afa-dir`, default `models/AFA`): listing and name resolution
    checkpoints     member names -> the WebUI's installed checkpoints (CheckpointInfo), their sha256 and labels
    member_cache    the member UNets and SABW weights kept between jobs ("Keep members loaded")
    request         what a job asked for (script args, X/Y/Z overrides) and its resolution into an EnsemblePlan
    job             the explicit per-job state (`job.current`), which `create_unet()` reads because it gets no `p`
    build           the job's EnsembleUNet against the loaded checkpoint (members, LoRA names, tiling, offloading)
    sd_unet_option  the `[AFA] Ensemble` SdUnetOption and SdUnet: where the WebUI's UNet is replaced and restored
    hooks           what the Script's hooks and the WebUI callbacks do, in job order
    infotext        the `AFA ...` infotext entries, and pasting them back into the accordion
    gallery_maps    aggregation-map images for the gallery (rendered by afa.maps)
    ui              the txt2img/img2img accordion
    xyz             the X/Y/Z plot axes
    api             the /afa/v1 routes
"""
