# shellcheck shell=bash
# Sourced by the docker_*.sh and container_check.sh scripts: which container engine to call and
# with which flags, so that the same scripts drive Docker or Podman.
#
# CONTAINER_ENGINE   docker or podman (a name on PATH or a path); default: docker when it is on
#                    PATH and its daemon answers (`docker info`), else podman when on PATH,
#                    else docker (whose own error then says what is missing).
# PODMAN_FLAGS       podman's global flags; default "--runtime runc --storage-driver vfs" (what
#                    runs on machines without overlayfs or crun; every call must use the same
#                    storage driver, or the image built is not found by the next call).
# CONTAINER_ULIMITS  ulimits for build and run, space-separated, e.g. "nofile=1024:1024";
#                    default for podman "nofile=1024:1024 nproc=1024:1024" (podman asks for more
#                    than a nested host allows, and the container then fails to start), none for
#                    docker (the daemon's defaults).
#
# Sets: engine (the command, an array), engine_name (docker or podman), limit_args (--ulimit ...).

if [[ -n "${CONTAINER_ENGINE:-}" ]]; then
    engine_cmd="$CONTAINER_ENGINE"
elif command -v docker > /dev/null 2>&1 && docker info > /dev/null 2>&1; then
    engine_cmd=docker
elif command -v podman > /dev/null 2>&1; then
    engine_cmd=podman
else
    engine_cmd=docker
fi
engine_name="$(basename -- "$engine_cmd")"
engine=("$engine_cmd")
limit_args=()
if [[ "$engine_name" == podman* ]]; then
    engine_name=podman
    read -r -a podman_flags <<< "${PODMAN_FLAGS---runtime runc --storage-driver vfs}"
    engine+=(${podman_flags[@]+"${podman_flags[@]}"})
    ulimits="${CONTAINER_ULIMITS-nofile=1024:1024 nproc=1024:1024}"
else
    ulimits="${CONTAINER_ULIMITS:-}"
fi
read -r -a ulimit_list <<< "$ulimits"
for limit in ${ulimit_list[@]+"${ulimit_list[@]}"}; do
    limit_args+=(--ulimit "$limit")
done
unset engine_cmd podman_flags ulimits ulimit_list limit
