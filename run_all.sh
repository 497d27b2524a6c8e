#!/usr/bin/env bash
# The main job: every method on the shared core, evaluated through lmms-eval, then a
# summary into results/.
#
# Until the embedded default (a trained small LLaVA and its shapes tasks) lands, the
# grid runs on the offline smoke task with a tiny random-weight LLaVA: it checks the
# whole path (install, model wrappers, harness, result files, summary), not accuracy.
#
# Resumable: each cell is written to a temporary folder and moved into place only when
# its results file exists, so an interrupted run loses nothing and a rerun skips the
# finished cells. --force recomputes every cell.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

force=0
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $arg (allowed: --force)" >&2; exit 2 ;;
  esac
done

./scripts/setup_env.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
bin=.venv/bin
model=runs/tiny-llava
runs=runs/smoke
[ -f "$model/config.json" ] || "$bin/dyrate-eval" make-tiny-model --out "$model" >/dev/null

# cell name | lmms-eval model | model_args beyond pretrained
cells=(
  "original|original_llava|"
  "fastv_K2_R0.5|fastv_llava|K=2,R=0.5"
  "fastv_K2_R0.75|fastv_llava|K=2,R=0.75"
  "vtw_K2|vtw_llava|K=2"
)

total=${#cells[@]}
index=0
for cell in "${cells[@]}"; do
  IFS='|' read -r name lmms_model extra <<<"$cell"
  index=$((index + 1))
  out="$runs/$name"
  if [ "$force" = 0 ] && compgen -G "$out/*/*_results.json" >/dev/null; then
    echo "[$index/$total] $name: done earlier, skipped"
    continue
  fi
  echo "[$index/$total] $name: running"
  rm -rf "$out" "$out.partial"
  mkdir -p "$out.partial"
  "$bin/lmms-eval" --model "$lmms_model" --model_args "pretrained=$model${extra:+,$extra}" \
    --tasks dyrate_smoke --include_path tasks --output_path "$out.partial" --log_samples --timezone UTC \
    >"$out.partial/log.txt" 2>&1 || true
  # lmms-eval exits 0 even when evaluation fails: the results file is the only proof.
  if ! compgen -G "$out.partial/*/*_results.json" >/dev/null; then
    echo "[$index/$total] $name: FAILED, no results file; log: $out.partial/log.txt" >&2
    tail -n 20 "$out.partial/log.txt" >&2
    exit 1
  fi
  mv "$out.partial" "$out"
done

"$bin/dyrate-eval" summarize "$runs" --out results --name smoke_methods
