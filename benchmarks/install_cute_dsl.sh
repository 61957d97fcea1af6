#!/usr/bin/env bash
# Installs the CuTe DSL that benchmarks/fetch_cute_dsl.sh put in .cdsl1/ and .cdsl2/: run THERE (GPU machine,
# Python 3.12, no network) from the repo root, with both folders carried into the tree.
#
#   export PYTHONPATH=$(benchmarks/install_cute_dsl.sh [DIR])$PWD   # DIR defaults to .cdsl/ (git-ignored)
#
# Reassembles the split libs wheel, checks its sha256, `pip install --no-index --no-deps --target DIR` all the
# wheels (skipped when DIR already holds this version: a warm machine keeps ignored folders), and prints the
# PYTHONPATH prefix to use, ending in ':'. Two entries: DIR itself and the DSL's dsl_packages folder, which the
# wheel adds through a .pth file that Python reads only in site directories, never on PYTHONPATH.
set -euo pipefail
dir=$(realpath -m "${1:-.cdsl}")
[ -d .cdsl1 ] && [ -d .cdsl2 ] || { echo "error: .cdsl1/ and .cdsl2/ missing (run benchmarks/fetch_cute_dsl.sh on a machine with network, carry both)" >&2; exit 1; }
if [ ! -f "$dir/.installed" ]; then
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    whl=$(basename "$(ls .cdsl1/*.part00)" .part00)
    cat .cdsl1/"$whl".part00 .cdsl2/"$whl".part01 >"$tmp/$whl"
    (cd "$tmp" && sha256sum -c --quiet "$OLDPWD/.cdsl1/WHEEL.sha256") >&2
    cp .cdsl2/*.whl "$tmp/"
    if python3 -m pip --version >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$dir" "$tmp"/*.whl >&2
    else        # no pip: a wheel is a zip of its files laid out as --target would lay them
        for w in "$tmp"/*.whl; do python3 -m zipfile -e "$w" "$dir"; done
    fi
    touch "$dir/.installed"
fi
echo "$dir:$dir/nvidia_cutlass_dsl/dsl_packages:"
