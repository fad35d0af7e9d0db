#!/usr/bin/env bash
# Carry onnxruntime-gpu 1.31.1 (CUDA 13) to a lent GPU machine whose image has the CPU onnxruntime only.
# Its wheel (244 MiB) is larger than what one device call carries (64 MiB with the working tree), but
# carried files stay on a warm machine, so it travels in parts over back-to-back calls:
#
#   here, once:       bash tools/device/ort_gpu_wheel.sh split
#                     (downloads the cp312 wheel into .ortgpu/, recompresses it with xz, cuts that
#                     into four 56 MiB parts, lists them and the wheel with their SHA-256 in
#                     .ortgpu/SHA256SUMS; .gitignore keeps them out of commits)
#   there, per part:  carry [".ortgpu/part-00", ".ortgpu/SHA256SUMS"],
#                     command "bash tools/device/ort_gpu_wheel.sh stash .ortgpu/part-00"
#   there, last:      command "bash tools/device/ort_gpu_wheel.sh install && source tools/device/setup.sh
#                     && bash tools/device/gpu_latency.sh \$OUT/gpu"
#
# `pack WHEEL` is split's second half, for a wheel already here (it is removed once packed).
# `install` joins the stashed parts, checks each part's and the wheel's SHA-256, and installs the wheel
# (no dependencies: the image's onnxruntime brought them) into /tmp/site, ahead of the image's CPU
# onnxruntime on PYTHONPATH (setup.sh puts /tmp/site first), so only one onnxruntime is imported.
# tests/test_latency.py packs, stashes and joins a small wheel (ORTGPU_PARTS, ORTGPU_STASH and
# ORTGPU_PART_SIZE move the folders and the part size); the CUDA run itself needs the device.
set -euo pipefail
self="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/../.."  # paths below, and those given, are relative to the checkout's root
version=1.31.1
parts=${ORTGPU_PARTS:-.ortgpu}  # where split leaves the parts (carried from here)
stash=${ORTGPU_STASH:-/tmp/ortgpu}  # where stash gathers them there

case "${1:-}" in
  split)
    mkdir -p "$parts"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$parts" "onnxruntime-gpu==$version"
    exec bash "$self" pack "$(ls "$parts"/onnxruntime_gpu-"$version"-*.whl)"
    ;;
  pack)
    wheel=${2:?usage: ort_gpu_wheel.sh pack WHEEL}
    mkdir -p "$parts"
    # the same files stored uncompressed, then xz: 186 MB for the CUDA provider library where the
    # wheel's deflate left 220, so four parts travel instead of five
    python3 - "$wheel" "$parts/$(basename "$wheel")" <<'PY'
import lzma, shutil, sys, zipfile
wheel, stored_path = sys.argv[1], sys.argv[2] + ".stored"
with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(stored_path, "w", zipfile.ZIP_STORED) as stored:
    for info in source.infolist():
        stored.writestr(info, source.read(info), compress_type=zipfile.ZIP_STORED)
with open(stored_path, "rb") as plain, lzma.open(sys.argv[2] + ".xz", "wb", preset=6) as packed:
    shutil.copyfileobj(plain, packed, 1 << 24)
PY
    name=$(basename "$wheel")
    rm -f "$parts"/part-* "$wheel"
    mv "$parts/$name.stored" "$parts/$name"
    split -b "${ORTGPU_PART_SIZE:-56m}" -d -a 2 "$parts/$name.xz" "$parts/part-"
    (cd "$parts" && sha256sum "$name" part-* > SHA256SUMS)
    rm "$parts/$name" "$parts/$name.xz"
    ls -l "$parts"
    ;;
  stash)
    part=${2:?usage: ort_gpu_wheel.sh stash .ortgpu/part-NN}
    mkdir -p "$stash"
    cp "$part" "$parts/SHA256SUMS" "$stash/"
    (cd "$stash" && grep " $(basename "$part")\$" SHA256SUMS | sha256sum -c --quiet)
    echo "stashed $(basename "$part"); $stash holds: $(cd "$stash" && ls part-* | tr '\n' ' ')"
    ;;
  install)
    if [ ! -f "$stash/SHA256SUMS" ]; then
      echo "error: no part stashed in $stash (none sent yet, or the machine was given back since)" >&2
      exit 1
    fi
    cd "$stash"
    wheel=$(awk '$2 ~ /\.whl$/ {print $2}' SHA256SUMS)
    expected=$(grep -c ' part-' SHA256SUMS)
    found=$(ls part-* | wc -l)
    if [ "$found" != "$expected" ]; then
      echo "error: $found of $expected parts stashed in $stash; stash the missing ones first" >&2
      exit 1
    fi
    grep ' part-' SHA256SUMS | sha256sum -c --quiet
    cat part-* | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 24)' > "$wheel"
    grep " $wheel\$" SHA256SUMS | sha256sum -c --quiet
    if [ "${2:-}" != "--check-only" ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel"
    fi
    echo "onnxruntime-gpu $version joined and checked${2:+ ($2)}"
    ;;
  *)
    echo "usage: ort_gpu_wheel.sh split | pack WHEEL | stash .ortgpu/part-NN | install [--check-only]" >&2
    exit 2
    ;;
esac
