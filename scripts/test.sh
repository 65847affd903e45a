#!/usr/bin/env bash
# Installs hf-oto (scripts/setup.sh), prints the versions under test, and runs the linter and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/hf-oto env
.venv/bin/python -m ruff check hf_oto scripts tests
# Test files run in parallel, one worker per core up to 4 (HF_OTO_TEST_WORKERS overrides; 0 runs them in
# this process); a file's tests stay on one worker, so its shared fixtures are built once.
workers="${HF_OTO_TEST_WORKERS:-$(.venv/bin/python -c 'from hf_oto.env import usable_cores; print(min(4, usable_cores()))')}"
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
