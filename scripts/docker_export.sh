#!/usr/bin/env bash
# Export the image for upload to Grand Challenge: docker save IMAGE | gzip -c > FILE.
#
# usage: scripts/docker_export.sh [IMAGE] [FILE]
#   IMAGE defaults to fusecare:latest; FILE to IMAGE with ':' and '/' replaced by '-',
#   plus .tar.gz (fusecare-latest.tar.gz). Written under a temporary name and renamed at
#   the end, so a failed export never leaves a truncated archive behind.
# Environment: CONTAINER_ENGINE, PODMAN_FLAGS (scripts/container_engine.sh). Podman writes a
#   docker-archive (the format `docker load` and Grand Challenge read).
set -euo pipefail

usage() {
    echo "usage: $0 [IMAGE] [FILE]   (default IMAGE: fusecare:latest, FILE: IMAGE.tar.gz)"
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

image="${1:-fusecare:latest}"
name="${image//[:\/]/-}"
file="${2:-${name}.tar.gz}"

# shellcheck source=container_engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/container_engine.sh"
save_args=()
if [[ "$engine_name" == podman ]]; then
    save_args=(--format docker-archive)
fi

if ! "${engine[@]}" image inspect "$image" > /dev/null 2>&1; then
    echo "error: image $image not found; build it with scripts/docker_build.sh $image" >&2
    exit 1
fi

partial="${file}.partial"
trap 'rm -f "$partial"' EXIT
"${engine[@]}" save ${save_args[@]+"${save_args[@]}"} "$image" | gzip -c > "$partial"
mv "$partial" "$file"
trap - EXIT
echo "wrote $file ($(du -h "$file" | cut -f1))"
