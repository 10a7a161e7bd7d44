# slimserve container image: the API + KServe v2 serving process (`slimserve serve`, the default)
# or a standalone optimization worker (`slimserve worker`), from one image.
#
# CPU image (the default):
#   docker build -t slimserve .
# CUDA image (onnxruntime-gpu and a CUDA build of torch, both for CUDA 13.0):
#   docker build -t slimserve:cuda --build-arg VARIANT=cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu22.04 .
#   The base gives ONNX Runtime's CUDA provider the CUDA 13 runtime, cuBLAS, cuFFT, cuRAND and cuDNN 9
#   on the loader path (onnxruntime-gpu 1.31.1 is built for CUDA 13.0 / cuDNN 9; torch 2.13.0 loads its
#   own copies from the nvidia-* wheels it depends on). Ubuntu 22.04, not 24.04: slimserve needs
#   Python 3.11 (requires-python <3.12) and 22.04 packages python3.11 in universe, which the `base`
#   stage installs when the base image has no python3.11. The GPU driver comes from the host through the
#   NVIDIA container toolkit (`docker run --gpus all`, or the device plugin on Kubernetes).
#
# Run (binding 0.0.0.0 needs an API key; without one the server exits 2 with one line saying so):
#   docker run -p 8000:8000 -e SLIMSERVE_ADMIN_KEYS=change-me -v slimserve:/var/lib/slimserve slimserve
#
# Build-host settings: PIP_CERT (a CA bundle for a TLS-intercepting proxy) and PIP_FIND_LINKS (a local
# wheel folder) are build arguments that pip reads in the builder's RUN steps only; the folders they
# point at are mounted for the build (buildah bud --volume), so nothing of the build host is left in
# the image. scripts/container-smoke builds and runs this file that way.

# A public image with Python 3.11. scripts/container-smoke passes a local Debian bookworm base made
# with debootstrap (python3 is 3.11 there too, but with no `python` or `pip` on PATH: hence python3.11).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
# Bases without Python 3.11 (the nvidia/cuda Ubuntu 22.04 images) get it from their distribution,
# unpinned (DL3008): the versions are whatever that base's release ships, a pin would tie this file to
# one base tag.
# hadolint ignore=DL3008
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

FROM base AS builder
ARG VARIANT=cpu
# Pinned like the Makefile's venv, from TORCH_INDEX_URL. Empty picks the variant's default: PyTorch's
# CPU index for cpu (PyPI's Linux wheel is the multi-GB CUDA build), PyPI for cuda (its Linux x86_64
# wheel of 2.13.0 is the CUDA 13.0 build; PyTorch's https://download.pytorch.org/whl/cu130 index
# serves the same build as 2.13.0+cu130). For cpu, a wheel folder in PIP_FIND_LINKS holding 2.13.0+cpu
# wins over any index (PEP 440 ranks 2.13.0+cpu above 2.13.0): scripts/container-smoke passes the host's
# folder with TORCH_INDEX_URL=https://pypi.org/simple where PyTorch's index is out of reach.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=""
# The newest onnxruntime-gpu on PyPI (there is no 1.32.0 GPU build; its CUDA is 13.0, like torch's).
ARG ORT_GPU_VERSION=1.31.1
# NVML's bindings (the `pynvml` module) for the GPU memory/utilization metrics (service/metrics.py).
ARG NVML_VERSION=13.615.71
ARG PIP_CERT=""
ARG PIP_FIND_LINKS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PATH=/opt/venv/bin:$PATH
RUN python3.11 -m venv /opt/venv
WORKDIR /src
# Only what `pip install .` reads: no tests, benchmarks, venvs or data (.dockerignore keeps the
# context to these as well).
COPY pyproject.toml README.md ./
COPY optimizer ./optimizer
COPY service ./service
# torch first, as the Makefile does: a later resolution then finds it installed instead of pulling
# another build. onnx2torch is installed with --no-deps (pyproject.toml says why). For the CUDA image
# a CPU torch in PIP_FIND_LINKS is kept out (it would outrank the CUDA build), and the CPU onnxruntime
# that the package pins is swapped for onnxruntime-gpu (the same Python module: both at once clash);
# nvidia-ml-py adds the GPU metrics.
# The last line imports the installed package from outside /src (-P) so a broken install fails here.
RUN case "$VARIANT" in \
        cpu) pip install --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
                "torch==${TORCH_VERSION}" ;; \
        cuda) PIP_FIND_LINKS="" pip install --index-url "${TORCH_INDEX_URL:-https://pypi.org/simple}" \
                "torch==${TORCH_VERSION}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac \
    && pip install "./[torch]" \
    && pip install --no-deps onnx2torch==1.5.15 \
    && if [ "$VARIANT" = cuda ]; then \
        pip uninstall -y onnxruntime \
        && pip install "onnxruntime-gpu==${ORT_GPU_VERSION}" "nvidia-ml-py==${NVML_VERSION}"; \
    fi \
    && python -P -c "import onnxruntime, service.cli, torch; print('torch', torch.__version__, 'onnxruntime', \
        onnxruntime.__version__, onnxruntime.get_available_providers())"

FROM base AS runtime
LABEL org.opencontainers.image.title="slimserve" \
      org.opencontainers.image.description="Inference-optimization service: optimize ONNX/PyTorch models, serve them over KServe v2" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric UID, so Kubernetes' runAsNonRoot can verify it and volumes can be chowned ahead.
RUN groupadd --system --gid 10001 slimserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 --home-dir /var/lib/slimserve \
        --shell /usr/sbin/nologin slimserve \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/slimserve
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    SLIMSERVE_HOME=/var/lib/slimserve
# The SQLite file and the artifact folder (with SLIMSERVE_DATABASE_URL / SLIMSERVE_STORAGE_URL set to
# Postgres and S3 it stays empty).
VOLUME ["/var/lib/slimserve"]
WORKDIR /var/lib/slimserve
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers); readiness (/v2/health/ready) is the orchestrator's probe.
# Python's urllib: slim images have no curl.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('SLIMSERVE_PORT', '8000') + '/v2/health/live', timeout=4)"]
ENTRYPOINT ["slimserve"]
CMD ["serve", "--host", "0.0.0.0"]
