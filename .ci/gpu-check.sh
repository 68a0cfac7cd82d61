#!/usr/bin/env bash
# The generic kernels on a real NVIDIA GPU, for any machine that has one
# (CI has none: there this prints "skipped: no GPU" and exits 0).
#
#   bash .ci/gpu-check.sh
#
# Needs the CUDA toolkit (nvcc) and the driver; CUDA_COMPUTE_CAP defaults to
# the GPU's own. It runs, with `--features cuda`:
# 1. the generic-against-native comparisons on real images
#    (nin-train/tests/kernels.rs) with the generic side on cuda:0;
# 2. a one-epoch `nin-train fit --device cuda` on the full data set, then
#    `eval --device cuda` of the result;
# 3. `nin-serve --device cuda` with the shipped weights: its start-up check
#    passes, /v2/models/nin names the GPU, and the slice is classified as
#    `eval --device cpu` classifies it;
# 4. `throughput --device cuda` at forward batch 1 and 64 and train 128.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi > /dev/null || ! nvidia-smi -L 2> /dev/null | grep -q '^GPU'; then
  echo "skipped: no GPU"
  exit 0
fi
nvidia-smi -L
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d '. ')
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$cap}
echo "kernels for compute capability $CUDA_COMPUTE_CAP (this GPU: $cap)"
out=target/gpu-check
mkdir -p "$out"

echo "== 1. generic kernels on cuda:0 against native on CPU"
NIN_TEST_DEVICE=cuda cargo test --release --features cuda -p nin-train --test kernels

echo "== 2. one epoch of fit on the GPU, and its eval"
cargo build --release --features cuda -p nin-train -p nin-serve
cargo build --release --features cuda -p nin-model --example throughput
rm -rf "$out/fit"
target/release/nin-train fit --device cuda --epochs 1 --out "$out/fit"
target/release/nin-train eval --device cuda --weights "$out/fit/nin-fashion-mnist.safetensors"

echo "== 3. nin-serve on the GPU classifies the slice as the CPU does"
weights=weights/nin-fashion-mnist.safetensors
target/release/nin-train eval --device cpu --weights "$weights" --data-dir tests/data --json \
  > "$out/eval-cpu.json"
target/release/nin-train eval --device cuda --weights "$weights" --data-dir tests/data --json \
  > "$out/eval-cuda.json"
python3 - "$out/eval-cpu.json" "$out/eval-cuda.json" << 'EOF'
import json, sys
cpu, gpu = (json.load(open(p)) for p in sys.argv[1:])
# One borderline image of the 1,000 may flip (the two sum in other orders).
assert abs(cpu["accuracy"] - gpu["accuracy"]) <= 0.001, (cpu["accuracy"], gpu["accuracy"])
print(f"slice accuracy: cpu {cpu['accuracy']:.4f}, cuda {gpu['accuracy']:.4f}")
EOF
target/release/nin-serve --device cuda --addr 127.0.0.1:18080 > "$out/serve.log" 2>&1 &
serve=$!
trap 'kill $serve 2> /dev/null || true' EXIT
bash .ci/wait-ready.sh http://127.0.0.1:18080/readyz "$serve" "$out/serve.log"
curl -fsS http://127.0.0.1:18080/v2/models/nin | tee "$out/model.json"
echo
grep -q '"device":"cuda:0"' "$out/model.json"
grep '^nin_device_info' <(curl -fsS http://127.0.0.1:18080/metrics)

echo "== 4. throughput on the GPU"
throughput=target/release/examples/throughput
$throughput --device cuda "$weights" forward 1 5
$throughput --device cuda "$weights" forward 64 5
$throughput --device cuda weights/nin-fashion-mnist.config.json train 128 5
echo "gpu-check: passed"
