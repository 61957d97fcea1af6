"""The numeric constants of the FP8 block-quantized format (SPEC §1-3), without Paddle.

Their one home: `moe_ref.fp8` and `moe_ref.quant` re-export them (`moe_ref.fp8.E4M3_MAX`,
`moe_ref.quant.GROUP_SIZE`, ...), and the Triton kernels, which run where Paddle is absent,
import them from here. Importing this module imports nothing but the standard library.
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
DEEPGEMM_AMAX_FLOOR = 1e-4       # DeepGEMM's floor: our default
FASTDEPLOY_AMAX_FLOOR = 1e-10    # FastDeploy kernels' floor
FASTDEPLOY_LOG2_BIAS = 5e-7      # FastDeploy's per_token_quant adds this inside log2 before rounding up


def align(n: int, multiple: int) -> int:
    """Round n up to a multiple of `multiple`."""
    return -(-int(n) // multiple) * multiple
