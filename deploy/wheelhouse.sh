#!/bin/sh
# Fill deploy/wheelhouse/ with every wheel the CPU image installs, on a machine with network
# access; the image then builds with no network at all (deploy/Containerfile installs with
# --no-index from this folder, hash-checked against deploy/requirements-cpu.lock):
#   deploy/wheelhouse.sh [PYTHON]        then: podman build -f deploy/Containerfile -t nanoscout:cpu .
# Carry the repository (with deploy/wheelhouse/) to an offline build host as it is.
set -eu
cd "$(dirname "$0")/.."
PY=${1:-python3}
OUT=deploy/wheelhouse
mkdir -p "$OUT"
# the pinned dependencies, as binary wheels for the image's platform, hashes checked
"$PY" -m pip download --require-hashes --no-deps --only-binary=:all: \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform linux_x86_64 --python-version 3.11 \
    --implementation cp -r deploy/requirements-cpu.lock -d "$OUT"
# nanoscout itself (shipped weights and model cards inside the wheel)
"$PY" -m pip wheel --no-deps -w "$OUT" .
cp deploy/requirements-cpu.lock "$OUT/"
echo "wheelhouse: $(ls "$OUT" | wc -l) files in $OUT"
