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
# TORCH=cuda12 (the default) demands that torch of the base and keeps it. TORCH=cpu is for a base
# without torch (a plain Python 3.11 with `python` and `pip` on PATH, such as the one
# scripts/make_cpu_base.sh builds where Docker Hub cannot be reached): it installs
# requirements-image.txt's torch pin, CPU build, and fails unless that is what it got.
ARG BASE_IMAGE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}
ARG TORCH=cuda12

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore

# requirements-image.txt: inference.py's run-time imports only (no training, scoring, reports or
# model-zoo export: about 0.9 GB less), each line as in requirements.txt. Its torch pin is for
# development machines and the CPU image; installing it over the CUDA base would replace the
# image's CUDA 12 torch with another build (gigabytes, possibly a CUDA the driver lacks). So the
# torch line is dropped, and torch is held with a constraints file: the base's own under
# TORCH=cuda12 (a package asking for another torch fails the build instead of swapping it), the
# pin, asked for explicitly, under TORCH=cpu. torch before 2.3 was built against numpy 1 and cannot
# use numpy 2 ("Numpy is not available"), which new imagecodecs wheels would pull in: on such a base
# numpy stays below 2, and a smoke check after the install proves torch and numpy work together.
# wheels/ (bound for this step only, never a layer): when it holds wheels, pip installs from there
# and nowhere else (--no-index); scripts/docker_build.sh fills it (WHEELS=1) with `pip download`
# on the host, for builds without PyPI and for torch's CPU wheel, which PyPI does not serve.
COPY requirements-image.txt /tmp/requirements-image.txt
# index and torch_arg below are zero or more words, unquoted on purpose
# hadolint ignore=SC2086
RUN --mount=type=bind,source=wheels,target=/tmp/wheels \
    set -eux; \
    case "${TORCH}" in \
      cuda12) \
        python -c "import sys, torch; cuda = torch.version.cuda or 'none'; \
ok = torch.__version__.startswith('2.') and cuda.startswith('12.'); \
sys.exit(0 if ok else f'base image must ship torch 2.x for CUDA 12, has {torch.__version__} (CUDA {cuda})')"; \
        python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > /tmp/constraints.txt; \
        python -c "import torch; v = tuple(int(p) for p in torch.__version__.split('+')[0].split('.')[:2]); \
print('numpy<2' if v < (2, 3) else '')" >> /tmp/constraints.txt; \
        torch_arg="" ;; \
      cpu) \
        grep -E '^torch==' /tmp/requirements-image.txt > /tmp/constraints.txt; \
        torch_arg="$(cat /tmp/constraints.txt)" ;; \
      *) echo "TORCH must be cuda12 or cpu, not '${TORCH}'" >&2; exit 2 ;; \
    esac; \
    grep -vE '^[[:space:]]*torch[[:space:]]*([=<>!~;[]|$)' /tmp/requirements-image.txt > /tmp/requirements-no-torch.txt; \
    index=""; \
    if ls /tmp/wheels/*.whl > /dev/null 2>&1; then index="--no-index --find-links /tmp/wheels"; fi; \
    pip install --no-cache-dir ${index} -c /tmp/constraints.txt -r /tmp/requirements-no-torch.txt ${torch_arg}; \
    python -c "import sys, torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda); \
want = open('/tmp/constraints.txt').readline().split('==')[1].strip(); \
ok = torch.__version__.split('+')[0] == want and (sys.argv[1] != 'cpu' or torch.version.cuda is None); \
sys.exit(0 if ok else f'wanted torch {want} ({sys.argv[1]}), got {torch.__version__} CUDA {torch.version.cuda}')" "${TORCH}"; \
    python -c "import numpy, torch; torch.from_numpy(numpy.zeros(1))"; \
    rm -f /tmp/requirements-image.txt /tmp/requirements-no-torch.txt /tmp/constraints.txt

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
