#!/usr/bin/env bash
# Regenerate requirements.lock, the tested dependency set that ./run_tests.sh, ./run_all.sh
# and CI install: every package the project needs, resolved together within
# pyproject.toml's ranges by pip-tools (pinned below), for Python 3.11 on Linux.
#   scripts/lock.sh            keeps the locked versions that still fit pyproject.toml
#   scripts/lock.sh --upgrade  takes the newest allowed version of everything (a bump:
#                              run scripts/check_versions.sh latest first)
# torch, torchvision and timm are left out: torch is the machine's own build or the CPU
# build of scripts/torch-cpu.txt (setup_env.sh), and the torchvision that would resolve
# beside a CPU torch breaks on import (nothing here needs it). Resolve where
# `pip install torch==VERSION` gives the CPU build, so that no CUDA packages get locked.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
"${PYTHON:-python3}" -m venv "$tools/venv"
"$tools/venv/bin/python" -m pip install --quiet pip-tools==7.6.2
cd "$root"
CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$tools/venv/bin/pip-compile" --quiet --strip-extras --extra test --no-emit-index-url --no-emit-find-links \
  --constraint scripts/torch-cpu.txt --unsafe-package torch --unsafe-package torchvision --unsafe-package timm \
  --output-file requirements.lock "$@" pyproject.toml
if grep -qE '^(nvidia-|triton==|cuda-)' requirements.lock; then
  echo "lock.sh: requirements.lock now holds CUDA packages: torch resolved to a CUDA build here." \
    "Regenerate it where torch $(cut -d= -f3 scripts/torch-cpu.txt) is the CPU build (git checkout requirements.lock)." >&2
  exit 1
fi
echo "lock.sh: wrote requirements.lock ($(grep -c '==' requirements.lock) packages)"
