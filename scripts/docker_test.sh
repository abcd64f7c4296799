#!/usr/bin/env bash
# Run the image the way the organisers test a submission, then check its outputs.
#
# usage: scripts/docker_test.sh [IMAGE] [SAMPLES_DIR]
#   IMAGE defaults to fusecare:latest (built with scripts/docker_build.sh if missing);
#   SAMPLES_DIR defaults to samples/input (its *.tif/*.tiff become the input cases).
# Environment: DOCKER_GPUS (default "all"; empty: no --gpus, for machines without a GPU),
#   DOCKER_MEMORY (default 15g, the challenge's machine less its reserve),
#   KEEP=1 to keep the temporary in/out folders for inspection;
#   CONTAINER_ENGINE, PODMAN_FLAGS, CONTAINER_ULIMITS (scripts/container_engine.sh: docker or
#   podman, with podman's flags for machines like ours).
# The run: no network, /input read-only, /output writable, an empty volume on /tmp, the image's
#   non-root user. Exit status: the container's (0 every case written, 1 a case unreadable),
#   or 1 when the check of the outputs finds one missing or wrong.
set -euo pipefail

usage() {
    echo "usage: $0 [IMAGE] [SAMPLES_DIR]   (defaults: fusecare:latest samples/input)"
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    usage
    exit 0
fi

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=container_engine.sh
source scripts/container_engine.sh
image="${1:-fusecare:latest}"
samples="${2:-samples/input}"
gpus="${DOCKER_GPUS-all}"
memory="${DOCKER_MEMORY:-15g}"

shopt -s nullglob
inputs=("$samples"/*.tif "$samples"/*.tiff)
if ((${#inputs[@]} == 0)); then
    echo "error: no .tif/.tiff in $samples" >&2
    usage >&2
    exit 2
fi

if ! "${engine[@]}" image inspect "$image" > /dev/null 2>&1; then
    scripts/docker_build.sh "$image"
fi

work="$(mktemp -d)"
in_dir="$work/in/images/fluorescence-lightsheet-3D-microscopy"
out_dir="$work/out"
tmp_dir="$work/tmp"
mkdir -p "$in_dir" "$out_dir" "$tmp_dir"
cp -- "${inputs[@]}" "$in_dir/"
chmod -R a+rX "$work/in"
chmod 0777 "$out_dir"  # the container's user (uid 1001) writes here
chmod 1777 "$tmp_dir"  # its scratch volume on /tmp

# shellcheck disable=SC2317,SC2329 # reached through the EXIT trap
cleanup() {
    # Outputs belong to the container's user: make them removable by us before removing.
    "${engine[@]}" run --rm ${limit_args[@]+"${limit_args[@]}"} --network none --entrypoint chmod \
        -v "$out_dir:/output" -v "$tmp_dir:/tmp" "$image" -R a+rwX /output /tmp > /dev/null 2>&1 || true
    if [[ "${KEEP:-0}" == "1" ]]; then
        echo "kept $work"
    else
        rm -rf -- "$work"
    fi
}
trap cleanup EXIT

gpu_args=()
if [[ -n "$gpus" ]]; then
    gpu_args=(--gpus "$gpus")
fi

echo "running $image with $engine_name on ${#inputs[@]} case(s) from $samples"
start=$SECONDS
status=0
"${engine[@]}" run --rm ${gpu_args[@]+"${gpu_args[@]}"} ${limit_args[@]+"${limit_args[@]}"} \
    --network none --shm-size 2g --memory "$memory" \
    -v "$work/in:/input:ro" -v "$out_dir:/output" -v "$tmp_dir:/tmp" "$image" || status=$?
echo "container exited with status $status after $((SECONDS - start)) s"

read -r -d '' check << 'PY' || true
import sys
from pathlib import Path

import tifffile

inputs = Path("/input/images/fluorescence-lightsheet-3D-microscopy")
outputs = Path("/output/images/fused-fluorescence-lightsheet-3D-microscopy")
bad = 0
for source in sorted(p for p in inputs.iterdir() if p.suffix.lower() in (".tif", ".tiff")):
    target = outputs / source.name
    if not target.is_file():
        print(f"MISSING  {source.name}")
        bad += 1
        continue
    with tifffile.TiffFile(source) as a, tifffile.TiffFile(target) as b:
        shape_in = tuple(n for n in a.series[0].shape if n != 1)
        shape_out, dtype = b.series[0].shape, b.series[0].dtype
    ok = shape_out == shape_in and str(dtype) == "uint16"
    bad += not ok
    print(f"{'OK' if ok else 'WRONG':8} {source.name}: input {shape_in}, output {shape_out} {dtype}")
print(f"{'PASS' if not bad else 'FAIL'}: {bad} problem(s)")
sys.exit(1 if bad else 0)
PY

"${engine[@]}" run --rm ${limit_args[@]+"${limit_args[@]}"} --network none --entrypoint python \
    -v "$work/in:/input:ro" -v "$out_dir:/output:ro" "$image" -c "$check" || status=1
exit "$status"
