# GPU image for RunPod serverless (and Ray GPU workers): llama-cpp-python built with CUDA in a build stage, a
# runtime stage without a compiler, a non-root user, the model cache on RunPod's /runpod-volume.
#
#   docker build -t gguf-serve .
#   docker build --build-arg BAKE_MODEL=1 -t gguf-serve:baked .   # model inside the image: fastest cold start
#   docker build --build-arg BAKE_MODEL=1 --build-arg BAKE_REPO_ID=org/name-GGUF \
#     --build-arg BAKE_FILENAME='*Q4_K_M.gguf' --build-arg BAKE_REVISION=main -t gguf-serve:mine .
# The baked reference must be the one serve_config.yaml's model names (repo, filename or pattern, revision):
# the cache looks the baked copy up by that reference.
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
 && mkdir -p /runpod-volume/models /runpod-volume/hf /opt/models \
 && chown -R app:app /runpod-volume /opt/models
COPY --from=build /opt/venv /opt/venv
WORKDIR /app
COPY --chown=app:app deploy/runpod/serve_config.yaml ./serve_config.yaml
ENV PATH=/opt/venv/bin:$PATH \
    HF_HOME=/runpod-volume/hf \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    GGUF_SERVE_CONFIG=/app/serve_config.yaml \
    GGUF_SERVE_BAKED_DIR=/opt/models \
    PYTHONUNBUFFERED=1
USER 1000
# BAKE_MODEL=1 downloads the model at build time into /opt/models, outside /runpod-volume so that an attached
# network volume cannot shadow it, publishing it only once its size and sha256 match the Hub (the pull fails
# the build otherwise), then makes the directory read-only. At run time the cache consults /opt/models first
# (manifest + a size check, no re-hash), then the volume, then RunPod's cached models, then the Hub.
ARG BAKE_MODEL=0
ARG BAKE_REPO_ID=DavidAU/Llama-3.2-8X3B-MOE-Dark-Champion-Instruct-uncensored-abliterated-18.4B-GGUF
ARG BAKE_FILENAME="*[Qq]4_[Kk]_[Mm].gguf"
ARG BAKE_REVISION=main
RUN if [ "$BAKE_MODEL" = "1" ]; then \
      python -m serve_app.cache pull "$BAKE_REPO_ID" "$BAKE_FILENAME" --revision "$BAKE_REVISION" \
        --cache-dir /opt/models --progress log \
      && rm -rf /opt/models/.staging/* /opt/models/.locks/* \
      && chmod -R a-w /opt/models; fi
# 8001: /ping for a load-balancing endpoint (deploy/runpod/lb.env sets PORT_HEALTH=8001).
EXPOSE 8000 8001 8265
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python3", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8000/ready', timeout=4)"]
CMD ["python", "-m", "serve_app.runpod"]
