#!/usr/bin/env bash
# The GPU protocols (benchmarks/README.md, "On a GPU"), run as parallel processes on one GPU machine.
# Usage, after `source tools/device/setup.sh`:
#   bash tools/device/gpu_protocols.sh WORKDIR RESULTS_DIR JOB...
# Jobs (each trains the baseline it needs with tools/train_reference.py, seed 0):
#   slimming-E[-kd][-pN]       VGG-11-BN baseline of E epochs, then the Network Slimming claim with as many
#                              sparsity-training and fine-tune epochs (bench_paper_claims.py); -kd distils
#                              the baseline into the fine-tunes, -pN prunes in N passes (e.g. slimming-60,
#                              slimming-60-kd: about 6 + 12 minutes each on an H100, sharing the baseline)
#   gate-decorator-MODEL       resnet56 / resnet20 baseline (15 epochs), then the Gate Decorator claim
#   vgg-baseline               VGG-11-BN baseline (20 epochs), sent back in 15 MB parts (cat them to rebuild)
#   compare                    VGG-11-BN baseline (20 epochs), graphprune vs Torch-Pruning (bench_fashion_mnist.py)
#   criteria                   VGG-11-BN baseline (20 epochs), every criterion vs the blend (bench_criteria.py)
# Results JSON are copied to RESULTS_DIR every 15 s (a run cut short keeps what it finished); render the
# markdown and plots from them with each script (see benchmarks/README.md).
set -u
work=$1 results=$2
shift 2
mkdir -p "$work/results" "$results"
log="$results/gpu_protocols.log"
claims="python3 benchmarks/bench_paper_claims.py --device cuda --threads 4 --out $work/results"

baseline() { # MODEL EPOCHS: train once (the first job to ask trains, the others wait for its record)
  local onnx="$work/$1_$2ep.onnx"
  if mkdir "$onnx.lock" 2>/dev/null; then
    python3 tools/train_reference.py --model "$1" --epochs "$2" --device cuda --threads 4 --out "$onnx" >&2
  fi
  while [ ! -f "${onnx%.onnx}.json" ]; do sleep 5; done
  echo "$onnx"
}

job() {
  case $1 in
    slimming-*)
      local spec=${1#slimming-} extra=() tag
      local epochs=${spec%%-*}
      tag="${epochs}ep"
      if [[ $spec == *-kd* ]]; then extra+=(--teacher); tag+="_kd"; fi
      if [[ $spec =~ -p([0-9]+) ]]; then extra+=(--passes "${BASH_REMATCH[1]}"); tag+="_p${BASH_REMATCH[1]}"; fi
      $claims --claim slimming --baseline "$(baseline vgg11_bn "$epochs")" --epochs-sparse "$epochs" \
        --epochs-finetune "$epochs" "${extra[@]}" --tag "$tag" --work "$work/$1" ;;
    gate-decorator-*)
      local model=${1#gate-decorator-}
      $claims --claim gate-decorator --model "$model" --baseline "$(baseline "$model" 15)" --tick-share 0.01 \
        --epochs-finetune 12 --finetune-lr 0.05 --tag "$model" --work "$work/$1" ;;
    vgg-baseline)
      split -b 15M "$(baseline vgg11_bn 20)" "$results/vgg11_bn_20ep.onnx.part-" ;;
    compare)
      python3 benchmarks/bench_fashion_mnist.py --model vgg11_bn --baseline "$(baseline vgg11_bn 20)" \
        --device cuda --threads 6 --train-samples 60000 --test-samples 5000 --epochs 2 --runs 30 --rounds 1 \
        --out "$work/results" ;;
    criteria)
      python3 benchmarks/bench_criteria.py --model vgg11_bn --baseline "$(baseline vgg11_bn 20)" \
        --device cuda --threads 4 --workers 3 --test-samples 1000 --population 6 --generations 3 \
        --minutes 6 --out "$work/results" ;;
    *) echo "unknown job $1" >&2; return 2 ;;
  esac
}

pids=()
for name in "$@"; do
  job "$name" >>"$log" 2>&1 &
  pids+=($!)
done
running() { for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && return 0; done; return 1; }
while running; do
  cp "$work"/results/*.json "$work"/*.json "$results"/ 2>/dev/null
  sleep 15
done
cp "$work"/results/*.json "$work"/*.json "$results"/ 2>/dev/null
wait "${pids[@]}"
