# syntax=docker/dockerfile:1
#
# nin on an NVIDIA GPU: nin-serve (the entrypoint) and nin-train, built with
# candle's CUDA backend.
#
#   docker build -t nin .
#   docker build --build-arg CUDA_COMPUTE_CAP=86 -t nin:sm86 .
#   docker build --build-arg CUDNN=true -t nin:cudnn .
#   docker run --gpus all -p 8080:8080 nin
#
# CUDA version and driver: the image uses CUDA 13.0 (Ubuntu 24.04), whose
# runtime needs an NVIDIA driver >= 580 on the host (`nvidia-smi` shows the
# driver version). For an older driver build on CUDA 12 instead, e.g.
#   --build-arg CUDA_VERSION=12.6.3   (needs driver >= 560)
# cudarc (candle's CUDA binding) accepts CUDA 12.0 to 13.4; CI compiles the
# cuda feature against CUDA 13.4 (.ci/cuda-build.sh).
#
# The binaries here are CUDA builds: they load libcuda.so.1 (the driver, put
# into the container by the NVIDIA Container Toolkit, `--gpus`) when they
# start, so this image cannot run without it. The CPU build is a separate
# binary (`cargo build --release`, no features).

ARG CUDA_VERSION=13.0.1
ARG UBUNTU_VERSION=ubuntu24.04

# ---------------------------------------------------------------------------
# chef: the CUDA devel image (nvcc, headers) plus a pinned Rust toolchain and
# cargo-chef, shared by the planner and the builder.
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-devel-${UBUNTU_VERSION} AS chef

# Same toolchain as the project's CI (`rustc --version`).
ARG RUST_VERSION=1.95.0
ARG CARGO_CHEF_VERSION=0.1.78

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:$PATH \
    DEBIAN_FRONTEND=noninteractive

# Build tools only: the builder stage is thrown away, so the package versions
# follow the base image's Ubuntu release rather than being pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl build-essential pkg-config \
 && rm -rf /var/lib/apt/lists/*

RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs \
      | sh -s -- -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rustc --version \
 && cargo install --locked cargo-chef --version "${CARGO_CHEF_VERSION}" \
 && rm -rf "${CARGO_HOME}/registry"

WORKDIR /src

# ---------------------------------------------------------------------------
# planner: reduces the workspace to its dependency recipe. The recipe changes
# only when a Cargo.toml or Cargo.lock does, so the builder's dependency
# layer below is reused across source edits.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
# builder: dependencies first (cached layer), then the workspace.
FROM chef AS builder

# GPU generation the CUDA kernels are compiled for. candle needs it at build
# time because there is no GPU (no nvidia-smi) inside `docker build`; on the
# target machine `nvidia-smi --query-gpu=compute_cap --format=csv` prints it
# (8.6 -> 86). Common values:
#   75 T4, RTX 20xx          80 A100, A30
#   86 A10, A40, RTX 30xx    89 L4, L40S, RTX 40xx
#   90 H100, H200 (default)  100 B200, GB200      120 RTX 50xx
# CUDA 13 no longer compiles for GPUs older than 75 (use a CUDA 12 image).
# Kernels built for one capability are not guaranteed to load on another:
# build one image per GPU generation you deploy to.
ARG CUDA_COMPUTE_CAP=90
# true: build with cuDNN (`--features cudnn`) for candle's convolutions;
# false: plain CUDA (`--features cuda`).
ARG CUDNN=false
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}

COPY --from=planner /src/recipe.json recipe.json
# Cargo's [env] (jemalloc's options) must reach the dependency layer too.
COPY .cargo/ .cargo/
RUN features=cuda; if [ "${CUDNN}" = true ]; then features=cudnn; fi \
 && cargo chef cook --release --locked --features "${features}" \
      -p nin-serve -p nin-train --recipe-path recipe.json

COPY . .
RUN features=cuda; if [ "${CUDNN}" = true ]; then features=cudnn; fi \
 && cargo build --release --locked --features "${features}" -p nin-serve -p nin-train \
 && install -D -m 0755 target/release/nin-serve target/release/nin-train -t /out/bin

# ---------------------------------------------------------------------------
# runtime: the matching CUDA runtime image (cuBLAS, cuRAND, NVRTC, cudart,
# cuDNN), the two binaries and the shipped weights. The web page is embedded
# in nin-serve.
FROM nvidia/cuda:${CUDA_VERSION}-cudnn-runtime-${UBUNTU_VERSION} AS runtime

ARG CUDA_COMPUTE_CAP=90
LABEL org.opencontainers.image.title="nin" \
      org.opencontainers.image.description="Network-in-Network Fashion-MNIST classifier: nin-serve and nin-train, CUDA build" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.source="https://github.com/nin-rs/nin" \
      nin.cuda-compute-cap="${CUDA_COMPUTE_CAP}"

# A fixed, unprivileged user; numeric so that `runAsNonRoot` can verify it.
RUN groupadd --system --gid 10001 nin \
 && useradd --system --uid 10001 --gid nin --home-dir /opt/nin --shell /usr/sbin/nologin nin

COPY --from=builder /out/bin/ /usr/local/bin/
COPY --chown=root:root weights/ /opt/nin/weights/

# The compute capability the kernels were built for, for operators and logs.
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    NIN_WEIGHTS=/opt/nin/weights/nin-fashion-mnist.safetensors \
    NIN_DEVICE=auto \
    RUST_LOG=info

WORKDIR /opt/nin
USER 10001:10001
EXPOSE 8080

# bash's /dev/tcp: no curl or wget in the runtime image. Liveness only
# (/healthz); /readyz is the readiness probe for an orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]

ENTRYPOINT ["nin-serve", "--addr", "0.0.0.0:8080"]
