#!/usr/bin/env bash
# The main job: every method on the shared core, evaluated through lmms-eval on the
# embedded default (the trained shapes model shipped in dyrate_eval/embedded_llava and
# the `shapes` tasks), then the report (the paper's tables and figures) into results/.
#
# The grid: the original model; FastV at K=2 with R = 0.5, 0.75, 0.9, each with its
# attention-ranked selection and with a random selection of the same count, and R = 0.25
# (FastV at each rate DyRate chooses from: results/embedded_caption_rate_by_objects.md
# is what one rate per kind of scene could buy); FastV at K=3 and K=4 (R=0.75); VTW at
# its default K (half the depth) and at K=2; DyRate with the two predictors shipped for
# the embedded model (trained for FLOPs shares of 0.6 and 0.7: its prefill-heavy FLOPs
# cannot go much below 0.5 at K=2; trained first if missing); the decoding ablation
# (DyRate 0.6 captions with beam-2, beam-5 and top-p); the other reducers of the paper's
# Table 1 and beside it (VisionZip and SparseVLM at 64/128/192 of 576 tokens, PruMerge,
# PruMerge+, PyramidDrop and DART at their papers' defaults), each beside FastV with the
# rate that spends its FLOPs share (`dyrate-eval match-rate`). Then the layer schedules (below)
# with a FastV cell at P-Sigmoid's FLOPs, the rate ablation (FixedPrune and
# DepthBasedPrune at K=2 with the rate that spends DyRate 0.6's FLOPs share on the
# captions, `dyrate-eval match-rate`), traces of four captions with FastV and DyRate
# (attention per token group, kept tokens; the report's figures) and the side-by-side
# benchmarks on the embedded model and on the 7B's width with 4 decoder layers, with
# FastV's peers beside the core's FastV (scripts/bench_gpu.sh times the real shapes on a GPU).
#
# After the cells, the latency pass (dyrate-eval latency) times every cell's method
# against the original, interleaved sample by sample in one process on the first docs of
# the cell's tasks, at batch 1 as the paper: 8 samples per task after 2 warm-up ones
# (--limit N: N after 1), on one CPU thread offline (shared cores, see results/FINDINGS.md).
# The tables' latency columns are its ratios; a cell timed earlier is not timed again.
#
# ./run_all.sh --paper --model-7b ID --model-13b ID runs the paper's grid instead, on a
# GPU machine with network access (lmms-eval's own benchmarks download their data; the
# models are hub ids or folders): per model the original, FastV K=2 R=0.5 and K=3
# R=0.5 (the paper's two FastV rows, about 55% and 57% of the FLOPs), VTW (K=16 for
# 7B, 20 for 13B) and the other reducers above on GQA, VizWiz, SQA-IMG, TextVQA, POPE, MMBench, MME, NoCaps and
# Flickr30k; with --predictor-7b / --predictor-13b DIR (from `dyrate-eval
# train-predictor --pretrained ID`), DyRate on the same, NoCaps with beam-2, beam-5 and
# top-p and the rate ablation on NoCaps; without, the decoding ablation runs FastV K=2
# R=0.5. Then a trace and the benchmark of the real shapes with random weights. Runs go
# to runs/paper and the report to results/paper. Either model may be left out. MMBench
# is scored by lmms-eval's GPT judge (mmbench_en_dev) when OPENAI_API_KEY is set, else
# by its rule-based scorer (mmbench_en_dev_static): the judge needs the API for every
# answer the rules cannot parse, and without it retries each of them for minutes.
#
# ./run_all.sh --paper --rehearse runs that grid offline, as a rehearsal of the real run:
# `dyrate-eval make-rehearsal` writes a checkpoint in the llava-hf LLaVA-1.5 layout (the
# embedded model's weights, LLaVA-1.5's ids, processor and chat template, 576 image
# tokens) and the nine benchmarks in miniature where lmms-eval's unchanged tasks find
# them (a private HF_HOME, runs/paper-rehearsal-setup), DyRate's predictor is trained
# for it on the rehearsal's captions, and the report goes to results/paper-rehearsal
# with its rows labelled "rehearsal". The bench times the rehearsal checkpoint (the real
# shapes need a GPU's memory).
#
# Resumable: each cell is written to a temporary folder (<cell>.partial, which the report
# never reads) and renamed into place only when its results file exists, so an
# interrupted run loses nothing and a rerun skips the finished cells; partial folders left
# by a killed run are removed when the next one starts. One run_all.sh at a time per runs
# folder: a second one stops at once, naming the lock it found held. --force recomputes
# every cell. --limit N evaluates N items per task, a quick check of the path whose tables
# (in runs/embedded-limitN/report) say nothing about accuracy (even N with --paper: MME
# scores its questions in pairs). --only A,B runs the named cells (and their latency
# pass), traces and benchmarks alone, then the report of the runs folder into its
# report/ (results/ keeps the whole grid's); a schedule cell named runs its search first
# when its schedule is missing, and the name vtw_searched stands for VTW's searched K (its
# search and its cell). --runs DIR puts the cells into
# DIR (relative to this folder) instead of runs/embedded (runs/paper with --paper,
# runs/paper-rehearsal with --rehearse, -limitN added with --limit); the rehearsal's
# setup goes beside DIR.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

# What a failed step said ($1: its log): the last traceback (lmms-eval logs it and still
# exits 0), else the log's last lines.
show_error() {
  local from
  from=$(grep -n '^Traceback' "$1" | tail -n 1 | cut -d: -f1)
  if [ -n "$from" ]; then tail -n "+$from" "$1" | head -n 40 >&2; else tail -n 20 "$1" >&2; fi
}

force=0
limit=()
paper=0
rehearse=0
only=""
model_7b=""
model_13b=""
predictor_7b=""
predictor_13b=""
runs=""
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --limit) limit=(--limit "$2"); shift ;;
    --paper) paper=1 ;;
    --rehearse) rehearse=1 ;;
    --only) only=",$2,"; shift ;;
    --model-7b) model_7b=$2; shift ;;
    --model-13b) model_13b=$2; shift ;;
    --predictor-7b) predictor_7b=$2; shift ;;
    --predictor-13b) predictor_13b=$2; shift ;;
    --runs) runs=$2; shift ;;
    -h|--help) sed -n '2,/^set /{/^#/p}' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown argument $1 (allowed: --force, --limit N, --only CELL,CELL, --runs DIR," \
         "--paper --model-7b ID --model-13b ID --predictor-7b DIR --predictor-13b DIR, --paper --rehearse)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$rehearse" = 1 ] && { [ "$paper" = 0 ] || [ -n "$model_7b$model_13b$predictor_7b$predictor_13b" ]; }; then
  echo "run_all.sh: --rehearse goes with --paper alone: it brings its own model and predictor" >&2
  exit 2
fi
if [ "$paper" = 1 ] && [ ${#limit[@]} = 2 ] && [ $((limit[1] % 2)) = 1 ]; then
  echo "run_all.sh: --limit ${limit[1]} is not allowed with --paper: it must be even (MME scores its questions in pairs per image)" >&2
  exit 2
fi
if [ "$paper" = 1 ] && [ "$rehearse" = 0 ] && [ -z "$model_7b$model_13b" ]; then
  echo "run_all.sh: --paper needs --model-7b ID and/or --model-13b ID (e.g. llava-hf/llava-1.5-7b-hf)" >&2
  exit 2
fi
if [ "$paper" = 0 ] && [ -n "$model_7b$model_13b$predictor_7b$predictor_13b" ]; then
  echo "run_all.sh: --model-7b / --model-13b / --predictor-7b / --predictor-13b go with --paper" >&2
  exit 2
fi
if [ -z "$runs" ]; then
  runs=runs/embedded
  [ "$paper" = 0 ] || runs=runs/paper
  [ "$rehearse" = 0 ] || runs=runs/paper-rehearsal
  [ ${#limit[@]} = 0 ] || runs=$runs-limit${limit[1]}
fi
mkdir -p "$runs"
# Two run_all.sh into one folder would both run every cell and rename over each other's
# results; the lock is released when this shell exits, however it exits.
exec 9>"$runs/.run_all.lock"
if ! flock --nonblock 9; then
  echo "run_all.sh: another run_all.sh is running into $runs (it holds $runs/.run_all.lock): wait for it to end, or stop it" >&2
  exit 1
fi
# Left by a run killed mid-cell (inside a finished cell too, where an old run_all.sh
# could rename a second copy): unfinished, never read, redone when their cell runs.
find "$runs" -maxdepth 2 -name '*.partial' -type d -prune -exec rm -rf {} +

./scripts/setup_env.sh
bin=.venv/bin

embedded=dyrate_eval/embedded_llava
if [ "$paper" = 0 ] || [ "$rehearse" = 1 ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
fi
if [ "$rehearse" = 1 ]; then
  # built once, into a temporary folder moved into place when complete
  setup=$(dirname "$runs")/paper-rehearsal-setup
  if [ ! -d "$setup" ]; then
    echo "building the rehearsal: the checkpoint and the nine benchmarks in miniature (log: $setup.log)"
    rm -rf "$setup.partial"
    "$bin/dyrate-eval" make-rehearsal --out "$setup.partial" >"$setup.log" 2>&1 || { show_error "$setup.log"; exit 1; }
    mv "$setup.partial" "$setup"
  fi
  export HF_HOME=$(cd "$setup" && pwd)/hf_home
  model_7b=$setup/llava-1.5-7b-rehearsal
  predictor_7b=$setup/predictor
  if [ ! -f "$predictor_7b/predictor.json" ]; then
    echo "training DyRate's predictor for the rehearsal checkpoint on the rehearsal's captions (log: $setup/predictor.log)"
    "$bin/dyrate-eval" train-predictor --pretrained "$model_7b" --data "$setup/predictor-data/captions.jsonl" \
      --rates 0,0.25,0.5,0.75 --steps 10 --batch-size 4 --out "$predictor_7b" >"$setup/predictor.log" 2>&1 ||
      { show_error "$setup/predictor.log"; exit 1; }
  fi
fi
if [ "$paper" = 0 ] && [ ! -f "$embedded/config.json" ]; then
  echo "the embedded model is missing: training it into $embedded (about an hour on 2 CPU cores)"
  "$bin/dyrate-eval" train-embedded --out "$embedded"
fi
# DyRate's predictors for the embedded model, shipped beside it (dyrate 0.6 is the default)
predictors=dyrate_eval/predictors
for target in 0.6 0.7; do
  if [ "$paper" = 0 ] && [ ! -f "$predictors/embedded-flops$target/predictor.json" ]; then
    echo "the embedded model's DyRate predictor for a FLOPs share of $target is missing: training it (minutes)"
    # no rate 1: teacher forcing hides what dropping the whole image mid-caption costs,
    # and predictors allowed it chose it in the middle of most captions
    "$bin/dyrate-eval" train-predictor --target-flops "$target" --rates 0,0.25,0.5,0.75 --out "$predictors/embedded-flops$target"
  fi
done

# cell name | lmms-eval model | model_args (the embedded model is the default
# pretrained) | tasks | gen_kwargs overriding the tasks' decoding
mmbench=mmbench_en_dev_static
[ -z "${OPENAI_API_KEY:-}" ] || mmbench=mmbench_en_dev
paper_tasks=gqa,vizwiz_vqa_val,scienceqa_img,textvqa_val,pope,$mmbench,mme,nocaps_val,flickr30k_test
# the rate ablation, after the grid: label | pretrained (empty: embedded) | the DyRate
# cell whose captions set the FLOPs share | caption task | its predictor
ablation=()
# The other reducers of the paper's Table 1 at its token budgets: VisionZip and SparseVLM
# keeping 64, 128 and 192 of LLaVA-1.5's 576 image tokens (VisionZip's counts scaled to
# the model's image tokens; SparseVLM scales its own), PruMerge and PruMerge+ (adaptive);
# and PyramidDrop (lambda 0.5 at a quarter, half and three quarters of the depth,
# positions renumbered) and DART (K=2, 128 of 576 kept), at their papers' defaults.
# On the embedded model each is followed by FastV at the FLOPs share it spent (below).
# $1: cell name prefix, $2: "pretrained=...," or empty, $3: tasks, $4: the model's image tokens
matched=()
add_reducer_cells() {
  local prefix=$1 pretrained=$2 tasks=$3 image_tokens=$4 budget tokens
  for budget in 64 128 192; do
    tokens=$(( (budget * image_tokens + 288) / 576 ))
    cells+=("${prefix}visionzip_$tokens|dyrate_llava|${pretrained}method=visionzip,tokens=$tokens|$tasks|"
            "${prefix}sparsevlm_$budget|dyrate_llava|${pretrained}method=sparsevlm,tokens=$budget|$tasks|")
  done
  cells+=("${prefix}prumerge|dyrate_llava|${pretrained}method=prumerge|$tasks|"
          "${prefix}prumerge_plus|dyrate_llava|${pretrained}method=prumerge,plus=true|$tasks|"
          "${prefix}pdrop_lambda0.5|dyrate_llava|${pretrained}method=pdrop,lambda=0.5|$tasks|"
          "${prefix}dart_K2_R0.778|dyrate_llava|${pretrained}method=dart,K=2,R=0.778|$tasks|")
}
if [ "$paper" = 1 ]; then
  cells=()
  for size in 7b 13b; do
    if [ "$size" = 7b ]; then id=$model_7b; predictor=$predictor_7b; else id=$model_13b; predictor=$predictor_13b; fi
    [ -n "$id" ] || continue
    cells+=(
      "${size}_original|original_llava|pretrained=$id|$paper_tasks|"
      "${size}_fastv_K2_R0.5|fastv_llava|pretrained=$id,K=2,R=0.5|$paper_tasks|"
      "${size}_fastv_K3_R0.5|fastv_llava|pretrained=$id,K=3,R=0.5|$paper_tasks|"
      "${size}_vtw|vtw_llava|pretrained=$id|$paper_tasks|"  # VTW's K: half the depth (16 for 7B, 20 for 13B)
    )
    add_reducer_cells "${size}_" "pretrained=$id," "$paper_tasks" 576
    if [ -n "$predictor" ]; then
      cells+=("${size}_dyrate|dyrate_llava|pretrained=$id,predictor=$predictor|$paper_tasks|")
      decoding="${size}_decoding_dyrate|dyrate_llava|pretrained=$id,predictor=$predictor|nocaps_val"
      ablation+=("$size|$id|${size}_dyrate|nocaps_val|$predictor")
    else
      decoding="${size}_decoding_fastv_K2_R0.5|fastv_llava|pretrained=$id,K=2,R=0.5|nocaps_val"
    fi
    IFS='|' read -r name model args tasks <<<"$decoding"
    cells+=(
      "${name}_beam2|$model|$args|$tasks|num_beams=2"
      "${name}_beam5|$model|$args|$tasks|num_beams=5"
      "${name}_top_p|$model|$args|$tasks|do_sample=True,temperature=0.7,top_p=0.9"
    )
  done
else
# the comparisons the README leads with first, so that a run cut short has them
cells=(
  "original|original_llava||shapes|"
  "fastv_K2_R0.5|fastv_llava|K=2,R=0.5|shapes|"
  "dyrate_flops0.6|dyrate_llava|predictor=$predictors/embedded-flops0.6|shapes|"
  "dyrate_flops0.7|dyrate_llava|predictor=$predictors/embedded-flops0.7|shapes|"
  "fastv_K2_R0.75|fastv_llava|K=2,R=0.75|shapes|"
  "fastv_K2_R0.9|fastv_llava|K=2,R=0.9|shapes|"
  "fastv_K2_R0.25|fastv_llava|K=2,R=0.25|shapes|"
  "fastv_K2_R0.5_random|fastv_llava|K=2,R=0.5,selection=random|shapes|"
  "fastv_K2_R0.75_random|fastv_llava|K=2,R=0.75,selection=random|shapes|"
  "fastv_K2_R0.9_random|fastv_llava|K=2,R=0.9,selection=random|shapes|"
  "fastv_K3_R0.75|fastv_llava|K=3,R=0.75|shapes|"
  "fastv_K4_R0.75|fastv_llava|K=4,R=0.75|shapes|"
  "fastv_K1_R0.5|fastv_llava|K=1,R=0.5|shapes|"
  "fastv_K1_R0.5_random|fastv_llava|K=1,R=0.5,selection=random|shapes|"
  "vtw_default|vtw_llava||shapes|"
  "vtw_K2|vtw_llava|K=2|shapes|"
  "decoding_dyrate_flops0.6_beam2|dyrate_llava|predictor=$predictors/embedded-flops0.6|shapes_caption|num_beams=2"
  "decoding_dyrate_flops0.6_beam5|dyrate_llava|predictor=$predictors/embedded-flops0.6|shapes_caption|num_beams=5"
  "decoding_dyrate_flops0.6_top_p|dyrate_llava|predictor=$predictors/embedded-flops0.6|shapes_caption|do_sample=True,temperature=0.7,top_p=0.9"
)
ablation=("embedded||dyrate_flops0.6|shapes_caption|$predictors/embedded-flops0.6")
reducers_from=${#cells[@]}
add_reducer_cells "" "" shapes "$("$bin/python" -c 'import sys; from dyrate_eval.arch import load_arch; print(load_arch(sys.argv[1]).n_img)' "$embedded")"
for cell in "${cells[@]:$reducers_from}"; do matched+=("${cell%%|*}"); done
fi

# traces and benchmarks, run after the cells; the paper's are traced on its first model
if [ -n "$model_7b" ]; then trace_model=$model_7b; trace_predictor=$predictor_7b; else trace_model=$model_13b; trace_predictor=$predictor_13b; fi
once=4
schedule_cells=5
[ "$paper" = 0 ] || { once=3; [ -z "$trace_predictor" ] || once=4; schedule_cells=0; }
total=$((${#cells[@]} + schedule_cells + 2 * ${#ablation[@]} + ${#matched[@]} + 1 + once))  # 1: the latency pass
index=0
# whether --only (if given) names $1
named() { [ -z "$only" ] || [[ $only == *",$1,"* ]]; }
# Counts a cell and says whether it runs: not when its output ($2, non-empty) is there
# from an earlier run, unless --force. $3: where its log goes.
cell_starts() {
  index=$((index + 1))
  named "$1" || return 1
  if [ "$force" = 0 ] && [ -n "$2" ]; then
    echo "[$index/$total] $1: done earlier, skipped"
    return 1
  fi
  echo "[$index/$total] $1: running${3:+ (log: $3)}"
  started=$SECONDS
}
# the cells the latency pass times: every cell run_all.sh was asked for, run now or
# earlier, once (a FLOPs-matched FastV cell can be a cell of the grid)
timed_cells=()
timed_names=","
# One lmms-eval cell: name | lmms-eval model | model_args | tasks | gen_kwargs.
run_cell() {
  local name lmms_model model_args tasks gen_kwargs out
  IFS='|' read -r name lmms_model model_args tasks gen_kwargs <<<"$1"
  out="$runs/$name"
  if named "$name" && [[ $timed_names != *",$name,"* ]]; then
    timed_cells+=("$out")
    timed_names+="$name,"
  fi
  # lmms-eval puts the results file in a subfolder named after pretrained=, or directly
  # in the output folder when pretrained= is not given (tasks' submission files, such as
  # MMBench's submissions/<task>_results.json, are not results files)
  cell_starts "$name" "$(find "$out" -name '*_results.json' -not -path '*/submissions/*' 2>/dev/null)" "$out.partial/log.txt" || return 0
  rm -rf "$out" "$out.partial"
  mkdir -p "$out.partial"
  "$bin/lmms-eval" --model "$lmms_model" ${model_args:+--model_args "$model_args"} ${gen_kwargs:+--gen_kwargs "$gen_kwargs"} \
    --batch_size 8 --tasks "$tasks" --include_path tasks --output_path "$out.partial" --log_samples --timezone UTC "${limit[@]}" \
    >"$out.partial/log.txt" 2>&1 || true
  # lmms-eval exits 0 even when evaluation fails: the results file is the only proof.
  if [ -z "$(find "$out.partial" -name '*_results.json' -not -path '*/submissions/*')" ]; then
    echo "[$index/$total] $name: FAILED, no results file; log: $out.partial/log.txt" >&2
    show_error "$out.partial/log.txt"
    exit 1
  fi
  # one rename: the cell appears finished or not at all (-T: never into an existing folder)
  mv -T "$out.partial" "$out"
  echo "[$index/$total] $name: done in $((SECONDS - started)) s"
}
for cell in "${cells[@]}"; do
  run_cell "$cell"
done
# FastV beside each reducer (PyramidDrop, DART, VisionZip, SparseVLM, PruMerge) at the
# FLOPs share it spent on the short answers, as P-Sigmoid's below: at K=2 where FastV
# reaches it, else at K=1 (at K=2 FastV cannot go below about half of the embedded
# model's FLOPs)
for matched_cell in "${matched[@]}"; do
  if [ ! -d "$runs/$matched_cell" ]; then  # the reducer's cell did not run (not among --only)
    index=$((index + 1))
    continue
  fi
  rate=""
  for K in 2 1; do
    rate=$("$bin/dyrate-eval" match-rate "$runs/$matched_cell" --task shapes_vqa --method fastv --set K=$K 2>/dev/null) && break
  done
  if [ -n "$rate" ]; then
    run_cell "fastv_K${K}_R$rate|fastv_llava|K=$K,R=$rate|shapes|"
  else
    index=$((index + 1))
    echo "no FastV rate at K=2 or K=1 matches $matched_cell's FLOPs share, no cell" >&2
  fi
done

# Layer schedules (embedded only; dyrate_eval/search/), searched after the grid:
# G-Search with the KL and with the score criterion, P-Sigmoid at a 40% FLOPs budget
# (both calibrated on the first 100 docs of shapes_vqa) and VTW's K by its KL rule on 20.
# Each search writes its schedule file last, so a rerun skips a finished search (--force
# redoes it). The schedules then run as cells on `shapes`, with FastV at P-Sigmoid's
# FLOPs share (the others have FastV cells of the grid beside them); VTW's K only when
# one meets eta.
if [ "$paper" = 0 ]; then
  schedules=$runs/schedules
  calibration_docs=100
  vtw_docs=20
  trials=30
  [ ${#limit[@]} = 0 ] || { calibration_docs=${limit[1]}; vtw_docs=${limit[1]}; trials=2; }
  search() {  # the file the search writes, the cell that runs its schedule, then its dyrate-eval command
    local out=$1 cell=$2
    shift 2
    named "$cell" || return 0
    if [ "$force" = 0 ] && [ -f "$out" ]; then
      echo "search ${out##*/}: done earlier, skipped"
      return
    fi
    echo "search ${out##*/}: running (log: ${out%.json}.log)"
    started=$SECONDS
    mkdir -p "$schedules"
    if ! "$bin/dyrate-eval" "$@" --out "$out" >"${out%.json}.log" 2>&1; then
      echo "search ${out##*/}: FAILED; log: ${out%.json}.log" >&2
      show_error "${out%.json}.log"
      exit 1
    fi
    echo "search ${out##*/}: done in $((SECONDS - started)) s"
  }
  search "$schedules/gsearch_kl.json" gsearch_kl gsearch --task shapes_vqa --limit "$calibration_docs" --criterion kl --tolerance 0.3
  search "$schedules/gsearch_score.json" gsearch_score gsearch --task shapes_vqa --limit "$calibration_docs" --criterion score --tolerance 0.02
  search "$schedules/psigmoid_score_b0.4.json" psigmoid_score_b0.4 psigmoid --task shapes_vqa --limit "$calibration_docs" --criterion score \
    --budget 0.4 --trials "$trials"
  search "$schedules/vtw_k.json" vtw_searched find-vtw-k --task shapes_vqa --limit "$vtw_docs" --eta 0.003
  run_cell "gsearch_kl|dyrate_llava|method=schedule,schedule=$schedules/gsearch_kl.json|shapes|"
  run_cell "gsearch_score|dyrate_llava|method=schedule,schedule=$schedules/gsearch_score.json|shapes|"
  run_cell "psigmoid_score_b0.4|dyrate_llava|method=schedule,schedule=$schedules/psigmoid_score_b0.4.json|shapes|"
  # FastV at P-Sigmoid's FLOPs share (K=1: at K=2 FastV cannot go below about 50%)
  if [ ! -d "$runs/psigmoid_score_b0.4" ]; then  # not among --only
    index=$((index + 1))
  elif rate=$("$bin/dyrate-eval" match-rate "$runs/psigmoid_score_b0.4" --task shapes_vqa --method fastv --set K=1); then
    run_cell "fastv_K1_R$rate|fastv_llava|K=1,R=$rate|shapes|"
  else
    index=$((index + 1))
    echo "no FastV rate matches P-Sigmoid's FLOPs share (see the message above), no cell" >&2
  fi
  vtw_k=""
  if [ -f "$schedules/vtw_k.json" ]; then
    vtw_k=$("$bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["K"] or "")' "$schedules/vtw_k.json")
  fi
  if ! named vtw_searched; then
    index=$((index + 1))
  elif [ -n "$vtw_k" ]; then
    [ -z "$only" ] || only+="vtw_K$vtw_k,"
    # named as the grid names VTW cells: a searched K of 2 is the grid's vtw_K2, not a
    # second run of it (which the report refuses)
    run_cell "vtw_K$vtw_k|vtw_llava|K=$vtw_k|shapes|"
  else
    index=$((index + 1))
    echo "VTW's searched K: no layer meets eta (see $schedules/vtw_k.json), no cell" >&2
  fi
fi

# The rate ablation: FixedPrune and DepthBasedPrune at DyRate's K, with the rate that
# spends the FLOPs share DyRate spent on the same captions.
for item in "${ablation[@]}"; do
  IFS='|' read -r label id dyrate_cell task predictor <<<"$item"
  arch=${id:-$embedded}
  K=$("$bin/python" -c 'import json, sys; print(json.load(open(sys.argv[1] + "/predictor.json"))["K"])' "$predictor")
  prefix=""; [ "$label" = embedded ] || prefix="${label}_"
  if [ ! -d "$runs/$dyrate_cell" ]; then  # not among --only
    index=$((index + 2))
  elif rate=$("$bin/dyrate-eval" match-rate "$runs/$dyrate_cell" --task "$task" --method fixed_prune --set "K=$K" --arch "$arch") &&
     depth_rate=$("$bin/dyrate-eval" match-rate "$runs/$dyrate_cell" --task "$task" --method depth_prune --set "K=$K" --arch "$arch"); then
    run_cell "${prefix}ablation_fixed_prune_K${K}_R$rate|dyrate_llava|${id:+pretrained=$id,}method=fixed_prune,K=$K,R=$rate|$task|"
    run_cell "${prefix}ablation_depth_prune_K${K}_R$depth_rate|dyrate_llava|${id:+pretrained=$id,}method=depth_prune,K=$K,R=$depth_rate|$task|"
  else
    index=$((index + 2))
    echo "rate ablation for $label skipped: no rate matches $dyrate_cell's FLOPs share (see the message above)" >&2
  fi
done

# The latency pass over the cells; dyrate-eval latency skips a cell with a latency file
# (--force: times them again) and writes each cell's file when it is complete.
index=$((index + 1))
if [ ${#timed_cells[@]} -gt 0 ]; then
  echo "[$index/$total] latency pass over ${#timed_cells[@]} cells (log: $runs/latency.log)"
  started=$SECONDS
  latency_samples=8
  latency_warmup=2
  [ ${#limit[@]} = 0 ] || { latency_samples=${limit[1]}; latency_warmup=1; }
  latency_options=(--samples "$latency_samples" --warmup "$latency_warmup" --batch 1)
  # offline on this project's shared 2-core machine, one thread (results/FINDINGS.md: two
  # threads beside other jobs made decode steps 40 to 70 times slower, and erratic)
  [ "$paper" = 1 ] && [ "$rehearse" = 0 ] || latency_options+=(--threads 1)
  [ "$force" = 0 ] || latency_options+=(--force)
  if ! "$bin/dyrate-eval" latency "${timed_cells[@]}" "${latency_options[@]}" 2>"$runs/latency.log"; then
    echo "[$index/$total] latency pass: FAILED; log: $runs/latency.log" >&2
    show_error "$runs/latency.log"
    exit 1
  fi
  echo "[$index/$total] latency pass: done in $((SECONDS - started)) s"
fi

# Cells written by a command in one go: skipped when their output exists.
run_once() {
  local name=$1 output=$2
  shift 2
  cell_starts "$name" "$(find "$output" 2>/dev/null)" || return 0
  rm -rf "$runs/$name"
  mkdir -p "$runs/$name"
  "$@"
  echo "[$index/$total] $name: done in $((SECONDS - started)) s"
}
examples=4
samples=5
[ ${#limit[@]} = 0 ] || { examples=1; samples=1; }
if [ "$paper" = 1 ]; then
  run_once trace_fastv_K2_R0.5 "$runs/trace_fastv_K2_R0.5/trace.json" \
    "$bin/dyrate-eval" trace --pretrained "$trace_model" --out "$runs/trace_fastv_K2_R0.5" --method fastv --set K=2 R=0.5 --examples "$examples"
  if [ -n "$trace_predictor" ]; then
    run_once trace_dyrate "$runs/trace_dyrate/trace.json" \
      "$bin/dyrate-eval" trace --pretrained "$trace_model" --out "$runs/trace_dyrate" --method dyrate --set "predictor=$trace_predictor" --examples "$examples"
  fi
  if [ "$rehearse" = 1 ]; then
    run_once bench_rehearsal "$runs/bench_rehearsal/bench.csv" \
      "$bin/dyrate-eval" bench --pretrained "$model_7b" --methods "original,fastv:K=2:R=0.5,vtw,dyrate:predictor=$predictor_7b" --peers \
      --samples "$samples" --warmup 1 --new-tokens 16 --out "$runs/bench_rehearsal/bench.csv"
  else
    for size in 7b 13b; do
      vtw_k=16; [ "$size" = 7b ] || vtw_k=20
      run_once "bench_$size" "$runs/bench_$size/bench.csv" \
        "$bin/dyrate-eval" bench --arch "llava-1.5-$size" --methods "original,fastv:K=2:R=0.5,vtw:K=$vtw_k" --peers \
        --samples 20 --warmup 3 --new-tokens 32 --out "$runs/bench_$size/bench.csv"
    done
  fi
else
  run_once trace_fastv_K2_R0.5 "$runs/trace_fastv_K2_R0.5/trace.json" \
    "$bin/dyrate-eval" trace --out "$runs/trace_fastv_K2_R0.5" --method fastv --set K=2 R=0.5 --examples "$examples"
  run_once trace_dyrate_flops0.6 "$runs/trace_dyrate_flops0.6/trace.json" \
    "$bin/dyrate-eval" trace --out "$runs/trace_dyrate_flops0.6" --method dyrate --examples "$examples"
  # 60 samples (about 1.5 minutes): a decode step of the small model moves by several
  # percent from sample to sample on a shared machine, DyRate's cost is a few percent
  run_once bench_embedded "$runs/bench_embedded/bench.csv" \
    "$bin/dyrate-eval" bench --methods original,fastv:K=2:R=0.5,dyrate --peers \
    --samples "$((12 * samples))" --warmup 2 --new-tokens 24 --out "$runs/bench_embedded/bench.csv"
  # the 7B's width and heads with 4 decoder layers, random weights (DyRate's predictor too);
  # a sample of its 8 rows takes about 2 minutes on 2 shared cores, so 2 samples
  run_once bench_7b_4layers "$runs/bench_7b_4layers/bench.csv" \
    "$bin/dyrate-eval" bench --arch llava-1.5-7b-4layers --methods original,fastv:K=2:R=0.5,vtw:K=2,dyrate --peers \
    --samples "$(( samples < 2 ? samples : 2 ))" --warmup 1 --new-tokens 16 --out "$runs/bench_7b_4layers/bench.csv"
fi

report=results
source=measured
[ "$paper" = 0 ] || report=results/paper
[ "$rehearse" = 0 ] || { report=results/paper-rehearsal; source=rehearsal; }
[ ${#limit[@]} = 0 ] && [ -z "$only" ] || report=$runs/report
[ "$paper" = 1 ] || "$bin/dyrate-eval" summarize "$runs" --out "$report" --name embedded
"$bin/dyrate-eval" report "$runs" --out "$report" --source "$source"
