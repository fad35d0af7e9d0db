#!/usr/bin/env bash
# GPU latency through onnxruntime's CUDA execution provider, in one go (benchmarks/bench_latency.py):
# resnet50, mobilenet_v2 and efficientnet_b0 at batch 1 and 64; original vs graphprune vs Torch-Pruning
# at ratio 0.5, and the latency-targeted plans from a CUDA latency profile. Writes RESULTS_DIR/gpu_latency.{json,md}.
# Usage, after `source tools/device/setup.sh`:
#   bash tools/device/gpu_latency.sh RESULTS_DIR [MODEL...]
# Needs, on the GPU machine: onnxruntime-gpu 1.31.1 (built for CUDA 13) in place of onnxruntime,
# torchvision (the image's; models are exported there) and torch-pruning (carried in .whl/ by setup.sh).
# The image seen on 2026-11-22 had the CPU onnxruntime only, and the GPU wheel (244 MiB) exceeds what a
# call carries (64 MiB): tools/device/ort_gpu_wheel.sh sends it in parts first. Without the CUDA
# provider it stops at once with graphprune's one-line install advice and exit status 2, before
# exporting anything.
# Meant to fit one 10-minute call (12 widths per layer dimension, 2 profile rounds, 3 timing rounds of
# 50 runs); not yet run on a GPU: the session that wrote it had none.
set -euo pipefail
results=${1:?usage: gpu_latency.sh RESULTS_DIR [MODEL...]}
shift
python=${PYTHON:-python3}
models=("$@")
mkdir -p "$results"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$results/gpu.txt" || true
fi
"$python" benchmarks/bench_latency.py --provider cuda --batches 1,64 --threads 4 --ratio 0.5 \
  --profile-points 12 --profile-rounds 2 --runs 50 --rounds 3 --results "$results" \
  ${models[@]+--models "${models[@]}"} 2>&1 | tee "$results/gpu_latency.log"
exit "${PIPESTATUS[0]}"
