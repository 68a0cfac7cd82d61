#!/usr/bin/env bash
# Checks the Kubernetes and KServe manifests of deploy/ without a cluster:
# renders every overlay with `kubectl kustomize`, starts a nin-serve the way
# the manifests configure it, and runs tests/deploy/test_manifests.py
# (strict validation against Kubernetes' schemas and KServe's vendored CRDs,
# then probes, metrics, settings and the image's user against the live
# server and, when NIN_IMAGE names one, the built image).
#
#   bash .ci/deploy-check.sh
#   NIN_SERVE_BIN=target/debug/nin-serve NIN_IMAGE=nin:cpu bash .ci/deploy-check.sh
#
# Installs what is missing: Debian's kubernetes-client (kubectl) and the
# checks' Python packages, pinned in tests/deploy/requirements.txt, into a
# venv under target/ci-tools/ keyed by that file's hash. The server runs
# with the base ConfigMap's NIN_* settings and the KServe runtime's
# arguments, on free loopback ports, and is stopped however this ends.
set -euo pipefail
cd "$(dirname "$0")/.."
# Read now: the server below starts with no NIN_* variable but its own.
image="${NIN_IMAGE:-}"

echo "== deploy check: kubectl, python"
if ! command -v kubectl > /dev/null || ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  command -v kubectl > /dev/null || apt-get install -y -qq kubernetes-client
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt-get install -y -qq python3 python3-venv
fi
kubectl version --client 2>/dev/null | head -n 2 | tr '\n' ' '
echo

requirements=tests/deploy/requirements.txt
venv=target/ci-tools/deploy-venv
key="$(sha256sum "$requirements" | cut -d' ' -f1) $(python3 -c 'import sys; print(sys.version.split()[0])')"
if [ ! -f "$venv/.installed" ] || [ "$(cat "$venv/.installed")" != "$key" ]; then
  echo "deploy-check: installing $requirements into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  echo "$key" > "$venv/.installed"
fi

echo "== deploy check: render the overlays"
rendered=target/ci-tools/deploy
mkdir -p "$rendered"
for overlay in deploy/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$rendered/$name.yaml"
  echo "deploy/overlays/$name: $(grep -c '^kind:' "$rendered/$name.yaml") resources"
done

serve_bin="${NIN_SERVE_BIN:-}"
if [ -z "$serve_bin" ]; then
  cargo build --release -p nin-serve
  serve_bin=target/release/nin-serve
fi
free_port() {
  python3 -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}
http_port=$(free_port)
grpc_port=$(free_port)

# The base ConfigMap's settings as the pod gets them (its addresses aside:
# loopback and free ports here), and the KServe runtime's arguments with the
# example InferenceService's name and a weights directory for /mnt/models.
settings=$("$venv/bin/python" - "$rendered/cpu.yaml" <<'PY'
import shlex, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
[config] = [d for d in docs if d["kind"] == "ConfigMap"]
print(" ".join(shlex.quote(f"{k}={v}") for k, v in config["data"].items()
               if k not in ("NIN_GRPC_ADDR", "NIN_ADDR")))
PY
)
args=$("$venv/bin/python" - <<'PY'
import shlex, yaml
runtime = yaml.safe_load(open("deploy/kserve/servingruntime.yaml"))
service = yaml.safe_load(open("deploy/kserve/inferenceservice.yaml"))
name = service["metadata"]["name"]
args = [a.replace("{{.Name}}", name) for a in runtime["spec"]["containers"][0]["args"]]
print(" ".join(shlex.quote(a.replace("/mnt/models", "weights")) for a in args
               if not a.startswith("--grpc-addr")))
PY
)
log="$(mktemp -t nin-serve-deploy.XXXXXX.log)"
echo "== deploy check: nin-serve $args with $settings (log: $log)"
eval "env $(compgen -e | grep '^NIN_' | sed 's/^/-u /' | tr '\n' ' ') $settings \"$serve_bin\" $args --addr 127.0.0.1:$http_port --grpc-addr 127.0.0.1:$grpc_port" \
  > "$log" 2>&1 &
server=$!
stop_server() {
  kill -TERM "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bash .ci/wait-ready.sh "http://127.0.0.1:$http_port/v2/health/ready" "$server" "$log"

echo "== deploy check: tests/deploy/test_manifests.py"
status=0
NIN_DEPLOY_RENDERED="$rendered" NIN_BASE_URL="http://127.0.0.1:$http_port" \
  NIN_GRPC_ADDR="127.0.0.1:$grpc_port" NIN_SERVE_BIN="$serve_bin" NIN_IMAGE="$image" \
  PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m pytest -v -p no:cacheprovider \
  tests/deploy/test_manifests.py || status=$?
if [ "$status" -ne 0 ]; then
  echo "deploy-check: failed; nin-serve's log:" >&2
  tail -n 30 "$log" >&2
fi
exit "$status"
