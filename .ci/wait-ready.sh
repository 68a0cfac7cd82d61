#!/usr/bin/env bash
# Waits until a nin-serve answers URL (its /readyz), for the CI scripts that
# start one:
#
#   bash .ci/wait-ready.sh URL PID LOG [TIMEOUT_S]
#
# Exits 1 with the server's LOG on stderr if process PID ends first or
# TIMEOUT_S (default 120) passes. Needs python3 only, no curl.
set -euo pipefail
url=$1 pid=$2 log=$3 timeout=${4:-120}
deadline=$((SECONDS + timeout))
ready() {
  python3 -c 'import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2).close()
except Exception:
    sys.exit(1)' "$url"
}
until ready; do
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "nin-serve exited before it was ready; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  if [ "$SECONDS" -ge "$deadline" ]; then
    echo "nin-serve not ready after ${timeout}s; its log:" >&2
    cat "$log" >&2
    exit 1
  fi
  sleep 0.5
done
echo "nin-serve is ready"
