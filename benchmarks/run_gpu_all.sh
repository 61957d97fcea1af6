#!/usr/bin/env bash
# Every GPU measurement and the GPU tests in one call of the GPU machine (issues 10 and 11), logs into OUT:
#
#   bash benchmarks/run_gpu_all.sh DEEPGEMM_SRC OUT
#
# 1. benchmarks/bench_gpu.py -> OUT/gpu_h200.json (sections: GEMM vs cuBLASLt, memory-bound vs copy, chain; top-level
#    `chain` records per W vs DeepGEMM's two GEMMs and a `memory_bound` list, issue 12);
# 2. benchmarks/bench_gemm_peers.py -> merged into the same JSON (top-level card, date, gemm_vs_peers): run
#    second because bench_gpu.py writes its file whole, and --merge-into only adds those keys;
# 2b. with the CuTe DSL carried (.cdsl1/, .cdsl2/: benchmarks/install_cute_dsl.sh), benchmarks/bench_cute_gemm.py
#    -> OUT/cute_gemm_paired_h200.json (its configs and the Gluon kernel, each paired with DeepGEMM);
# 3. benchmarks/bench_fused_gemm1.py -> OUT/fused_gemm1_h200.json (GEMM 1 + SwiGLU + quant fused vs unfused);
# 4. make test-gpu (tl, Gluon, the launchers' picks, DeepGEMM raw and as the deep_gemm provider runs it, the permute,
#    the fused GEMM 1, the graph-captured chain);
# 5. benchmarks/profile_host.py -> OUT/host_profile_h200.json (host time per op of the eager expert chain).
# DEEPGEMM_SRC: the DeepGEMM source folder of build_deepgemm.sh (fetch). Each step has its own time limit, so
# the later ones run even when one fails; the exit status is the first failing step's. STEPS (environment, default
# all): a comma list of gpu,peers,cute,fused,test,host to run only those (one call of the machine is 10 minutes).
set -uo pipefail
dg_src=$(realpath "${1:?usage: run_gpu_all.sh DEEPGEMM_SRC OUT}")
out=$(mkdir -p "${2:?usage: run_gpu_all.sh DEEPGEMM_SRC OUT}" && realpath "$2")
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
rc=0
dg=$(bash benchmarks/build_deepgemm.sh build "$dg_src" 2>"$out/build_deepgemm.log") || { echo "DeepGEMM build failed"; rc=1; }
cdsl=""     # the CuTe DSL, when .cdsl1/ and .cdsl2/ were carried (two calls): the FP32 launcher's pick from 256 rows
if [ -d .cdsl1 ] && [ -d .cdsl2 ]; then
    cdsl=$(bash benchmarks/install_cute_dsl.sh 2>"$out/install_cute_dsl.log") || { echo "CuTe DSL install failed"; cdsl=""; }
fi
export PYTHONPATH="$cdsl$PWD${dg:+:$dg}"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv | tee -a "$out/gpu_h200.log"
steps=",${STEPS:-gpu,peers,cute,fused,test,host},"
step() {    # step NAME SECONDS LOG COMMAND...
    [[ "$steps" == *",$1,"* ]] || return 0
    local limit=$2 log=$3; shift 3
    echo "=== $* (limit ${limit}s)" | tee -a "$out/$log"
    timeout "$limit" "$@" 2>&1 | tee -a "$out/$log"
    local s=${PIPESTATUS[0]}
    echo "=== exit $s" | tee -a "$out/$log"
    [ "$s" = 0 ] || [ "$rc" != 0 ] || rc=$s
}
[ -z "$cdsl" ] || step cute 150 cute_gemm_paired_h200.log python3 benchmarks/bench_cute_gemm.py \
    --out "$out/cute_gemm_paired_h200.json" --fills 64,128,256,512,1024,2048,uneven_0_1024,uneven_0_2048 \
    --configs bn192_cl2,bn192_cl2_pr,bn128_cl2
step gpu 300 gpu_h200.log python3 benchmarks/bench_gpu.py --out "$out/gpu_h200.json"
step peers 230 gemm_vs_peers_h200.log python3 benchmarks/bench_gemm_peers.py --out /tmp/peers.json \
    --merge-into "$out/gpu_h200.json"
step fused 120 fused_gemm1_h200.log python3 benchmarks/bench_fused_gemm1.py --out "$out/fused_gemm1_h200.json"
step test 240 test_gpu_h200.log make test-gpu DEEPGEMM="$dg_src" PYTHON=python3
step host 120 host_profile_h200.log python3 benchmarks/profile_host.py --out "$out/host_profile_h200.json"
exit $rc
