#!/usr/bin/env bash
# Load test of nin-serve on this machine, loopback only, with wrk.
#
#   bench/load.sh [weights.safetensors]
#
# Builds the release nin-serve and the `throughput` example, starts the
# server on a free loopback port (127.0.0.1, port chosen by the kernel) with
# the weights (default weights/nin-fashion-mnist.safetensors, or $NIN_LOAD_WEIGHTS),
# waits for /readyz, turns real Fashion-MNIST test images from tests/data/
# into PNG files, then runs, one after the other:
#
#   raw     the model's own batched throughput: the same weights file
#           through the `throughput` example, forward passes at --max-batch
#           with no HTTP (before and after the steady phase; their mean is
#           what the server is compared with);
#   single  one connection for $SINGLE_SECONDS (20) s: the latency of a
#           lone request, batch 1 end to end;
#   steady  $LOAD_CLIENTS (64) connections for $LOAD_SECONDS (60) s;
#   burst   $BURST_CLIENTS (1024) connections for $BURST_SECONDS (15) s, far
#           above capacity: the server must shed the excess with 503.
#
# Every connection is closed-loop (sends its next request when the answer
# to the last one came). The server's VmRSS is sampled every second
# throughout. The summary table gives, per phase: connections, requests/s,
# p50/p99 latency, the answers by status, socket errors and RSS (start,
# peak, end); then HTTP req/s / raw images/s, the batch sizes the server
# ran (from /metrics), VmHWM and the huge pages in use.
#
# Exit status 1 if the single and steady phases got any answer but 200, the burst any
# but 200 and 503 (every 503 with Retry-After), or either any socket error (connect, read, write, or a
# request slower than wrk's --timeout); the throughput and memory goals
# are reported as met or missed. Everything is bounded in time: wrk stops
# after its duration (and is killed 60 s later if it does not), the server
# is stopped on exit, whatever the exit.
#
# Knobs (environment): SINGLE_SECONDS, LOAD_SECONDS, LOAD_CLIENTS, BURST_SECONDS,
# BURST_CLIENTS, RAW_SECONDS (10), MAX_BATCH (32, the server's default),
# QUEUE_SIZE (256, the server's default), MAX_DELAY_US (0, the server's default), IMAGES (10:
# one per class), WRK_THREADS (2), KEEP=1 keeps the work directory.
# Needs wrk (`apt-get install wrk`), python3 and curl. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

weights=${1:-${NIN_LOAD_WEIGHTS:-weights/nin-fashion-mnist.safetensors}}
single_seconds=${SINGLE_SECONDS:-20}
load_seconds=${LOAD_SECONDS:-60}
load_clients=${LOAD_CLIENTS:-64}
burst_seconds=${BURST_SECONDS:-15}
burst_clients=${BURST_CLIENTS:-1024}
raw_seconds=${RAW_SECONDS:-10}
max_batch=${MAX_BATCH:-32}
queue_size=${QUEUE_SIZE:-256}
max_delay_us=${MAX_DELAY_US:-0}
images=${IMAGES:-10}
wrk_threads=${WRK_THREADS:-2}

for tool in wrk python3 curl; do
  command -v "$tool" >/dev/null || { echo "load.sh: needs $tool (wrk: apt-get install wrk)" >&2; exit 2; }
done
[ -f "$weights" ] || { echo "load.sh: no weights file $weights (give one as the argument)" >&2; exit 2; }
# Each connection is a file descriptor, in wrk and in the server.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((burst_clients + 256)) ]; then
  ulimit -n $((burst_clients + 256)) || { echo "load.sh: raise ulimit -n above $burst_clients" >&2; exit 2; }
fi

cargo build --release --quiet -p nin-serve --bin nin-serve
cargo build --release --quiet -p nin-model --example throughput

work=$(mktemp -d)
server_pid=
sampler_pid=
cleanup() {
  local status=$?
  if [ -n "$sampler_pid" ]; then kill "$sampler_pid" 2>/dev/null || true; fi
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  if [ "$status" -ne 0 ] && [ -f "$work/server.log" ]; then
    echo "--- last lines of the server's log" >&2
    tail -n 20 "$work/server.log" >&2
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $work" >&2; else rm -rf "$work"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Real images: the committed slice of the Fashion-MNIST test set, as 28x28
# greyscale PNG files, taken class by class in turn.
python3 bench/fashion_pngs.py tests/data "$work" "$images"
pngs=("$work"/image-*.png)

# The server: loopback, a port of the kernel's choosing, CPU (as the
# throughput example), no NIN_* variable of the caller's (an API key would
# turn every answer into a 401).
for var in $(compgen -e | grep '^NIN_' || true); do unset "$var"; done
NO_COLOR=1 RUST_LOG=info target/release/nin-serve --weights "$weights" \
  --addr 127.0.0.1:0 --grpc-addr off --device cpu --max-batch "$max_batch" \
  --max-delay-us "$max_delay_us" --queue-size "$queue_size" \
  > "$work/server.log" 2>&1 &
server_pid=$!
port=
for _ in $(seq 600); do
  port=$(grep -o 'listening (HTTP) addr=127\.0\.0\.1:[0-9]*' "$work/server.log" | head -n 1 | cut -d: -f2 || true)
  [ -n "$port" ] && break
  kill -0 "$server_pid" 2>/dev/null || { echo "load.sh: nin-serve exited" >&2; exit 1; }
  sleep 0.2
done
[ -n "$port" ] || { echo "load.sh: nin-serve did not listen within 120 s" >&2; exit 1; }
base=http://127.0.0.1:$port
for _ in $(seq 100); do
  curl -sf -o /dev/null "$base/readyz" && break
  sleep 0.1
done
curl -sf -o /dev/null "$base/readyz" || { echo "load.sh: /readyz never answered 200" >&2; exit 1; }
for png in "${pngs[@]}"; do
  curl -sf -o /dev/null -H 'Content-Type: image/png' --data-binary "@$png" "$base/classify" \
    || { echo "load.sh: POST /classify failed for $png" >&2; exit 1; }
done
echo "nin-serve (pid $server_pid) on $base: $weights, max-batch $max_batch, queue-size $queue_size; ${#pngs[@]} images" >&2

# VmRSS and VmHWM every second, labelled with the phase running.
echo idle > "$work/phase"
(
  while kill -0 "$server_pid" 2>/dev/null; do
    phase=$(cat "$work/phase")
    mem=$(awk '/^VmRSS:/ {r = $2} /^VmHWM:/ {h = $2} END {print r, h}' "/proc/$server_pid/status" 2>/dev/null) || break
    [ -n "${mem// /}" ] || break
    echo "$(date +%s.%N) $phase $mem" >> "$work/rss.log"
    sleep 1
  done
) &
sampler_pid=$!

raw() {
  echo "$1" > "$work/phase"
  echo "raw: $weights forward, batch $max_batch, $raw_seconds s" >&2
  target/release/examples/throughput "$weights" forward "$max_batch" "$raw_seconds" > "$work/$1.json"
}

load() { # phase connections seconds
  echo "$1" > "$work/phase"
  echo "$1: $2 connections for $3 s" >&2
  curl -sf "$base/metrics" > "$work/$1.metrics-before"
  timeout --kill-after=5 $(($3 + 60)) \
    wrk -t "$(($2 < wrk_threads ? $2 : wrk_threads))" -c "$2" -d "${3}s" --timeout 10s \
      -s bench/load.lua "$base/classify" -- "${pngs[@]}" > "$work/$1.wrk"
  grep '^RESULT ' "$work/$1.wrk" | cut -d' ' -f2- > "$work/$1.json"
  curl -sf "$base/metrics" > "$work/$1.metrics-after"
}

raw raw-before
load single 1 "$single_seconds"
load steady "$load_clients" "$load_seconds"
raw raw-after
load burst "$burst_clients" "$burst_seconds"
echo after > "$work/phase"
sleep 3
grep -E '^(VmRSS|VmHWM):' "/proc/$server_pid/status" > "$work/final-status"
grep -E '^AnonHugePages:' "/proc/$server_pid/smaps_rollup" > "$work/thp" 2>/dev/null || echo "AnonHugePages: ? kB" > "$work/thp"
kill "$sampler_pid" 2>/dev/null || true
sampler_pid=

python3 - "$work" "$load_clients" "$burst_clients" <<'PY'
import json, re, sys
from collections import defaultdict
work, load_clients, burst_clients = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
read = lambda name: open(f"{work}/{name}").read()
mib = lambda kb: kb / 1024

rss = defaultdict(list)  # phase -> [(time, rss_kb)]
for line in read("rss.log").splitlines():
    t, phase, r, _h = line.split()
    rss[phase].append((float(t), int(r)))

def metrics(name):
    values = {}
    for line in read(name).splitlines():
        m = re.match(r'^(nin_\w+?)(\{[^}]*\})? (\S+)$', line)
        if m:
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return values

raw = {p: json.loads(read(f"{p}.json"))["images_per_s"] for p in ("raw-before", "raw-after")}
raw_mean = sum(raw.values()) / len(raw)
results = {p: json.loads(read(f"{p}.json")) for p in ("single", "steady", "burst")}

def rss_cells(phase):
    s = rss.get(phase, [])
    if not s:
        return "-"
    return f"{mib(s[0][1]):.0f} / {mib(max(r for _, r in s)):.0f} / {mib(s[-1][1]):.0f}"

header = f"{'phase':<11}{'conns':>6}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}  {'statuses':<22}{'sock err':>9}  RSS MiB start/peak/end"
print()
print(header)
print("-" * len(header))
for p in ("raw-before", "raw-after"):
    print(f"{p:<11}{'-':>6}{raw[p]:>9.0f}{'-':>8}{'-':>8}  {'(images/s, no HTTP)':<22}{'-':>9}  {rss_cells(p)}")
failures, batches = [], {}
for p, conns in (("single", 1), ("steady", load_clients), ("burst", burst_clients)):
    r = results[p]
    seconds = r["duration_us"] / 1e6
    rps = r["requests"] / seconds
    statuses = " ".join(f"{k}:{v}" for k, v in sorted(r["statuses"].items()))
    e = r["errors"]
    socket_errors = e["connect"] + e["read"] + e["write"] + e["timeout"]
    lat = r["latency_us"]
    print(f"{p:<11}{conns:>6}{rps:>9.0f}{lat['p50'] / 1e3:>8.1f}{lat['p99'] / 1e3:>8.1f}  {statuses:<22}{socket_errors:>9}  {rss_cells(p)}")
    allowed = {"200", "503"} if p == "burst" else {"200"}
    bad = {k: v for k, v in r["statuses"].items() if k not in allowed}
    if bad:
        failures.append(f"{p}: unexpected statuses {bad}")
    if r.get("503_without_retry_after"):
        failures.append(f"{p}: {r['503_without_retry_after']} answers 503 without Retry-After")
    if socket_errors:
        failures.append(f"{p}: socket errors {e}")
    if r["requests"] == 0:
        failures.append(f"{p}: no request completed")
    before, after = metrics(f"{p}.metrics-before"), metrics(f"{p}.metrics-after")
    d = lambda key: after.get(key, 0) - before.get(key, 0)
    buckets, previous = [], 0.0
    for key in sorted((k for k in after if k.startswith("nin_batch_size_bucket")),
                      key=lambda k: float(re.search(r'le="([^"]+)"', k).group(1))):
        le = re.search(r'le="([^"]+)"', key).group(1)
        n = d(key) - previous
        previous = d(key)
        if n:
            buckets.append(f"<={le.replace('.0', '')}: {n:.0f}")
    batches[p] = (d("nin_batch_size_count"), d("nin_batch_size_sum"),
                  d("nin_inference_duration_seconds_sum"), seconds, buckets)
print(f"{'after':<11}{'-':>6}{'':>9}{'':>8}{'':>8}  {'(3 s idle)':<22}{'-':>9}  {rss_cells('after')}")
print()

steady_rps = results["steady"]["requests"] / (results["steady"]["duration_us"] / 1e6)
ratio = steady_rps / raw_mean
print(f"HTTP req/s at {load_clients} connections / raw images/s: {steady_rps:.0f} / {raw_mean:.0f} = {ratio:.2f}"
      f" (raw before {raw['raw-before']:.0f}, after {raw['raw-after']:.0f})")
for p, (count, images, busy, seconds, buckets) in batches.items():
    if count:
        print(f"{p}: {count:.0f} forward passes, mean batch {images / count:.1f}, model busy"
              f" {busy / seconds:.0%} of the time at {images / busy:.0f} images/s; batch sizes {', '.join(buckets)}")
hwm = dict(line.split(":") for line in read("final-status").splitlines())
print(f"server memory: VmHWM (peak RSS) {mib(int(hwm['VmHWM'].split()[0])):.0f} MiB,"
      f" now {mib(int(hwm['VmRSS'].split()[0])):.0f} MiB; {read('thp').strip()} (transparent huge pages)")

# Memory is flat when the second half of the steady phase peaks no higher
# than its first half (allocator noise: 5% or 8 MiB); the burst's queue is bounded.
levels = defaultdict(int)
for line in open(f"{work}/server.log", errors="replace"):
    m = re.match(r"\S+\s+(TRACE|DEBUG|INFO|WARN|ERROR)\b", line)
    levels[m.group(1) if m else "other"] += 1
print("server log: " + ", ".join(f"{n} {level}" for level, n in sorted(levels.items())) + " lines")

steady = rss.get("steady", [])
half = len(steady) // 2
flat = None
if half:
    first, second = max(r for _, r in steady[:half]), max(r for _, r in steady[half:])
    flat = second <= max(first * 1.05, first + 8 * 1024)
    print(f"steady RSS peak: first half {mib(first):.0f} MiB, second half {mib(second):.0f} MiB")
print()
print(f"goal: errors other than 503 under overload: {'none (met)' if not failures else 'FAILED'}")
print(f"goal: HTTP >= 0.8 x raw throughput: {ratio:.2f} ({'met' if ratio >= 0.8 else 'missed'})")
print(f"goal: memory flat: {'met' if flat else 'missed' if flat is not None else 'not measured (phase too short)'}")
for p, conns in (("single", 1), ("steady", load_clients)):
    lat = results[p]["latency_us"]
    print(f"latency at {conns} connection{'s' if conns > 1 else ''}: p50 {lat['p50'] / 1e3:.1f} ms, p99 {lat['p99'] / 1e3:.1f} ms")
if "503" not in results["burst"]["statuses"]:
    print("note: the burst got no 503: it was not above capacity (raise BURST_CLIENTS or lower QUEUE_SIZE)")
for f in failures:
    print(f"FAIL {f}", file=sys.stderr)
sys.exit(1 if failures else 0)
PY
