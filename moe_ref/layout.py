"""Token layouts of the grouped GEMMs (SPEC §5) and the weighted combine back (SPEC §8).

Two layouts of the same data:

- masked ("ht" prefill, `group_gemm_masked`): `permute_x [E, M, H]`, expert e uses rows
  0..token_nums_per_expert[e]-1 of its M-row slab, the rest are zero;
- contiguous (DeepGEMM's other grouped GEMM): experts laid end to end, each segment padded
  to a multiple of 128 rows, `m_indices` giving each row's expert (-1 for padding).

Slot order inside an expert is deterministic: token-major, then k (upstream uses atomics).
A (t, k) entry whose id is -1 is not routed; rows whose ids are all -1 (padding) may sit
anywhere. The maps from (t, k) to rows make both layouts invertible.
"""
from __future__ import annotations

from typing import NamedTuple

from ._paddle import paddle
from .checks import (FLOAT_DTYPES, INT_DTYPES, check_dim, check_ids_in_range, check_nonnegative_int,
                     check_positive_int, check_same_shape, check_tensor)
from .constants import GROUP_SIZE
from .fp8 import MNMajorScale, gather_rows_zero_fill, num_scale_groups, packed_words, to_mn_major_tma_aligned

CONTIGUOUS_SEGMENT_ALIGN = 128   # DeepGEMM's contiguous grouped GEMM: each expert's rows padded to the M block

_X_DTYPES = (paddle.float8_e4m3fn, paddle.bfloat16, paddle.float16, paddle.float32)
_SCALE_DTYPES = (paddle.float32, paddle.int32)


class MaskedLayout(NamedTuple):
    """Output of prefill_permute_to_masked_gemm (SPEC §5).

    permute_x             [E, M, H] dtype of x; rows past token_nums_per_expert[e] are zero.
    permute_scale         MNMajorScale: logical [E, M, S'] with strides (S'·align(M, 4), 1, align(M, 4)),
                          physical [E, S', align(M, 4)]; float32 (S' = S) or packed UE8M0 int32
                          (S' = ceil(S/4)); None when scale is None.
    permuted_indice_map   [W, K_top] int32: e·M + slot, or -1 where topk_ids is -1.
    token_nums_per_expert [E, 1] int32: rows used per expert (masked_m).
    """
    permute_x: paddle.Tensor
    permute_scale: MNMajorScale | None
    permuted_indice_map: paddle.Tensor
    token_nums_per_expert: paddle.Tensor


class ContiguousLayout(NamedTuple):
    """Output of permute_to_contiguous (SPEC §5, last paragraph). Mc = Σ_e align(count_e, 128).

    permute_x             [Mc, H] dtype of x; expert e's segment starts at Σ_{e'<e} align(count_e', 128);
                          padding rows are zero.
    permute_scale         [Mc, S'] float32 or packed int32, row-major (DeepGEMM makes it MN-major itself);
                          None when scale is None.
    m_indices             [Mc] int32: the expert of each row, -1 for padding rows.
    permuted_indice_map   [W, K_top] int32: row of entry (t, k) in permute_x, or -1.
    token_nums_per_expert [E, 1] int32: rows used per expert.
    """
    permute_x: paddle.Tensor
    permute_scale: paddle.Tensor | None
    m_indices: paddle.Tensor
    permuted_indice_map: paddle.Tensor
    token_nums_per_expert: paddle.Tensor


def _check_topk_ids(topk_ids, num_local_experts: int) -> paddle.Tensor:
    """topk_ids [W, K_top] int32|int64 with values in [-1, E) -> same values as int64."""
    check_tensor(topk_ids, "topk_ids", dtypes=INT_DTYPES, ndim=2)
    return check_ids_in_range(topk_ids, "topk_ids", num_local_experts, "local expert ids", f"E={num_local_experts}")


def _check_x_and_scale(x, scale, topk_ids, group_size: int = GROUP_SIZE):
    check_tensor(x, "x", dtypes=_X_DTYPES, ndim=2)
    check_dim(topk_ids, 0, int(x.shape[0]), "topk_ids", "W (rows of x)")
    if scale is None:
        if x.dtype == paddle.float8_e4m3fn:
            raise ValueError("scale: required when x is float8_e4m3fn, got None")
        return
    check_tensor(scale, "scale", dtypes=_SCALE_DTYPES, ndim=2)
    check_dim(scale, 0, int(x.shape[0]), "scale", "W (rows of x)")
    groups = num_scale_groups(int(x.shape[1]), group_size)
    if scale.dtype == paddle.int32:
        check_dim(scale, 1, packed_words(groups), "scale", "ceil(S/4) packed UE8M0 words")
    else:
        check_dim(scale, 1, groups, "scale", f"S = ceil(H/{group_size})")


def _slots_in_expert(ids: paddle.Tensor, num_local_experts: int):
    """ids [W, K_top] int64 in [-1, E) -> (slot [W·K_top] int64, counts [E] int64).

    slot of entry (t, k) = number of entries with the same expert before it in (t, k) order:
    a stable sort by expert keeps that order, so slot = sorted position - start of the expert.
    """
    flat = ids.flatten()
    n = int(flat.shape[0])
    key = paddle.where(flat >= 0, flat, paddle.full_like(flat, num_local_experts))   # -1 sorts last
    counts = paddle.bincount(key, minlength=num_local_experts + 1)[:num_local_experts]
    starts = paddle.concat([paddle.zeros([1], dtype=paddle.int64), paddle.cumsum(counts)])   # [E + 1]
    order = paddle.argsort(key, stable=True)
    slot_sorted = paddle.arange(n, dtype=paddle.int64) - paddle.gather(starts, paddle.gather(key, order))
    slot = paddle.scatter(paddle.zeros([n], dtype=paddle.int64), order, slot_sorted)
    return slot, counts.astype(paddle.int64)


def _scatter_sources(dest: paddle.Tensor, valid: paddle.Tensor, num_rows: int, k: int) -> paddle.Tensor:
    """Inverse of the (t, k) -> row map: [num_rows] int64 holding the token t that fills each row, or -1."""
    n = int(dest.shape[0])
    token = paddle.arange(n, dtype=paddle.int64) // k
    src = paddle.full([num_rows + 1], -1, dtype=paddle.int64)     # last entry absorbs the unrouted entries
    index = paddle.where(valid, dest, paddle.full_like(dest, num_rows))
    src = paddle.scatter(src, index, paddle.where(valid, token, paddle.full_like(token, -1)), overwrite=True)
    return src[:num_rows]


def _check_overflow(counts: paddle.Tensor, max_token_num: int) -> None:
    over = paddle.nonzero(counts > max_token_num).flatten()
    if int(over.shape[0]):
        e = int(over[0])
        raise ValueError(f"max_token_num: expert {e} receives {int(counts[e])} rows, more than M = {max_token_num}")


def prefill_permute_to_masked_gemm(x: paddle.Tensor, scale: paddle.Tensor | None, topk_ids: paddle.Tensor,
                                   num_local_experts: int, max_token_num: int,
                                   group_size: int = GROUP_SIZE) -> MaskedLayout:
    """Permute tokens into the masked grouped-GEMM layout (SPEC §5).

    x [W, H] fp8 | bf16, scale [W, S'] float32 (S' = S) | packed UE8M0 int32 (S' = ceil(S/4)) | None,
    topk_ids [W, K_top] int64 local ids or -1, E = num_local_experts, M = max_token_num;
    S = ceil(H/group_size) (128, SPEC §5; 32 for #7666's 1x32 groups: the scale rows only move)
    -> MaskedLayout(permute_x [E, M, H], permute_scale (logical [E, M, S'] MN-major, physical
    [E, S', align(M, 4)]), permuted_indice_map [W, K_top] int32, token_nums_per_expert [E, 1] int32).

    Entry (t, k) with id e >= 0 goes to slot `number of earlier (t', k') entries with id e` of
    expert e. Raises ValueError for an id outside [-1, E) or an expert with more than M rows.
    """
    num_experts = check_positive_int(num_local_experts, "num_local_experts")
    m = check_positive_int(max_token_num, "max_token_num")
    ids = _check_topk_ids(topk_ids, num_experts)
    _check_x_and_scale(x, scale, topk_ids, group_size)
    k = int(ids.shape[1])

    slot, counts = _slots_in_expert(ids, num_experts)
    _check_overflow(counts, m)
    flat = ids.flatten()
    valid = flat >= 0
    dest = paddle.where(valid, flat * m + slot, paddle.full_like(flat, -1))          # [W·K_top]
    src = _scatter_sources(dest, valid, num_experts * m, k)                           # [E·M]

    permute_x = gather_rows_zero_fill(x, src).reshape([num_experts, m, int(x.shape[1])])
    permute_scale = None
    if scale is not None:
        rows = gather_rows_zero_fill(scale, src).reshape([num_experts, m, int(scale.shape[1])])
        permute_scale = to_mn_major_tma_aligned(rows)
    return MaskedLayout(permute_x, permute_scale, dest.reshape(ids.shape).astype(paddle.int32),
                        counts.reshape([num_experts, 1]).astype(paddle.int32))


def permute_to_contiguous(x: paddle.Tensor, scale: paddle.Tensor | None, topk_ids: paddle.Tensor,
                          num_local_experts: int, group_size: int = GROUP_SIZE) -> ContiguousLayout:
    """Permute tokens into the contiguous grouped-GEMM layout (SPEC §5).

    x [W, H] fp8 | bf16, scale [W, S'] float32 | packed int32 | None, topk_ids [W, K_top] int64 local ids or -1
    -> ContiguousLayout(permute_x [Mc, H], permute_scale [Mc, S'] row-major, m_indices [Mc] int32,
    permuted_indice_map [W, K_top] int32, token_nums_per_expert [E, 1] int32), Mc = Σ_e align(count_e, 128).
    Same slot order as the masked layout; segment of expert e = rows offset_e .. offset_e + count_e - 1.
    """
    num_experts = check_positive_int(num_local_experts, "num_local_experts")
    ids = _check_topk_ids(topk_ids, num_experts)
    _check_x_and_scale(x, scale, topk_ids, group_size)
    k = int(ids.shape[1])

    slot, counts = _slots_in_expert(ids, num_experts)
    padded = ((counts + CONTIGUOUS_SEGMENT_ALIGN - 1) // CONTIGUOUS_SEGMENT_ALIGN) * CONTIGUOUS_SEGMENT_ALIGN
    offsets = paddle.concat([paddle.zeros([1], dtype=paddle.int64), paddle.cumsum(padded)])   # [E + 1]
    total = int(offsets[-1])
    flat = ids.flatten()
    valid = flat >= 0
    dest = paddle.where(valid, paddle.gather(offsets, paddle.clip(flat, min=0)) + slot, paddle.full_like(flat, -1))
    src = _scatter_sources(dest, valid, total, k)

    expert_of_row = paddle.full([total + 1], -1, dtype=paddle.int64)
    expert_of_row = paddle.scatter(expert_of_row, paddle.where(valid, dest, paddle.full_like(dest, total)),
                                   paddle.where(valid, flat, paddle.full_like(flat, -1)), overwrite=True)
    permute_x = gather_rows_zero_fill(x, src)
    permute_scale = gather_rows_zero_fill(scale, src) if scale is not None else None
    return ContiguousLayout(permute_x, permute_scale, expert_of_row[:total].astype(paddle.int32),
                            dest.reshape(ids.shape).astype(paddle.int32),
                            counts.reshape([num_experts, 1]).astype(paddle.int32))


def weighted_gather_combine(rows: paddle.Tensor, indice_map: paddle.Tensor, topk_weights: paddle.Tensor,
                            num_worst_tokens: int, rows_name: str = "rows") -> paddle.Tensor:
    """The one weighted combine of SPEC §8, on any flat row buffer.

    rows [N, H] bf16 | float32, indice_map [W, K_top] int32 | int64 (row of `rows` or -1),
    topk_weights [W, K_top] float32 -> out [W, H] bf16:
    out[t] = bf16(Σ_{k ascending, idx >= 0} topk_weights[t, k] · float32(rows[idx])), idx = indice_map[t, k].
    """
    check_tensor(indice_map, "indice_map", dtypes=INT_DTYPES, ndim=2)
    check_tensor(topk_weights, "topk_weights", dtypes=FLOAT_DTYPES, ndim=2)
    w_rows = check_nonnegative_int(num_worst_tokens, "num_worst_tokens")   # W = 0: no tokens on this rank
    check_dim(indice_map, 0, w_rows, "indice_map", "num_worst_tokens")
    check_same_shape(topk_weights, "topk_weights", indice_map, "indice_map")
    n = int(rows.shape[0])
    idx = check_ids_in_range(indice_map, "indice_map", n, "values", note=f" (rows of {rows_name})")
    weights = topk_weights.astype(paddle.float32)
    acc = paddle.zeros([w_rows, int(rows.shape[1])], dtype=paddle.float32)
    for k in range(int(idx.shape[1])):          # fixed k order: the float32 sum is reproducible
        valid = (idx[:, k] >= 0).unsqueeze(1)
        picked = paddle.gather(rows, paddle.clip(idx[:, k], min=0), axis=0).astype(paddle.float32)
        term = weights[:, k: k + 1] * picked
        acc = acc + paddle.where(valid, term, paddle.zeros_like(term))
    return acc.astype(paddle.bfloat16)


def depermute_prefill_combine(ffn_out: paddle.Tensor, indice_map: paddle.Tensor, topk_weights: paddle.Tensor,
                              num_worst_tokens: int) -> paddle.Tensor:
    """Gather each token's expert rows back and sum them weighted (SPEC §8).

    ffn_out [E, M, H] bf16 | float32, indice_map [W, K_top] int32 (e·M + slot or -1),
    topk_weights [W, K_top] float32, num_worst_tokens = W -> out [W, H] bf16:
    out[t] = bf16(Σ_{k ascending, idx >= 0} topk_weights[t, k] · float32(ffn_out[idx // M, idx % M])),
    float32 accumulation; rows with no valid index are zero.
    """
    check_tensor(ffn_out, "ffn_out", dtypes=FLOAT_DTYPES, ndim=3)
    e, m, h = (int(d) for d in ffn_out.shape)
    return weighted_gather_combine(ffn_out.reshape([e * m, h]), indice_map, topk_weights, num_worst_tokens,
                                    "ffn_out as [E·M, H]")


def depermute_contiguous_combine(ffn_out: paddle.Tensor, indice_map: paddle.Tensor, topk_weights: paddle.Tensor,
                                 num_worst_tokens: int) -> paddle.Tensor:
    """Inverse of permute_to_contiguous with the weighted sum (SPEC §8 on the contiguous layout).

    ffn_out [Mc, H] bf16 | float32, indice_map [W, K_top] int32 (row or -1), topk_weights [W, K_top] float32
    -> out [W, H] bf16, same formula and summation order as depermute_prefill_combine.
    """
    check_tensor(ffn_out, "ffn_out", dtypes=FLOAT_DTYPES, ndim=2)
    return weighted_gather_combine(ffn_out, indice_map, topk_weights, num_worst_tokens, "ffn_out")
