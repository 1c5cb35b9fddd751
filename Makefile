# Developer entry points. Both targets create .venv with the pinned environment on first use.
PYTHON := .venv/bin/python

.PHONY: env test test-webui test-comfyui demo bench

env:
	@bash tools/setup_env.sh

# pytest keeps the temporary folders of its last 3 runs by default, and a run of tests/ writes about 16 GB of them
# (checkpoints, WebUI and ComfyUI stand-ins; measured 2026-12-07): runs here keep only the folders of tests that
# failed (none once every test passed), so repeated runs cannot fill the disk, as one did on a CI machine.
PYTEST := $(PYTHON) -m pytest -q -o tmp_path_retention_policy=failed

# The README's test command (CI runs exactly this through .ci/run).
test: env
	$(PYTEST) tests

# The real-host tiers (test-webui, test-comfyui) add requirements/webui-real.txt (playwright; the browser is the
# system's /usr/bin/chromium) to .venv, once per version of that file (the stamp holds its sha256).
WEBUI_REAL_STAMP := .venv/.afa-webui-real.sha256
define install-real-tier-requirements
@want=$$(sha256sum requirements/webui-real.txt | cut -d' ' -f1); \
if [ "$$(cat $(WEBUI_REAL_STAMP) 2>/dev/null)" != "$$want" ]; then \
  $(PYTHON) -m pip --disable-pip-version-check -q install \
    -r requirements/webui-real.txt -c requirements/constraints.txt && echo "$$want" > $(WEBUI_REAL_STAMP); \
fi
endef

# Opt-in: the tests in a real A1111 1.10 (tests/webui_real; README "Running the tests in a real A1111"):
#   AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui    (the WebUI's venv at $AFA_WEBUI_DIR/venv)
# Without AFA_WEBUI_DIR the target stops with a message (and pytest skips the tier).
test-webui: env
	@test -n "$$AFA_WEBUI_DIR" || { echo "make test-webui: set AFA_WEBUI_DIR to an A1111 1.10 checkout" \
	  "(its venv at \$$AFA_WEBUI_DIR/venv): AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui" >&2; exit 2; }
	$(install-real-tier-requirements)
	$(PYTEST) tests/webui_real

# Opt-in: the tests in a real ComfyUI (tests/comfyui_real; run for real against 0.3.64):
#   COMFYUI_DIR=/path/to/ComfyUI make test-comfyui    (ComfyUI's venv at $COMFYUI_DIR/venv)
# Random full-width SD 1.5 checkpoints (2 GB each) and SABW weights trained on them are cached in
# $AFA_COMFYUI_TIER_CACHE (default ~/.cache/afa/comfyui-tier). ComfyUI runs with --fp16-unet (about 9 GB at peak;
# AFA_COMFYUI_FP32_UNET=1: its CPU default, fp32, about 14 GB). AFA_COMFYUI_README_SCREENSHOT=1 also rewrites
# docs/images/comfyui-workflow.png. Without COMFYUI_DIR the target stops with a message (and pytest skips the tier).
test-comfyui: env
	@test -n "$$COMFYUI_DIR" || { echo "make test-comfyui: set COMFYUI_DIR to a ComfyUI checkout" \
	  "(its venv at \$$COMFYUI_DIR/venv): COMFYUI_DIR=/path/to/ComfyUI make test-comfyui" >&2; exit 2; }
	$(install-real-tier-requirements)
	$(PYTEST) tests/comfyui_real

# The README's first command: the offline demo (synthetic data, two tiny experts, SABW training, evaluation).
demo: env
	$(PYTHON) training/demo.py --output demo-output

bench: env
	$(PYTHON) -m afa bench --arch tiny
