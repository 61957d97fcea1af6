"""Portable provider of the ops contract: vectorized Paddle, CPU or GPU.

Arguments arrive validated by `backend.ops`; see the docstrings there for shapes and layouts.
This is an implementation of its own, not a call into `moe_ref`'s ops (only the format helpers of
`moe_ref.fp8` - constants, MN-major storage, gather with a zero row - and the CUTLASS formula are shared): slots come from a running one-hot count per expert and rows
move by scattering source indices, scale exponents come from `frexp`, packed words are read through a byte view.
CPU Paddle has no arithmetic on float8 and no uint8 `scatter`/`max`/`multiply`, so fp8 rows
move as uint8 bytes (gather only) and all math is float32 or int32/int64.
"""
from __future__ import annotations

import paddle

from moe_ref.checks import first_index
from moe_ref.fp8 import (BYTES_PER_WORD, E4M3_MAX, UE8M0_BIAS, UE8M0_MAX_EXP, UE8M0_MIN_EXP, UE8M0_NAN, align,
                         dtype_view, gather_rows_zero_fill, to_mn_major_view)
from moe_ref.quant import DEEPGEMM_AMAX_FLOOR, FASTDEPLOY_AMAX_FLOOR, GROUP_SIZE

from moe_ref import cutlass_sf
from moe_ref.cutlass_sf import SF_TILE_ROWS, SF_VEC_SIZE

from . import device_errors

NAME = "paddle"

FP8 = paddle.float8_e4m3fn
SF_PER_GROUP = GROUP_SIZE // SF_VEC_SIZE          # 32-wide scale bytes per 128-wide group: 4


def is_available() -> tuple[bool, str]:
    """Always available: plain Paddle ops on whatever device the tensors live on."""
    return True, "vectorized Paddle, any device"


# ----------------------------------------------------------------------------- helpers

def _pow2_ceil_exponent(s: paddle.Tensor) -> paddle.Tensor:
    """s [...] float32 > 0, normal -> int32 e with 2^(e-1) < s <= 2^e, clamped to UE8M0's 1-127..254-127.

    frexp gives s = f · 2^x with f in [0.5, 1): s is a power of two exactly when f == 0.5.
    """
    f, x = paddle.frexp(s)
    x = x.astype(paddle.int32)
    e = paddle.where(f == 0.5, x - 1, x)
    return paddle.clip(e, UE8M0_MIN_EXP - UE8M0_BIAS, UE8M0_MAX_EXP - UE8M0_BIAS)


def _exp2(e: paddle.Tensor) -> paddle.Tensor:
    """int32 exponents -> float32 2^e (exact, subnormals included)."""
    return paddle.ldexp(paddle.ones(e.shape, dtype=paddle.float32), e)


def _pack_bytes(b: paddle.Tensor) -> paddle.Tensor:
    """b [..., G] int32 byte values -> [..., ceil(G/4)] int32 words, little-endian, padded with byte 0."""
    g = int(b.shape[-1])
    words = -(-g // BYTES_PER_WORD)
    if words * BYTES_PER_WORD != g:
        b = paddle.concat([b, paddle.zeros(list(b.shape[:-1]) + [words * BYTES_PER_WORD - g], dtype=b.dtype)], -1)
    if b.numel() == 0:
        return paddle.zeros(list(b.shape[:-1]) + [words], dtype=paddle.int32)
    # Reinterpret 4 consecutive bytes as one little-endian int32 (the same bytes the GPU reads).
    return b.astype(paddle.uint8).reshape(list(b.shape[:-1]) + [words * BYTES_PER_WORD]).view(paddle.int32)


def _words_to_bytes(words: paddle.Tensor) -> paddle.Tensor:
    """[..., C] int32 (any strides) -> [..., 4C] uint8, byte j of word p at column 4p + j."""
    return dtype_view(words, paddle.uint8)


def _decode_ue8m0(b: paddle.Tensor) -> paddle.Tensor:
    """uint8 / int32 exponent bytes -> float32 2^(b - 127); 255 -> NaN."""
    e = b.astype(paddle.int32)
    out = _exp2(e - UE8M0_BIAS)
    return paddle.where(e == UE8M0_NAN, paddle.full_like(out, float("nan")), out)


def _quantize_groups(y: paddle.Tensor, block_size: int, use_ue8m0: bool, amax_floor: float):
    """y [R, L] float32 -> (q [R, L] uint8 e4m3 bytes, scale [R, G] float32, exponent bytes [R, G] int32 | None)."""
    r, length = (int(d) for d in y.shape)
    g = -(-length // block_size)
    if g * block_size != length:
        y = paddle.concat([y, paddle.zeros([r, g * block_size - length], dtype=y.dtype)], axis=1)
    groups = y.reshape([r, g, block_size])
    amax = paddle.maximum(groups.abs().max(axis=-1), paddle.full([1], amax_floor, dtype=paddle.float32))
    s = amax / E4M3_MAX
    exp_bytes = None
    if use_ue8m0:
        e = _pow2_ceil_exponent(s)
        s = _exp2(e)
        exp_bytes = e + UE8M0_BIAS
    q = (groups / s.unsqueeze(-1)).clip_(-E4M3_MAX, E4M3_MAX).astype(FP8)
    q = q.view(paddle.uint8).reshape([r, g * block_size])
    if g * block_size != length:
        q = q[:, :length].contiguous()
    return q, s, exp_bytes


def _valid_rows(counts: paddle.Tensor, rows_per_expert: int):
    """counts [E] int32 -> (flat rows e·M + m of every m < counts[e] [V] int64, expert of each [V], m of each [V])."""
    c = counts.astype(paddle.int64)
    e = c.shape[0]
    expert = paddle.repeat_interleave(paddle.arange(e, dtype=paddle.int64), c)
    starts = paddle.cumsum(c) - c
    m = paddle.arange(expert.shape[0], dtype=paddle.int64) - paddle.gather(starts, expert)
    return expert * rows_per_expert + m, expert, m


def _scatter_source_index(dest: paddle.Tensor, num_rows: int, num_src: int) -> paddle.Tensor:
    """For each of num_rows destinations, the source row written there, or num_src (a zero row) if none.

    dest [V] int64: destination of source row i (all distinct, in [0, num_rows)).
    """
    src = paddle.full([num_rows], num_src, dtype=paddle.int64)
    if int(dest.shape[0]) == 0:
        return src
    return paddle.scatter(src, dest, paddle.arange(dest.shape[0], dtype=paddle.int64), overwrite=True)


def _mn_major(rows: paddle.Tensor, e: int, m: int) -> paddle.Tensor:
    """rows [E·M, C] -> MN-major strided view, logical [E, M, C] (moe_ref.fp8's storage helper)."""
    return to_mn_major_view(rows.reshape([e, m, int(rows.shape[1])]))


# ----------------------------------------------------------------------------- ops

def per_token_quant(x, block_size, use_ue8m0):
    t = int(x.shape[0])
    q, s, exp_bytes = _quantize_groups(x.astype(paddle.float32), block_size, use_ue8m0, DEEPGEMM_AMAX_FLOOR)
    q = q.view(FP8) if t else q.astype(FP8)
    return q, (_pack_bytes(exp_bytes) if use_ue8m0 else s)


def prefill_permute_to_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    e, m = num_local_experts, max_token_num
    w, k_top = (int(d) for d in topk_ids.shape)
    ids = topk_ids.astype(paddle.int64).reshape([-1])
    # ids outside [0, E) and rows past M are dropped (map -1, not written): the contract has raised on them in
    # eager mode; in deferred mode they are recorded in `errors` (backend.ops.device_errors)
    valid = paddle.logical_and(ids >= 0, ids < e)
    # Counting, not sorting: a running one-hot count per expert over the (t, k) entries in
    # token-major-then-k order gives each entry its slot. Memory: W·K_top·E int32.
    one_hot = paddle.nn.functional.one_hot(paddle.where(valid, ids, paddle.full_like(ids, e)), e + 1)
    running = paddle.cumsum(one_hot.astype(paddle.int32), axis=0)[:, :e]                  # [W·K_top, E]
    safe_ids = paddle.where(valid, ids, paddle.zeros_like(ids)).unsqueeze(1)
    slot = paddle.take_along_axis(running, safe_ids, axis=1).squeeze(1).astype(paddle.int64) - 1
    valid = paddle.logical_and(valid, slot < m)
    dest = paddle.where(valid, ids * m + slot, paddle.full_like(ids, -1))
    routed_counts = running[-1] if w * k_top else paddle.zeros([e], dtype=paddle.int32)
    if errors is not None:
        device_errors.record_bad_ids(errors, topk_ids, e, device_errors.BAD_LOCAL_ID)
        device_errors.record_overflow(errors, routed_counts, m)
    counts = paddle.minimum(routed_counts, paddle.full_like(routed_counts, m))
    # Scatter-based: each destination row learns the token written there (w: the appended zero row).
    routed = paddle.nonzero(valid).flatten()
    src_token = paddle.full([e * m], w, dtype=paddle.int64)
    if int(routed.shape[0]):
        src_token = paddle.scatter(src_token, paddle.gather(dest, routed), routed // k_top, overwrite=True)
    permute_x = gather_rows_zero_fill(x, src_token).reshape([e, m, int(x.shape[1])])
    permute_scale = None
    if scale is not None:
        permute_scale = _mn_major(gather_rows_zero_fill(scale, src_token), e, m)
    return (permute_x, permute_scale, dest.reshape([w, k_top]).astype(paddle.int32),
            counts.astype(paddle.int32).reshape([e, 1]))


def _words_to_sf(words: paddle.Tensor, masked_m: paddle.Tensor | None, group_size: int) -> paddle.Tensor:
    """Packed UE8M0 words [E, MN, C] (any strides; bytes = groups of group_size along K) -> CUTLASS SF bytes
    [E, align(MN, 128), 4C · group_size/32]: each group byte repeated once per 32 K-elements, rows >= MN and
    rows >= masked_m[e] zero, swizzled (SPEC §4). group_size 128: unpack_and_convert_scale; 32: the bytes as they are."""
    e, mn, c = (int(d) for d in words.shape)
    mn_pad = align(mn, SF_TILE_ROWS)
    b = _words_to_bytes(words).astype(paddle.int32)                          # [E, MN, 4C]
    if masked_m is not None:
        keep = paddle.arange(mn, dtype=paddle.int32).reshape([1, mn, 1]) < masked_m.reshape([e, 1, 1])
        b = b * keep.astype(paddle.int32)
    rep = group_size // SF_VEC_SIZE
    if rep > 1:
        b = b.unsqueeze(-1).expand([e, mn, c * BYTES_PER_WORD, rep]).reshape([e, mn, -1])
    if mn_pad != mn:
        b = paddle.concat([b, paddle.zeros([e, mn_pad - mn, int(b.shape[2])], dtype=b.dtype)], axis=1)
    return cutlass_sf.swizzle(b.astype(paddle.uint8))


def unpack_and_convert_scale(scale, masked_m):
    # One byte per 32 K-elements: each 128-group byte covers SF_PER_GROUP of them.
    return _words_to_sf(scale, masked_m, GROUP_SIZE)


def cutlass_scale_to_fp32(sf, num_rows):
    e, mn_pad, kb = (int(d) for d in sf.shape)
    rm = cutlass_sf.unswizzle(sf).astype(paddle.int32).reshape([e, mn_pad, kb // SF_PER_GROUP, SF_PER_GROUP])
    first = rm[..., :1]
    disagree = (rm != first).any(axis=-1)
    if bool(disagree.any()):
        at = [int(i) for i in paddle.nonzero(disagree)[0]]
        raise ValueError(f"sf: the {SF_PER_GROUP} bytes of 128-group {at[2]} of expert {at[0]}, row {at[1]} differ: "
                         f"{rm[at[0], at[1], at[2]].tolist()} (expected one UE8M0 byte repeated per 32 K-elements)")
    return _decode_ue8m0(first.squeeze(-1)[:, :num_rows])


def _decode_sf_rows(sf: paddle.Tensor, expert: paddle.Tensor, row: paddle.Tensor, num_cols: int) -> paddle.Tensor:
    """Scales of rows (expert, row) of CUTLASS SF bytes sf [E, MN_pad, KB], columns 0..num_cols-1, read
    through `cutlass_sf.sf_byte_offset`: expert, row int64 broadcastable to [...] -> [..., num_cols] fp32."""
    _, mn_pad, kb = (int(d) for d in sf.shape)
    col = paddle.arange(num_cols, dtype=paddle.int64)
    offset = expert.unsqueeze(-1) * (mn_pad * kb) + cutlass_sf.sf_byte_offset(row.unsqueeze(-1), col, kb)
    return _decode_ue8m0(paddle.gather(sf.reshape([-1]), offset.reshape([-1])).reshape(offset.shape))


def _apply_k_scales(x: paddle.Tensor, s: paddle.Tensor) -> paddle.Tensor:
    """x [V, K] fp32 (consumed: scaled in place), s [V, ceil(K/32)] -> x · s, each scale on its 32 columns.

    A broadcast multiply over the [V, KB, 32] view; a ragged K is zero-padded for it and cut back after
    (clone: a contiguous copy of the slice).
    """
    v, k = (int(d) for d in x.shape)
    kb = int(s.shape[1])
    if kb * SF_VEC_SIZE != k:
        x = paddle.concat([x, paddle.zeros([v, kb * SF_VEC_SIZE - k], dtype=x.dtype)], axis=1)
    blocks = x.reshape([v, kb, SF_VEC_SIZE])
    blocks.multiply_(s.unsqueeze(-1))
    x = blocks.reshape([v, kb * SF_VEC_SIZE])
    return x if kb * SF_VEC_SIZE == k else x[:, :k].clone()


def _fp8_to_float(x: paddle.Tensor) -> paddle.Tensor:
    """uint8 bytes of e4m3 values (any shape) -> float32."""
    return x.view(FP8).astype(paddle.float32)


def group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, recipe, *, sfb_per_block,
                      sfb_prepared, sfa_per_group, expected_m):
    # sm_count, recipe (None or "w8a8": the same computation), sfb_per_block, sfa_per_group and expected_m change
    # nothing here: every row's scale bytes are decoded, whatever they hold.
    e, n, k = (int(d) for d in b.shape)
    m = max_m_per_expert
    counts = [int(c) for c in masked_m.tolist()]
    active = [ex for ex in range(e) if counts[ex]]
    if not active:
        return out
    kb = -(-k // SF_VEC_SIZE)
    # Work scales with the valid rows and the experts that have some, never with E·M:
    # A: the valid rows of every expert, dequantized at once (rows grouped by expert, in order).
    rows, expert, m_idx = _valid_rows(masked_m, m)
    a_deq = _apply_k_scales(_fp8_to_float(paddle.gather(a.view(paddle.uint8), rows)),
                            _decode_sf_rows(sfa, expert, m_idx, kb))                            # [V, K]
    # B: scales of the active experts' rows, decoded at once; each weight matrix dequantized when used.
    b_scale = _decode_sf_rows(sfb, paddle.to_tensor(active, dtype=paddle.int64).unsqueeze(1),
                              paddle.arange(n, dtype=paddle.int64).unsqueeze(0), kb)              # [A, N, KB]
    b_bytes = b.view(paddle.uint8)
    start = 0
    for j, ex in enumerate(active):
        c = counts[ex]
        b_deq = _apply_k_scales(_fp8_to_float(b_bytes[ex]), b_scale[j])                       # [N, K]
        piece = paddle.matmul(a_deq[start:start + c], b_deq, transpose_y=True)
        if bias is not None:
            piece = piece + bias[ex].astype(paddle.float32)
        out[ex * m:ex * m + c] = piece.astype(out.dtype)
        start += c
    return out


def _check_swiglu_finite(y: paddle.Tensor, rows: paddle.Tensor, m: int) -> None:
    """y [V, I] float32 of the valid rows `rows` (flat e·M + m): all finite, else ValueError (SPEC §1). The
    contract has checked that up is finite: a non-finite y here is lin · gate overflowing float32 / bf16."""
    if not device_errors.value_checks_on():
        return
    bad = paddle.logical_not(paddle.isfinite(y))
    if bool(bad.any()):
        r, j = first_index(bad)
        flat = int(rows[r])
        raise ValueError(f"SwiGLU(up): non-finite value {float(y[r, j])} at index ({flat // m}, {flat % m}, {j}) "
                         f"for a finite up (lin · gate overflows); SPEC §1: quantization input must be finite")


def fused_mask_swiglu_fp8_quant(up, token_nums_per_expert, block_size, use_ue8m0):
    e, m, i2 = (int(d) for d in up.shape)
    i = i2 // 2
    rows, _, _ = _valid_rows(token_nums_per_expert, m)
    v = int(rows.shape[0])
    # Row 2r of the [E·M·2, I] view is the gate half of row r, row 2r + 1 its lin half: both gathered
    # contiguous (elementwise ops on strided column slices are several times slower on CPU).
    halves = up.reshape([e * m * 2, i])
    gate = paddle.gather(halves, rows * 2).astype(paddle.float32)
    lin = paddle.gather(halves, rows * 2 + 1).astype(paddle.float32)
    den = paddle.exp(-gate).scale_(1.0, 1.0)                                 # 1 + exp(-gate), in place
    y = (lin * gate).divide_(den).astype(paddle.bfloat16).astype(paddle.float32)
    _check_swiglu_finite(y, rows, m)
    q, s, exp_bytes = _quantize_groups(y, block_size, use_ue8m0, FASTDEPLOY_AMAX_FLOOR)
    scale_rows = _pack_bytes(exp_bytes) if use_ue8m0 else s
    src = _scatter_source_index(rows, e * m, v)
    act = gather_rows_zero_fill(q, src).view(FP8).reshape([e, m, i])
    return act, _mn_major(gather_rows_zero_fill(scale_rows, src), e, m)


def depermute_prefill_combine(ffn_out, indice_map, topk_weights, num_worst_tokens):
    e, m, h = (int(d) for d in ffn_out.shape)
    flat = ffn_out.reshape([e * m, h])
    idx = indice_map.astype(paddle.int64)
    valid = idx >= 0
    safe = paddle.where(valid, idx, paddle.zeros_like(idx))
    acc = paddle.zeros([num_worst_tokens, h], dtype=paddle.float32)
    for k in range(int(idx.shape[1])):
        rows = paddle.gather(flat, safe[:, k]).astype(paddle.float32)
        term = rows * topk_weights[:, k:k + 1]
        acc = acc + paddle.where(valid[:, k:k + 1], term, paddle.zeros_like(term))
    return acc.astype(paddle.bfloat16)


# ----------------------------------------------------------------------------- develop's fused ops, #7666's quant
# Composed of this provider's own ops (what one fused kernel does in a single pass); equal to the reference
# moe_ref.blackwell_layout byte for byte (tests/test_paddle_provider.py).

def prefill_permute_to_blackwell_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    e, m = num_local_experts, max_token_num
    group = GROUP_SIZE if scale.dtype == paddle.int32 else SF_VEC_SIZE
    # 1x32 bytes travel through the permute packed 4 to a word, as 1x128 words do: the permute moves rows.
    words = scale if group == GROUP_SIZE else _pack_bytes(scale.astype(paddle.int32))
    permute_x, permute_words, indice_map, counts = prefill_permute_to_masked_gemm(x, words, topk_ids, e, m,
                                                                                  errors=errors)
    sf = _words_to_sf(permute_words, counts.reshape([-1]), group)
    return permute_x.reshape([e * m, int(x.shape[1])]), sf, indice_map, counts


def fused_mask_swiglu_fp8_quant_blackwell(up, token_nums_per_expert, *, group_size):
    e = int(token_nums_per_expert.shape[0])
    rows, i2 = (int(d) for d in up.shape)
    act, words = fused_mask_swiglu_fp8_quant(up.reshape([e, rows // e, i2]), token_nums_per_expert, group_size, True)
    return act.reshape([rows, i2 // 2]), _words_to_sf(words, token_nums_per_expert, group_size)


def group_wise_quant(x, flag, use_swizzle):
    # flag is always False (checked by the contract; its meaning upstream is unknown).
    n, k = int(x.shape[-2]), int(x.shape[-1])
    lead = list(x.shape[:-2])
    q, _, exp_bytes = _quantize_groups(x.astype(paddle.float32).reshape([-1, k]), SF_VEC_SIZE, True,
                                       FASTDEPLOY_AMAX_FLOOR)
    q = (q.view(FP8) if q.numel() else q.astype(FP8)).reshape(lead + [n, k])
    sf = exp_bytes.astype(paddle.uint8).reshape(lead + [n, -(-k // SF_VEC_SIZE)])
    return q, (cutlass_sf.swizzle(sf) if use_swizzle else sf)
