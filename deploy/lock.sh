#!/bin/sh
# Re-pin the CPU image's dependencies (every package, exact version, sha256 of every file) for
# the image's platform: Python 3.11, Linux x86_64 (manylinux 2.28). Run after changing the
# dependencies in pyproject.toml, commit the lock, rebuild the wheelhouse.
#   deploy/lock.sh            (needs uv: pip install uv)
set -eu
cd "$(dirname "$0")/.."
uv pip compile pyproject.toml --extra cpu --generate-hashes --python-version 3.11 \
    --python-platform x86_64-manylinux_2_28 --no-header --custom-compile-command "deploy/lock.sh" \
    -o deploy/requirements-cpu.lock
