#!/usr/bin/env bash
# End-to-end test of nin-serve's web page (GET /) in headless Chromium.
#
# Installs what is missing (Debian's chromium; python3's venv module; the
# test's Python packages, pinned in tests/web/requirements.txt, into a venv
# cached under target/ci-tools/ and keyed by that file's hash), builds
# nin-serve in release, serves a weights file on a free loopback port, waits
# until it is ready, and runs tests/web/test_page.py (pytest + Playwright)
# against it. The server is stopped however the script ends. No node or npm:
# Python Playwright carries its own driver and drives Debian's chromium, so
# nothing is downloaded but Debian and PyPI packages.
#
#   bash .ci/web-test.sh                      # weights/nin-fashion-mnist.safetensors
#   NIN_WEIGHTS=runs/x/nin-fashion-mnist.safetensors bash .ci/web-test.sh
#   NIN_SERVE_BIN=target/debug/nin-serve bash .ci/web-test.sh   # no release build
#
# Runs as root in CI (no sandbox for Chromium there, hence --no-sandbox in
# the test); NIN_READY_TIMEOUT (seconds, default 120) bounds the wait for
# the model to load and warm up.
set -euo pipefail
cd "$(dirname "$0")/.."

weights="${NIN_WEIGHTS:-weights/nin-fashion-mnist.safetensors}"
ready_timeout="${NIN_READY_TIMEOUT:-120}"
if [ ! -f "$weights" ]; then
  echo "web-test: weights file $weights not found (set NIN_WEIGHTS)" >&2
  exit 1
fi

echo "== web test: chromium and python"
if [ ! -x /usr/bin/chromium ] || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ -x /usr/bin/chromium ] || apt-get install -y -qq chromium
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt-get install -y -qq python3 python3-venv
fi
/usr/bin/chromium --version 2>/dev/null # its launcher script warns on stderr
python3 --version

requirements=tests/web/requirements.txt
venv=target/ci-tools/web-venv
# A venv belongs to one interpreter: its version is part of the key.
key="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$key" ]; then
  echo "web-test: installing $requirements into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$key" > "$venv/.installed"
fi
"$venv/bin/python" -m pip list --disable-pip-version-check --format=freeze \
  | grep -iE '^(playwright|pytest|pillow)==' | tr '\n' ' '
echo

# NIN_SERVE_BIN: a nin-serve binary already built (CI passes the one
# `cargo test` built, so that no release build is needed); else release.
serve_bin="${NIN_SERVE_BIN:-}"
if [ -z "$serve_bin" ]; then
  echo "== web test: build nin-serve (release)"
  cargo build --release -p nin-serve
  serve_bin=target/release/nin-serve
fi

# A free port: bind port 0, read what the kernel chose, release it. Another
# process could take it before nin-serve binds, but then nin-serve exits
# with "cannot listen" and the wait below says so.
port="$(python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()')"
base="http://127.0.0.1:$port"
log="$(mktemp -t nin-serve-web.XXXXXX.log)"

echo "== web test: serve $weights on $base (log: $log)"
"$serve_bin" --addr "127.0.0.1:$port" --grpc-addr off --weights "$weights" >"$log" 2>&1 &
server=$!
stop_server() {
  if kill -0 "$server" 2>/dev/null; then
    kill -TERM "$server" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$server" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$server" 2>/dev/null || true
  fi
  wait "$server" 2>/dev/null || true
}
trap stop_server EXIT
# Interrupted or terminated: exit, which runs the EXIT trap above.
trap 'exit 130' INT
trap 'exit 143' TERM

bash .ci/wait-ready.sh "$base/readyz" "$server" "$log" "$ready_timeout"

echo "== web test: tests/web/test_page.py in headless Chromium"
status=0
# -s shows where the screenshots went; no cache or bytecode left in tests/web.
NIN_BASE_URL="$base" PYTHONDONTWRITEBYTECODE=1 \
  "$venv/bin/python" -m pytest -v -s -p no:cacheprovider tests/web/test_page.py || status=$?
if [ "$status" -ne 0 ]; then
  echo "web-test: failed; nin-serve's log:" >&2
  tail -n 50 "$log" >&2
fi
exit "$status"
