"""Triton kernels of the FP8 MoE path (SPEC §3-8).

    kernels.py   the @triton.jit kernels (framework-neutral: pointers and sizes)
    launch.py    torch launchers: torch tensors in and out, shapes as in SPEC §0
    provider.py  the `triton` provider of backend.ops (Paddle tensors in and out)
    chain.py     the ht launch chain on static buffers (CUDA-graph capturable)
    ep_exchange.py  expert-parallel dispatch / combine built on the device (torch.distributed), ll pair, two-batch overlap
    fast_launch.py  Triton launches through the compiled launcher (host time per launch)

Importing this package imports neither Paddle nor the kernels; `launch` needs torch and triton
only, so the GPU benchmark runs where Paddle is absent.
"""
