"""Kernels written in the CUTLASS Python DSL (CuTe DSL, PyPI nvidia-cutlass-dsl), an optional dependency.

Nothing here imports cutlass at import time: masked_gemm loads its kernel module on first use, so the rest of
backend/ runs without the DSL. benchmarks/fetch_cute_dsl.sh / install_cute_dsl.sh bring it to the GPU machine.
"""
