#!/usr/bin/env bash
# The benchmark of the real LLaVA-1.5 shapes on a GPU, in one command: the 7B and 13B
# built with random weights (valid for timing: the number of new tokens is fixed), fp16,
# every method at the paper's settings (`dyrate-eval bench --methods all`; DyRate with a
# predictor of random weights) and FastV's peers (--peers), with SDPA and, where flash-attn
# is installed, FlashAttention 2, at batch 1 and 8. Each combination writes every measured
# sample to RUNS/<shape>_<attention>_b<batch>/bench.csv and the report's benchmark
# table of it to REPORT/bench_<shape>_<attention>_b<batch>.md/.csv.
#
#   scripts/bench_gpu.sh [--shapes "llava-1.5-7b llava-1.5-13b"] [--batches "1 8"]
#       [--samples 20] [--warmup 3] [--new-tokens 32] [--device cuda] [--dtype float16]
#       [--runs runs/gpu] [--report results/gpu]
#
# A shape is a named shape (dyrate_eval/arch.py) or a model folder, whose config is timed
# with random weights. CI runs the script on a CPU with a tiny model folder and float32.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

shapes="llava-1.5-7b llava-1.5-13b"
batches="1 8"
samples=20
warmup=3
new_tokens=32
device=cuda
dtype=float16
runs=runs/gpu
report=results/gpu
while [ $# -gt 0 ]; do
  case "$1" in
    --shapes) shapes=$2 ;;
    --batches) batches=$2 ;;
    --samples) samples=$2 ;;
    --warmup) warmup=$2 ;;
    --new-tokens) new_tokens=$2 ;;
    --device) device=$2 ;;
    --dtype) dtype=$2 ;;
    --runs) runs=$2 ;;
    --report) report=$2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "bench_gpu.sh: unknown argument $1 (allowed: --shapes, --batches, --samples, --warmup, --new-tokens," \
         "--device, --dtype, --runs, --report)" >&2; exit 2 ;;
  esac
  shift 2
done

bin=.venv/bin
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
attentions=sdpa
if "$bin/python" -c "import flash_attn" 2>/dev/null; then
  attentions="sdpa flash_attention_2"
else
  echo "bench_gpu.sh: flash-attn is not installed: timing SDPA only"
fi

for shape in $shapes; do
  if [ -d "$shape" ]; then
    model=(--pretrained "$shape" --random-weights)
  else
    model=(--arch "$shape")
  fi
  name=$(basename "$shape")
  for attention in $attentions; do
    for batch in $batches; do
      out="$runs/${name}_${attention}_b${batch}/bench.csv"
      echo "== $name, $attention, batch $batch -> $out"
      "$bin/dyrate-eval" bench "${model[@]}" --methods all --peers --attention "$attention" --batch "$batch" \
        --device "$device" --dtype "$dtype" --samples "$samples" --warmup "$warmup" --new-tokens "$new_tokens" \
        --out "$out" --report "$report"
    done
  done
done
