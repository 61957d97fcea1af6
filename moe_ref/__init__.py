"""Pure-Paddle reference of the FP8 block-quantized MoE path (the ground truth).

Modules follow the data flow (see SPEC.md, sections in brackets):

    fp8      e4m3 cast, UE8M0 ceil/encode/decode, packing, MN-major storage,  [§1-2]
             fp8 byte views, gather with a zero row (fp8_torch: their torch front-end)
    quant    1x128 and 128x128 block quantization and dequantization          [§3]
    routing  softmax top-k and DeepSeek-V3 noaux_tc                           [§10]
    layout   masked / contiguous permute, depermute + weighted combine        [§5, §8]
    ep       DeepEP-normal dispatch / combine simulated over R ranks          [§9]
    moe      the float oracle and the FP8 layer                               [§11]
    metrics  calc_diff and friends                                            [§12]

`constants` holds the numbers and integer formulas of the format without Paddle: importing `moe_ref` or
`moe_ref.constants` does not import Paddle (the Triton kernels import them on machines without it).
"""
