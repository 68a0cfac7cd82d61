#!/usr/bin/env bash
# Builds the Dockerfile's two images on this registry-less Docker Engine and
# checks them (tests/containers/test_images.py):
#
#   bash .ci/docker-images.sh            # build nin:cpu and nin:cuda, check both
#   bash .ci/docker-images.sh cpu        # build nin:cpu only (no checks)
#   bash .ci/docker-images.sh build      # build both, no checks (CI runs this
#                                        # beside the host tests)
#   bash .ci/docker-images.sh check      # check the images built before
#
# 1. .ci/base-images.sh makes the base images the Dockerfile names
#    (debian:bookworm-slim, rust:<V>-slim-bookworm) from Debian's mirror and
#    this machine's Rust toolchain; NIN_FRESH_IMAGES=1 (CI) makes them anew.
# 2. `docker build` of the targets `cpu` and `cuda` with BuildKit, where a
#    docker CLI can drive it: the buildx plugin, or a CLI older than 23 with
#    BuildKit built in (Debian 12's /usr/bin/docker, which our CI machines
#    have beside a newer CLI without buildx). The shared stages (chef,
#    planner, deps) are built first, then both targets at once, so the CUDA
#    chain overlaps the CPU workspace build and each target builds only the
#    stages it needs. Failing that, the legacy builder (DOCKER_BUILDKIT=0),
#    one target after the other.
# 3. A libcuda.so.1 stub (every call fails: a machine without a GPU), made
#    by .ci/cuda-stubs/gen_stubs.py from cudarc's declarations, which the
#    checks mount into the CUDA image in place of the driver; and a fake GPU
#    (.ci/cuda-stubs/fake-gpu: it opens, but no kernel loads) with the
#    cuBLAS and cuRAND that candle needs to open it.
# 4. pytest on tests/containers, with the web test's venv (Pillow, pytest),
#    against the host's own nin-serve for the reference answers.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
only=${1:-}
started=$(date +%s)

case "$only" in
  "" | cpu | cuda | build | check) ;;
  *) echo "usage: docker-images.sh [cpu|cuda|build|check]" >&2; exit 2 ;;
esac

if [ "$only" != check ]; then
  if [ "${NIN_FRESH_IMAGES:-0}" = 1 ]; then
    docker image rm -f nin:cpu nin:cuda >/dev/null 2>&1 || true
    # The builder stages of earlier builds: untagged images (legacy builder)
    # and BuildKit's cache (several GB for CUDA).
    docker image prune -f > /dev/null
    docker builder prune -af > /dev/null 2>&1 || true
  fi
  rust_version=$(bash .ci/base-images.sh)
fi

# Prefixes each line with the time of day, so the log shows each step's cost.
stamp() { while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done; }

# BuildKit if some docker CLI here drives it, else the legacy builder.
builder=legacy
docker_cli=docker
if docker buildx version > /dev/null 2>&1; then
  builder=buildx
else
  for cli in $(type -ap docker); do
    major=$("$cli" version --format '{{.Client.Version}}' 2> /dev/null | cut -d. -f1)
    if [ -n "$major" ] && [ "$major" -lt 23 ] 2> /dev/null; then
      builder=buildkit docker_cli=$cli
      break
    fi
  done
fi

build() { # build TARGET [TAG]
  local t0 log=target/ci-tools/docker-$1.log
  local args=(--target "$1" --build-arg "RUST_VERSION=$rust_version")
  [ -n "${2:-}" ] && args+=(-t "$2")
  t0=$(date +%s)
  echo "-- docker build ${args[*]} ($builder; log: $log)"
  mkdir -p target/ci-tools
  local status=0
  case "$builder" in
    buildx) docker buildx build --load --progress=plain "${args[@]}" . 2>&1 | stamp > "$log" || status=$? ;;
    buildkit) DOCKER_BUILDKIT=1 "$docker_cli" build --progress=plain "${args[@]}" . 2>&1 | stamp > "$log" || status=$? ;;
    legacy) DOCKER_BUILDKIT=0 docker build "${args[@]}" . 2>&1 | stamp > "$log" || status=$? ;;
  esac
  if [ "$status" != 0 ]; then
    tail -n 60 "$log" >&2
    echo "docker build --target $1 failed" >&2
    return 1
  fi
  if [ -n "${2:-}" ]; then
    echo "$2 built in $(($(date +%s) - t0)) s, $(docker image inspect -f '{{.Size}}' "$2" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
  else
    echo "stage $1 built in $(($(date +%s) - t0)) s"
  fi
}

if [ "$only" != check ]; then
  if [ "$only" = cpu ] || [ "$only" = cuda ]; then
    build "$only" "nin:$only"
    exit 0
  fi
  if [ "$builder" = legacy ]; then
    build cpu nin:cpu
    build cuda nin:cuda
  else
    # BuildKit exports even an intermediate target as an image: tagged so
    # that it is replaced, not piled up, and removed once both are built
    # (the layers stay in BuildKit's cache).
    build deps nin-build:deps
    build cpu nin:cpu &
    cpu_build=$!
    build cuda nin:cuda &
    cuda_build=$!
    failed=0
    wait "$cpu_build" || failed=1
    wait "$cuda_build" || failed=1
    docker image rm nin-build:deps > /dev/null
    [ "$failed" = 0 ] || exit 1
  fi
  [ "$only" = build ] && exit 0
fi
for image in nin:cpu nin:cuda; do
  docker image inspect "$image" > /dev/null 2>&1 \
    || { echo "no image $image: run .ci/docker-images.sh build first" >&2; exit 1; }
done

echo "-- libcuda.so.1 stub and fake GPU for the GPU-less checks"
cargo fetch --locked --quiet
cudarc_version=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' Cargo.lock)
cudarc_src=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc_version" | head -n1)
stub_dir=$root/target/ci-tools/cuda-stub
python3 .ci/cuda-stubs/gen_stubs.py --only cuda "$cudarc_src" "$stub_dir" > /dev/null
chmod 0755 "$stub_dir/lib/libcuda.so.1"
fake_gpu=$root/target/ci-tools/cuda-fake-gpu
python3 .ci/cuda-stubs/gen_stubs.py --only cuda,cublas,curand --fake .ci/cuda-stubs/fake-gpu \
  "$cudarc_src" "$fake_gpu" > /dev/null
chmod -R a+rX "$fake_gpu"

# The reference answers: the host's own nin-serve, as `cargo test` built it
# (CI) or as NIN_HOST_SERVE names it.
host_serve=${NIN_HOST_SERVE:-$root/target/debug/nin-serve}
if [ ! -x "$host_serve" ]; then
  echo "-- the host's nin-serve (reference answers)"
  cargo build --locked --quiet -p nin-serve
fi

echo "-- checks (tests/containers)"
venv=target/ci-tools/web-venv
if [ ! -x "$venv/bin/pytest" ]; then
  echo "no $venv: run .ci/web-test.sh first (it makes the venv with Pillow and pytest)" >&2
  exit 1
fi
NIN_IMAGE_CPU=nin:cpu NIN_IMAGE_CUDA=nin:cuda NIN_CUDA_STUB="$stub_dir/lib/libcuda.so.1" \
  NIN_FAKE_GPU="$fake_gpu/lib" \
  NIN_HOST_SERVE="$host_serve" \
  "$venv/bin/pytest" -q -p no:cacheprovider tests/containers
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' nin
echo "images built and checked in $(($(date +%s) - started)) s"
