#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install the project with everything it
# needs, from requirements.lock: exactly the dependency set the tests passed on, with no
# resolution (so a newer upstream release cannot slip in). Safe to run again: it
# reinstalls only when the lock, pyproject.toml or this script changed.
#   scripts/setup_env.sh                   .venv in the repository root, from the lock
#   scripts/setup_env.sh --venv DIR        another environment
#   scripts/setup_env.sh --venv DIR --latest
#                                          the newest versions pyproject.toml allows instead
#                                          of the lock (scripts/check_versions.sh latest)
#
# torch: an existing torch in the environment is kept (a GPU machine brings its own CUDA
# build); where none is installed, scripts/torch-cpu.txt's version is installed first and
# held while the rest installs, so that no dependency drags in another torch with its CUDA
# packages. torchvision is not installed: lmms-eval lists it, but the build pip finds for
# a CPU torch breaks on import (operator torchvision::nms does not exist), and
# transformers works without it (Pillow image processors).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
latest=0
while [ $# -gt 0 ]; do
  case "$1" in
    --venv) venv=$2; shift ;;
    --latest) latest=1 ;;
    *) echo "setup_env.sh: unknown argument $1 (allowed: --venv DIR, --latest)" >&2; exit 2 ;;
  esac
  shift
done
python="$venv/bin/python"

if [ ! -x "$python" ]; then
  echo "[setup] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi

stamp="$venv/.dyrate-eval-installed"
want="$(cat requirements.lock pyproject.toml scripts/torch-cpu.txt scripts/setup_env.sh | sha256sum | cut -d' ' -f1) latest=$latest"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! "$python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $(cat scripts/torch-cpu.txt)"
  "$python" -m pip install --quiet -r scripts/torch-cpu.txt
fi
torch_version="$("$python" -c "import torch; print(torch.__version__)" 2>/dev/null)"
held="$venv/torch-constraint.txt"
echo "torch==${torch_version}" > "$held"

if [ "$latest" = 1 ]; then
  echo "[setup] installing dyrate-eval with the newest dependencies pyproject.toml allows (torch stays at $torch_version)"
  "$python" -m pip install --quiet --upgrade --upgrade-strategy eager -c "$held" -e ".[test]"
else
  echo "[setup] installing the locked dependency set (requirements.lock; torch stays at $torch_version)"
  "$python" -m pip install --quiet --no-deps -r requirements.lock
  "$python" -m pip install --quiet --no-deps -e .
  # the lock holds every dependency, resolved together: anything pip check reports beyond
  # the torchvision that is left out on purpose means the lock is out of step with pyproject.toml
  if problems=$("$python" -m pip check 2>&1 | grep -v "requires torchvision, which is not installed" | grep -v "^No broken requirements"); then
    echo "[setup] warning: the installed set is inconsistent (regenerate the lock: scripts/lock.sh):" >&2
    echo "$problems" >&2
  fi
fi

# An environment made before the lock (or by --latest) may hold the broken torchvision,
# and timm, which imports it.
if "$python" -m pip show --quiet torchvision >/dev/null 2>&1 && ! "$python" -c "import torchvision" >/dev/null 2>&1; then
  echo "[setup] removing torchvision and timm: this torchvision does not work with torch $torch_version"
  "$python" -m pip uninstall --quiet -y torchvision timm
fi

# Caption metrics (pycocoevalcap's PTB tokenizer) run java, which pip cannot install:
# take it from apt where this user may, else say what is missing.
if ! command -v java >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && $sudo true 2>/dev/null; then
    echo "[setup] installing a Java runtime (caption metrics need it)"
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq default-jre-headless >/dev/null
  else
    echo "[setup] warning: no java found and no apt-get to install it; caption tasks (shapes_caption, nocaps_val, flickr30k_test) and their tests need a Java runtime" >&2
  fi
fi

echo "$want" > "$stamp"
echo "[setup] ready: $venv"
