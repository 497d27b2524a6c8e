#!/usr/bin/env bash
# Install into .venv (first run only) and run the test suite (pytest, CPU, offline).
# Extra arguments go to pytest, e.g. ./run_tests.sh -k harness
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
./scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
