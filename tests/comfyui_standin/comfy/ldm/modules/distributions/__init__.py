# stand-in copy of ComfyUI 0.3.64 (commit a125cd8): comfy/ldm/modules/distributions/__init__.py
