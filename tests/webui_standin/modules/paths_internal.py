"""Stand-in of modules/paths_internal.py (v1.10): where the WebUI keeps code, data and models.

The real module parses `--data-dir`/`--models-dir` from sys.argv at import time; the stand-in does not read
sys.argv (pytest's arguments are not WebUI arguments). `harness.configure_paths(data_dir)` re-points the data
paths of this module, `modules.paths` and `modules.shared` for a test.
"""

import os
from pathlib import Path

normalized_filepath = lambda filepath: str(Path(filepath).absolute())  # noqa: E731  # modules/paths_internal.py

modules_path = os.path.dirname(os.path.realpath(__file__))
script_path = os.path.dirname(modules_path)

sd_configs_path = os.path.join(script_path, "configs")
# Where the real WebUI keeps its SD1 default config. The stand-in ships none: harness.configure_paths points this
# (and its copies) at harness.default_config_file(), the tiny architecture naming the session's text encoder folder.
sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
sd_model_file = os.path.join(script_path, 'model.ckpt')
default_sd_model_file = sd_model_file

data_path = script_path
models_path = os.path.join(data_path, "models")
extensions_dir = os.path.join(data_path, "extensions")
extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
config_states_dir = os.path.join(script_path, "config_states")
default_output_dir = os.path.join(data_path, "outputs")
