#!/usr/bin/env bash
# Run a built image for real, as the organisers do, on the bundled samples and on a folder of
# bad inputs, and check what comes out. Each run is scripts/docker_test.sh: no network, /input
# read-only, /output writable, an empty volume on /tmp, the image's non-root user.
#
# usage: scripts/container_check.sh [IMAGE]   (default IMAGE: fusecare:cpu)
#   1. samples/input: the container exits 0, every case has a uint16 output of its input's shape.
#   2. bad inputs: a zero-byte .tif, a truncated .tif, a 2-D .tif and one good sample. The container
#      exits 1 (README: a case could not be read), logs one `FAILED <file>` line per bad file,
#      writes no output for them, and the good sample still gets its output.
# Prints PASS or FAIL per check and the seconds each run took; exit 0 when both pass.
# Environment: as scripts/docker_test.sh (CONTAINER_ENGINE, PODMAN_FLAGS, CONTAINER_ULIMITS,
#   DOCKER_MEMORY); DOCKER_GPUS defaults to none here (a CPU image).
# Build the CPU image first (no Docker Hub needed): scripts/make_cpu_base.sh, then
#   WHEELS=1 scripts/docker_build.sh fusecare:cpu --build-arg BASE_IMAGE=fusecare-base:cpu \
#       --build-arg TORCH=cpu
set -euo pipefail

usage() {
    echo "usage: $0 [IMAGE]   (default IMAGE: fusecare:cpu)"
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=container_engine.sh
source scripts/container_engine.sh
image="${1:-fusecare:cpu}"
export DOCKER_GPUS="${DOCKER_GPUS-}"

if ! "${engine[@]}" image inspect "$image" > /dev/null 2>&1; then
    echo "error: image $image not found ($engine_name); build it first (see $0's header)" >&2
    exit 2
fi

work="$(mktemp -d)"
# shellcheck disable=SC2317,SC2329 # reached through the EXIT trap
cleanup() {
    "${engine[@]}" run --rm ${limit_args[@]+"${limit_args[@]}"} --network none --entrypoint chmod \
        -v "$work/bad:/bad" "$image" -R a+rwX /bad > /dev/null 2>&1 || true
    rm -rf -- "$work"
}
trap cleanup EXIT
failures=0

check() {  # check NAME CONDITION-STATUS MESSAGE
    if [[ "$2" == 0 ]]; then
        echo "PASS  $1: $3"
    else
        echo "FAIL  $1: $3"
        failures=$((failures + 1))
    fi
}

contains() {  # contains FILE FIXED-STRING: 0 when FILE holds the line fragment
    grep -qF -- "$2" "$1" && echo 0 || echo 1
}

# ---- 1. the bundled samples
start=$SECONDS
status=0
scripts/docker_test.sh "$image" samples/input 2>&1 | tee "$work/samples.log" || status=$?
shopt -s nullglob
samples=(samples/input/*.tif samples/input/*.tiff)
ok_lines="$(grep -c '^OK ' "$work/samples.log" || true)"
check samples "$( ((status == 0 && ok_lines == ${#samples[@]})) && echo 0 || echo 1)" \
    "exit $status, ${ok_lines}/${#samples[@]} outputs uint16 of the input's shape, $((SECONDS - start)) s"

# ---- 2. bad inputs beside a good one
bad="$work/bad"
mkdir -p "$bad"
chmod 0777 "$bad"
cp samples/input/sample_membrane.tif "$bad/good.tif"
: > "$bad/empty.tif"
head -c 300 samples/input/sample_nucleus.tif > "$bad/truncated.tif"
"${engine[@]}" run --rm ${limit_args[@]+"${limit_args[@]}"} --network none --entrypoint python \
    -v "$bad:/bad" "$image" -c \
    "import numpy, tifffile; tifffile.imwrite('/bad/flat_2d.tif', numpy.zeros((32, 32), numpy.uint16))"
start=$SECONDS
status=0
scripts/docker_test.sh "$image" "$bad" 2>&1 | tee "$work/bad.log" || status=$?
log="$work/bad.log"
check bad-exit "$(contains "$log" "container exited with status 1 ")" \
    "the container exits 1 (a case could not be read), $((SECONDS - start)) s"
for name in empty.tif truncated.tif flat_2d.tif; do
    count="$(grep -c "FAILED $name: " "$log" || true)"
    check "bad-$name" "$( ((count == 1)) && echo 0 || echo 1)" "$count FAILED line(s)"
    check "bad-$name" "$(contains "$log" "MISSING  $name")" "no output written"
done
check bad-good "$(contains "$log" "OK       good.tif: input (32, 64, 56), output (32, 64, 56) uint16")" \
    "the good case beside them still restored"
check bad-traceback "$(grep -q Traceback "$log" && echo 1 || echo 0)" "no traceback"
check bad-summary "$(contains "$log" "done: 1 restored, 0 written back unchanged (fallback), 3 failed")" \
    "the run's summary counts 3 failed"

if ((failures)); then
    echo "FAIL: $failures check(s) failed"
    exit 1
fi
echo "PASS: the image runs the samples and survives bad inputs"
