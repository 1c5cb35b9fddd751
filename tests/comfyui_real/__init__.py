"""The real-ComfyUI tier (opt-in: `COMFYUI_DIR=/path/to/ComfyUI make test-comfyui`; see conftest.py).

A package so that pytest imports its conftest as `comfyui_real.conftest`: as a top-level `conftest` it would
replace tests/conftest.py in sys.modules for the test modules collected after it, which import helpers from there.
"""
