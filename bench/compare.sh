#!/usr/bin/env bash
# nin against the engines its users would otherwise pick, on this CPU: the
# same network and weights, batch, threads and workload.
#
#   bench/compare.sh [rounds] [seconds-per-measurement]
#
# Peers (bench/peers.py says how each is configured): PyTorch eager in NCHW
# and in channels_last, ONNX Runtime and OpenVINO (f32), the last two on
# the ONNX file that nin's `throughput --onnx` exports of the very network
# it measures; PyTorch builds its twin from the same config and takes the
# same weights from that file. nin also runs `--precision bf16`, against
# the peers' own bf16 defaults: PyTorch autocast (channels_last) and
# OpenVINO without a precision hint (bf16 where the CPU has the units);
# on a CPU without AVX512-BF16, where nin's bf16 falls back to FP32, the
# bf16 rows are left out. Installs them from PyPI into bench/.venv on
# first use (about 5 GB: PyPI's torch brings CUDA libraries; it runs on the
# CPU), builds the Rust `throughput` example, then runs every workload on
# every engine, interleaved round by round (so a noisy neighbour hurts all
# alike), and prints the median images/s of each, and nin's ratio against
# the fastest peer. Workloads: the `compact` preset, and `shipped`, the
# trained network of weights/ (forward: the weights file itself; train: its
# config). Not part of CI's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-4}
threads=${THREADS:-2}

venv=bench/.venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import torch, onnx, onnxruntime, openvino' 2> /dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet -r bench/requirements.txt
fi
cargo build --release --quiet -p nin-model --example throughput --bin nin-summary
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/nin-summary --arch compact --json \
  | "$venv/bin/python" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["config"]))' \
  > "$work/compact.json"
cp weights/nin-fashion-mnist.config.json "$work/shipped.json"
shipped_weights=weights/nin-fashion-mnist.safetensors

# The network each workload runs, as nin names it.
network() { # network ARCH MODE
  if [ "$1" = shipped ] && [ "$2" = forward ]; then echo "$shipped_weights"; else echo "$work/$1.json"; fi
}

workloads=(
  "compact forward 64"
  "compact forward 1"
  "shipped forward 64"
  "shipped forward 1"
  "compact train 128"
  "shipped train 128"
)
export RAYON_NUM_THREADS=$threads
# Without AVX512-BF16 there is no bf16 mode to compare. With it, nin's
# `--precision bf16` runs against the peers' bf16 defaults even where it
# computes in FP32 (AVX512-BF16 measured slower than FP32, no AMX): that
# is what a user asking for bf16 gets; the table says what it ran as.
precisions="fp32 bf16"
bf16_engines="torch-bf16"
if ! grep -qw avx512_bf16 /proc/cpuinfo; then
  echo "this CPU has no AVX512-BF16: FP32 rows only" >&2
  precisions="fp32" bf16_engines=""
fi
# Before the rounds: each forward network exported once, as nin holds it.
for arch in compact shipped; do
  ./target/release/examples/throughput --onnx "$work/$arch.onnx" \
    "$(network "$arch" forward)" forward 1 0.1 > /dev/null
done
# nin's runs of a workload, in each precision.
run_nin() { # run_nin ARCH MODE BATCH
  for precision in $precisions; do
    ./target/release/examples/throughput --precision "$precision" \
      "$(network "$1" "$2")" "$2" "$3" "$seconds" \
      | "$venv/bin/python" -c 'import json,sys; r=json.load(sys.stdin); r["arch"]=sys.argv[1]; r["impl"]="nin-bf16" if sys.argv[2]=="bf16" else "nin"; print(json.dumps(r))' "$1" "$precision" \
      >> "$work/results.jsonl"
  done
}
# In each round nin runs a workload before the peers and again after
# them (its median is of twice as many runs): a shared VM's speed
# drifts by a fifth or more within a minute, and nin's runs on either
# side of the peers' span the same stretch of it, where runs only before
# them did not (on a Zen 4 at e59ebaa, shipped b1 came out at 0.92x
# ONNX Runtime that way, and at 1.17x to 1.22x in runs alternating
# with it).
for round in $(seq "$rounds"); do
  for w in "${workloads[@]}"; do
    set -- $w
    arch=$1 mode=$2 batch=$3
    run_nin "$arch" "$mode" "$batch"
    engines="torch torch-cl $bf16_engines"
    [ "$mode" = forward ] && engines="$engines ort openvino ${bf16_engines:+openvino-bf16}"
    for engine in $engines; do
      "$venv/bin/python" bench/peers.py --engine "$engine" --config "$work/$arch.json" \
        --onnx "$work/$arch.onnx" --arch "$arch" --mode "$mode" --batch "$batch" \
        --seconds "$seconds" --threads "$threads" 2> "$work/peer.log" >> "$work/results.jsonl" \
        || { cat "$work/peer.log" >&2; exit 1; }
    done
    run_nin "$arch" "$mode" "$batch"
  done
  echo "round $round/$rounds done" >&2
done

"$venv/bin/python" - "$work/results.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
titles = {"nin": "nin", "torch": "PyTorch NCHW", "torch-cl": "PyTorch ch-last",
          "ort": "ONNX Runtime", "openvino": "OpenVINO f32",
          "nin-bf16": "nin bf16", "torch-bf16": "PyTorch bf16 autocast",
          "openvino-bf16": "OpenVINO default"}
workloads = []
for r in rows:
    k = (r["arch"], r["mode"], r["batch"])
    if k not in workloads:
        workloads.append(k)
ov = {r["precision"] for r in rows if r["impl"] == "openvino-bf16"}
print("images/s, medians; ratio = nin / the fastest peer")
if ov:
    print(f"(OpenVINO default chose: {', '.join(sorted(ov))})")
ours = {r["precision"] for r in rows if r["impl"] == "nin-bf16"}
if ours:
    print(f"(nin --precision bf16 ran as: {', '.join(sorted(ours))})")
for ours, engines in [("nin", ["torch", "torch-cl", "ort", "openvino"]),
                      ("nin-bf16", ["torch-bf16", "openvino-bf16"])]:
    if not any(r["impl"] == ours for r in rows):
        continue
    engines = [ours] + engines
    print()
    print("| workload | " + " | ".join(titles[e] for e in engines) + " | ratio |")
    print("|---|" + "---:|" * (len(engines) + 1))
    for k in workloads:
        medians = {}
        for e in engines:
            runs = [r["images_per_s"] for r in rows
                    if (r["arch"], r["mode"], r["batch"]) == k and r["impl"] == e]
            if runs:
                medians[e] = statistics.median(runs)
        best = max(v for e, v in medians.items() if e != ours)
        cells = [f"{medians[e]:,.0f}" if e in medians else "-" for e in engines]
        print(f"| {k[0]} {k[1]} b{k[2]} | " + " | ".join(cells) + f" | {medians[ours] / best:.2f}x |")
PY
