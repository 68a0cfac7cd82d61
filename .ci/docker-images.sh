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
# 2. `docker build` of the targets `cpu` and `cuda`, with the legacy builder
#    (DOCKER_BUILDKIT=0: the engine here has no buildx). The CUDA stages reuse
#    the chef and planner layers of the CPU build.
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
    # The builder stages of earlier builds, now untagged (several GB for CUDA).
    docker image prune -f > /dev/null
  fi
  rust_version=$(bash .ci/base-images.sh)
fi

# Prefixes each line with the time of day, so the log shows each step's cost.
stamp() { while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done; }

build() { # build TARGET TAG
  local t0
  t0=$(date +%s)
  echo "-- docker build --target $1 -t $2 (log: target/ci-tools/docker-$1.log)"
  mkdir -p target/ci-tools
  if ! DOCKER_BUILDKIT=0 docker build --target "$1" --build-arg "RUST_VERSION=$rust_version" \
      -t "$2" . 2>&1 | stamp > "target/ci-tools/docker-$1.log"; then
    tail -n 60 "target/ci-tools/docker-$1.log" >&2
    echo "docker build --target $1 failed" >&2
    exit 1
  fi
  echo "$2 built in $(($(date +%s) - t0)) s, $(docker image inspect -f '{{.Size}}' "$2" | awk '{ printf "%.0f MB", $1 / 1e6 }')"
}

if [ "$only" != check ]; then
  build cpu nin:cpu
  [ "$only" = cpu ] && exit 0
  build cuda nin:cuda
  [ "$only" = cuda ] || [ "$only" = build ] && exit 0
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
