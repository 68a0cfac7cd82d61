#!/usr/bin/env bash
# nin against PyTorch on this CPU: same network, batch, threads, workload.
#
#   bench/compare.sh [rounds] [seconds-per-measurement]
#
# Installs PyTorch (PyPI's wheel, about 5 GB with the CUDA libraries it
# brings; it runs on CPU) into bench/.venv on first use, builds the
# Rust `throughput` example, then runs every workload in both, interleaved
# round by round (so a noisy neighbour hurts both sides alike), and prints
# the median images/s, the ratio nin/PyTorch and nin's GFLOP/s as a
# fraction of the machine's measured peak (the best of PyTorch's large
# square SGEMM with the same threads, unless PEAK_GFLOPS is set).
# Workloads: the two presets, and `shipped`, the batch-norm network of
# weights/ (its config). Not part of CI's tests.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
seconds=${2:-8}
threads=${THREADS:-2}

venv=bench/.venv
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch numpy
fi
cargo build --release --quiet -p nin-model --example throughput --bin nin-summary
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for arch in compact d2l; do
  ./target/release/nin-summary --arch "$arch" --json \
    | "$venv/bin/python" -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["config"]))' \
    > "$work/$arch.json"
done
cp weights/nin-fashion-mnist.config.json "$work/shipped.json"

if [ -z "${PEAK_GFLOPS:-}" ]; then
  PEAK_GFLOPS=$("$venv/bin/python" - "$threads" <<'PY'
import sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
n = 3072
a, b = torch.randn(n, n), torch.randn(n, n)
torch.mm(a, b)
best = 0.0
for _ in range(5):
    start = time.perf_counter()
    torch.mm(a, b)
    best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
print(f"{best:.0f}")
PY
)
  echo "peak: $PEAK_GFLOPS GFLOP/s (PyTorch SGEMM ${threads} threads, 3072x3072)" >&2
fi

workloads=(
  "compact train 128"
  "compact forward 64"
  "compact forward 1"
  "d2l train 16"
  "d2l forward 16"
  "d2l forward 1"
  "shipped train 128"
  "shipped forward 64"
)
export RAYON_NUM_THREADS=$threads
for round in $(seq "$rounds"); do
  for w in "${workloads[@]}"; do
    set -- $w
    ./target/release/examples/throughput "$work/$1.json" "$2" "$3" "$seconds" >> "$work/results.jsonl"
    "$venv/bin/python" bench/nin_torch.py --config "$work/$1.json" --arch "$1" \
      --mode "$2" --batch "$3" --seconds "$seconds" --threads "$threads" \
      2>/dev/null >> "$work/results.jsonl"
  done
  echo "round $round/$rounds done" >&2
done

"$venv/bin/python" - "$work/results.jsonl" "$PEAK_GFLOPS" <<'PY'
import json, os, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:  # nin names the config file it ran
    r["arch"] = os.path.basename(r["arch"]).removesuffix(".json")
peak = float(sys.argv[2])
key = lambda r: (r["arch"], r["mode"], r["batch"])
seen = []
for r in rows:
    if key(r) not in seen:
        seen.append(key(r))
print(f"{'workload':<22}{'nin img/s':>11}{'torch img/s':>13}{'ratio':>8}{'nin GFLOP/s':>13}{'of peak':>9}")
for k in seen:
    nin = [r for r in rows if key(r) == k and r["impl"] == "nin"]
    torch = [r for r in rows if key(r) == k and r["impl"] == "torch"]
    a = statistics.median(r["images_per_s"] for r in nin)
    b = statistics.median(r["images_per_s"] for r in torch)
    g = statistics.median(r["gflops"] for r in nin)
    name = f"{k[0]} {k[1]} b{k[2]}"
    print(f"{name:<22}{a:>11.1f}{b:>13.1f}{a / b:>7.2f}x{g:>13.1f}{g / peak:>8.0%}")
PY
