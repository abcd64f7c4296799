#!/usr/bin/env bash
# Build a CPU base image locally, for machines that cannot pull from Docker Hub: debootstrap
# Debian (bookworm: Python 3.11, the Python of the official PyTorch image), a virtual environment
# in /opt/venv first on PATH (so `python` and `pip` are there, as in the PyTorch image, and pip
# may install: Debian's own Python is "externally managed"), then import the folder as an image.
#
# usage: scripts/make_cpu_base.sh [TAG]   (default TAG: fusecare-base:cpu; run as root)
# Environment: DEBIAN_SUITE (bookworm), DEBIAN_MIRROR (http://deb.debian.org/debian),
#   CONTAINER_ENGINE, PODMAN_FLAGS (scripts/container_engine.sh).
# Then: WHEELS=1 scripts/docker_build.sh fusecare:cpu --build-arg BASE_IMAGE=fusecare-base:cpu \
#           --build-arg TORCH=cpu
set -euo pipefail

usage() {
    echo "usage: $0 [TAG]   (default TAG: fusecare-base:cpu)"
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

tag="${1:-fusecare-base:cpu}"
suite="${DEBIAN_SUITE:-bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

# shellcheck source=container_engine.sh
source "$(dirname "${BASH_SOURCE[0]}")/container_engine.sh"

if ! command -v debootstrap > /dev/null 2>&1; then
    echo "error: debootstrap not found (apt-get install debootstrap)" >&2
    exit 1
fi

work="$(mktemp -d)"
trap 'rm -rf -- "$work"' EXIT
rootfs="$work/rootfs"

debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    "$suite" "$rootfs" "$mirror"
chroot "$rootfs" /usr/bin/python3 -m venv /opt/venv
chroot "$rootfs" /opt/venv/bin/python -c "import sys; print('base Python', sys.version.split()[0])"
rm -rf "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/lib/apt/lists/* "${rootfs:?}"/tmp/*

tar --numeric-owner -C "$rootfs" -c . | "${engine[@]}" import \
    --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python"]' \
    - "$tag"
"${engine[@]}" image inspect --format '{{.Id}} {{.Size}} bytes' "$tag"
