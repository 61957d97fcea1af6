"""The numbers and integer formulas of the FP8 block-quantized format (SPEC §1-3), without Paddle.

Their one home: `moe_ref.fp8` and `moe_ref.quant` re-export the constants (`moe_ref.fp8.E4M3_MAX`,
`moe_ref.quant.GROUP_SIZE`, ...); the tensor front-ends of the storage helpers (`moe_ref.fp8` for
Paddle, `moe_ref.fp8_torch` for torch) take their shapes and strides from the formulas below; the
Triton kernels, which run where Paddle is absent, import them from here. Importing this module
imports nothing but the standard library.
"""
from __future__ import annotations

# §1-2: e4m3fn and UE8M0 (moe_ref.fp8)
E4M3_MAX = 448.0            # largest finite e4m3fn value
E4M3_MIN_SUBNORMAL = 2.0 ** -9
UE8M0_BIAS = 127            # byte e stands for 2^(e - 127)
UE8M0_NAN = 255
UE8M0_MIN_EXP, UE8M0_MAX_EXP = 1, 254   # ceil_to_ue8m0 clamps the exponent field here
BYTES_PER_WORD = 4          # UE8M0 bytes packed per int32 word, little-endian
TMA_ALIGN = 4               # MN axis of MN-major scales padded to 4 elements (16 bytes)

# §3: block quantization (moe_ref.quant)
GROUP_SIZE = 128                 # 1x128 activation groups and 128x128 weight blocks
BLOCK_SIZE = (GROUP_SIZE, GROUP_SIZE)
MX_GROUP_SIZE = 32               # FastDeploy #7666: 1x32 groups for activations and weights (one UE8M0 byte per 32)
RECIPE_GROUP_SIZES = (MX_GROUP_SIZE, GROUP_SIZE)   # the scale-group sizes along K of the recipes we follow
DEEPGEMM_AMAX_FLOOR = 1e-4       # DeepGEMM's floor: our default
FASTDEPLOY_AMAX_FLOOR = 1e-10    # FastDeploy kernels' floor
FASTDEPLOY_LOG2_BIAS = 5e-7      # FastDeploy's per_token_quant adds this inside log2 before rounding up


def ceil_div(n: int, d: int) -> int:
    """ceil(n / d) for ints n >= 0, d > 0."""
    return -(-int(n) // d)


def align(n: int, multiple: int) -> int:
    """Round n up to a multiple of `multiple`."""
    return ceil_div(n, multiple) * multiple


def num_scale_groups(k: int, group_size: int = GROUP_SIZE) -> int:
    """S = ceil(K / 128): 1x128 groups (or 128-wide blocks) along a K axis of K elements."""
    return ceil_div(k, group_size)


def packed_words(num_groups: int) -> int:
    """ceil(S / 4): int32 words holding S UE8M0 bytes (SPEC §2)."""
    return ceil_div(num_groups, BYTES_PER_WORD)


def mn_major_strides(mn: int, c: int) -> tuple[int, int, int]:
    """Element strides of the logical [B, MN, C] view of an MN-major TMA-aligned buffer (SPEC §2):
    (C · align(MN, 4), 1, align(MN, 4)); its physical buffer is [B, C, align(MN, 4)], rows past MN zero."""
    mn_pad = align(mn, TMA_ALIGN)
    return (int(c) * mn_pad, 1, mn_pad)
