"""Strict fake of FastDeploy's own ops (`fastdeploy.model_executor.ops.gpu`) that the Blackwell backend calls.

Made from the op definitions, identical at #7053 (446b26bb), develop (92ae10c3 = dad5a432) and #7666
(f0ea6f80) - same git blobs (docs/upstream.md §3):

    per_token_quant                 custom_ops/gpu_ops/per_token_quant_fp8.cu:479 (PerTokenQuant :135)
    prefill_permute_to_masked_gemm  custom_ops/gpu_ops/moe/prefill_permute_to_masked_gemm.cu:276 (:176)
    fused_mask_swiglu_fp8_quant     custom_ops/gpu_ops/fused_mask_swiglu_fp8_quant_kernel.cu:423 (:358)
    depermute_prefill_combine       custom_ops/gpu_ops/moe/depermute_prefill_combine.cu:214 (:159)

Parameter names are the pybind11 ones (custom_ops/gpu_ops/cpp_extensions.cc at dad5a432, lines 1425-1445
and 1932-1947): upstream passes `use_ue8m0=` by keyword. Values come from our paddle provider
(`backend.ops.get_provider("paddle")`): numerics can be checked, but they follow our SPEC "ours" lines
(amax floor 1e-4 and no 5e-7 log2 bias in per_token_quant), not the CUDA kernels bit for bit.
"""
from __future__ import annotations

import paddle

from ._base import fake_op, mn_major, need_bool, need_counts, need_dim, need_in, need_int, need_tensor

MODULE = "fastdeploy.model_executor.ops.gpu"
KERNEL_GROUP = 128        # every kernel here hard-codes 128-wide groups, whatever block_size says
COMBINE_TOPK = {4, 6, 8}  # depermute_prefill_combine.cu:171-189


def _paddle_ops():
    from backend.ops import get_provider
    return get_provider("paddle")


@fake_op(MODULE)
def per_token_quant(input, block_size, use_ue8m0):
    """input [T, H] bf16 | fp16 -> (out [T, H] fp8, scale): use_ue8m0 -> int32 [T, ceil(ceil(H/bs)/4)],
    else fp32 [T, ceil(H/bs)], both row-major (per_token_quant_fp8.cu:157-220)."""
    op = "per_token_quant"
    need_tensor(op, "input", input, (paddle.bfloat16, paddle.float16), ndim=2)
    need_int(op, "block_size", block_size)
    need_bool(op, "use_ue8m0", use_ue8m0)
    need_in(op, "block_size", block_size, {KERNEL_GROUP}, "the kernel walks 128-wide groups (:44, :56) while "
            "sizing the scale by block_size (:143): any other value mislabels the scales")
    return _paddle_ops().per_token_quant(input.astype(paddle.bfloat16), KERNEL_GROUP, use_ue8m0)


def _permute_topk(x_dtype, scale_dtype) -> set:
    # prefill_permute_to_masked_gemm.cu:189-241: only bf16 x with fp32 scales instantiates TOP_K = 6
    return {4, 6, 8} if (x_dtype == paddle.bfloat16 and scale_dtype == paddle.float32) else {4, 8}


@fake_op(MODULE)
def prefill_permute_to_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num):
    """x [W, H] fp8 | bf16, scale [W, S'] fp32 | int32, topk_ids [W, K_top] int64 (the kernel reads int64,
    :27, :167) -> (permute_x [E, M, H], permute_scale [E, M, S'] strides [S'·M, 1, M] (M unpadded, :124-130),
    permuted_indice_map [W, K_top] int32, token_nums_per_expert [E, 1] int32)."""
    op = "prefill_permute_to_masked_gemm"
    need_tensor(op, "x", x, (paddle.float8_e4m3fn, paddle.bfloat16), ndim=2)
    need_tensor(op, "scale", scale, (paddle.float32, paddle.int32), ndim=2)
    need_tensor(op, "topk_ids", topk_ids, (paddle.int64,), ndim=2)
    e, m = need_int(op, "num_local_experts", num_local_experts), need_int(op, "max_token_num", max_token_num)
    w, h = (int(d) for d in x.shape)
    need_dim(op, "scale", scale, 0, w, "W, rows of x")
    need_dim(op, "topk_ids", topk_ids, 0, w, "W, rows of x")
    need_in(op, "K_top", int(topk_ids.shape[1]), _permute_topk(x.dtype, scale.dtype), "TOP_K instantiations")
    vec = 16 if x.dtype == paddle.float8_e4m3fn else 8
    if h % vec:
        raise ValueError(f"{op}: x.shape[1] expected a multiple of {vec} (16-byte vector copies drop the tail), got {h}")
    permute_x, permute_scale, indice_map, counts = _paddle_ops().prefill_permute_to_masked_gemm(
        x, scale, topk_ids, e, m)
    physical = permute_scale.contiguous().transpose([0, 2, 1])                   # [E, S', M]
    return permute_x, mn_major(physical, m), indice_map, counts


@fake_op(MODULE)
def fused_mask_swiglu_fp8_quant(input, token_nums_per_expert, block_size, use_ue8m0=False):
    """input [E, M, 2I] bf16, token_nums_per_expert int32 (E = its shape[0]) -> (out [E, M, I] fp8, scale):
    use_ue8m0 -> int32 [E, M, ceil(I/bs/4)] strides (C·align(M,4), 1, align(M,4)); else fp32 [E, M, I/bs]
    strides (S·M, 1, M) (fused_mask_swiglu_fp8_quant_kernel.cu:370-387)."""
    op = "fused_mask_swiglu_fp8_quant"
    need_tensor(op, "input", input, (paddle.bfloat16,), ndim=3)
    e = need_counts(op, "token_nums_per_expert", token_nums_per_expert)
    need_dim(op, "input", input, 0, e, "E = token_nums_per_expert.shape[0]")
    need_int(op, "block_size", block_size)
    need_bool(op, "use_ue8m0", use_ue8m0)
    need_in(op, "block_size", block_size, {KERNEL_GROUP}, "the kernel quantizes 128-wide groups (:57)")
    i = int(input.shape[2]) // 2
    if int(input.shape[2]) % 2 or i % KERNEL_GROUP:
        raise ValueError(f"{op}: input.shape[2] expected 2I with I a multiple of 128 (hidden_size_scale = I / "
                         f"block_size drops a ragged group, :367), got {list(input.shape)}")
    act, scale = _paddle_ops().fused_mask_swiglu_fp8_quant(input, token_nums_per_expert, KERNEL_GROUP, use_ue8m0)
    if not use_ue8m0:
        scale = mn_major(scale.contiguous().transpose([0, 2, 1]), int(input.shape[1]))   # fp32: M unpadded
    return act, scale


@fake_op(MODULE)
def depermute_prefill_combine(x, indice_map, topk_weights, num_worst_tokens):
    """x [E, M, H] fp8 | bf16, indice_map [W, K_top] int32, topk_weights [W, K_top] fp32 (K_top in 4, 6, 8)
    -> depermuted_x [num_worst_tokens, H] dtype of x (depermute_prefill_combine.cu:119-212)."""
    op = "depermute_prefill_combine"
    need_tensor(op, "x", x, (paddle.float8_e4m3fn, paddle.bfloat16), ndim=3)
    need_tensor(op, "indice_map", indice_map, (paddle.int32,), ndim=2)
    need_tensor(op, "topk_weights", topk_weights, (paddle.float32,), ndim=2)
    w = need_int(op, "num_worst_tokens", num_worst_tokens)
    need_in(op, "K_top", int(indice_map.shape[1]), COMBINE_TOPK, "TOP_K instantiations")
    if list(topk_weights.shape) != list(indice_map.shape):
        raise ValueError(f"{op}: topk_weights expected the shape of indice_map {list(indice_map.shape)}, "
                         f"got {list(topk_weights.shape)}")
    if not 0 < w <= int(indice_map.shape[0]):
        raise ValueError(f"{op}: num_worst_tokens expected 1..{int(indice_map.shape[0])} (rows of indice_map; the "
                         f"kernel reads indice_map[t] for t < num_worst_tokens), got {w}")
    if int(x.shape[2]) % (16 if x.dtype == paddle.float8_e4m3fn else 8):
        raise ValueError(f"{op}: x.shape[2] expected a multiple of the 16-byte vector, got {list(x.shape)}")
    ffn_out = x if x.dtype == paddle.bfloat16 else x.astype(paddle.float32)
    out = _paddle_ops().depermute_prefill_combine(ffn_out, indice_map[:w], topk_weights[:w], w)
    return out.astype(x.dtype)


OPS = ("per_token_quant", "prefill_permute_to_masked_gemm", "fused_mask_swiglu_fp8_quant", "depermute_prefill_combine")
