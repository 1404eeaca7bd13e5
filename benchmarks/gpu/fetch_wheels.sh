#!/bin/sh
# Download the wheels in benchmarks/gpu/wheels.txt for the GPU machine (CPython 3.12, x86-64
# manylinux) into benchmarks/gpu/wheels/ (git-ignored), where pip reaches PyPI;
# benchmarks/gpu/run_check.sh installs them there.
set -eu
cd "$(dirname "$0")"
PIP=${PIP:-python3 -m pip}
mkdir -p wheels
grep -v '^#' wheels.txt | grep . | xargs $PIP download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d wheels
ls -l wheels
du -sh wheels
