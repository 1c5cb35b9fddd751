"""Stand-in of AUTOMATIC1111 stable-diffusion-webui 1.10 `modules` package, for CI tests of extensions.

Put `tests/webui_standin` on `sys.path` (it plays the WebUI root, `paths.script_path`) and import `modules.*` as an
extension would. Every module names the real file it stands in for; see `tests/webui_standin/README.md`.
"""
