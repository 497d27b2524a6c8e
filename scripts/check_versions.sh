#!/usr/bin/env bash
# Run the test suite on other versions than the lock's, in an environment of its own
# (the project's .venv is not touched):
#   scripts/check_versions.sh latest [PYTEST ARGS]
#       the newest version of every dependency that pyproject.toml allows (torch stays at
#       the machine's build), in a fresh throwaway environment: the check before each lock
#       bump (then scripts/lock.sh --upgrade, and record the result in the README).
#   scripts/check_versions.sh oldest [PYTEST ARGS]
#       the locked set with transformers at the oldest release pyproject.toml allows (the
#       bottom of the range the core is tested on), laid over .venv; CI runs the pruning
#       core's tests this way.
# It prints the versions that differ from the lock, then runs pytest (all tests unless
# PYTEST ARGS name some) and exits with pytest's status.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
which=${1:-}
shift || true
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
case "$which" in
  latest)
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
    ./scripts/setup_env.sh --venv "$work/venv" --latest
    python="$work/venv/bin/python"
    ;;
  oldest)
    ./scripts/setup_env.sh
    python="$root/.venv/bin/python"
    floor=$(sed -n 's/^ *"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
    overlay="$root/.venv/overlay-transformers-$floor"
    if [ ! -d "$overlay/transformers" ]; then
      "$python" -m pip install --quiet --no-deps --target "$overlay" "transformers==$floor"
    fi
    export PYTHONPATH="$overlay${PYTHONPATH:+:$PYTHONPATH}"
    ;;
  *)
    echo "check_versions.sh: say which versions: latest or oldest (then optional pytest arguments)" >&2
    exit 2
    ;;
esac
echo "[check] versions that differ from requirements.lock:"
"$python" - <<'PY'
import importlib.metadata, re
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
locked = {norm(name): version for name, version in
          re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", open("requirements.lock").read(), flags=re.M)}
installed = {norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
import transformers  # what the tests will import (an overlay wins over .venv)
installed["transformers"] = transformers.__version__
changed = [f"  {name}: {locked[name]} -> {installed.get(name, 'not installed')}"
           for name in sorted(locked) if installed.get(name) != locked[name]]
print("\n".join(changed) or "  none")
PY
"$python" -m pytest "$@"
