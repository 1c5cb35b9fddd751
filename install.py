"""Run by the WebUI (a separate `python install.py`, at every start unless --skip-install) to install what the AFA
ensemble needs and A1111 1.10 lacks. A1111 1.10 already ships everything `afa/` imports (torch, einops,
safetensors, PyYAML via omegaconf, numpy, Pillow, ldm), so this normally does nothing and prints nothing. It never
installs or upgrades torch.

ComfyUI-Manager runs this file too when it installs the repository as a ComfyUI node pack. ComfyUI's own
requirements already include every package the nodes import, and ComfyUI has no `launch` module: there it does
nothing.
"""

try:
    import launch
except ImportError:  # not A1111 (ComfyUI-Manager, or run by hand): nothing to install
    launch = None

# import name -> pip requirement, for the packages afa/ imports beyond torch and the WebUI's own ldm
REQUIREMENTS = {
    "einops": "einops",
    "safetensors": "safetensors",
    "yaml": "pyyaml",
    "numpy": "numpy",
    "PIL": "Pillow",
}

if launch is not None:
    for import_name, requirement in REQUIREMENTS.items():
        if not launch.is_installed(import_name):
            launch.run_pip(f"install {requirement}", f"{requirement} for the AFA ensemble extension")
