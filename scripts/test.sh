#!/usr/bin/env bash
# Installs hf-oto (scripts/setup.sh), prints the versions under test, and runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hf-oto env
.venv/bin/python -m ruff check hf_oto scripts tests
exec .venv/bin/python -m pytest "$@"
