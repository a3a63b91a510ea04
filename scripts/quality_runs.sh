#!/usr/bin/env bash
# Runs the README quality table: SmolLM2-135M, calibration 64 x 512 tokens from the shared WikiText-2 validation
# file, perplexity on the first 65,536 tokens of the shared WikiText-2 raw test at seqlen 512, and on the first
# 65,536 tokens of a second text that calibration never sees (`pydoc`: Python's own documentation, rose/data.py).
# Usage: scripts/quality_runs.sh RUNS_DIR SEED CONFIG...   where CONFIG is method:sparsity[:extra-flags]
# e.g.   scripts/quality_runs.sh runs 0 dense sparsegpt:2:4 rose:0.7:--rose-order=columns rose:2:4:--order=best,--refit
# ROSE_EXPORT overrides the command (default: rose-export), e.g. "python -m rose_export" from a checkout;
# ROSE_SECOND_TEXT= (empty) skips the second text (3-4 minutes of evaluation per run on one thread);
# ROSE_MODEL=DIR prunes another model than the embedded SmolLM2 (e.g. a local checkpoint directory).
# Each run keeps its rose_recipe.json (timings, per-sublayer records, perplexity) under RUNS_DIR; the weights
# are deleted to save disk. Render with: python scripts/quality_table.py RUNS_DIR
set -euo pipefail
# torch's CPU thread count changes LAPACK's Cholesky in its last bits, and that moves SparseGPT's masks (at 50%
# seed 0: 55.12 perplexity on 2 threads, 55.44 on 1). Every cell of the table runs on one thread, so that cells
# compare like with like and a rerun matches bit for bit; each recipe records the count (versions.torch_threads).
export OMP_NUM_THREADS=${ROSE_THREADS:-1}
runs=$1; seed=$2; shift 2
data=${ROSE_DATA:-../shared/data/wikitext2}
read -r -a rose_export <<< "${ROSE_EXPORT:-rose-export}"
second=${ROSE_SECOND_TEXT-pydoc}
read -r -a texts <<< "$data/test.raw.txt${second:+ $second}"
model=(${ROSE_MODEL:+--model "$ROSE_MODEL"})
common=("${model[@]}" --calib "$data/valid.tokens.txt" --nsamples 64 --seqlen 512 --seed "$seed" --eval
        "${texts[@]/#/--eval-data=}" --eval-seqlen 512 --max-tokens 65536 --quiet --overwrite)
mkdir -p "$runs"
for spec in "$@"; do
  name="${spec//[:=]/_}_s$seed"
  [ -f "$runs/$name/rose_recipe.json" ] && { echo "skip $name"; continue; }
  if [ "$spec" = dense ]; then
    mkdir -p "$runs/$name"
    "${rose_export[@]}" eval "${model[@]}" "${texts[@]/#/--data=}" --seqlen 512 --max-tokens 65536 --json > "$runs/$name/eval.json"
    cp "$runs/$name/eval.json" "$runs/$name/rose_recipe.json"
    continue
  fi
  method=${spec%%:*}; rest=${spec#*:}
  # sparsity is N:M or a ratio; anything after it (separated by ':') are extra flags
  if [[ $rest =~ ^([0-9]+:[0-9]+)(:(.*))?$ ]]; then sp=${BASH_REMATCH[1]}; extra=${BASH_REMATCH[3]:-}
  else sp=${rest%%:*}; extra=""; [[ $rest == *:* ]] && extra=${rest#*:}; fi
  echo "== $name: --method $method --sparsity $sp $extra"
  # shellcheck disable=SC2086
  "${rose_export[@]}" prune --method "$method" --sparsity "$sp" ${extra//,/ } "${common[@]}" --out "$runs/$name"
  rm -f "$runs/$name"/*.safetensors
done
