# The indai platform image: Ray (same version as requirements.lock), DeepSpeed, MLflow client, indai.
#   GPU nodes: docker build -f docker/platform.Dockerfile -t ghcr.io/indai/platform:0.1.0-gpu .
#   CPU nodes: docker build -f docker/platform.Dockerfile --build-arg BASE=rayproject/ray:2.60.0-py311-cpu -t ghcr.io/indai/platform:0.1.0-cpu .
# The chart runs the GPU variant on GPU workers (images.platformGpu), the CPU one elsewhere (images.platform).
# GPU default: CUDA 13, the major version of the torch wheels in requirements.lock (nvidia-*-cu13),
# so DeepSpeed's JIT-built ops compile against a matching nvcc
ARG BASE=rayproject/ray:2.60.0-py311-cu130
FROM ${BASE}

USER root
# Korean glyphs for drawings rendered at ingest (Hangul notes would otherwise be drawn as boxes)
RUN apt-get update && apt-get install -y --no-install-recommends fonts-nanum && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/indai
COPY pyproject.toml requirements.lock README.md ./
COPY platform ./platform
COPY trainers ./trainers
COPY serving ./serving
RUN python -m pip install --no-cache-dir -c requirements.lock . \
 && chown -R 1000:100 /opt/indai

# the base image's "ray" user (uid 1000); Pod Security "restricted" needs a numeric non-root uid
USER 1000
ENV HF_HUB_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0
CMD ["indai", "--help"]
