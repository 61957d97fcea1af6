#!/usr/bin/env bash
# DeepGEMM, the Hopper peer of benchmarks/bench_gemm_peers.py: fetch its source here, build it on the GPU machine.
#
#   benchmarks/build_deepgemm.sh fetch DIR    # development machine (network): DeepGEMM 54e2261 with the include/
#                                            # trees of its third-party cutlass (f3fde58) and fmt (553ec11), ~29 MB
#   benchmarks/build_deepgemm.sh build DIR    # GPU machine (no network): prints the folder to put on PYTHONPATH
#
# A DIR/prebuilt/_C*.so (or dg_prebuilt.tgz holding it) from an earlier build on the same machine image skips
# the 90 s compile: the package is then assembled as setup.py's build_py step would.
#
# DIR is git-ignored (never committed). The build uses the system compiler: the image's other g++ crashed
# building DeepGEMM 2.6.1 (benchmarks/NOTES_gpu.md). DeepGEMM JIT-compiles each kernel at its first call
# with the machine's nvcc; DG_JIT_CACHE_DIR keeps those compilations (the bench puts it under DIR).
set -euo pipefail
mode=${1:?usage: build_deepgemm.sh fetch|build DIR}
dir=${2:?usage: build_deepgemm.sh fetch|build DIR}
DG_COMMIT=54e2261
CUTLASS_COMMIT=f3fde58
FMT_COMMIT=553ec11

archive() {   # archive URL_OR_GIT_DIR COMMIT DEST [PATH]: one commit's tree (or one folder of it) into DEST
    local src=$1 commit=$2 dest=$3 path=${4:-}
    if [ ! -d "$src" ]; then
        local tmp; tmp=$(mktemp -d)
        git clone -q --filter=blob:none --no-checkout "$src" "$tmp"
        src=$tmp/.git
    fi
    mkdir -p "$dest"
    git --git-dir="$src" archive "$commit" $path | tar -x -C "$dest"
}

case $mode in
fetch)
    # Sources: git URLs, or local clones given as DG_GIT / CUTLASS_GIT / FMT_GIT (bare or .git folders).
    archive "${DG_GIT:-https://github.com/deepseek-ai/DeepGEMM}" $DG_COMMIT "$dir"
    rm -rf "$dir/third-party/cutlass" "$dir/third-party/fmt"
    archive "${CUTLASS_GIT:-https://github.com/NVIDIA/cutlass}" $CUTLASS_COMMIT "$dir/third-party/cutlass" include
    archive "${FMT_GIT:-https://github.com/fmtlib/fmt}" $FMT_COMMIT "$dir/third-party/fmt" include
    du -sh "$dir"
    ;;
build)
    cd "$dir"
    lib=$(ls -d build/lib.* 2>/dev/null | head -1 || true)
    [ -f prebuilt/dg_prebuilt.tgz ] && ! ls prebuilt/_C*.so >/dev/null 2>&1 && tar xzf prebuilt/dg_prebuilt.tgz -C prebuilt
    if [ -z "$lib" ] && ls prebuilt/_C*.so >/dev/null 2>&1; then
        # a _C*.so built on an earlier machine of the same image (saved by the bench call): setup.py's
        # build_py step done by hand (package, cute/cutlass headers for the JIT, envs.py)
        lib=build/lib.prebuilt
        mkdir -p $lib
        cp -r deep_gemm $lib/
        cp prebuilt/_C*.so $lib/deep_gemm/
        cp -r third-party/cutlass/include/cute third-party/cutlass/include/cutlass $lib/deep_gemm/include/
        echo "persistent_envs = dict()" >$lib/deep_gemm/envs.py
    fi
    if [ -z "$lib" ] || ! ls "$lib"/deep_gemm/_C*.so >/dev/null 2>&1; then
        DG_USE_LOCAL_VERSION=0 CC=/usr/bin/gcc CXX=/usr/bin/g++ python3 setup.py build >build.log 2>&1 \
            || { tail -40 build.log >&2; exit 1; }
        lib=$(ls -d build/lib.* | head -1)
    fi
    echo "$PWD/$lib"
    ;;
*)
    echo "mode: expected fetch or build, got $mode" >&2
    exit 2
    ;;
esac
