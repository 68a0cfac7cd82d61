#!/usr/bin/env bash
# nin-serve through NVIDIA Triton's own Python clients: tritonclient.http
# (JSON and binary tensors) and tritonclient.grpc against nin-serve's HTTP
# (KServe v2 + Triton's binary tensor, model configuration and statistics
# extensions) and gRPC (inference.GRPCInferenceService) listeners; and
# the ONNX export of the same weights in ONNX Runtime beside them.
#
# Installs what is missing (python3's venv module; the test's Python
# packages, pinned in tests/triton/requirements.txt, into a venv cached
# under target/ci-tools/ and keyed by that file's hash and the
# interpreter's version), builds nin-serve and nin-train in release unless
# NIN_SERVE_BIN and NIN_TRAIN_BIN name binaries, exports the weights to ONNX
# with `nin-train export`, serves them twice on free loopback ports (HTTP and
# gRPC each): once open, once with a random --api-key (given through
# NIN_API_KEY, so that it is not in the process list), waits until both are
# ready, and runs tests/triton/test_clients.py and test_onnx.py (pytest)
# against them. Both servers are stopped however the script ends; on
# failure the end of their logs is printed.
#
#   bash .ci/triton-test.sh                      # weights/nin-fashion-mnist.safetensors
#   NIN_WEIGHTS=runs/x/nin-fashion-mnist.safetensors bash .ci/triton-test.sh
#   NIN_SERVE_BIN=target/debug/nin-serve NIN_TRAIN_BIN=target/debug/nin-train \
#     bash .ci/triton-test.sh                    # no release build
#   bash .ci/triton-test.sh -k grpc -x          # arguments go to pytest
#
# NIN_READY_TIMEOUT (seconds, default 120) bounds the wait for the model to
# load and warm up. Nothing is downloaded but PyPI packages (and Debian's
# python3-venv if the venv module is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

weights="${NIN_WEIGHTS:-weights/nin-fashion-mnist.safetensors}"
ready_timeout="${NIN_READY_TIMEOUT:-120}"
max_batch=32
if [ ! -f "$weights" ]; then
  echo "triton-test: weights file $weights not found (set NIN_WEIGHTS)" >&2
  exit 1
fi

echo "== triton test: python"
if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq python3 python3-venv
fi
python3 --version

requirements=tests/triton/requirements.txt
venv=target/ci-tools/triton-venv
# A venv belongs to one interpreter: its version is part of the key.
key="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$key" ]; then
  echo "triton-test: installing $requirements into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$key" > "$venv/.installed"
fi
"$venv/bin/python" -m pip list --disable-pip-version-check --format=freeze \
  | grep -iE '^(tritonclient|grpcio|numpy|pytest)==' | tr '\n' ' '
echo

# NIN_SERVE_BIN and NIN_TRAIN_BIN: binaries already built (CI passes the
# ones `cargo test` built, so that no release build is needed); else release.
serve_bin="${NIN_SERVE_BIN:-}"
train_bin="${NIN_TRAIN_BIN:-}"
if [ -z "$serve_bin" ] || [ -z "$train_bin" ]; then
  echo "== triton test: build nin-serve and nin-train (release)"
  cargo build --release -p nin-serve -p nin-train
  serve_bin=${serve_bin:-target/release/nin-serve}
  train_bin=${train_bin:-target/release/nin-train}
fi

# Four free ports: bind port 0 four times at once (so they differ), read
# what the kernel chose, release them. Another process could take one
# before nin-serve binds it, but then nin-serve exits with "cannot listen"
# and the wait below says so.
read -r http_port grpc_port auth_http_port auth_grpc_port < <(python3 -c 'import socket
sockets = [socket.socket() for _ in range(4)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in sockets))
for s in sockets:
    s.close()')
api_key="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
log="$(mktemp -t nin-serve-triton.XXXXXX.log)"
auth_log="$(mktemp -t nin-serve-triton-auth.XXXXXX.log)"
onnx="$(mktemp -t nin-triton.XXXXXX.onnx)"

echo "== triton test: export $weights to ONNX (tests/triton/test_onnx.py runs it beside the server)"
"$train_bin" export --weights "$weights" --onnx "$onnx"

# No NIN_* variable of the caller's reaches the servers (an API key or an
# address there would change what is tested); each gets its settings here.
clean_env=()
for var in $(compgen -e | grep '^NIN_' || true); do clean_env+=(-u "$var"); done

echo "== triton test: serve $weights on HTTP 127.0.0.1:$http_port, gRPC 127.0.0.1:$grpc_port (log: $log)"
env "${clean_env[@]}" "$serve_bin" --weights "$weights" --max-batch "$max_batch" \
  --addr "127.0.0.1:$http_port" --grpc-addr "127.0.0.1:$grpc_port" >"$log" 2>&1 &
server=$!
echo "== triton test: the same with --api-key on HTTP 127.0.0.1:$auth_http_port, gRPC 127.0.0.1:$auth_grpc_port (log: $auth_log)"
env "${clean_env[@]}" NIN_API_KEY="$api_key" "$serve_bin" --weights "$weights" --max-batch "$max_batch" \
  --addr "127.0.0.1:$auth_http_port" --grpc-addr "127.0.0.1:$auth_grpc_port" >"$auth_log" 2>&1 &
auth_server=$!

stop() { # pid
  if kill -0 "$1" 2>/dev/null; then
    kill -TERM "$1" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$1" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$1" 2>/dev/null || true
  fi
  wait "$1" 2>/dev/null || true
}
stop_servers() {
  stop "$server"
  stop "$auth_server"
  rm -f "$onnx"
}
trap stop_servers EXIT
# Interrupted or terminated: exit, which runs the EXIT trap above.
trap 'exit 130' INT
trap 'exit 143' TERM

bash .ci/wait-ready.sh "http://127.0.0.1:$http_port/readyz" "$server" "$log" "$ready_timeout"
bash .ci/wait-ready.sh "http://127.0.0.1:$auth_http_port/readyz" "$auth_server" "$auth_log" "$ready_timeout"

echo "== triton test: tests/triton/test_clients.py (tritonclient http + grpc), test_onnx.py (ONNX Runtime)"
status=0
# No cache or bytecode left in tests/triton; -rs lists skipped tests and why.
NIN_TRITON_HTTP="127.0.0.1:$http_port" NIN_TRITON_GRPC="127.0.0.1:$grpc_port" \
NIN_TRITON_AUTH_HTTP="127.0.0.1:$auth_http_port" NIN_TRITON_AUTH_GRPC="127.0.0.1:$auth_grpc_port" \
NIN_TRITON_API_KEY="$api_key" NIN_TRITON_MAX_BATCH="$max_batch" NIN_TRITON_WEIGHTS="$weights" \
NIN_ONNX="$onnx" PYTHONDONTWRITEBYTECODE=1 \
  "$venv/bin/python" -m pytest -v -rs -p no:cacheprovider tests/triton/test_clients.py \
    tests/triton/test_onnx.py "$@" || status=$?
if [ "$status" -ne 0 ]; then
  echo "triton-test: failed; the end of nin-serve's log:" >&2
  tail -n 50 "$log" >&2
  echo "triton-test: the end of the --api-key nin-serve's log:" >&2
  tail -n 20 "$auth_log" >&2
fi
exit "$status"
