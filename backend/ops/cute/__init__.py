"""The masked grouped FP8 GEMM for SM90 written in the CUTLASS Python DSL (CuTe DSL, PyPI nvidia-cutlass-dsl, an
optional dependency; issue 11): what Gluon cannot express, DeepGEMM's structure (TMA multicast of B over 2-CTA
clusters, one m64n192 wgmma per math warpgroup). Bitwise equal to the Gluon kernel (tests/test_gpu_cute_gemm.py);
the `triton` provider's masked GEMM runs it on SM90 from CUTE_FROM_ROWS rows per expert when the DSL is importable
(FP32 scales, or CUTLASS UE8M0 bytes of block-uniform weights converted to them; launch.masked_gemm_kernel), the
Gluon kernel otherwise. Timed beside the Gluon kernel and DeepGEMM by
benchmarks/bench_cute_gemm.py (benchmarks/NOTES_gpu.md).

Nothing here imports cutlass at import time: masked_gemm loads its kernel module on first use.
benchmarks/fetch_cute_dsl.sh / install_cute_dsl.sh bring the DSL to the GPU machine.
"""
