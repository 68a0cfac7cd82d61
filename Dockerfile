# nin's two images: nin-serve (the entrypoint) and nin-train with the shipped
# weights, on Debian 12.
#
#   docker build -t nin:cuda .                    # NVIDIA GPU (the default target)
#   docker build --target cpu -t nin:cpu .        # any x86-64 machine
#   docker build --build-arg CUDA_COMPUTE_CAP=86 -t nin:cuda-sm86 .
#   docker run --gpus all -p 8080:8080 nin:cuda
#   docker run -p 8080:8080 nin:cpu
#
# BuildKit (the default builder since Docker 23) builds only the stages a
# target needs, and independent stages at the same time. Without it
# (`DOCKER_BUILDKIT=0`), the legacy builder builds every stage above the
# target, so the default target builds the CPU image on the way; `--target
# cpu` builds nothing of CUDA either way. There is no `# syntax=` line: the
# builder's own Dockerfile frontend is used, so nothing is pulled from a
# registry to parse this file.
#
# The CUDA image is Debian plus NVIDIA's CUDA libraries from their PyPI
# wheels (cuda-toolkit), not an nvidia/cuda base image: one Debian base for
# both images, and a build that works wherever PyPI and Debian's mirror are
# reachable (our CI has no Docker registry; .ci/base-images.sh makes the two
# base images named below from Debian's mirror and the machine's toolchain).
# CUDA 13.4 needs an NVIDIA driver >= 580 on the host (`nvidia-smi` shows the
# driver version). The NVIDIA Container Toolkit (`--gpus`) mounts the driver's
# libcuda.so.1 into the container.

ARG RUST_VERSION=1.95.0
ARG DEBIAN_RELEASE=bookworm

# ---------------------------------------------------------------------------
# chef: Rust and cargo-chef, shared by the planner and both builders.
FROM rust:${RUST_VERSION}-slim-${DEBIAN_RELEASE} AS chef
ARG CARGO_CHEF_VERSION=0.1.78
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN cargo install --locked cargo-chef --version "${CARGO_CHEF_VERSION}" \
 && rm -rf "${CARGO_HOME}/registry"
# make: jemalloc's build (tikv-jemalloc-sys) runs it; the rust images carry
# only gcc and libc6-dev. A build stage, so the version follows the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
# The images strip debug info from the binaries, so the release profile's
# line tables would be compiled and linked only to be thrown away.
ENV CARGO_PROFILE_RELEASE_DEBUG=false
WORKDIR /src

# ---------------------------------------------------------------------------
# planner: reduces the workspace to its dependency recipe. The recipe changes
# only when a Cargo.toml or Cargo.lock does, so each builder's dependency
# layer below is reused across source edits.
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---------------------------------------------------------------------------
# deps: the dependencies, compiled (a cached layer). The CUDA builder starts
# from it too: only candle and what depends on it compile again there.
FROM chef AS deps
COPY --from=planner /src/recipe.json recipe.json
# Cargo's [env] (jemalloc's options) must reach the dependency layer too.
COPY .cargo/ .cargo/
RUN cargo chef cook --release --locked -p nin-serve -p nin-train --recipe-path recipe.json

# ---------------------------------------------------------------------------
# cpu-builder: the workspace.
FROM deps AS cpu-builder
COPY . .
# Without the line tables (about 190 MB): symbols stay, for backtraces.
RUN cargo build --release --locked -p nin-serve -p nin-train \
 && install -D -m 0755 target/release/nin-serve target/release/nin-train -t /out/bin \
 && strip --strip-debug /out/bin/*

# ---------------------------------------------------------------------------
# runtime: what both images share: an unprivileged user, the shipped
# weights, the settings and the health check. The web page is embedded in
# nin-serve.
FROM debian:${DEBIAN_RELEASE}-slim AS runtime
LABEL org.opencontainers.image.title="nin" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0" \
      org.opencontainers.image.source="https://github.com/nin-rs/nin"
# A fixed, unprivileged user; numeric so that `runAsNonRoot` can verify it.
RUN groupadd --system --gid 10001 nin \
 && useradd --system --uid 10001 --gid nin --home-dir /opt/nin --shell /usr/sbin/nologin nin
COPY --chown=root:root weights/ /opt/nin/weights/
ENV NIN_WEIGHTS=/opt/nin/weights/nin-fashion-mnist.safetensors \
    NIN_GRPC_ADDR=0.0.0.0:8001 \
    NIN_DEVICE=auto \
    RUST_LOG=info
WORKDIR /opt/nin
# HTTP (/classify, v2 REST, the web page) and gRPC (v2, health, reflection).
EXPOSE 8080 8001
# bash's /dev/tcp: no curl or wget in the image. Liveness only (/healthz);
# /readyz is the readiness probe for an orchestrator.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8080 && printf 'GET /healthz HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && head -n1 <&3 | grep -q ' 200 '"]
ENTRYPOINT ["nin-serve", "--addr", "0.0.0.0:8080"]

# ---------------------------------------------------------------------------
# cpu: the CPU build (no features).
FROM runtime AS cpu
LABEL org.opencontainers.image.description="Network-in-Network Fashion-MNIST classifier: nin-serve and nin-train, CPU build"
COPY --from=cpu-builder /out/bin/ /usr/local/bin/
USER 10001:10001

# ---------------------------------------------------------------------------
# cuda-builder: nvcc and the CUDA libraries from PyPI, then the cuda build.
FROM deps AS cuda-builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# cudarc (candle's CUDA binding) accepts CUDA 12.0 to 13.4.
ARG CUDA_TOOLKIT_VERSION=13.4.3
# GPU generation the CUDA kernels are compiled for. candle needs it at build
# time because there is no GPU inside `docker build`; on the target machine
# `nvidia-smi --query-gpu=compute_cap --format=csv` prints it (8.6 -> 86):
#   75 T4, RTX 20xx          80 A100, A30
#   86 A10, A40, RTX 30xx    89 L4, L40S, RTX 40xx
#   90 H100, H200 (default)  100 B200, GB200      120 RTX 50xx
# Kernels built for one capability are not guaranteed to load on another:
# build one image per GPU generation you deploy to.
ARG CUDA_COMPUTE_CAP=90
# g++: nvcc's host compiler; python3: the CUDA wheels. Build tools only: this
# stage is thrown away, so the package versions follow the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
# /usr/local/cuda as a CUDA install looks: the wheels' bin/, include/, lib/,
# plus the unversioned library names the linker asks for.
RUN python3 -m venv /opt/cuda-wheels \
 && /opt/cuda-wheels/bin/pip install --no-cache-dir --disable-pip-version-check \
      "cuda-toolkit[nvcc,cccl,cudart,cublas,curand,nvrtc]==${CUDA_TOOLKIT_VERSION}" \
 && ln -s "$(/opt/cuda-wheels/bin/python -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')" /usr/local/cuda \
 && for lib in cudart cublas cublasLt curand nvrtc; do \
      for real in /usr/local/cuda/lib/lib"${lib}".so.*; do ln -s "${real##*/}" "/usr/local/cuda/lib/lib${lib}.so"; break; done; done \
 && /usr/local/cuda/bin/nvcc --version
# The driver's libcuda.so is not redistributable; link against a stub of the
# functions cudarc declares (the role of the stub in NVIDIA's devel images).
# The driver's own library replaces it at run time (`--gpus`).
COPY Cargo.lock .ci/cuda-stubs/gen_stubs.py /tmp/stub/
RUN version=$(awk '/^name = "cudarc"$/ { getline; gsub(/"/, "", $3); print $3; exit }' /tmp/stub/Cargo.lock) \
 && mkdir -p /tmp/stub/fetch/src && touch /tmp/stub/fetch/src/lib.rs \
 && printf '[package]\nname = "stub"\nversion = "0.0.0"\n[dependencies]\ncudarc = { version = "=%s", default-features = false }\n' "$version" \
      > /tmp/stub/fetch/Cargo.toml \
 && cargo fetch --quiet --manifest-path /tmp/stub/fetch/Cargo.toml \
 && python3 /tmp/stub/gen_stubs.py --only cuda "${CARGO_HOME}"/registry/src/*/"cudarc-${version}" /tmp/stub/out \
 && install -D -m 0755 /tmp/stub/out/lib/libcuda.so.1 /usr/local/cuda/lib/stubs/libcuda.so \
 && rm -rf /tmp/stub
ENV CUDA_ROOT=/usr/local/cuda \
    NVCC=/usr/local/cuda/bin/nvcc \
    PATH=/usr/local/cuda/bin:$PATH \
    CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP}
RUN cargo chef cook --release --locked --features cuda -p nin-serve -p nin-train --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --features cuda -p nin-serve -p nin-train \
 && install -D -m 0755 target/release/nin-serve target/release/nin-train -t /out/bin \
 && strip --strip-debug /out/bin/* \
 && mkdir -p /out/cuda \
 && cp -a /usr/local/cuda/lib/libcudart.so.* /usr/local/cuda/lib/libcublas.so.* /usr/local/cuda/lib/libcublasLt.so.* \
      /usr/local/cuda/lib/libcurand.so.* /out/cuda/

# ---------------------------------------------------------------------------
# cuda: the cuda build and the CUDA libraries it links (cuBLAS, cuBLASLt,
# cuRAND, cudart; not NVRTC, which the linker drops as unused); the driver
# comes from the host.
FROM runtime AS cuda
ARG CUDA_COMPUTE_CAP=90
LABEL org.opencontainers.image.description="Network-in-Network Fashion-MNIST classifier: nin-serve and nin-train, CUDA build" \
      nin.cuda-compute-cap="${CUDA_COMPUTE_CAP}"
COPY --from=cuda-builder /out/cuda/ /usr/local/cuda/lib/
RUN echo /usr/local/cuda/lib > /etc/ld.so.conf.d/nin-cuda.conf && ldconfig
COPY --from=cuda-builder /out/bin/ /usr/local/bin/
# What nvidia/cuda images tell the NVIDIA Container Toolkit: expose every GPU
# with the compute libraries, and refuse to start on a driver too old for
# CUDA 13 (a clear error from `docker run` instead of one from CUDA).
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=13.0"
USER 10001:10001
