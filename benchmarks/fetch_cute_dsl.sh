#!/usr/bin/env bash
# CuTe DSL (nvidia-cutlass-dsl) for the GPU machine, which has no network: run HERE (package registry reachable).
#
#   benchmarks/fetch_cute_dsl.sh      # from the repo root: fills .cdsl1/ and .cdsl2/ (git-ignored, each < 60 MiB)
#
# Downloads the cp312 manylinux x86_64 wheels of nvidia-cutlass-dsl 4.8.1 (CUDA 12 flavour of its libs: the same
# compiler that builds and checks benchmarks/cute_gemm on the CPU machine; it runs under a CUDA 13 driver) and its
# dependencies, none of which torch brings. The 92 MB libs wheel is split in two with `split -b` so each folder
# fits one device call's 64 MiB of carried files. benchmarks/install_cute_dsl.sh puts them back together there.
set -euo pipefail
VERSION=4.8.1
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$tmp" \
    nvidia-cutlass-dsl==$VERSION nvidia-cutlass-dsl-libs-base==$VERSION nvidia-cutlass-dsl-libs-core==$VERSION \
    nvidia-cutlass-dsl-libs-cu12==$VERSION "cuda-bindings>=12.8,<14" cuda-pathfinder "protobuf>=4.21.12" \
    "typing-extensions>=4.10.0" 2>&1 | grep -v "is ignored" || true
big=$(ls "$tmp"/nvidia_cutlass_dsl_libs_cu12-*.whl)
rm -rf .cdsl1 .cdsl2
mkdir -p .cdsl1 .cdsl2
(cd "$tmp" && sha256sum "$(basename "$big")") >.cdsl1/WHEEL.sha256   # checked after reassembly
split -b 55M -d "$big" ".cdsl1/$(basename "$big").part"
[ ! -e ".cdsl1/$(basename "$big").part02" ] || { echo "error: $big split in more than 2 parts" >&2; exit 1; }
mv .cdsl1/*.part01 .cdsl2/
rm "$big"
mv "$tmp"/*.whl .cdsl2/
for d in .cdsl1 .cdsl2; do
    size=$(du -sm "$d" | cut -f1)
    [ "$size" -lt 60 ] || { echo "error: $d is $size MiB, over the 60 MiB a device call carries" >&2; exit 1; }
    echo "$d: $size MiB: $(ls "$d" | tr '\n' ' ')"
done
