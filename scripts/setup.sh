#!/usr/bin/env bash
# Creates .venv (or reuses it) and installs hf-oto with its test extras, at the tested versions.
# Without an NVIDIA GPU it installs PyTorch's CPU build, so no CUDA wheels are downloaded.
#
# Versions: by default every package is installed at the version in hf_oto/constraints.txt (the lock
# CI tests). HF_OTO_LATEST=1 installs the newest versions pyproject.toml allows instead, to try the
# next transformers before moving the lock (README: "Locked installs").
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${HF_OTO_VENV:-.venv}"
LOCK=hf_oto/constraints.txt
LATEST="${HF_OTO_LATEST:-0}"
locked_torch=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$LOCK")
TORCH_VERSION="${HF_OTO_TORCH:-$locked_torch}"
if [ "$LATEST" = 0 ] && [ "$TORCH_VERSION" != "$locked_torch" ]; then
  echo "setup.sh: HF_OTO_TORCH=$TORCH_VERSION differs from the lock's torch $locked_torch; set HF_OTO_LATEST=1 to install unlocked" >&2
  exit 2
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

have_torch=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || true)
if [ "$have_torch" != "$TORCH_VERSION" ]; then
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
mode="locked $(cksum < "$LOCK" | cut -d' ' -f1) $(cksum < pyproject.toml | cut -d' ' -f1)"
[ "$LATEST" = 0 ] || mode="latest $(date +%F)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$mode" ]; then
  if [ "$LATEST" = 0 ]; then
    pip_install -c "$LOCK" -e ".[test]"
  else
    pip_install --upgrade --upgrade-strategy eager -e ".[test]" "torch==$TORCH_VERSION"
  fi
  echo "$mode" > "$stamp"
fi
