#!/usr/bin/env bash
# The CPU results committed in docs/bench/cpu/ (run on a quiet machine: other work skews every timing).
# Usage: scripts/bench_cpu.sh [OUT_DIR]          (default docs/bench/cpu)
set -euo pipefail
out=${1:-docs/bench/cpu}
data=${ROSE_DATA:-../shared/data/wikitext2}
pruned=${PRUNED:-out/smollm2-rose-2of4-bench}
cpu=torch-cpu,cpp,onnx-cpu,onnx-packed24-cpu

# the embedded SmolLM2-135M pruned 2:4 with ROSE (a small calibration set: speed does not depend on it)
[ -f "$pruned/manifest.json" ] || rose-export prune-and-export --method rose --sparsity 2:4 \
  --calib "$data/valid.tokens.txt" --nsamples 16 --seqlen 256 --formats hf,packed24,onnx,onnx-packed24 --out "$pruned"

# one linear layer: SmolLM2's shapes, then LLaMA-2-7B's, every CPU backend, fp32 and bf16
rose-export bench linear --preset smollm2-135m --tokens 1,8,64,512,2048 --dtypes fp32,bf16 --backends $cpu \
  --out "$out/linear-smollm2" --overwrite
rose-export bench linear --preset llama-2-7b --tokens 1,2,4,8,16,64,256,512,2048 --dtypes fp32,bf16 \
  --backends $cpu --warmup 2 --iters 10 --out "$out/linear-llama-2-7b" --overwrite

# end to end on the pruned model: prefill, time to first token, decode with the KV cache
rose-export bench model --pruned "$pruned" --prompt-lens 16,128,512 --batch 1 --decode-tokens 32 \
  --dtypes fp32,bf16 --backends $cpu --warmup 2 --iters 10 --out "$out/model-smollm2" --overwrite
