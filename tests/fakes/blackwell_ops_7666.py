"""Strict fake of `blackwell_ops` as FastDeploy #7666 (open PR head f0ea6f80) calls it: the 1x32 recipe.

fused_moe_blackwell_backend.py at f0ea6f80: `group_wise_quant(x, False, False)` for activations (:632) and
`(w, False, True)` for weights (:454-458); `group_gemm_masked` with "w8a8" (:737-748, :766-777, :857, :875);
`fused_mask_swiglu_fp8_quant_blackwell` (:749, :870), here in 32-wide groups (docs/upstream.md §2: unknown upstream);
`prefill_permute_to_blackwell_masked_gemm` only on the unfused branch (:710-719), fed raw 1x32 uint8 scales.
`unpack_and_convert_scale` is no longer called but stays in the package.
"""
import paddle

from ._blackwell import (group_wise_quant, make_fused_swiglu, make_group_gemm_masked, make_prefill_permute,
                         unpack_and_convert_scale)
from ._modules import missing_op

GENERATION = "7666"
group_gemm_masked = make_group_gemm_masked(with_recipe=True)
prefill_permute_to_blackwell_masked_gemm = make_prefill_permute((paddle.int32, paddle.uint8))
fused_mask_swiglu_fp8_quant_blackwell = make_fused_swiglu(group_size=32)
OPS = ("group_gemm_masked", "unpack_and_convert_scale", "prefill_permute_to_blackwell_masked_gemm",
       "fused_mask_swiglu_fp8_quant_blackwell", "group_wise_quant")


def __getattr__(name):
    raise missing_op("blackwell_ops", GENERATION, name)
