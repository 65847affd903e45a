#!/usr/bin/env bash
# Creates .venv (or reuses it) and installs hf-oto with its test extras.
# Without an NVIDIA GPU it installs PyTorch's CPU build, so no CUDA wheels are downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_OTO_VENV:-.venv}"
TORCH_VERSION="${HF_OTO_TORCH:-2.13.0}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "torch==$TORCH_VERSION"
  elif "$PY" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
    pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu \
      --extra-index-url https://pypi.org/simple
  else
    # PyTorch's CPU index is out of reach: take torch from the configured indexes (a local CPU
    # wheel where the machine provides one).
    pip_install "torch==$TORCH_VERSION"
  fi
fi
stamp="$VENV/.hf-oto-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  pip_install -e ".[test]"
  touch "$stamp"
fi
