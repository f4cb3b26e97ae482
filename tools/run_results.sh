#!/usr/bin/env bash
# The experiment of docs/RESULTS.md, end to end: train (a) sliding-window attention only,
# (b) + FwPKM, (b') + FwPKM reading through a short convolution, optionally (c) + static PKM,
# on the same tokens, steps and seed; then streamed perplexity and NIAH on the held-out books;
# then the tables and plots. (a) and (b) train side by side, then (b').
#
#   bash tools/run_results.sh [RUNS_DIR]        (default runs/results)
#
# Environment: CORPUS (default ../shared/data/gutenberg), STEPS (600), THREADS (1 per run; the
# two main runs go side by side), SAMPLES (NIAH samples per length, 5 needles each; 4), WITH_PKM=1
# to add (c), FWPKM (command, default "python -m fwpkm_ext").
set -euo pipefail
RUNS=${1:-runs/results}
CORPUS=${CORPUS:-../shared/data/gutenberg}
STEPS=${STEPS:-600}
THREADS=${THREADS:-1}
SAMPLES=${SAMPLES:-4}
FWPKM=${FWPKM:-python -m fwpkm_ext}
mkdir -p "$RUNS"

# one tokenizer for every run, trained on the training split only (what `fwpkm train` does
# when given no --tokenizer; --stop-at 0 stops before the first step)
if [ ! -f "$RUNS/tokenizer.model" ]; then
  $FWPKM train --preset tiny-nomem --corpus "$CORPUS" --seq-len 4096 --steps 1 --stop-at 0 \
      --val-every 0 --out "$RUNS/tok" --no-progress > "$RUNS/tok.log" 2>&1
  cp "$RUNS/tok/tokenizer.model" "$RUNS/tokenizer.model"
fi

COMMON=(--corpus "$CORPUS" --tokenizer "$RUNS/tokenizer.model" --seq-len 4096 --steps "$STEPS"
        --val-every 200 --val-batches 8 --needle-rate 1.0 --needles-per-seq 6 --seed 0
        --no-progress --threads "$THREADS")
train() {  # name preset [config]
  local cfg=()
  [ -n "${3:-}" ] && cfg=(--config "$3")
  OMP_NUM_THREADS=$THREADS $FWPKM train --preset "$2" "${cfg[@]}" "${COMMON[@]}" \
      --out "$RUNS/$1" > "$RUNS/$1.train.log" 2>&1
}
train a tiny-nomem &
train b tiny '{"fwpkm_n_subkeys": 512}' &
wait
train b3 tiny '{"fwpkm_n_subkeys": 512, "fwpkm_short_conv": 4}'
if [ "${WITH_PKM:-0}" = 1 ]; then
  train c tiny-nomem '{"pkm_layers": [1], "pkm_n_subkeys": 128, "pkm_k_dim": 128}'
fi

evaluate() {  # name
  OMP_NUM_THREADS=$THREADS $FWPKM eval ppl --model "$RUNS/$1" --corpus "$CORPUS" \
      --threads "$THREADS" --json "$RUNS/$1/ppl.json" --no-plot --no-progress \
      > "$RUNS/$1.ppl.log" 2>&1
  OMP_NUM_THREADS=$THREADS $FWPKM niah --model "$RUNS/$1" --corpus "$CORPUS" \
      --lengths 4096,16384,32768,131072 --iters 1,2 --samples "$SAMPLES" --threads "$THREADS" \
      --json "$RUNS/$1/niah.json" --no-progress > "$RUNS/$1.niah.log" 2>&1
}
evaluate a &
evaluate b &
wait
evaluate b3
[ -d "$RUNS/c" ] && evaluate c

labels=(--run "(a) SWA only=$RUNS/a" --run "(b) SWA + FwPKM=$RUNS/b"
        --run "(b') + short conv=$RUNS/b3")
[ -d "$RUNS/c" ] && labels+=(--run "(c) SWA + PKM=$RUNS/c")
python tools/results_report.py "${labels[@]}" --plots "$RUNS/plots"
