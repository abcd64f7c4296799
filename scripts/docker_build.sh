#!/usr/bin/env bash
# Build the submission image from the repository root.
#
# usage: scripts/docker_build.sh [TAG] [docker build options...]
#   TAG defaults to fusecare:latest. Refuses to build an image without weights (every case
#   would fall back to the input) unless ALLOW_NO_WEIGHTS=1.
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

echo "building $tag (weights: ${manifests[*]:-none})"
docker build --tag "$tag" "$@" .
docker image inspect --format '{{.Id}} {{.Size}} bytes' "$tag"
