# stand-in copy of ComfyUI 0.3.64 (commit a125cd8): comfy/ldm/modules/encoders/__init__.py
