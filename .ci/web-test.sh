#!/usr/bin/env bash
# End-to-end test of nin-serve's web page (GET /) in headless Chromium.
#
# Installs what is missing (Debian's chromium, the test's node packages),
# builds nin-serve in release, serves a weights file on a free loopback
# port, waits until it is ready, and runs tests/web/page.test.mjs against it.
# The server is stopped however the script ends.
#
#   bash .ci/web-test.sh                      # weights/nin-fashion-mnist.safetensors
#   NIN_WEIGHTS=runs/x/nin-fashion-mnist.safetensors bash .ci/web-test.sh
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

echo "== web test: chromium and node"
if [ ! -x /usr/bin/chromium ] || ! command -v node >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ -x /usr/bin/chromium ] || apt-get install -y -qq chromium
  command -v node >/dev/null || apt-get install -y -qq nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "web-test: node $(node --version) is too old; playwright-core needs node 20 or newer" >&2
  exit 1
fi
/usr/bin/chromium --version 2>/dev/null # its launcher script warns on stderr
node --version
(cd tests/web && npm ci --no-audit --no-fund)

echo "== web test: build nin-serve (release)"
cargo build --release -p nin-serve

# A free port: bind port 0, read what the kernel chose, release it. Another
# process could take it before nin-serve binds, but then nin-serve exits
# with "cannot listen" and the wait below says so.
port="$(node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})')"
base="http://127.0.0.1:$port"
log="$(mktemp -t nin-serve-web.XXXXXX.log)"

echo "== web test: serve $weights on $base (log: $log)"
target/release/nin-serve --addr "127.0.0.1:$port" --weights "$weights" >"$log" 2>&1 &
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

deadline=$((SECONDS + ready_timeout))
ready() { # no curl needed: node is here anyway
  node -e 'fetch(process.argv[1]).then((r) => process.exit(r.ok ? 0 : 1), () => process.exit(1))' "$base/readyz"
}
until ready; do
  if ! kill -0 "$server" 2>/dev/null; then
    echo "web-test: nin-serve exited before it was ready; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "web-test: nin-serve not ready after ${ready_timeout}s; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "nin-serve is ready"

echo "== web test: page.test.mjs in headless Chromium"
status=0
NIN_BASE_URL="$base" node --test tests/web/page.test.mjs || status=$?
if [ "$status" -ne 0 ]; then
  echo "web-test: failed; nin-serve's log:" >&2
  tail -n 50 "$log" >&2
fi
exit "$status"
