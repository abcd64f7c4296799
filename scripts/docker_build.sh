#!/usr/bin/env bash
# Build the submission image from the repository root.
#
# usage: scripts/docker_build.sh [TAG] [docker build options...]
#   TAG defaults to fusecare:latest. Refuses to build an image without weights (every case
#   would fall back to the input) unless ALLOW_NO_WEIGHTS=1.
# Environment: CONTAINER_ENGINE, PODMAN_FLAGS, CONTAINER_ULIMITS (scripts/container_engine.sh);
#   CONTAINER_BUILD_NETWORK (e.g. none: passed as --network to the build);
#   WHEELS=1 fills wheels/ first with `pip download -r requirements-image.txt` run by
#   ${PYTHON:-python3} (same Python version and platform as the image's: 3.11, x86_64), so that
#   the image's pip installs from there with --no-index: for builds without PyPI, and for a CPU
#   base, whose torch CPU wheel PyPI does not serve (pip must find it in a --find-links folder).
# A CPU image (no CUDA base at hand):
#   WHEELS=1 scripts/docker_build.sh fusecare:cpu --build-arg BASE_IMAGE=fusecare-base:cpu \
#       --build-arg TORCH=cpu        (the base: scripts/make_cpu_base.sh)
set -euo pipefail

usage() {
    echo "usage: $0 [TAG] [docker build options...]   (default TAG: fusecare:latest)"
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

tag="${1:-fusecare:latest}"
if (($# > 0)); then
    shift
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."

shopt -s nullglob
manifests=(model_weights/*/manifest.json)
if ((${#manifests[@]} == 0)); then
    if [[ "${ALLOW_NO_WEIGHTS:-0}" != "1" ]]; then
        echo "error: no model_weights/<channel>/manifest.json: the image would only copy its inputs." >&2
        echo "       Train or copy weights first, or set ALLOW_NO_WEIGHTS=1 to build anyway." >&2
        exit 1
    fi
    echo "warning: building without weights (ALLOW_NO_WEIGHTS=1): every case falls back to its input" >&2
    mkdir -p model_weights
fi

# shellcheck source=container_engine.sh
source scripts/container_engine.sh

if [[ "${WHEELS:-0}" == "1" ]]; then
    echo "filling wheels/ from requirements-image.txt"
    "${PYTHON:-python3}" -m pip download --only-binary :all: --dest wheels -r requirements-image.txt
fi

build_args=(${limit_args[@]+"${limit_args[@]}"})
if [[ -n "${CONTAINER_BUILD_NETWORK:-}" ]]; then
    build_args+=(--network "$CONTAINER_BUILD_NETWORK")
fi

echo "building $tag with $engine_name (weights: ${manifests[*]:-none})"
"${engine[@]}" build ${build_args[@]+"${build_args[@]}"} --tag "$tag" "$@" .
"${engine[@]}" image inspect --format '{{.Id}} {{.Size}} bytes' "$tag"
