#!/usr/bin/env bash
# GPU rows of docs/BENCHMARKS.md: eager Hugging Face vs eager DART in fp16 at the real
# LLaVA-1.5-7B shapes (random weights); torch.cuda.synchronize() before every clock read.
# Run from the repository root on a CUDA machine with torch + transformers (no install needed:
# scripts/bench.py puts the checkout on sys.path). Writes JSON and PNG to ${OUT:-.}.
#
#     OUT=results bash scripts/gpu_bench.sh
#
# The ort rows are left out: onnxruntime on the lent GPU machines is the CPU build, and a 7B fp32
# ONNX export (28 GB) on CPU measures nothing a GPU user deploys. With onnxruntime-gpu installed,
# export with --dtype fp16 and add --runtimes ...,ort --ort-provider cuda.
set -euo pipefail
out="${OUT:-.}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python scripts/bench.py --model llava-7b-shape --device cuda --dtype fp16 \
    --runtimes eager-hf,eager-dart --new-tokens 32 --repeats 10 --warmup 2 \
    --json "$out/gpu-llava-7b-shape.json" --plot "$out/gpu-llava-7b-shape.png" "$@" | tee "$out/gpu-llava-7b-shape.txt"
