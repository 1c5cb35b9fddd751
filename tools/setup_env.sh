#!/usr/bin/env bash
# Creates .venv (if needed) and installs the pinned development environment into it. Re-running is cheap: the install
# is skipped while the requirement files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
venv=.venv
stamp=$venv/.afa-requirements.sha256
want=$(cat requirements/*.txt tools/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
# torch 2.13 requires setuptools >= 77 (with A1111's own pin, 69.5.1, pip silently falls back to another torch build).
"${pip[@]}" install --upgrade "pip>=23" "setuptools>=77" wheel
"${pip[@]}" install -r requirements/dev.txt -c requirements/constraints.txt
"${pip[@]}" install --no-deps -r requirements/no-deps.txt
echo "$want" > "$stamp"
