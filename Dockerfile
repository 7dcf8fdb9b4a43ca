# syntax=docker/dockerfile:1
# Images for the coordinator and the workers (one image, both binaries).
#
#   docker build -t declip-orchestrator:0.1.0 .                 # CPU runtime (default)
#   docker build --target gpu -t declip-orchestrator:0.1.0-gpu .  # + CUDA libs from the torch wheel
#
# libtorch comes from the same PyPI wheels as on developer machines and in CI
# (scripts/setup-libtorch, torch 2.11.0): the binaries link only the CPU libs and
# dlopen libtorch_cuda.so at start when it is there (docs/development.md), so the
# CPU and GPU images run the very same binaries. See docs/kubernetes.md.

ARG RUST_VERSION=1.95
ARG TORCH_VERSION=2.11.0

# ---- build: the two binaries and the CPU libtorch they link ----------------------
FROM rust:${RUST_VERSION}-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip g++ \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN scripts/setup-libtorch
RUN cargo build --release --locked -p coordinator -p worker \
 && install -D -m 0755 target/release/coordinator /out/bin/coordinator \
 && install -D -m 0755 target/release/worker /out/bin/worker \
 && mkdir -p /out/lib && cp -a .libtorch/lib/. /out/lib/

# ---- cpu: the runtime image -------------------------------------------------------
FROM debian:bookworm-slim AS cpu
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libstdc++6 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home /runs declip
COPY --from=build /out/lib/ /opt/libtorch/lib/
COPY --from=build /out/bin/ /usr/local/bin/
# The binaries' rpath points into the build tree; the libs live here instead.
ENV LD_LIBRARY_PATH=/opt/libtorch/lib
USER 10001
# The manifests give every container its command (coordinator serve / worker ...).
ENTRYPOINT []
CMD ["coordinator", "--help"]

# ---- gpu: adds torch's CUDA libraries (libtorch_cuda.so, cuDNN, NCCL, ...) ------------
# The full torch wheel pulls its nvidia-* runtime wheels (~2.2 GB). The node needs an
# NVIDIA driver for CUDA 13 and the NVIDIA device plugin (nvidia.com/gpu).
FROM cpu AS gpu
ARG TORCH_VERSION
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/torch \
 && /opt/torch/bin/pip install --no-cache-dir "torch==${TORCH_VERSION}" \
 && site=$(/opt/torch/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
 && ln -s "$site/torch/lib" /opt/torch/torch-lib \
 && ln -s "$site/nvidia" /opt/torch/nvidia \
 # cudarc looks for libnccl.so; the NCCL wheel ships only libnccl.so.2.
 && ln -s "$site/nvidia/nccl/lib/libnccl.so.2" /opt/torch/nvidia/nccl/lib/libnccl.so
# The torch wheel's own libs first (they match libtorch_cuda.so), then each nvidia-* lib dir.
ENV LD_LIBRARY_PATH=/opt/torch/torch-lib:/opt/torch/nvidia/cu13/lib:/opt/torch/nvidia/cudnn/lib:/opt/torch/nvidia/nccl/lib:/opt/torch/nvidia/cublas/lib:/opt/torch/nvidia/cuda_runtime/lib:/opt/torch/nvidia/cuda_cupti/lib:/opt/torch/nvidia/cusparse/lib:/opt/torch/nvidia/cufft/lib:/opt/torch/nvidia/curand/lib:/opt/torch/nvidia/cusolver/lib:/opt/torch/nvidia/nvjitlink/lib:/opt/torch/nvidia/cusparselt/lib:/opt/torch/nvidia/nvshmem/lib:/opt/libtorch/lib
USER 10001
