"""AFA's ComfyUI glue: the only package that imports ComfyUI (`comfy`, `folder_paths`), as `afa.webui` is the only
one that imports A1111. The node pack's entry point (the repository's `__init__.py`, which ComfyUI loads from
`custom_nodes/`) imports the mappings below and nothing else.

Importing it registers the `afa` model folder (`models/afa/`; `extra_model_paths.yaml` can add more under the key
`afa`), as ComfyUI's own model folders are registered, and loads no model.
"""

import os

import folder_paths

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, WEIGHTS_FOLDER

folder_paths.add_model_folder_path(WEIGHTS_FOLDER, os.path.join(folder_paths.models_dir, WEIGHTS_FOLDER),
                                   is_default=True)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
