# Fuse My Cells submission: restore single-view 3-D lightsheet volumes with the CARE ensemble.
#
# Contract (shared/docs/fmc_contract.md): no network at run time, /input read-only, /output
# writable, non-root user, WORKDIR /opt/app, weights inside the image,
# ENTRYPOINT python inference.py (no arguments: the Grand Challenge folders).
#
# Build:  scripts/docker_build.sh [TAG]      Test: scripts/docker_test.sh [TAG]
# Export: scripts/docker_export.sh [TAG]
#
# Base: the official PyTorch *runtime* image (torch 2.x built for CUDA 12, cuDNN 9, Python 3.11).
# Its CUDA 12 build runs on the challenge's T4 (sm_75); override with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# Requirements WITHOUT torch. requirements.txt pins torch==2.13.0 for development machines,
# where PyPI serves a CPU or default-CUDA wheel; installing that pin here would replace the
# image's CUDA 12 torch with another build (gigabytes, possibly a CUDA the driver lacks).
# So: drop the torch line, and hold the image's own torch with a constraints file, so that a
# package asking for another torch fails the build instead of silently swapping it.
COPY requirements.txt /tmp/requirements.txt
RUN set -eux; \
    python -c "import sys, torch; cuda = torch.version.cuda or 'none'; \
ok = torch.__version__.startswith('2.') and cuda.startswith('12.'); \
sys.exit(0 if ok else f'base image must ship torch 2.x for CUDA 12, has {torch.__version__} (CUDA {cuda})')"; \
    python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/constraints.txt; \
    grep -vE '^[[:space:]]*torch[[:space:]]*([=<>!~;[]|$)' /tmp/requirements.txt > /tmp/requirements-no-torch.txt; \
    pip install --no-cache-dir -c /tmp/constraints.txt -r /tmp/requirements-no-torch.txt; \
    python -c "import torch; print('kept torch', torch.__version__, 'CUDA', torch.version.cuda)"; \
    rm -f /tmp/requirements.txt /tmp/requirements-no-torch.txt /tmp/constraints.txt

# A non-root user (uid 1001), as Grand Challenge's template runs containers.
RUN useradd --create-home --uid 1001 --user-group user

WORKDIR /opt/app
COPY fusecare/ /opt/app/fusecare/
COPY inference.py /opt/app/inference.py
COPY model_weights/ /opt/app/model_weights/
RUN chmod -R a+rX /opt/app

# hadolint ignore=DL3066
USER user
ENV FUSECARE_WEIGHTS=/opt/app/model_weights \
    HOME=/home/user

# Fail the build, not the submission, if the code cannot even be imported.
RUN python inference.py --help > /dev/null

ENTRYPOINT ["python", "inference.py"]
