# Developer entry points. Both targets create .venv with the pinned environment on first use.
PYTHON := .venv/bin/python

.PHONY: env test demo bench

env:
	@bash tools/setup_env.sh

# The README's test command (CI runs exactly this through .ci/run).
test: env
	$(PYTHON) -m pytest -q tests

# The README's first command: the offline demo (synthetic data, two tiny experts, SABW training, evaluation).
demo: env
	$(PYTHON) training/demo.py --output demo-output

bench: env
	$(PYTHON) -m afa bench --arch tiny
