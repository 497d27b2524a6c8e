#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv in the repository root and install
# the project with everything it needs. Safe to run again: it reinstalls only when
# pyproject.toml or this script changed.
#
# torch: an existing torch in .venv is kept (a GPU machine brings its own CUDA build);
# where none is installed, torch==2.13.0 is installed first and pinned while the rest
# installs, so that no dependency drags in another torch with its CUDA packages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="$root/.venv"
python="$venv/bin/python"

if [ ! -x "$python" ]; then
  echo "[setup] creating $venv"
  "${PYTHON:-python3}" -m venv "$venv"
fi

stamp="$venv/.dyrate-eval-installed"
want="$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! "$python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  "$python" -m pip install --quiet torch==2.13.0
fi
torch_version="$("$python" -c "import torch; print(torch.__version__)" 2>/dev/null)"
constraints="$venv/torch-constraint.txt"
echo "torch==${torch_version}" > "$constraints"

echo "[setup] installing dyrate-eval and its dependencies (torch stays at $torch_version)"
"$python" -m pip install --quiet -c "$constraints" -e ".[test]"

# lmms-eval depends on torchvision; the build pip finds for a CPU-only torch is a CUDA
# build that breaks on import (operator torchvision::nms does not exist), and timm,
# which accelerate's CLI imports, needs it. transformers works without torchvision
# (Pillow image processors), so an unusable torchvision is removed with timm.
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
