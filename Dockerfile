# fedmic-pipeline: the Kedro pipeline in a CUDA container (see docs/container.md).
#
#   docker build -t fedmic-pipeline .
#   docker run --rm --gpus all fedmic-pipeline              # kedro run on the GPU
#   docker run --rm fedmic-pipeline                         # the same on the CPU
#   docker compose up --build                               # + an MLflow tracking server
#
# Base: NVIDIA's CUDA 13.0 runtime on Ubuntu 22.04, pinned by tag. torch==2.14.1 in
# requirements.lock is the cu130 build and brings its own CUDA 13.0 user-space libraries
# as pip packages (nvidia-*-cu13); the host needs an NVIDIA driver for CUDA 13 (R580+)
# and the NVIDIA Container Toolkit. Python 3.11 (pyproject: >=3.11,<3.12) comes from
# Ubuntu 22.04's own python3.11 packages.
FROM nvidia/cuda:13.0.2-runtime-ubuntu22.04

ARG APP_USER=fedmic
ARG APP_UID=1000
ARG PIP_VERSION=25.3

# Telemetry of every tool in the stack off (as the Makefile does), quiet non-interactive
# Python, matplotlib without a display, GitPython silent without a git binary (the image
# has no .git; the lineage tags then read "unknown").
ENV KEDRO_DISABLE_TELEMETRY=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    DO_NOT_TRACK=1 \
    MPLBACKEND=Agg \
    GIT_PYTHON_REFRESH=quiet \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install "pip==${PIP_VERSION}"

WORKDIR /app

# The locked dependencies first: this layer (~6.5 GB, torch + CUDA libraries) is rebuilt
# only when the lock changes, not on every source edit.
COPY requirements.lock ./
RUN python -m pip install --no-deps -r requirements.lock

# The project itself, installed like the Makefile does (editable, no dependency resolution).
COPY pyproject.toml dvc.yaml dvc.lock ./
COPY conf/ conf/
COPY src/ src/
COPY data/01_raw/ data/01_raw/
RUN python -m pip install --no-deps --no-build-isolation -e . \
    && python -c "import fedmic_pipeline, torch; print('fedmic_pipeline OK, torch', torch.__version__, 'CUDA', torch.version.cuda)"

# A non-root user owns only what a run writes: the data outputs, logs, the project root
# (a local sqlite:///mlflow.db when no tracking server is set) and the MLflow server's
# volume mount points (named volumes take their owner from these directories).
RUN useradd --create-home --uid "${APP_UID}" --shell /bin/bash "${APP_USER}" \
    && mkdir -p data/02_intermediate data/03_primary data/04_feature data/05_model_input \
                data/06_models data/07_model_output data/08_reporting logs conf/local \
                /mlflow/db /mlflow/artifacts \
    && chown "${APP_USER}:${APP_USER}" /app \
    && chown -R "${APP_USER}:${APP_USER}" data logs conf/local /mlflow

USER ${APP_USER}

# `device: auto` (conf/base/parameters_federated_training.yml) picks CUDA when the
# container is started with --gpus all, else the CPU.
CMD ["kedro", "run"]
