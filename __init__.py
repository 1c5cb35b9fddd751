"""ComfyUI's entry point for this repository as a node pack (cloned into `ComfyUI/custom_nodes/`): registration
only; the nodes are in `afa/comfyui/`. A1111 never imports this file (it loads `scripts/`).

`afa` and `training` are top-level packages (as for A1111, the command line and the trainer), so this folder is
appended to `sys.path` (appended: it never shadows a package ComfyUI or another pack already provides). Outside
ComfyUI (pytest imports this file as the package of the repository's root) there is no `comfy` to register with,
and it registers nothing.
"""

import importlib.util
import os
import sys

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}

if importlib.util.find_spec("comfy") is not None:
    _ROOT = os.path.dirname(os.path.abspath(__file__))
    if _ROOT not in sys.path:
        sys.path.append(_ROOT)
    from afa.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
