"""Strict fake of `blackwell_ops` as FastDeploy #7053 (merge 446b26bb) calls it.

fused_moe_blackwell_backend.py at 446b26bb: `group_gemm_masked` with 9 positional arguments (:546-556,
:579-589) and `unpack_and_convert_scale(scale, masked_m)` for the ht activations (:534, :578); weights via
fused_moe_triton_backend.py:1709 (`unpack_and_convert_scale(scale, None)`). Nothing else lives here.
"""
from ._blackwell import make_group_gemm_masked, unpack_and_convert_scale
from ._modules import missing_op

GENERATION = "7053"
group_gemm_masked = make_group_gemm_masked(with_recipe=False)
OPS = ("group_gemm_masked", "unpack_and_convert_scale")
__all__ = list(OPS)


def __getattr__(name):
    raise missing_op("blackwell_ops", GENERATION, name)
