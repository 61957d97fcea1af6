"""Expert-parallel dispatch and combine (SPEC §9), simulated in one process for R ranks.

Every argument that lives on a rank is a list with one tensor per rank (index = rank).
The order of everything (owner of each global expert, receive order, padding rows, the W
overflow error, the summation order of combine) is fixed once, in docs/design.md
("Expert-parallel semantics, exact"), so that this simulation, the in-process runner and the
paddle.distributed runner agree bit for bit.

The low-latency ("ll", decode) pair returns the masked layout directly: [E, R·N, H] per rank
with slots ordered (source rank, source token, k) and a per-expert count.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from ._paddle import paddle
from .checks import (FLOAT_DTYPES, INT_DTYPES, check_dim, check_finite, check_ids_in_range, check_positive_int,
                     check_same_shape, check_tensor)
from .fp8 import concat_rows, gather_rows_zero_fill, pack_scale_ue8m0
from .layout import prefill_permute_to_masked_gemm, weighted_gather_combine
from .quant import DEEPGEMM_AMAX_FLOOR, per_token_group_quant


@dataclasses.dataclass
class EPHandle:
    """What combine needs to route rows back. recv_src_rank[r], recv_src_token[r]: [W] int64, the
    source rank and token of each row received by rank r (-1 for padding rows)."""
    num_local_experts: int
    num_worst_tokens: int
    num_tokens: list[int]
    recv_src_rank: list[paddle.Tensor]
    recv_src_token: list[paddle.Tensor]

    @property
    def num_ranks(self) -> int:
        return len(self.num_tokens)


@dataclasses.dataclass
class DispatchOutput:
    """What rank r holds after dispatch (W = num_worst_tokens).

    recv_x [W, H] dtype of x; recv_x_scale [W, S'] dtype of x_scale or None;
    recv_topk_ids [W, K_top] int64 local ids or -1; recv_topk_weights [W, K_top] float32;
    num_recv_tokens: real rows (the rest is padding); handle: what combine needs to route rows back
    (here an EPHandle shared by all ranks, for ep_combine; each EP runner of `backend.moe` returns its
    own handle in this same class).
    """
    recv_x: paddle.Tensor
    recv_x_scale: paddle.Tensor | None
    recv_topk_ids: paddle.Tensor
    recv_topk_weights: paddle.Tensor
    num_recv_tokens: int
    handle: Any


def _as_list(value, name: str, num_ranks: int) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{name}: expected a list with one tensor per rank, got {type(value).__name__}")
    if len(value) != num_ranks:
        raise ValueError(f"{name}: expected {num_ranks} entries (one per rank), got {len(value)}")
    return list(value)


def _check_global_ids(ids: paddle.Tensor, name: str, num_experts_total: int) -> paddle.Tensor:
    return check_ids_in_range(ids, name, num_experts_total, "global expert ids", f"E·R={num_experts_total}")


def _check_per_rank_inputs(x, topk_ids, topk_weights, num_local_experts):
    if not isinstance(x, (list, tuple)) or len(x) == 0:
        raise TypeError("x: expected a non-empty list with one [T, H] tensor per rank")
    num_ranks = len(x)
    topk_ids = _as_list(topk_ids, "topk_ids", num_ranks)
    e = check_positive_int(num_local_experts, "num_local_experts")
    hidden, k, ids_all = None, None, []
    for s in range(num_ranks):
        check_tensor(x[s], f"x[{s}]", ndim=2)
        check_tensor(topk_ids[s], f"topk_ids[{s}]", dtypes=INT_DTYPES, ndim=2)
        check_dim(topk_ids[s], 0, int(x[s].shape[0]), f"topk_ids[{s}]", f"T (rows of x[{s}])")
        hidden = int(x[0].shape[1]) if hidden is None else hidden
        k = int(topk_ids[0].shape[1]) if k is None else k
        check_dim(x[s], 1, hidden, f"x[{s}]", "H (columns of x[0])")
        check_dim(topk_ids[s], 1, k, f"topk_ids[{s}]", "K_top (columns of topk_ids[0])")
        ids_all.append(_check_global_ids(topk_ids[s], f"topk_ids[{s}]", e * num_ranks))
    if topk_weights is not None:
        topk_weights = _as_list(topk_weights, "topk_weights", num_ranks)
        for s in range(num_ranks):
            check_tensor(topk_weights[s], f"topk_weights[{s}]", dtypes=FLOAT_DTYPES, ndim=2)
            check_same_shape(topk_weights[s], f"topk_weights[{s}]", topk_ids[s], f"topk_ids[{s}]")
    return num_ranks, e, ids_all


def _local_ids(ids: paddle.Tensor, rank: int, num_local_experts: int) -> paddle.Tensor:
    """Global ids [N, K_top] -> local ids of `rank`'s experts, -1 for the others and for -1."""
    on_rank = paddle.logical_and(ids >= 0, ids // num_local_experts == rank)
    return paddle.where(on_rank, ids - rank * num_local_experts, paddle.full_like(ids, -1))


def ep_dispatch(x: list, x_scale: list | None, topk_ids: list, topk_weights: list, num_local_experts: int,
                num_worst_tokens: int) -> list[DispatchOutput]:
    """DeepEP "normal" dispatch over R simulated ranks (SPEC §9, design.md exact semantics).

    x[s] [T_s, H] fp8 | bf16, x_scale[s] [T_s, S'] float32 | packed int32 (or x_scale None),
    topk_ids[s] [T_s, K_top] int64 global ids in [-1, E·R), topk_weights[s] [T_s, K_top] float32,
    E = num_local_experts, W = num_worst_tokens -> one DispatchOutput per rank (R = len(x)).
    Raises ValueError naming the rank, its count and W when a rank would receive more than W rows
    (checked for every rank before anything is built, as every real rank would raise).
    """
    if topk_weights is None:
        raise TypeError("topk_weights: expected a list with one [T, K_top] tensor per rank, got None")
    num_ranks, e, ids_all = _check_per_rank_inputs(x, topk_ids, topk_weights, num_local_experts)
    w_rows = check_positive_int(num_worst_tokens, "num_worst_tokens")
    if x_scale is not None:
        x_scale = _as_list(x_scale, "x_scale", num_ranks)
        for s in range(num_ranks):
            check_tensor(x_scale[s], f"x_scale[{s}]", ndim=2)
            check_dim(x_scale[s], 0, int(x[s].shape[0]), f"x_scale[{s}]", f"T (rows of x[{s}])")
    num_tokens = [int(t.shape[0]) for t in x]

    # All source tokens in (source rank, source token) order: the receive order of every rank.
    x_all = concat_rows(list(x))
    scale_all = None if x_scale is None else paddle.concat(list(x_scale), axis=0)
    ids = paddle.concat(ids_all, axis=0)
    weights = paddle.concat([w.astype(paddle.float32) for w in topk_weights], axis=0)
    src_rank = paddle.concat([paddle.full([n], s, dtype=paddle.int64) for s, n in enumerate(num_tokens)])
    src_token = paddle.concat([paddle.arange(n, dtype=paddle.int64) for n in num_tokens])

    local = [_local_ids(ids, r, e) for r in range(num_ranks)]
    rows = [paddle.nonzero((loc >= 0).any(axis=1)).flatten() for loc in local]
    counts = [int(rw.shape[0]) for rw in rows]
    for r, count in enumerate(counts):
        if count > w_rows:
            raise ValueError(f"num_worst_tokens: rank {r} receives {count} tokens, more than W = {w_rows}")

    outputs, recv_src_rank, recv_src_token = [], [], []
    for r in range(num_ranks):
        src = paddle.concat([rows[r], paddle.full([w_rows - counts[r]], -1, dtype=paddle.int64)])   # [W]
        valid = (src >= 0).unsqueeze(1)
        recv_ids = gather_rows_zero_fill(local[r], src)
        recv_ids = paddle.where(valid, recv_ids, paddle.full_like(recv_ids, -1))
        pick = paddle.clip(src, min=0)
        recv_src_rank.append(paddle.where(src >= 0, paddle.gather(src_rank, pick), src))
        recv_src_token.append(paddle.where(src >= 0, paddle.gather(src_token, pick), src))
        outputs.append(DispatchOutput(
            recv_x=gather_rows_zero_fill(x_all, src),
            recv_x_scale=None if scale_all is None else gather_rows_zero_fill(scale_all, src),
            recv_topk_ids=recv_ids,
            recv_topk_weights=gather_rows_zero_fill(weights, src),
            num_recv_tokens=counts[r], handle=None))
    handle = EPHandle(e, w_rows, num_tokens, recv_src_rank, recv_src_token)
    for out in outputs:
        out.handle = handle
    return outputs


def ep_combine(partial: list, handle: EPHandle) -> list[paddle.Tensor]:
    """DeepEP "normal" combine over R simulated ranks (SPEC §9).

    partial[r] [W, H] bf16 (rank r's weighted expert output, SPEC §8), handle from ep_dispatch
    -> out[s] [T_s, H] bf16: bf16(Σ_{r ascending, t sent to r} float32(partial[r][row of t on r])),
    no weights, one rounding; tokens sent nowhere are zero.
    """
    if not isinstance(handle, EPHandle):
        raise TypeError(f"handle: expected EPHandle from ep_dispatch, got {type(handle).__name__}")
    num_ranks, w_rows = handle.num_ranks, handle.num_worst_tokens
    partial = _as_list(partial, "partial", num_ranks)
    hidden = None
    for r in range(num_ranks):
        check_tensor(partial[r], f"partial[{r}]", dtypes=FLOAT_DTYPES, ndim=2)
        hidden = int(partial[0].shape[1]) if hidden is None else hidden
        if list(partial[r].shape) != [w_rows, hidden]:
            raise ValueError(f"partial[{r}]: expected shape [W, H] = {[w_rows, hidden]}, got {list(partial[r].shape)}")

    outputs = []
    for s, n in enumerate(handle.num_tokens):
        acc = paddle.zeros([n, hidden], dtype=paddle.float32)
        for r in range(num_ranks):              # rank order is part of the contract
            from_s = handle.recv_src_rank[r] == s
            token = paddle.where(from_s, handle.recv_src_token[r], paddle.full_like(handle.recv_src_token[r], n))
            row_of_token = paddle.scatter(paddle.full([n + 1], -1, dtype=paddle.int64), token,
                                          paddle.where(from_s, paddle.arange(w_rows, dtype=paddle.int64),
                                                       paddle.full([w_rows], -1, dtype=paddle.int64)))[:n]
            picked = paddle.gather(partial[r], paddle.clip(row_of_token, min=0), axis=0).astype(paddle.float32)
            acc = acc + paddle.where((row_of_token >= 0).unsqueeze(1), picked, paddle.zeros_like(picked))
        outputs.append(acc.astype(paddle.bfloat16))
    return outputs


# ---------------------------------------------------------------------------------------------
# Low latency ("ll", decode)
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class EPLLHandle:
    """indice_map[r]: [ΣT_s, K_top] int32, slot e·(R·N) + j on rank r of entry (global token, k), or -1.
    num_tokens: T_s per source rank; global token order is (source rank, source token)."""
    num_local_experts: int
    num_max_dispatch_tokens_per_rank: int
    num_tokens: list[int]
    indice_map: list[paddle.Tensor]


def ll_dispatch(x: list, topk_ids: list, num_max_dispatch_tokens_per_rank: int, num_local_experts: int,
                use_fp8: bool = True, use_ue8m0: bool = False, amax_floor: float = DEEPGEMM_AMAX_FLOOR):
    """DeepEP low-latency dispatch over R simulated ranks (SPEC §9, last item).

    x[s] [T_s, H] bf16 (T_s <= N = num_max_dispatch_tokens_per_rank), topk_ids[s] [T_s, K_top] global ids
    -> list over ranks of (recv_x [E, R·N, H] fp8 (use_fp8) | bf16, recv_x_scale MNMajorScale logical
    [E, R·N, S] float32 or packed int32 [E, R·N, ceil(S/4)] (use_ue8m0) | None, recv_count [E] int32, handle).
    Each (token, k) entry whose expert lives on r takes the next slot of that expert, in
    (source rank, source token, k) order. Tokens are quantized per 1x128 on their source rank.
    """
    num_ranks, e, ids_all = _check_per_rank_inputs(x, topk_ids, None, num_local_experts)
    n = check_positive_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank")
    for s, t in enumerate(x):
        if int(t.shape[0]) > n:
            raise ValueError(f"x[{s}]: {int(t.shape[0])} tokens, more than num_max_dispatch_tokens_per_rank = {n}")
    if use_ue8m0 and not use_fp8:
        raise ValueError("use_ue8m0: only meaningful with use_fp8=True")
    if use_fp8:
        for s, t in enumerate(x):
            check_finite(t, f"x[{s}]")               # SPEC §1; no nan_policy here
        quantized = [per_token_group_quant(t, use_ue8m0=use_ue8m0, amax_floor=amax_floor) for t in x]
        x_all = concat_rows([q for q, _ in quantized])
        scale_all = paddle.concat([s for _, s in quantized], axis=0)
        if use_ue8m0:
            scale_all = pack_scale_ue8m0(scale_all)
    else:
        x_all = paddle.concat([t.astype(paddle.bfloat16) for t in x], axis=0)
        scale_all = None
    ids = paddle.concat(ids_all, axis=0)
    results, maps = [], []
    for r in range(num_ranks):
        lay = prefill_permute_to_masked_gemm(x_all, scale_all, _local_ids(ids, r, e), e, num_ranks * n)
        maps.append(lay.permuted_indice_map)
        results.append([lay.permute_x, lay.permute_scale, lay.token_nums_per_expert.flatten()])
    handle = EPLLHandle(e, n, [int(t.shape[0]) for t in x], maps)
    return [tuple(res) + (handle,) for res in results]


def ll_combine(expert_out: list, topk_ids: list, topk_weights: list, handle: EPLLHandle) -> list[paddle.Tensor]:
    """DeepEP low-latency combine over R simulated ranks.

    expert_out[r] [E, R·N, H] bf16, topk_ids[s] / topk_weights[s] [T_s, K_top] (as given to ll_dispatch)
    -> out[s] [T_s, H] bf16 = bf16(Σ_{k ascending, id >= 0} w[t, k] · float32(expert_out[id // E][id % E, slot])).
    """
    if not isinstance(handle, EPLLHandle):
        raise TypeError(f"handle: expected EPLLHandle from ll_dispatch, got {type(handle).__name__}")
    num_ranks = len(handle.num_tokens)
    e, n = handle.num_local_experts, handle.num_max_dispatch_tokens_per_rank
    expert_out = _as_list(expert_out, "expert_out", num_ranks)
    topk_ids = _as_list(topk_ids, "topk_ids", num_ranks)
    topk_weights = _as_list(topk_weights, "topk_weights", num_ranks)
    rows_per_rank = e * num_ranks * n
    for r in range(num_ranks):
        check_tensor(expert_out[r], f"expert_out[{r}]", dtypes=FLOAT_DTYPES, ndim=3)
        if list(expert_out[r].shape[:2]) != [e, num_ranks * n]:
            raise ValueError(f"expert_out[{r}]: expected shape [E, R·N, H] with E={e}, R·N={num_ranks * n}, "
                             f"got {list(expert_out[r].shape)}")
        check_dim(topk_ids[r], 0, handle.num_tokens[r], f"topk_ids[{r}]", "T of that rank at dispatch")
    hidden = int(expert_out[0].shape[2])
    rows = paddle.concat([o.reshape([rows_per_rank, hidden]) for o in expert_out], axis=0)
    # One global row index per (token, k): rank offset + slot on that rank; the maps are -1 off-rank.
    global_map = paddle.full(handle.indice_map[0].shape, -1, dtype=paddle.int64)
    for r in range(num_ranks):
        m = handle.indice_map[r].astype(paddle.int64)
        global_map = paddle.where(m >= 0, m + r * rows_per_rank, global_map)
    weights = paddle.concat([w.astype(paddle.float32) for w in topk_weights], axis=0)
    out = weighted_gather_combine(rows, global_map, weights, int(weights.shape[0]),
                                   "expert_out of all ranks")
    bounds = [0]
    for t in handle.num_tokens:
        bounds.append(bounds[-1] + t)
    return [out[bounds[s]: bounds[s + 1]] for s in range(num_ranks)]
