# GPU image for RunPod serverless (and Ray GPU workers): llama-cpp-python built with CUDA in a build stage, a
# runtime stage without a compiler, a non-root user, the model cache on RunPod's /runpod-volume.
#
#   docker build -t gguf-serve .
#   docker build --build-arg BAKE_MODEL=1 -t gguf-serve:baked .   # model inside the image: fastest cold start
#
# The install steps are the ones CI runs (pip install of this project from its own pyproject.toml); only
# CMAKE_ARGS differs, to compile llama.cpp's CUDA backend.
ARG CUDA_VERSION=12.6.3
ARG UBUNTU=ubuntu24.04

FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential cmake ninja-build \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY serve_app ./serve_app
# Link against the driver stub: the real libcuda.so.1 only exists on the GPU host at run time.
ENV CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=80;86;89;90 -DGGML_NATIVE=off" \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --upgrade pip \
 && /opt/venv/bin/python -m pip install .

FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 libgomp1 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 1000 app \
 && mkdir -p /runpod-volume/models /runpod-volume/hf \
 && chown -R app:app /runpod-volume
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=app:app deploy/runpod/serve_config.yaml ./serve_config.yaml
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/runpod-volume/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    GGUF_SERVE_CONFIG=/app/serve_config.yaml \
    PYTHONUNBUFFERED=1
USER 1000
# BAKE_MODEL=1 downloads the configured model at build time and verifies its size and sha256 against the Hub
# (the preflight fails the build otherwise). A network volume mounted at /runpod-volume shadows the baked copy
# and is used as the cache instead.
ARG BAKE_MODEL=0
RUN if [ "$BAKE_MODEL" = "1" ]; then python -m serve_app.preflight /app/serve_config.yaml \
      && python -m serve_app.cache list --cache-dir /runpod-volume/models; fi
EXPOSE 8000 8265
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
CMD ["python", "-m", "serve_app.runpod"]
