#!/usr/bin/env bash
# What jemalloc's transparent huge pages (`thp:always`, set in
# .cargo/config.toml) are worth to training: the `throughput` example's
# training steps with them and without (`_RJEM_MALLOC_CONF=thp:default`,
# no rebuild needed), interleaved, ROUNDS rounds (default 3) of 3 s each.
# Recorded output: bench/results/huge-pages.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
cargo build --release --quiet -p nin-model --example throughput
throughput=target/release/examples/throughput
for round in $(seq "$rounds"); do
  for thp in always default; do
    for net in compact weights/nin-fashion-mnist.config.json; do
      if [ "$thp" = default ]; then conf=thp:default; else conf=; fi
      rate=$(_RJEM_MALLOC_CONF=$conf RAYON_NUM_THREADS=2 "$throughput" "$net" train 128 3 \
        | python3 -c 'import json, sys; print(json.load(sys.stdin)["images_per_s"])')
      echo "round $round  thp:$thp  $net train 128  $rate img/s"
    done
  done
done
