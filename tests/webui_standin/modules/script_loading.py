"""Stand-in of modules/script_loading.py (v1.10), copied: load a script file as an unregistered module by path."""

import os
import importlib.util

from modules import errors


loaded_scripts = {}


# modules/script_loading.py (v1.10): load_module — module name is the file's basename (e.g. "xyz_grid.py")
def load_module(path):
    module_spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)

    loaded_scripts[path] = module
    return module


# modules/script_loading.py (v1.10): preload_extensions
def preload_extensions(extensions_dir, parser, extension_list=None):
    if not os.path.isdir(extensions_dir):
        return

    extensions = extension_list if extension_list is not None else os.listdir(extensions_dir)
    for dirname in sorted(extensions):
        preload_script = os.path.join(extensions_dir, dirname, "preload.py")
        if not os.path.isfile(preload_script):
            continue

        try:
            module = load_module(preload_script)
            if hasattr(module, 'preload'):
                module.preload(parser)

        except Exception:
            errors.report(f"Error running preload() for {preload_script}", exc_info=True)
