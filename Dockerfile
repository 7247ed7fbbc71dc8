# ourvidz-serve on Ray's GPU image. Weights are mounted at /models, never baked in; no secret
# is set here (pass them at run time, or from the Kubernetes Secret on KubeRay).
#
#   docker build -t ourvidz-serve:0.1.0 .
#   docker run --gpus all --shm-size=16g -p 8000:8000 -v /srv/models:/models:ro \
#     -e OURVIDZ_API_KEYS=... -e OURVIDZ_DATABASE_URL=... ourvidz-serve:0.1.0
#
# CUDA picks both the Ray base image and the PyTorch wheel index, so they always agree. torch
# 2.13.0 is built for cu126, cu129, cu130 and cu132, and Ray publishes -cu126, -cu129 and
# -cu130 images: cu130 (PyTorch's stable CUDA for 2.13, NVIDIA driver >= 580) by default,
# `--build-arg CUDA=cu126` for hosts with an older driver. Not `-gpu`: that alias is CUDA 12.1.
ARG RAY_VERSION=2.60.0
ARG CUDA=cu130

# The package as a wheel, built from its sources and its SQL (schemas/migrations and
# schemas/queries are package data, see pyproject.toml): the image gets the wheel alone, not
# the source tree. The same base as the image (already pulled, the same Python and pip); pip
# fetches the build backend (setuptools) for this stage only. As the `ray` user, in a folder
# it owns: pip builds in the source folder.
FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA} AS wheel
USER 1000:100
RUN mkdir -p /home/ray/build
WORKDIR /home/ray/build
COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 schemas/ schemas/
COPY --chown=1000:100 ourvidz_serve/ ourvidz_serve/
RUN pip wheel --no-cache-dir --no-deps --disable-pip-version-check --wheel-dir /home/ray/dist .

FROM rayproject/ray:${RAY_VERSION}-py311-${CUDA}

ARG RAY_VERSION
ARG CUDA
# The same torch as the Makefile's TORCH_SPEC (tests/test_container.py checks it), CUDA build.
ARG TORCH_VERSION=2.13.0

LABEL org.opencontainers.image.title="ourvidz-serve" \
      org.opencontainers.image.description="Ray Serve application for OurVidz image and video generation (SDXL, WAN 2.1, Qwen2.5)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.base.name="docker.io/rayproject/ray:${RAY_VERSION}-py311-${CUDA}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# /models: the read-only mount point of the weights. /home/ray/data: the embedded PostgreSQL
# and local storage when OURVIDZ_DATABASE_URL / OURVIDZ_STORAGE_BACKEND=s3 are not set.
# Numeric ids: the image's `ray` user (1000, group users 100), so that Kubernetes'
# runAsNonRoot can verify it.
USER 0
RUN mkdir -p /models /home/ray/app /home/ray/data \
    && chown 1000:100 /home/ray/app /home/ray/data
USER 1000:100
WORKDIR /home/ray/app

# Every later pip call (here and in images built FROM this one) keeps this CUDA build of torch.
ENV PIP_CONSTRAINT=/home/ray/constraints.txt \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# 1. torch from PyTorch's CUDA index (its CUDA libraries come as wheels; PyPI for the rest).
RUN echo "torch==${TORCH_VERSION}+${CUDA}" > /home/ray/constraints.txt \
    && pip install --no-cache-dir \
        --index-url "https://download.pytorch.org/whl/${CUDA}" \
        --extra-index-url https://pypi.org/simple \
        "torch==${TORCH_VERSION}+${CUDA}"

# 2. The package's dependencies, read from pyproject.toml alone: this layer is rebuilt only
#    when they change, not on every source edit.
COPY --chown=1000:100 pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir --requirement /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. The package: the wheel of the `wheel` stage (the SQL inside it), not an editable install
#    of the source tree, which the image does not hold. Every dependency is already there
#    (--no-deps), so nothing is downloaded and torch stays. The Serve configs go to the
#    working directory, where the default command reads them. The checks: the CUDA torch, and
#    the SQL found as package data from outside any source tree.
COPY --chown=1000:100 serve_config.yaml ./
COPY --chown=1000:100 deployments/ deployments/
COPY --from=wheel --chown=1000:100 /home/ray/dist/ourvidz_serve-*.whl /tmp/
RUN pip install --no-cache-dir --no-deps /tmp/ourvidz_serve-*.whl \
    && rm /tmp/ourvidz_serve-*.whl \
    && python -c "import torch; assert torch.__version__ == '${TORCH_VERSION}+${CUDA}', torch.__version__" \
    && python -c "from ourvidz_serve.persistence import migrations, queries; assert migrations.load_migrations() and queries.load_queries()"

# The `weights` profile by default: with no OURVIDZ_API_KEYS or a missing checkpoint the
# service refuses to start (no development key, no silent noise). The tiny profile runs with
# `-e OURVIDZ_MODEL_PROFILE=tiny` (README, "Container image"). Paths match
# k8s/secrets.example.yaml; mount the weights read-only at /models or override these.
ENV OURVIDZ_MODEL_PROFILE=weights \
    OURVIDZ_SDXL_CHECKPOINT=/models/sdxl-lustify/lustifySDXLNSFWSFW_v20.safetensors \
    OURVIDZ_WAN_MODEL_DIR=/models/wan2.1-t2v-1.3b-diffusers \
    OURVIDZ_QWEN_MODEL_DIR=/models/qwen2.5-7b-instruct \
    OURVIDZ_DATA_DIR=/home/ray/data \
    HF_HUB_OFFLINE=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    RAY_SERVE_DEFAULT_HTTP_HOST=0.0.0.0 \
    PYTHONUNBUFFERED=1
VOLUME ["/models"]

# Serve HTTP, Ray dashboard (no authentication: publish it on a trusted network only), Ray
# metrics export (the port KubeRay passes as --metrics-export-port and scrapes).
EXPOSE 8000 8265 8080

# Liveness of the HTTP ingress (no credential needed). Loading the real weights takes minutes,
# hence the long start period. Docker only: Kubernetes ignores HEALTHCHECK (KubeRay probes Ray).
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"]

# `serve run` shuts Serve down cleanly on SIGINT (replicas finish or release their jobs within
# graceful_shutdown_timeout_s); give `docker stop` time for it (--stop-timeout 60).
STOPSIGNAL SIGINT

# A single-node Ray with the dashboard and the metrics on the exposed ports, then the one-GPU
# config (the same one the KubeRay RayService serves). On KubeRay the operator replaces this
# command with its own `ray start`.
CMD ["bash", "-c", "ray start --head --dashboard-host=0.0.0.0 --metrics-export-port=8080 && exec serve run deployments/ada-48gb.yaml"]
