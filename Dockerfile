# Targets: `cpu` (default: ONNX Runtime only, no torch; serves onnx/onnx-int8 artifacts), `cpu-torch`
# (pinned CPU torch as well: serves the torch variant too) and `cuda` (CUDA torch + onnxruntime-gpu).
#   docker build --target cpu  -t prune-serve:cpu  --build-arg MODEL_SRC=madlag/bert-large-uncased-wwm-squadv2-x2.15-f83.2-d25-hybrid-v1 .
#   docker build --target cuda -t prune-serve:cuda --build-arg MODEL_SRC=path/in/context .   (packs --fp16)
# MODEL_SRC (hub id, or a checkpoint directory inside the build context) is packed at build time
# into /app/models/$MODEL_NAME; leave it empty to serve a models/ directory mounted at run time.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# One CUDA 12 stack: the base image's CUDA 12.8 + cuDNN 9, torch's cu128 wheel, onnxruntime-gpu 1.32 from
# PyPI (built for CUDA 12.x, cuDNN 9). Needs an NVIDIA driver >= 570 (CUDA 12.8).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build-pack: everything prune-pack needs (CPU torch, transformers, the ONNX tools) ----------
FROM ${PYTHON_IMAGE} AS build-pack
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# Builds without that index: TORCH_WHEELS names a directory in the build context holding the CPU wheel.
ARG TORCH_WHEELS=""
RUN --mount=type=bind,source=.,target=/ctx \
    python3 -m venv /opt/venv \
    && if [ -n "${TORCH_WHEELS}" ]; then pip install --find-links "/ctx/${TORCH_WHEELS}" torch==2.13.0; \
       else pip install --index-url "${TORCH_INDEX}" torch==2.13.0; fi
COPY pyproject.toml README.md /src/
COPY packer /src/packer
COPY service /src/service
RUN pip install "/src[pack,onnx,serve]"

# ---- build-serve: only what serving an ONNX artifact needs (no torch, no transformers) -----------
FROM ${PYTHON_IMAGE} AS build-serve
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
COPY pyproject.toml README.md /src/
COPY packer /src/packer
COPY service /src/service
RUN python3 -m venv /opt/venv && pip install "/src[onnx,serve]"

# ---- pack: the model packed at build time (or an empty models directory) -------------------
FROM build-pack AS pack
ARG MODEL_SRC=""
ARG MODEL_NAME=model
ARG PACK_ARGS="--int8"
RUN --mount=type=bind,source=.,target=/ctx \
    mkdir -p /models \
    && if [ -z "${MODEL_SRC}" ]; then echo "no MODEL_SRC: serve a mounted models/ directory"; \
       elif [ -e "/ctx/${MODEL_SRC}" ]; then prune-pack pack -q "/ctx/${MODEL_SRC}" "/models/${MODEL_NAME}" ${PACK_ARGS}; \
       else HF_HOME=/tmp/hf prune-pack pack -q "${MODEL_SRC}" "/models/${MODEL_NAME}" ${PACK_ARGS}; fi

# ---- pack-cuda: the same, with the GPU variant (fp16) by default ----------------------------------
FROM build-pack AS pack-cuda
ARG MODEL_SRC=""
ARG MODEL_NAME=model
ARG PACK_ARGS_CUDA="--fp16"
RUN --mount=type=bind,source=.,target=/ctx \
    mkdir -p /models \
    && if [ -z "${MODEL_SRC}" ]; then echo "no MODEL_SRC: serve a mounted models/ directory"; \
       elif [ -e "/ctx/${MODEL_SRC}" ]; then prune-pack pack -q "/ctx/${MODEL_SRC}" "/models/${MODEL_NAME}" ${PACK_ARGS_CUDA}; \
       else HF_HOME=/tmp/hf prune-pack pack -q "${MODEL_SRC}" "/models/${MODEL_NAME}" ${PACK_ARGS_CUDA}; fi

# ---- runtime-cpu: what the CPU images share (no compilers, non-root, health-checked) -------------
FROM ${PYTHON_IMAGE} AS runtime-cpu
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin prune
# DL3064 reads TOKENIZERS_PARALLELISM as a secret; it is not one.
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PRUNE_SERVE_MODELS_DIR=/app/models HF_HOME=/tmp/hf TOKENIZERS_PARALLELISM=false
WORKDIR /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
CMD ["prune-serve", "--host", "0.0.0.0", "--port", "8000"]

# ---- cpu: serves ONNX artifacts (onnx-int8 by default) with ONNX Runtime; no torch inside --------
FROM runtime-cpu AS cpu
COPY --from=build-serve /opt/venv /opt/venv
COPY --from=pack --chown=10001:10001 /models /app/models

# ---- cpu-torch: also serves the torch variant (and carries prune-pack) ---------------------------
FROM runtime-cpu AS cpu-torch
COPY --from=build-pack /opt/venv /opt/venv
COPY --from=pack --chown=10001:10001 /models /app/models

# ---- cuda: build and run on NVIDIA GPUs -----------------------------------------------------
FROM ${CUDA_IMAGE} AS build-cuda
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
# PyPI's torch 2.13 is a CUDA 13 build (driver >= 580): take the CUDA 12.8 one, as onnxruntime-gpu is.
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_CUDA_INDEX}" torch==2.13.0
COPY pyproject.toml README.md /src/
COPY packer /src/packer
COPY service /src/service
RUN pip install "/src[pack,gpu,serve]" "onnxruntime-gpu==1.32.0"

FROM ${CUDA_IMAGE} AS cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin prune
COPY --from=build-cuda /opt/venv /opt/venv
COPY --from=pack-cuda --chown=10001:10001 /models /app/models
# hadolint ignore=DL3064
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PRUNE_SERVE_MODELS_DIR=/app/models PRUNE_SERVE_DEVICE=cuda HF_HOME=/tmp/hf TOKENIZERS_PARALLELISM=false
WORKDIR /app
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
CMD ["prune-serve", "--host", "0.0.0.0", "--port", "8000"]

# The default target is the CPU image.
FROM cpu
