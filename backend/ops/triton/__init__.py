"""Triton kernels of the FP8 MoE path (SPEC §3-8).

    kernels.py   the @triton.jit kernels (framework-neutral: pointers and sizes)
    launch.py    torch launchers: torch tensors in and out, shapes as in SPEC §0
    provider.py  the `triton` provider of backend.ops (Paddle tensors in and out)
    chain.py     the ht launch chain on static buffers (CUDA-graph capturable)
    ep_exchange.py  expert-parallel dispatch / combine built on the device (torch.distributed), two-batch overlap

Importing this package imports neither Paddle nor the kernels; `launch` needs torch and triton
only, so the GPU benchmark runs where Paddle is absent.
"""
