#!/usr/bin/env bash
# Every GPU measurement and the GPU tests in one call of the GPU machine (issues 10 and 11), logs into OUT:
#
#   bash benchmarks/run_gpu_all.sh DEEPGEMM_SRC OUT
#
# 1. benchmarks/bench_gpu.py -> OUT/gpu_h200.json (sections: GEMM vs cuBLASLt, memory-bound vs copy, chain; top-level
#    `chain` records per W vs DeepGEMM's two GEMMs and a `memory_bound` list, issue 12);
# 2. benchmarks/bench_gemm_peers.py -> merged into the same JSON (top-level card, date, gemm_vs_peers): run
#    second because bench_gpu.py writes its file whole, and --merge-into only adds those keys;
# 3. benchmarks/bench_fused_gemm1.py -> OUT/fused_gemm1_h200.json (GEMM 1 + SwiGLU + quant fused vs unfused);
# 4. make test-gpu (tl, Gluon, the launchers' picks, DeepGEMM raw and as the deep_gemm provider runs it, the permute,
#    the fused GEMM 1, the graph-captured chain);
# 5. benchmarks/profile_host.py -> OUT/host_profile_h200.json (host time per op of the eager expert chain).
# DEEPGEMM_SRC: the DeepGEMM source folder of build_deepgemm.sh (fetch). Each step has its own time limit, so
# the later ones run even when one fails; the exit status is the first failing step's.
set -uo pipefail
dg_src=$(realpath "${1:?usage: run_gpu_all.sh DEEPGEMM_SRC OUT}")
out=$(mkdir -p "${2:?usage: run_gpu_all.sh DEEPGEMM_SRC OUT}" && realpath "$2")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
rc=0
dg=$(bash benchmarks/build_deepgemm.sh build "$dg_src" 2>"$out/build_deepgemm.log") || { echo "DeepGEMM build failed"; rc=1; }
export PYTHONPATH="$PWD${dg:+:$dg}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee -a "$out/gpu_h200.log"
step() {    # step SECONDS LOG COMMAND...
    local limit=$1 log=$2; shift 2
    echo "=== $* (limit ${limit}s)" | tee -a "$out/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$log"
    local s=${PIPESTATUS[0]}
    echo "=== exit $s" | tee -a "$out/$log"
    [ "$s" = 0 ] || [ "$rc" != 0 ] || rc=$s
}
step 300 gpu_h200.log python3 benchmarks/bench_gpu.py --out "$out/gpu_h200.json"
step 230 gemm_vs_peers_h200.log python3 benchmarks/bench_gemm_peers.py --out /tmp/peers.json \
    --merge-into "$out/gpu_h200.json"
step 120 fused_gemm1_h200.log python3 benchmarks/bench_fused_gemm1.py --out "$out/fused_gemm1_h200.json"
step 240 test_gpu_h200.log make test-gpu DEEPGEMM="$dg_src" PYTHON=python3
step 120 host_profile_h200.log python3 benchmarks/profile_host.py --out "$out/host_profile_h200.json"
exit $rc
