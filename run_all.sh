#!/usr/bin/env bash
# The main job: every method on the shared core, evaluated through lmms-eval on the
# embedded default (the trained shapes model shipped in dyrate_eval/embedded_llava and
# the `shapes` tasks), then the report (the paper's tables and figures) into results/.
#
# The grid: the original model; FastV at K=2 with R = 0.5, 0.75, 0.9, each with its
# attention-ranked selection and with a random selection of the same count; FastV at
# K=3 and K=4 (R=0.75); VTW at its default K (half the depth) and at K=2. Then the
# decoding ablation (FastV K=2 R=0.5 captions with beam-2, beam-5 and top-p), a trace
# of four captions (attention per token group, kept tokens; the report's figures) and
# the side-by-side benchmark on the CPU-scaled 7B shape.
#
# ./run_all.sh --paper --model-7b ID --model-13b ID runs the paper's grid instead, on a
# GPU machine with network access (lmms-eval's own benchmarks download their data; the
# models are hub ids or folders): per model the original, FastV K=2 R=0.5 and K=3
# R=0.5 (the paper's two FastV rows, about 55% and 57% of the FLOPs) and VTW (K=16 for
# 7B, 20 for 13B) on GQA, VizWiz, SQA-IMG, TextVQA, POPE, MMBench, MME, NoCaps and
# Flickr30k; NoCaps with beam-2, beam-5 and top-p for FastV K=2 R=0.5; a trace; the
# benchmark of the real shapes with random weights. Runs go to runs/paper and the
# report to results/paper. Either model may be left out.
#
# Resumable: each cell is written to a temporary folder and moved into place only when
# its results file exists, so an interrupted run loses nothing and a rerun skips the
# finished cells. --force recomputes every cell. --limit N evaluates N items per task, a
# quick check of the path whose tables (in runs/embedded-limitN/report) say nothing about
# accuracy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

force=0
limit=()
paper=0
model_7b=""
model_13b=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --limit) limit=(--limit "$2"); shift ;;
    --paper) paper=1 ;;
    --model-7b) model_7b=$2; shift ;;
    --model-13b) model_13b=$2; shift ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (allowed: --force, --limit N, --paper --model-7b ID --model-13b ID)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$paper" = 1 ] && [ -z "$model_7b$model_13b" ]; then
  echo "run_all.sh: --paper needs --model-7b ID and/or --model-13b ID (e.g. llava-hf/llava-1.5-7b-hf)" >&2
  exit 2
fi
if [ "$paper" = 0 ] && [ -n "$model_7b$model_13b" ]; then
  echo "run_all.sh: --model-7b / --model-13b go with --paper" >&2
  exit 2
fi
runs=runs/embedded
[ "$paper" = 0 ] || runs=runs/paper
[ ${#limit[@]} = 0 ] || runs=$runs-limit${limit[1]}

./scripts/setup_env.sh
bin=.venv/bin

embedded=dyrate_eval/embedded_llava
if [ "$paper" = 0 ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
if [ "$paper" = 0 ] && [ ! -f "$embedded/config.json" ]; then
  echo "the embedded model is missing: training it into $embedded (about an hour on 2 CPU cores)"
  "$bin/dyrate-eval" train-embedded --out "$embedded"
fi

# cell name | lmms-eval model | model_args (the embedded model is the default
# pretrained) | tasks | gen_kwargs overriding the tasks' decoding
paper_tasks=gqa,vizwiz_vqa_val,scienceqa_img,textvqa_val,pope,mmbench_en_dev,mme,nocaps_val,flickr30k_test
if [ "$paper" = 1 ]; then
  cells=()
  for size in 7b 13b; do
    if [ "$size" = 7b ]; then id=$model_7b; vtw_k=16; else id=$model_13b; vtw_k=20; fi
    [ -n "$id" ] || continue
    cells+=(
      "${size}_original|original_llava|pretrained=$id|$paper_tasks|"
      "${size}_fastv_K2_R0.5|fastv_llava|pretrained=$id,K=2,R=0.5|$paper_tasks|"
      "${size}_fastv_K3_R0.5|fastv_llava|pretrained=$id,K=3,R=0.5|$paper_tasks|"
      "${size}_vtw_K$vtw_k|vtw_llava|pretrained=$id,K=$vtw_k|$paper_tasks|"
      "${size}_decoding_fastv_K2_R0.5_beam2|fastv_llava|pretrained=$id,K=2,R=0.5|nocaps_val|num_beams=2"
      "${size}_decoding_fastv_K2_R0.5_beam5|fastv_llava|pretrained=$id,K=2,R=0.5|nocaps_val|num_beams=5"
      "${size}_decoding_fastv_K2_R0.5_top_p|fastv_llava|pretrained=$id,K=2,R=0.5|nocaps_val|do_sample=True,temperature=0.7,top_p=0.9"
    )
  done
else
cells=(
  "original|original_llava||shapes|"
  "fastv_K2_R0.5|fastv_llava|K=2,R=0.5|shapes|"
  "fastv_K2_R0.75|fastv_llava|K=2,R=0.75|shapes|"
  "fastv_K2_R0.9|fastv_llava|K=2,R=0.9|shapes|"
  "fastv_K2_R0.5_random|fastv_llava|K=2,R=0.5,selection=random|shapes|"
  "fastv_K2_R0.75_random|fastv_llava|K=2,R=0.75,selection=random|shapes|"
  "fastv_K2_R0.9_random|fastv_llava|K=2,R=0.9,selection=random|shapes|"
  "fastv_K3_R0.75|fastv_llava|K=3,R=0.75|shapes|"
  "fastv_K4_R0.75|fastv_llava|K=4,R=0.75|shapes|"
  "vtw_default|vtw_llava||shapes|"
  "vtw_K2|vtw_llava|K=2|shapes|"
  "decoding_fastv_K2_R0.5_beam2|fastv_llava|K=2,R=0.5|shapes_caption|num_beams=2"
  "decoding_fastv_K2_R0.5_beam5|fastv_llava|K=2,R=0.5|shapes_caption|num_beams=5"
  "decoding_fastv_K2_R0.5_top_p|fastv_llava|K=2,R=0.5|shapes_caption|do_sample=True,temperature=0.7,top_p=0.9"
)
fi

total=$((${#cells[@]} + 2))
index=0
for cell in "${cells[@]}"; do
  IFS='|' read -r name lmms_model model_args tasks gen_kwargs <<<"$cell"
  index=$((index + 1))
  out="$runs/$name"
  # lmms-eval puts the results file in a subfolder named after pretrained=, or directly
  # in the output folder when pretrained= is not given
  if [ "$force" = 0 ] && [ -n "$(find "$out" -name '*_results.json' 2>/dev/null)" ]; then
    echo "[$index/$total] $name: done earlier, skipped"
    continue
  fi
  echo "[$index/$total] $name: running (log: $out.partial/log.txt)"
  started=$SECONDS
  rm -rf "$out" "$out.partial"
  mkdir -p "$out.partial"
  "$bin/lmms-eval" --model "$lmms_model" ${model_args:+--model_args "$model_args"} ${gen_kwargs:+--gen_kwargs "$gen_kwargs"} \
    --batch_size 8 --tasks "$tasks" --include_path tasks --output_path "$out.partial" --log_samples --timezone UTC "${limit[@]}" \
    >"$out.partial/log.txt" 2>&1 || true
  # lmms-eval exits 0 even when evaluation fails: the results file is the only proof.
  if [ -z "$(find "$out.partial" -name '*_results.json')" ]; then
    echo "[$index/$total] $name: FAILED, no results file; log: $out.partial/log.txt" >&2
    tail -n 20 "$out.partial/log.txt" >&2
    exit 1
  fi
  mv "$out.partial" "$out"
  echo "[$index/$total] $name: done in $((SECONDS - started)) s"
done

# Cells written by a command in one go: skipped when their output exists.
run_once() {
  local name=$1 output=$2
  shift 2
  index=$((index + 1))
  if [ "$force" = 0 ] && [ -f "$output" ]; then
    echo "[$index/$total] $name: done earlier, skipped"
    return
  fi
  echo "[$index/$total] $name: running"
  started=$SECONDS
  rm -rf "$runs/$name"
  mkdir -p "$runs/$name"
  "$@"
  echo "[$index/$total] $name: done in $((SECONDS - started)) s"
}
examples=4
samples=5
[ ${#limit[@]} = 0 ] || { examples=1; samples=1; }
if [ "$paper" = 1 ]; then
  trace_model=${model_7b:-$model_13b}  # traced on held-out shapes scenes
  run_once trace_fastv_K2_R0.5 "$runs/trace_fastv_K2_R0.5/trace.json" \
    "$bin/dyrate-eval" trace --pretrained "$trace_model" --out "$runs/trace_fastv_K2_R0.5" --method fastv --set K=2 R=0.5 --examples "$examples"
  for size in 7b 13b; do
    vtw_k=16; [ "$size" = 7b ] || vtw_k=20
    run_once "bench_$size" "$runs/bench_$size/bench.csv" \
      "$bin/dyrate-eval" bench --arch "llava-1.5-$size" --methods "original,fastv:K=2:R=0.5,vtw:K=$vtw_k" \
      --samples 20 --warmup 3 --new-tokens 32 --out "$runs/bench_$size/bench.csv"
  done
else
  run_once trace_fastv_K2_R0.5 "$runs/trace_fastv_K2_R0.5/trace.json" \
    "$bin/dyrate-eval" trace --out "$runs/trace_fastv_K2_R0.5" --method fastv --set K=2 R=0.5 --examples "$examples"
  run_once bench_7b_cpu "$runs/bench_7b_cpu/bench.csv" \
    "$bin/dyrate-eval" bench --arch llava-1.5-7b-cpu --methods original,fastv:K=2:R=0.5,vtw:K=16 \
    --samples "$samples" --warmup 1 --new-tokens 16 --out "$runs/bench_7b_cpu/bench.csv"
fi

report=results
[ "$paper" = 0 ] || report=results/paper
[ ${#limit[@]} = 0 ] || report=$runs/report
[ "$paper" = 1 ] || "$bin/dyrate-eval" summarize "$runs" --out "$report" --name embedded
"$bin/dyrate-eval" report "$runs" --out "$report"
