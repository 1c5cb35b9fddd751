# Developer entry points. Both targets create .venv with the pinned environment on first use.
PYTHON := .venv/bin/python

.PHONY: env test test-webui demo bench

env:
	@bash tools/setup_env.sh

# The README's test command (CI runs exactly this through .ci/run).
test: env
	$(PYTHON) -m pytest -q tests

# Opt-in: the tests in a real A1111 1.10 (tests/webui_real; README "Running the tests in a real A1111"):
#   AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui    (the WebUI's venv at $AFA_WEBUI_DIR/venv)
# Adds requirements/webui-real.txt (playwright; the browser is the system's /usr/bin/chromium) to .venv.
# Without AFA_WEBUI_DIR the target stops with a message (and pytest skips the tier).
WEBUI_REAL_STAMP := .venv/.afa-webui-real.sha256

test-webui: env
	@test -n "$$AFA_WEBUI_DIR" || { echo "make test-webui: set AFA_WEBUI_DIR to an A1111 1.10 checkout" \
	  "(its venv at \$$AFA_WEBUI_DIR/venv): AFA_WEBUI_DIR=/path/to/stable-diffusion-webui make test-webui" >&2; exit 2; }
	@want=$$(sha256sum requirements/webui-real.txt | cut -d' ' -f1); \
	if [ "$$(cat $(WEBUI_REAL_STAMP) 2>/dev/null)" != "$$want" ]; then \
	  $(PYTHON) -m pip --disable-pip-version-check -q install \
	    -r requirements/webui-real.txt -c requirements/constraints.txt && echo "$$want" > $(WEBUI_REAL_STAMP); \
	fi
	$(PYTHON) -m pytest -q tests/webui_real

# The README's first command: the offline demo (synthetic data, two tiny experts, SABW training, evaluation).
demo: env
	$(PYTHON) training/demo.py --output demo-output

bench: env
	$(PYTHON) -m afa bench --arch tiny
