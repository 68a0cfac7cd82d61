#!/usr/bin/env bash
# Proves that the `cuda` feature compiles and links on this CPU-only machine
# (no GPU, no NVIDIA driver, no system CUDA toolkit), then checks what a CUDA
# build does where no GPU answers:
#   - `--device cuda` exits non-zero with a message naming CUDA (no panic);
#   - `--device auto` falls back to CPU and serves (when a weights file exists).
#
# How:
#   - nvcc comes from PyPI (`cuda-toolkit[nvcc,cccl]`, CUDA 13.4: the newest
#     toolkit cudarc 0.19 accepts) in a venv under target/cuda-tools/;
#   - libcuda & co. are link-time stubs generated from cudarc's own
#     declarations (.ci/cuda-stubs/gen_stubs.py): every call returns an error;
#   - the build uses its own target dir (target/cuda) so the CPU build's cache
#     stays valid. Venv and stubs are cached between runs under target/.
#
# Env: CUDA_COMPUTE_CAP (default 90), NIN_CUDA_TEST_WEIGHTS (a weights file for
# the checks; default weights/nin-fashion-mnist.safetensors, else a tiny one
# trained here on CPU from tests/data).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

tools=$root/target/cuda-tools
venv=$tools/venv
toolkit_spec='cuda-toolkit[nvcc,cccl]==13.4.3'
export CARGO_TARGET_DIR=$root/target/cuda
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
started=$(date +%s)

echo "-- nvcc (PyPI $toolkit_spec, cached in $venv)"
mkdir -p "$tools"
if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$toolkit_spec" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$toolkit_spec"
  echo "$toolkit_spec" > "$venv/.installed"
fi
cuda_home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
if [ ! -x "$cuda_home/bin/nvcc" ]; then
  echo "no nvcc at $cuda_home/bin/nvcc: the $toolkit_spec wheels changed layout" >&2
  exit 1
fi
export PATH=$cuda_home/bin:$PATH NVCC=$cuda_home/bin/nvcc
nvcc_version=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p')
echo "nvcc $nvcc_version at $NVCC"
# cudarc 0.19 knows CUDA up to 13.4 and refuses anything newer.
if ! printf '%s\n13.4\n' "$nvcc_version" | sort -V -C; then
  echo "nvcc $nvcc_version is newer than 13.4, which cudarc 0.19 refuses" >&2
  exit 1
fi

echo "-- CUDA link stubs (cached in $tools/stubs)"
cargo fetch --locked --quiet
cudarc_version=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version" | head -n1)
stubs=$tools/stubs
stamp="cudarc-$cudarc_version $(sha256sum .ci/cuda-stubs/gen_stubs.py | cut -c1-16)"
if [ ! -f "$stubs/.stamp" ] || [ "$(cat "$stubs/.stamp")" != "$stamp" ]; then
  rm -rf "$stubs"
  python3 .ci/cuda-stubs/gen_stubs.py "$cudarc_src" "$stubs" "$cuda_home/lib/libcudart.so.13"
  echo "$stamp" > "$stubs/.stamp"
fi
# cudarc's build script takes link search paths from CUDA_ROOT (and CUDA_HOME,
# CUDA_PATH, ...): point it at the stubs only, never at a real toolkit.
unset CUDA_HOME CUDA_PATH CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB
export CUDA_ROOT=$stubs

echo "-- cargo build --release --features cuda -p nin-serve -p nin-train (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP)"
cargo build --locked --release --features cuda -p nin-serve -p nin-train
built=$(date +%s)
echo "cuda build took $((built - started)) s"
serve=$CARGO_TARGET_DIR/release/nin-serve
train=$CARGO_TARGET_DIR/release/nin-train
for bin in "$serve" "$train"; do
  needed=$(readelf -d "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')
  echo "$(basename "$bin") needs: $needed"
  case " $needed " in
    *" libcuda.so.1 "*) ;;
    *) echo "$bin does not link libcuda.so.1: is the cuda feature on?" >&2; exit 1 ;;
  esac
  if LD_LIBRARY_PATH=$stubs/lib ldd "$bin" | grep -q 'not found'; then
    echo "$bin has unresolved libraries even with the stubs:" >&2
    LD_LIBRARY_PATH=$stubs/lib ldd "$bin" >&2
    exit 1
  fi
done

echo "-- GPU-less behaviour of the CUDA build (stub libraries: every CUDA call fails)"
export LD_LIBRARY_PATH=$stubs/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# Show what a user sees: candle appends a backtrace to errors when this is set.
unset RUST_BACKTRACE RUST_LIB_BACKTRACE
passed=0
failed=0
check() { # check NAME OK(0/1)
  if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "ok: $1"; else failed=$((failed + 1)); echo "FAILED: $1"; fi
}
work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

weights=${NIN_CUDA_TEST_WEIGHTS:-$root/weights/nin-fashion-mnist.safetensors}

# 1. --device cuda must fail cleanly (device is opened before the weights are
#    read, so any path does). 101 = Rust panic, 134 = abort, 139 = segfault.
set +e
"$serve" --device cuda --weights "$weights" --addr 127.0.0.1:0 > "$work/cuda.out" 2>&1
code=$?
set -e
echo "nin-serve --device cuda exited $code:"
sed 's/^/    /' "$work/cuda.out"
ok=1
if [ "$code" != 0 ] && [ "$code" != 101 ] && [ "$code" != 134 ] && [ "$code" != 139 ] \
  && grep -qi cuda "$work/cuda.out" && ! grep -q panicked "$work/cuda.out"; then ok=0; fi
check "--device cuda fails with a clear CUDA message, no crash" $ok

# 2. nin-train also refuses --device cuda cleanly.
set +e
"$train" eval --device cuda --weights "$weights" > "$work/train.out" 2>&1
code=$?
set -e
echo "nin-train eval --device cuda exited $code:"
sed 's/^/    /' "$work/train.out" | tail -n 5
ok=1
if [ "$code" != 0 ] && [ "$code" != 101 ] && [ "$code" != 134 ] && [ "$code" != 139 ] \
  && grep -qi cuda "$work/train.out" && ! grep -q panicked "$work/train.out"; then ok=0; fi
check "nin-train --device cuda fails with a clear CUDA message, no crash" $ok

# 3. --device auto falls back to CPU and serves. Without shipped weights, the
#    CUDA build's own nin-train makes a tiny weights file on CPU from the test
#    slice in tests/data (1 epoch, widths 8,8,8: ~20 s), which also shows that
#    a CUDA build trains on CPU where no GPU answers.
if [ ! -f "$weights" ] && [ -z "${NIN_CUDA_TEST_WEIGHTS:-}" ]; then
  echo "no shipped weights at $weights: training a tiny one with the CUDA build's nin-train --device cpu"
  mkdir -p "$work/data"
  for kind in images-idx3 labels-idx1; do
    cp "tests/data/t10k-$kind-ubyte.gz" "$work/data/t10k-$kind-ubyte.gz"
    cp "tests/data/t10k-$kind-ubyte.gz" "$work/data/train-$kind-ubyte.gz"
  done
  if "$train" fit --device cpu --data-dir "$work/data" --epochs 1 --widths 8,8,8 --val-size 0 \
      --out "$work/run" > "$work/fit.out" 2>&1; then
    weights=$work/run/nin-fashion-mnist.safetensors
    tail -n 2 "$work/fit.out" | sed 's/^/    /'
  else
    sed 's/^/    /' "$work/fit.out" | tail -n 20
    check "the CUDA build's nin-train trains on CPU" 1
  fi
fi
if [ -f "$weights" ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')
  "$serve" --device auto --weights "$weights" --addr "127.0.0.1:$port" > "$work/auto.out" 2>&1 &
  server_pid=$!
  ready=1
  for _ in $(seq 1 120); do
    if python3 - "$port" <<'PY' 2>/dev/null; then ready=0; break; fi
import sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
    if ! kill -0 "$server_pid" 2>/dev/null; then break; fi
    sleep 0.5
  done
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
  echo "nin-serve --device auto log:"
  sed 's/^/    /' "$work/auto.out"
  ok=1
  if [ "$ready" = 0 ] && grep -q "using CPU" "$work/auto.out"; then ok=0; fi
  check "--device auto falls back to CPU and answers /readyz" $ok
else
  echo "FAILED: no weights file at $weights for the --device auto fallback check"
  failed=$((failed + 1))
fi

echo "cuda build and checks took $(($(date +%s) - started)) s"
echo "cuda: $passed passed, $failed failed"
[ "$failed" = 0 ]
