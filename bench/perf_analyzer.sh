#!/usr/bin/env bash
# nin-serve under NVIDIA Triton's perf_analyzer, over gRPC, HTTP with binary
# tensors (perf_analyzer's default) and HTTP with JSON tensors, loopback only.
#
#   bench/perf_analyzer.sh [weights.safetensors]
#
# Installs what is missing: perf_analyzer (the tritonclient[all] 2.41.0
# wheel's bin/perf_analyzer, with PyPI's nvidia-cuda-runtime-cu12 for the
# libcudart.so.12 it links; all pinned in bench/perf_analyzer.requirements.txt)
# into a venv cached under target/ci-tools/ and keyed by that file's hash,
# and Debian's libb64-0d. Builds the release nin-serve unless NIN_SERVE_BIN
# names a binary, serves the weights (default
# weights/nin-fashion-mnist.safetensors, or $NIN_PA_WEIGHTS) on free
# loopback ports (HTTP and gRPC, CPU, --max-batch $MAX_BATCH), waits until
# it is ready, writes a perf_analyzer --input-data file of real
# Fashion-MNIST test images from tests/data/ (FP32, the bytes / 255, one
# image per request), then runs perf_analyzer once per protocol and
# concurrency: batch size 1 (-b 1), synchronous clients, the given
# concurrency (--concurrency-range C:C, since its range steps linearly),
# measurement windows of $PA_INTERVAL_MS ms until three in a row agree
# within $PA_STABILITY % (at most $PA_MAX_TRIALS windows).
#
# The table (protocol, concurrency, inferences/s, p50 and p99 latency,
# status) goes to stdout and to $PA_RESULTS (default
# bench/results/perf-analyzer.txt), with the settings. Exit status 1 if any
# run failed: perf_analyzer exited non-zero or printed an error, or the
# server's statistics counted a failed request (inference_stats.fail); a
# run that never became stable is reported as such but is no error.
#
# Knobs (environment): NIN_SERVE_BIN, PA_CONCURRENCY ("1 2 4 8 16 32 64"),
# PA_PROTOCOLS ("grpc http http-json"), PA_INTERVAL_MS (4000), PA_STABILITY (20 %;
# perf_analyzer's default of 10 leaves runs at high concurrency unstable
# on 2 shared cores), PA_MAX_TRIALS (10), PA_IMAGES (1000: the whole
# slice), MAX_BATCH (32), MAX_DELAY_US (2000), KEEP=1 keeps the work
# directory (perf_analyzer's logs and CSV files). perf_analyzer runs on the
# same cores as the server: on this 2-core machine the two compete, so the
# figures are those of the pair, not of the server alone. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

weights=${1:-${NIN_PA_WEIGHTS:-weights/nin-fashion-mnist.safetensors}}
concurrencies=${PA_CONCURRENCY:-1 2 4 8 16 32 64}
protocols=${PA_PROTOCOLS:-grpc http http-json}
interval_ms=${PA_INTERVAL_MS:-4000}
stability=${PA_STABILITY:-20}
max_trials=${PA_MAX_TRIALS:-10}
images=${PA_IMAGES:-1000}
max_batch=${MAX_BATCH:-32}
max_delay_us=${MAX_DELAY_US:-2000}
results=${PA_RESULTS:-bench/results/perf-analyzer.txt}
model=nin

[ -f "$weights" ] || { echo "perf_analyzer.sh: no weights file $weights (give one as the argument)" >&2; exit 2; }

echo "== perf_analyzer: python, libb64-0d" >&2
missing=()
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
ldconfig -p | grep -q 'libb64\.so\.0d' || missing+=(libb64-0d)
if [ "${#missing[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}"
fi

requirements=bench/perf_analyzer.requirements.txt
venv=target/ci-tools/perf-analyzer-venv
key="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$key" ]; then
  echo "perf_analyzer.sh: installing $requirements into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$key" > "$venv/.installed"
fi
perf_analyzer=$venv/bin/perf_analyzer
cudart=$("$venv/bin/python" -c 'import os, nvidia.cuda_runtime as m; print(os.path.join(list(m.__path__)[0], "lib"))')
export LD_LIBRARY_PATH="$cudart${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if ldd "$perf_analyzer" | grep -q 'not found'; then
  echo "perf_analyzer.sh: $perf_analyzer misses libraries:" >&2
  ldd "$perf_analyzer" | grep 'not found' >&2
  exit 2
fi
pa_version=$("$perf_analyzer" --version 2>&1 | head -n 1 || true)

serve_bin=${NIN_SERVE_BIN:-}
if [ -z "$serve_bin" ]; then
  echo "== perf_analyzer: build nin-serve (release)" >&2
  cargo build --release --quiet -p nin-serve --bin nin-serve
  serve_bin=target/release/nin-serve
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  local status=$?
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

# Two free loopback ports, bound at once so that they differ, then released.
read -r http_port grpc_port < <(python3 -c 'import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
for s in sockets:
    s.close()')

# The server: loopback, CPU, no NIN_* variable of the caller's (an API key
# would refuse every request).
server_args=(--weights "$weights" --addr "127.0.0.1:$http_port" --grpc-addr "127.0.0.1:$grpc_port"
  --device cpu --max-batch "$max_batch" --max-delay-us "$max_delay_us")
(
  for var in $(compgen -e | grep '^NIN_' || true); do unset "$var"; done
  NO_COLOR=1 exec "$serve_bin" "${server_args[@]}"
) > "$work/server.log" 2>&1 &
server_pid=$!
bash .ci/wait-ready.sh "http://127.0.0.1:$http_port/readyz" "$server_pid" "$work/server.log" 120 >&2

# Real images, FP32 in [0, 1] (each byte / 255, rounded to float32 and
# written so that it reads back exactly), one per request (-b 1: shape
# [1, 1, 28, 28] on the wire; the model configuration's dims [1, 28, 28]
# leave out the batch dimension).
python3 - "$work/input.json" "$images" <<'PY'
import struct, sys
sys.path.insert(0, "tests/data")
import idx  # tests/data/idx.py, the shared IDX reader

out, count = sys.argv[1], int(sys.argv[2])
images = idx.Images(idx.read("tests/data", "t10k-images-idx3-ubyte"))
if not 0 < count <= images.count:
    sys.exit(f"PA_IMAGES={count}: the slice holds {images.count} images")
value = [repr(struct.unpack("<f", struct.pack("<f", b / 255))[0]) for b in range(256)]
with open(out, "w") as f:
    f.write('{"data": [\n')
    for i in range(count):
        sep = ",\n" if i + 1 < count else "\n"
        f.write('{"input": {"content": [' + ",".join(value[b] for b in images.image(i))
                + '], "shape": [1, 28, 28]}}' + sep)
    f.write("]}\n")
PY
echo "nin-serve (pid $server_pid): HTTP 127.0.0.1:$http_port, gRPC 127.0.0.1:$grpc_port; $images images; $pa_version" >&2

# Failed requests the server counted (Triton's statistics, over HTTP).
fail_count() {
  python3 - "http://127.0.0.1:$http_port/v2/models/$model/stats" <<'PY'
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    stats = json.load(r)
print(sum(int(s.get("inference_stats", {}).get("fail", {}).get("count", 0)) for s in stats["model_stats"]))
PY
}

errors=0
run_timeout=$(( (max_trials + 3) * interval_ms / 1000 + 120 ))
: > "$work/runs"
for protocol in $protocols; do
  case $protocol in
    grpc) url=127.0.0.1:$grpc_port; extra=() ;;
    http) url=127.0.0.1:$http_port; extra=(--input-tensor-format=binary --output-tensor-format=binary) ;;
    http-json) url=127.0.0.1:$http_port; extra=(--input-tensor-format=json --output-tensor-format=json) ;;
    *) echo "perf_analyzer.sh: unknown protocol $protocol (grpc, http or http-json)" >&2; exit 2 ;;
  esac
  for c in $concurrencies; do
    name=$protocol-$c
    echo "== perf_analyzer -i $protocol --concurrency-range $c:$c" >&2
    before=$(fail_count)
    rc=0
    timeout --kill-after=10 "$run_timeout" "$perf_analyzer" -m "$model" -u "$url" -i "${protocol%-json}" "${extra[@]}" \
      -b 1 --concurrency-range "$c:$c" --measurement-interval "$interval_ms" \
      --stability-percentage "$stability" --max-trials "$max_trials" \
      --input-data "$work/input.json" -f "$work/$name.csv" > "$work/$name.log" 2>&1 || rc=$?
    after=$(fail_count)
    grep -E 'Throughput|p50 latency|p99 latency|rror|stable|what\(\)' "$work/$name.log" | sed 's/^/    /' >&2 || true
    # perf_analyzer exits 2 when no three windows in a row agreed: no
    # figures, but no error either. Anything else but 0 is an error, and so
    # is a request the server counted as failed or an error in its output.
    verdict=ok
    if [ "$after" -ne "$before" ] || grep -qE 'rror|terminate called' "$work/$name.log"; then
      verdict=error
    elif [ "$rc" -ne 0 ]; then
      if [ "$rc" -eq 2 ] && grep -q 'Failed to obtain stable measurement' "$work/$name.log"; then
        verdict=unstable
      else
        verdict=error
      fi
    fi
    echo "$protocol $c $rc $((after - before)) $verdict" >> "$work/runs"
    if [ "$verdict" = error ]; then
      errors=$((errors + 1))
      echo "perf_analyzer.sh: $name failed (exit $rc, $((after - before)) failed requests); its output:" >&2
      tail -n 30 "$work/$name.log" >&2
    fi
  done
done

mkdir -p "$(dirname "$results")"
python3 - "$work" "$results" "$serve_bin" "$pa_version" "$interval_ms" "$stability" "$max_trials" \
  "$images" "$max_batch" "$max_delay_us" <<'PY'
import csv, datetime, os, re, subprocess, sys
work, results, serve_bin, pa_version, interval, stability, trials, images, max_batch, delay = sys.argv[1:]
rows = []
for line in open(f"{work}/runs"):
    protocol, c, rc, fails, verdict = line.split()
    ips = p50 = p99 = None
    path = f"{work}/{protocol}-{c}.csv"
    records = list(csv.DictReader(open(path))) if os.path.exists(path) else []
    log = open(f"{work}/{protocol}-{c}.log", errors="replace").read()
    if records:
        r = records[0]
        ips, p50, p99 = float(r["Inferences/Second"]), int(r["p50 latency"]) / 1e3, int(r["p99 latency"]) / 1e3
    else:
        # A run that stopped after its measurement (in the server-side
        # report, say) printed the client's figures all the same.
        found = {key: re.findall(pattern, log) for key, pattern in (
            ("ips", r"Throughput: ([0-9.]+) infer/sec"), ("p50", r"p50 latency: ([0-9]+) usec"),
            ("p99", r"p99 latency: ([0-9]+) usec"))}
        if all(found.values()):
            ips, p50, p99 = float(found["ips"][-1]), int(found["p50"][-1]) / 1e3, int(found["p99"][-1]) / 1e3
    if verdict == "error":
        what = re.findall(r"what\(\): +(.*)|^(?:error|Error|ERROR)[^\n]*|(failed to [^\n]*)", log, re.M)
        detail = next((" ".join(filter(None, w)) for w in what if any(w)), "")
        status = f"ERROR (exit {rc}, {fails} failed requests{'; ' + detail.strip() if detail else ''})"
        if records or ips is not None:
            status += "; figures from its log" if not records else ""
    elif verdict == "unstable":
        status = "unstable: no 3 windows in a row within the stability percentage"
    else:
        status = "ok"
    rows.append((protocol, int(c), ips, p50, p99, status))

def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "?"

cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
lines = [
    f"# bench/perf_analyzer.sh, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC,"
    f" commit {git('rev-parse', '--short', 'HEAD')}{' (+ uncommitted changes)' if git('status', '--porcelain', '--untracked-files=no') else ''}",
    f"# machine: {os.cpu_count()} cores, {cpu}; perf_analyzer and nin-serve share them",
    f"# server: {serve_bin} --device cpu --max-batch {max_batch} --max-delay-us {delay}",
    f"# client: {pa_version}; -b 1, synchronous, --concurrency-range C:C,"
    f" --measurement-interval {interval} ms, --stability-percentage {stability}, --max-trials {trials};"
    f" {images} real test images (tests/data), FP32;"
    " http = binary tensors both ways, http-json = JSON tensors both ways",
    "",
    f"{'protocol':<10}{'conc.':>6}{'infer/s':>10}{'p50 ms':>9}{'p99 ms':>9}  status",
]
cell = lambda v, width, digits: f"{'-':>{width}}" if v is None else f"{v:>{width}.{digits}f}"
for protocol, c, ips, p50, p99, status in rows:
    lines.append(f"{protocol:<10}{c:>6}{cell(ips, 10, 1)}{cell(p50, 9, 2)}{cell(p99, 9, 2)}  {status}")
text = "\n".join(lines) + "\n"
open(results, "w").write(text)
print(text, end="", flush=True)
print(f"written to {results}", file=sys.stderr)
PY

if [ "$errors" -ne 0 ]; then
  echo "perf_analyzer.sh: $errors run(s) failed" >&2
  exit 1
fi
