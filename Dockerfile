# xaiserve images. Two targets from one build:
#
#   docker build --target cpu -t xaiserve:cpu .   # CPU torch and onnxruntime (the default target)
#   docker build --target gpu -t xaiserve:gpu .   # CUDA torch and onnxruntime-gpu
#
# Both carry the gateway and TorchServe with the xaiserve handler; the first argument picks
# the process: `gateway` (the default: xaiserve-server) or `torchserve`. They run as the
# non-root user 10001 and need nothing writable besides /tmp and /home/xaiserve (mount
# emptyDirs there under a read-only root filesystem). The build stages hold the build
# tools (make, the protobuf compiler); the final stages copy only the virtual environment.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
ARG TORCH_VERSION=2.13.0
ARG ONNXRUNTIME_VERSION=1.31.1
ARG TORCHSERVE_VERSION=0.12.0
ARG GRPC_VERSION=1.85.1

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------- build: sources + stubs
FROM base AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
ARG GRPC_VERSION
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir grpcio-tools==${GRPC_VERSION}
WORKDIR /src
COPY pyproject.toml README.md Makefile ./
COPY proto proto
COPY src src
# The protobuf code comes from the Makefile's own `proto` target (developers, CI and this
# build run the same protoc command); BIN points it at this environment, STAMP= skips the
# developer virtual environment.
RUN make proto BIN=/opt/venv/bin STAMP= \
    && pip uninstall -y grpcio-tools

# ---------------------------------------------------------------- CPU environment
FROM build AS build-cpu
ARG TORCH_VERSION
ARG ONNXRUNTIME_VERSION
ARG TORCHSERVE_VERSION
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu \
        torch==${TORCH_VERSION} \
    && pip install --no-cache-dir \
        onnxruntime==${ONNXRUNTIME_VERSION} \
        torchserve==${TORCHSERVE_VERSION} \
        torch-model-archiver==${TORCHSERVE_VERSION} \
    && pip install --no-cache-dir .

# ---------------------------------------------------------------- GPU environment
# PyPI's Linux torch wheel is the CUDA build; it brings the CUDA runtime libraries as
# nvidia-* wheels, which onnxruntime-gpu uses too. The driver comes from the node (NVIDIA
# container runtime).
FROM build AS build-gpu
ARG TORCH_VERSION
ARG ONNXRUNTIME_VERSION
ARG TORCHSERVE_VERSION
RUN pip install --no-cache-dir \
        torch==${TORCH_VERSION} \
        torchserve==${TORCHSERVE_VERSION} \
        torch-model-archiver==${TORCHSERVE_VERSION} \
    && pip install --no-cache-dir . \
    && pip uninstall -y onnxruntime \
    && pip install --no-cache-dir onnxruntime-gpu==${ONNXRUNTIME_VERSION}

# ---------------------------------------------------------------- runtime (shared)
FROM base AS runtime
# tini reaps TorchServe's worker processes and passes signals to the whole process group;
# TorchServe 0.12 runs on Java 17. openjdk-17-jre-headless stays unpinned (DL3008): Debian
# replaces its version with each security update, so a pin would break every rebuild after
# one; the base image's tag fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        tini=0.19.0-1+b3 \
        openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 xaiserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/xaiserve --create-home \
        --shell /usr/sbin/nologin xaiserve
COPY deploy/docker/entrypoint.sh /usr/local/bin/xaiserve-entrypoint
COPY deploy/torchserve/config.properties /etc/xaiserve/torchserve/config.properties
ENV XAISERVE_HOST=0.0.0.0 \
    XAISERVE_MODEL_STORE=/models \
    TS_CONFIG_FILE=/etc/xaiserve/torchserve/config.properties \
    TS_WORKDIR=/home/xaiserve/torchserve \
    HOME=/home/xaiserve
WORKDIR /home/xaiserve
USER 10001:10001
# gateway gRPC, gateway metrics, TorchServe gRPC inference, HTTP inference (ping), metrics
EXPOSE 50051 9464 7070 8080 8082
ENTRYPOINT ["/usr/bin/tini", "-g", "--", "/usr/local/bin/xaiserve-entrypoint"]
CMD ["gateway"]

FROM runtime AS gpu
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build-gpu /opt/venv /opt/venv

FROM runtime AS cpu
COPY --from=build-cpu /opt/venv /opt/venv
