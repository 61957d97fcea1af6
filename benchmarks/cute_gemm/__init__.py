"""A masked grouped FP8 GEMM for SM90 written in the CUTLASS Python DSL (CuTe DSL, PyPI nvidia-cutlass-dsl, an
optional dependency): issue 11's try of what Gluon cannot express (TMA multicast over 2-CTA clusters, one m64n192
wgmma). Measured beside the Gluon kernel and DeepGEMM by benchmarks/bench_cute_gemm.py (benchmarks/NOTES_gpu.md):
bitwise equal to the Gluon kernel, 0.92-0.96x its speed, so no provider runs it; it lives with the benchmarks.

Nothing here imports cutlass at import time: masked_gemm loads its kernel module on first use.
benchmarks/fetch_cute_dsl.sh / install_cute_dsl.sh bring the DSL to the GPU machine.
"""
