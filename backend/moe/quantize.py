"""The method's FP8 quantization outside the contract's fused ops: expert weights at load time
(128x128 blocks, UE8M0 scales, per-row packed scales for SM100) and tokens before a dispatch.

The math is the reference's (`moe_ref.quant.per_block_quant(use_ue8m0=True)`, `dequant_per_block`,
`expand_block_scale_to_rows`, `moe_ref.fp8.pack_scale_ue8m0`): weights are quantized once, at load,
where a second implementation would only be a second thing to keep bit-identical. Tokens go through
the ops contract (`provider.per_token_quant`), which is what the tests compare with the reference.
"""
from __future__ import annotations

import numpy as np
import paddle

from moe_ref.checks import first_index
from moe_ref.cutlass_sf import SF_VEC_SIZE
from moe_ref.fp8 import as_bytes, e4m3_to_float32, from_bytes, num_scale_groups, pack_scale_ue8m0, packed_words
from moe_ref.quant import (DEEPGEMM_AMAX_FLOOR, GROUP_SIZE, dequant_per_block, expand_block_scale_to_rows,
                           per_block_quant)

FP8 = paddle.float8_e4m3fn
FLOAT32_MAX = float(np.finfo(np.float32).max)


def quantize_weight_blocks_ue8m0(w: paddle.Tensor, amax_floor: float = DEEPGEMM_AMAX_FLOOR):
    """128x128 block quantization of one expert's weight with UE8M0 scales (SPEC §3).

    w [N, K] float32 -> (q [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] float32 powers of two):
    `moe_ref.quant.per_block_quant(w, use_ue8m0=True)`. Non-finite input is a ValueError naming the
    index ("w: non-finite value at index (n, k)", which the method prefixes with the tensor and expert).
    """
    if not bool(paddle.isfinite(w).all()):
        bad = np.argwhere(~np.isfinite(w.numpy()))[0]
        raise ValueError(f"w: non-finite value at index {tuple(int(i) for i in bad)}")
    return per_block_quant(w, use_ue8m0=True, amax_floor=amax_floor)


def dequantize_weight_blocks(q: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """q [N, K] fp8, scale [ceil(N/128), ceil(K/128)] float32 finite -> [N, K] float32 q · s (`dequant_per_block`).

    A finite q whose q · s overflows float32 (so bf16 too) is a ValueError naming the scale's block,
    its value and the product ("scale[i, j] = 1e+37 times ...", which the method prefixes with the
    scale tensor and expert): the scale is wrong, not the weight. A non-finite q (e4m3 NaN byte) is
    left to `quantize_weight_blocks_ue8m0`, which names the weight.
    """
    wf = dequant_per_block(q, scale)
    overflow = paddle.isinf(wf) & paddle.isfinite(e4m3_to_float32(q))
    if bool(overflow.any()):
        n, k = first_index(overflow)
        i, j = n // GROUP_SIZE, k // GROUP_SIZE
        s, v = float(scale.numpy()[i, j]), float(e4m3_to_float32(q[n: n + 1, k: k + 1]).numpy()[0, 0])
        raise ValueError(f"scale[{i}, {j}] = {s:g} times the FP8 weight {v:g} at ({n}, {k}) is {s * v:.3g}: "
                         f"q · s overflows float32 and bf16 (largest finite {FLOAT32_MAX:.3g})")
    return wf


def pack_row_scales_ue8m0(scale: paddle.Tensor, num_rows: int) -> paddle.Tensor:
    """Per-row packed UE8M0 weight scales for SM100 (SPEC §3 end, §2).

    scale [E, ceil(N/128), KB] float32 powers of two -> [E, N, ceil(KB/4)] int32 contiguous:
    sf_row[n, kb] = scale[n // 128, kb], its exponent byte (log2 s + 127) packed 4 to a word,
    little-endian, missing groups byte 0. A scale that is not a power of two is a ValueError
    (taking the exponent of one would round it down: SPEC §2).
    """
    try:
        return pack_scale_ue8m0(expand_block_scale_to_rows(scale, num_rows))
    except ValueError as err:
        raise ValueError(f"scale: UE8M0 packing needs positive normal powers of two ({err})") from None


def quantize_tokens(provider, x: paddle.Tensor, use_ue8m0: bool, group_size: int = GROUP_SIZE):
    """FP8 quantization of tokens through the ops contract: x [T, H] bf16 ->
    group_size 128: (x_q [T, H] fp8, scale [T, ceil(S/4)] packed UE8M0 int32 (use_ue8m0) | [T, S] float32),
    `per_token_quant` (#7053, develop); group_size 32: (x_q, [T, ceil(H/32)] uint8 UE8M0 bytes, row-major),
    `group_wise_quant(x, False, False)` as #7666 quantizes activations (BW f0ea6f80:632; needs use_ue8m0).

    T = 0 (a rank with no tokens) returns the empty tensors without launching the provider's op.
    """
    t, h = (int(d) for d in x.shape)
    if group_size == SF_VEC_SIZE:
        if not use_ue8m0:
            raise ValueError("use_ue8m0: 1x32 groups are UE8M0 only (#7666), got False")
        if t == 0:
            return paddle.zeros([0, h], dtype=FP8), paddle.zeros([0, -(-h // SF_VEC_SIZE)], dtype=paddle.uint8)
        return provider.group_wise_quant(x, False, False)
    if t == 0:
        s = num_scale_groups(h)
        cols, dtype = (packed_words(s), paddle.int32) if use_ue8m0 else (s, paddle.float32)
        return paddle.zeros([0, h], dtype=FP8), paddle.zeros([0, cols], dtype=dtype)
    return provider.per_token_quant(x, GROUP_SIZE, use_ue8m0)


def swap_last_two(t: paddle.Tensor) -> paddle.Tensor:
    """[E, A, B] -> a contiguous [E, B, A] copy (fp8 moved as bytes: Paddle has no fp8 transpose kernel on
    every device). Between upstream's load orientation [E, K, N] and the GEMM's [E, N, K]."""
    moved = as_bytes(t).transpose([0, 2, 1]).clone()
    return from_bytes(moved, t.dtype)
