"""The strict fake ops of `blackwell_ops`, shared by the generation modules (blackwell_ops_7053, _develop, _7666).

`blackwell_ops` is unpublished: every signature here is derived from FastDeploy's call sites
(docs/upstream.md §2), so every parameter is positional-only (upstream never passes one by keyword).
The checks are what all call sites of a generation satisfy; values come from our paddle provider
(`group_gemm_masked`, `unpack_and_convert_scale`) and from moe_ref.blackwell_layout (the fused ops).
"""
from __future__ import annotations

import paddle

from ._base import fake_op, need_bool, need_counts, need_dim, need_in, need_int, need_tensor

MODULE = "blackwell_ops"
SF_VEC = 32            # K-elements per scale byte the GEMM reads
RECIPES = {"w8a8"}     # the tenth argument of group_gemm_masked since #7374


def _paddle_ops():
    from backend.ops import get_provider
    return get_provider("paddle")


def _check_gemm(op, a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count):
    need_tensor(op, "a", a, (paddle.float8_e4m3fn,), ndim=2)      # every call site passes [E·M, K]
    need_tensor(op, "b", b, (paddle.float8_e4m3fn,), ndim=3)
    e, n, k = (int(d) for d in b.shape)
    m = need_int(op, "max_m_per_expert", max_m_per_expert)
    need_int(op, "sm_count", sm_count)
    need_dim(op, "a", a, 0, e * m, f"E·M = {e}·{m}")
    need_dim(op, "a", a, 1, k, "K of b")
    for name, sf, rows in (("sfa", sfa, m), ("sfb", sfb, n)):
        need_tensor(op, name, sf, (paddle.uint8,), ndim=3)        # CUTLASS SF bytes, never packed int32
        if int(sf.shape[0]) != e or int(sf.shape[1]) < rows or int(sf.shape[2]) * SF_VEC < k:
            raise ValueError(f"{op}: {name} expected uint8 [E={e}, >= {rows}, >= ceil(K/32) = {-(-k // SF_VEC)}], "
                             f"got {list(sf.shape)}")
    need_counts(op, "masked_m", masked_m, e)
    need_tensor(op, "out", out, (paddle.bfloat16,), ndim=(2, 3))
    if list(out.shape) not in ([e * m, n], [e, m, n]):
        raise ValueError(f"{op}: out expected [E·M, N] = {[e * m, n]} or [E, M, N] = {[e, m, n]}, got {list(out.shape)}")
    if bias is not None:
        need_tensor(op, "bias", bias, (paddle.bfloat16, paddle.float32), ndim=2)
        if list(bias.shape) != [e, n]:
            raise ValueError(f"{op}: bias expected [E, N] = {[e, n]} or None, got {list(bias.shape)}")
    return e, m, n


def _run_gemm(a, b, sfa, sfb, masked_m, out, bias, m, sm_count):
    e, n = int(b.shape[0]), int(b.shape[1])
    flat = out.reshape([e * m, n])
    result = _paddle_ops().group_gemm_masked(a, b, sfa, sfb, masked_m, flat, bias, m, sm_count)
    paddle.assign(result.reshape(out.shape), output=out)
    return out


def make_group_gemm_masked(with_recipe: bool):
    """#7053: 9 positional arguments; #7374 / develop / #7666: a tenth, the recipe string "w8a8"."""
    if with_recipe:
        @fake_op(MODULE)
        def group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, recipe, /):
            """a [E·M, K] fp8, b [E, N, K] fp8, sfa/sfb uint8 CUTLASS SF, masked_m int32 [E] | [E, 1],
            out bf16 [E·M, N] | [E, M, N] written in place, bias None, M, sm_count, recipe "w8a8"."""
            op = "group_gemm_masked"
            _, m, _ = _check_gemm(op, a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count)
            if not isinstance(recipe, str):
                raise TypeError(f"{op}: recipe expected str, got {type(recipe).__name__} {recipe!r}")
            need_in(op, "recipe", recipe, RECIPES, "the only recipe upstream passes")
            return _run_gemm(a, b, sfa, sfb, masked_m, out, bias, m, sm_count)
    else:
        @fake_op(MODULE)
        def group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, /):
            """#7053's nine arguments (fused_moe_blackwell_backend.py:546-556 at 446b26bb)."""
            op = "group_gemm_masked"
            _, m, _ = _check_gemm(op, a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count)
            return _run_gemm(a, b, sfa, sfb, masked_m, out, bias, m, sm_count)
    return group_gemm_masked


@fake_op(MODULE)
def unpack_and_convert_scale(scale, masked_m, /):
    """scale int32 [E, MN, C] packed UE8M0, MN-major as every upstream caller passes it (MN stride 1);
    masked_m None (weights) or int32 [E] | [E, 1] -> uint8 CUTLASS SF bytes [E, align(MN, 128), 16·C] (ours)."""
    op = "unpack_and_convert_scale"
    need_tensor(op, "scale", scale, (paddle.int32,), ndim=3)
    if int(scale.shape[1]) > 1 and int(scale.strides[1]) != 1:
        raise ValueError(f"{op}: scale expected MN-major strides (MN stride 1), as FastDeploy's permute, DeepEP's "
                         f"low-latency dispatch and the weight path all pass it; got strides {list(scale.strides)}")
    if masked_m is not None:
        need_counts(op, "masked_m", masked_m, int(scale.shape[0]))
    return _paddle_ops().unpack_and_convert_scale(scale, masked_m)


def make_prefill_permute(scale_dtypes):
    """develop: packed 1x128 int32 scales; #7666 (unfused fallback): also raw 1x32 uint8 bytes."""
    @fake_op(MODULE)
    def prefill_permute_to_blackwell_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num, /):
        """x [W, H] fp8, scale [W, S'], topk_ids [W, K_top] int64 (upstream casts first), E, M
        -> (permute_x [E·M, H] fp8, sfa uint8 CUTLASS SF, permuted_indice_map [W, K_top] int32,
        token_nums_per_expert [E, 1] int32)."""
        op = "prefill_permute_to_blackwell_masked_gemm"
        need_tensor(op, "x", x, (paddle.float8_e4m3fn,), ndim=2)
        need_tensor(op, "scale", scale, scale_dtypes, ndim=2)
        need_tensor(op, "topk_ids", topk_ids, (paddle.int64,), ndim=2)
        need_int(op, "num_local_experts", num_local_experts)
        need_int(op, "max_token_num", max_token_num)
        from moe_ref.blackwell_layout import prefill_permute_to_blackwell_masked_gemm as ref
        return tuple(ref(x, scale, topk_ids, num_local_experts, max_token_num))
    return prefill_permute_to_blackwell_masked_gemm


def make_fused_swiglu(group_size: int):
    @fake_op(MODULE)
    def fused_mask_swiglu_fp8_quant_blackwell(up, token_nums_per_expert, /):
        """up [E·M, 2I] bf16, token_nums_per_expert int32 [E] | [E, 1]
        -> (act [E·M, I] fp8, sfa uint8 CUTLASS SF [E, align(M, 128), KB])."""
        op = "fused_mask_swiglu_fp8_quant_blackwell"
        need_tensor(op, "up", up, (paddle.bfloat16,), ndim=2)      # develop passes the 2-D GEMM output
        e = need_counts(op, "token_nums_per_expert", token_nums_per_expert)
        if int(up.shape[0]) % e:
            raise ValueError(f"{op}: up.shape[0] expected a multiple of E = {e}, got {list(up.shape)}")
        from moe_ref.blackwell_layout import fused_mask_swiglu_fp8_quant_blackwell as ref
        return ref(up, token_nums_per_expert, group_size=group_size)
    return fused_mask_swiglu_fp8_quant_blackwell


@fake_op(MODULE)
def group_wise_quant(x, flag, use_swizzle, /):
    """#7666 (BW f0ea6f80:454-458, 632): x [N, K] bf16 -> (fp8 [N, K], uint8 [N, ceil(K/32)] UE8M0 bytes, 1x32 groups),
    CUTLASS-swizzled when use_swizzle (weights). `flag` is always False upstream; its meaning is unknown."""
    op = "group_wise_quant"
    need_tensor(op, "x", x, (paddle.bfloat16,), ndim=2)
    need_bool(op, "flag", flag)
    need_bool(op, "use_swizzle", use_swizzle)
    need_in(op, "flag", flag, {False}, "the only value upstream passes; what True does is unknown")
    from moe_ref.blackwell_layout import group_wise_quant as ref
    return ref(x, use_swizzle=use_swizzle)
