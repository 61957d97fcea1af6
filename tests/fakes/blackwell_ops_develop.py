"""Strict fake of `blackwell_ops` as FastDeploy #7374 (merge 92ae10c3) and develop (dad5a432) call it.

fused_moe_blackwell_backend.py at dad5a432 (same blob as 92ae10c3): `group_gemm_masked` with a tenth
argument "w8a8" (:757-768, :786-797 ht; :999-1011, :1017-1029 ll), `prefill_permute_to_blackwell_masked_gemm`
(:99), `fused_mask_swiglu_fp8_quant_blackwell(up, counts)` (:769, :1012), `unpack_and_convert_scale` for
weights (:468) and the ll activations (:998).
"""
import paddle

from ._blackwell import make_fused_swiglu, make_group_gemm_masked, make_prefill_permute, unpack_and_convert_scale
from ._modules import missing_op

GENERATION = "develop"
group_gemm_masked = make_group_gemm_masked(with_recipe=True)
prefill_permute_to_blackwell_masked_gemm = make_prefill_permute((paddle.int32,))
fused_mask_swiglu_fp8_quant_blackwell = make_fused_swiglu(group_size=128)
OPS = ("group_gemm_masked", "unpack_and_convert_scale", "prefill_permute_to_blackwell_masked_gemm",
       "fused_mask_swiglu_fp8_quant_blackwell")


def __getattr__(name):
    raise missing_op("blackwell_ops", GENERATION, name)
