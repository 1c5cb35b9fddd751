# stand-in copy of ComfyUI 0.3.64 (commit a125cd8): comfy/options.py

args_parsing = False

def enable_args_parsing(enable=True):
    global args_parsing
    args_parsing = enable
