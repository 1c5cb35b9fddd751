"""Stand-in of modules/paths.py (v1.10): re-exports paths_internal (the real one also puts repositories on sys.path)."""

import os  # noqa: F401

from modules.paths_internal import (  # noqa: F401
    models_path, script_path, data_path, extensions_dir, extensions_builtin_dir, sd_configs_path, sd_default_config,
    sd_model_file, default_sd_model_file, default_output_dir,
)
