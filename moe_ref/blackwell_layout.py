"""Reference of the two fused `blackwell_ops` ops of FastDeploy #7374 / develop (docs/upstream.md §2).

Since #7374 the "ht" prefill path calls

    blackwell_ops.prefill_permute_to_blackwell_masked_gemm(x, scale, topk_ids, E, M)
    blackwell_ops.fused_mask_swiglu_fp8_quant_blackwell(up [E·M, 2I], token_nums_per_expert)

and hands their scale outputs straight to `group_gemm_masked` as `sfa`, where #7053 ran
`unpack_and_convert_scale` in between (fused_moe_blackwell_backend.py at 92ae10c3, lines 99, 757-797).
`blackwell_ops` is unpublished, so what they return is derived from those call sites:

- the scale output is what `group_gemm_masked` reads as `sfa`: CUTLASS SM100 scale-factor bytes
  (SPEC §4, `moe_ref.cutlass_sf`), one UE8M0 byte per 32 K-elements. Sure: no conversion
  sits between the op and the GEMM any more, and the GEMM's other `sfa` producer is
  `unpack_and_convert_scale`.
- the activation output is 2-D `[E·M, K]`: #7053 reshaped to `[E·M, K]` before the GEMM, develop
  passes the op's output unreshaped. Fairly sure (the GEMM might also accept `[E, M, K]`).
- the byte container is `[E, align(M, 128), KB]`, the shape of `unpack_and_convert_scale`'s
  output (ours), so the old and the new path can be compared byte for byte. Not known upstream
  (only the bytes' order matters to the GEMM).
- `token_nums_per_expert` stays `[E, 1]` int32 as in FastDeploy's permute; the GEMM read that at
  #7053 and reads DeepEP's `[E]` on the decode path.
- the SwiGLU op has no block-size argument; #7666 calls it unchanged while switching the path to
  1x32 groups. Whether develop's op already quantizes in 32- or 128-wide groups is not known:
  `group_size` selects (128 reproduces #7053's `fused_mask_swiglu_fp8_quant` + conversion).
"""
from __future__ import annotations

from typing import NamedTuple

from . import cutlass_sf

from ._paddle import paddle
from .checks import INT_DTYPES, check_dim, check_finite, check_positive_int, check_tensor
from .constants import BYTES_PER_WORD, GROUP_SIZE, RECIPE_GROUP_SIZES, align
from .fp8 import e4m3_to_float32, ue8m0_decode, ue8m0_encode, unpack_ue8m0
from .layout import _scatter_sources, gather_rows_zero_fill, prefill_permute_to_masked_gemm
from .moe import SWIGLU_AMAX_FLOOR, swiglu
from .quant import per_token_group_quant



class BlackwellMaskedLayout(NamedTuple):
    """Output of prefill_permute_to_blackwell_masked_gemm.

    permute_x             [E·M, H] dtype of x; rows past token_nums_per_expert[e] of expert e are zero.
    permute_sf            [E, align(M, 128), KB] uint8 CUTLASS SF bytes (`group_gemm_masked`'s sfa);
                          zero bytes past the count of each expert.
    permuted_indice_map   [W, K_top] int32: e·M + slot, or -1 where topk_ids is -1.
    token_nums_per_expert [E, 1] int32.
    """
    permute_x: paddle.Tensor
    permute_sf: paddle.Tensor
    permuted_indice_map: paddle.Tensor
    token_nums_per_expert: paddle.Tensor


def sf_columns(k: int, group_size: int) -> int:
    """KB, the scale-byte columns for K elements: one byte per 32, padded to whole words of groups.

    group_size 128: 16·ceil(K/512), what `unpack_and_convert_scale` gives for ceil(S/4) words;
    group_size 32: align(ceil(K/32), 4), whole SfAtom tiles.
    """
    per_group = group_size // cutlass_sf.SF_VEC_SIZE
    return align(-(-k // cutlass_sf.SF_VEC_SIZE), cutlass_sf.SF_TILE_COLS * per_group)


def ue8m0_bytes_to_cutlass_sf(b: paddle.Tensor, group_size: int, num_cols: int) -> paddle.Tensor:
    """UE8M0 bytes, one per group -> CUTLASS SM100 SF bytes, one per 32 K-elements (SPEC §4 steps 1-2).

    b [E, MN, G] uint8 (G groups of group_size along K; zero rows stay zero) -> [E, align(MN, 128),
    num_cols] uint8: byte (r, kb) = b[r, kb // (group_size/32)] for kb < G·group_size/32, 0 past it,
    rows MN.. zero, swizzled per expert with `cutlass_sf.swizzle`.
    """
    check_tensor(b, "b", dtypes=(paddle.uint8,), ndim=3)
    if group_size not in RECIPE_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {RECIPE_GROUP_SIZES}, got {group_size!r}")
    e, mn, g = (int(d) for d in b.shape)
    rep = group_size // cutlass_sf.SF_VEC_SIZE
    if g * rep > num_cols:
        raise ValueError(f"num_cols: {g} groups of {group_size} need >= {g * rep} byte columns, got {num_cols}")
    wide = b.astype(paddle.int32).unsqueeze(-1).expand([e, mn, g, rep]).reshape([e, mn, g * rep])
    rows = align(mn, cutlass_sf.SF_TILE_ROWS)
    full = paddle.zeros([e, rows, num_cols], dtype=paddle.int32)
    full[:, :mn, : g * rep] = wide
    return cutlass_sf.swizzle(full.astype(paddle.uint8))


def _scale_bytes(scale: paddle.Tensor, h: int) -> tuple[paddle.Tensor, int]:
    """scale rows [W, S'] -> (UE8M0 bytes [W, G] uint8, group size).

    int32: packed 1x128 words, S' = ceil(S/4); uint8: raw 1x32 bytes (#7666's group_wise_quant), S' = ceil(H/32).
    """
    if scale.dtype == paddle.int32:
        groups = -(-h // GROUP_SIZE)
        check_dim(scale, 1, -(-groups // BYTES_PER_WORD), "scale", "ceil(S/4) packed UE8M0 words (1x128)")
        return unpack_ue8m0(scale, groups), GROUP_SIZE
    check_dim(scale, 1, -(-h // cutlass_sf.SF_VEC_SIZE), "scale", "ceil(H/32) UE8M0 bytes (1x32)")
    return scale, cutlass_sf.SF_VEC_SIZE


def prefill_permute_to_blackwell_masked_gemm(x: paddle.Tensor, scale: paddle.Tensor, topk_ids: paddle.Tensor,
                                             num_local_experts: int, max_token_num: int) -> BlackwellMaskedLayout:
    """Permute tokens to the masked layout, scales straight to the GEMM's SF bytes (#7374, blackwell_ops).

    x [W, H] float8_e4m3fn; scale [W, ceil(S/4)] int32 packed UE8M0 (1x128, develop) or
    [W, ceil(H/32)] uint8 UE8M0 bytes (1x32, #7666); topk_ids [W, K_top] int64 (upstream casts
    before the call) local ids or -1; E = num_local_experts, M = max_token_num
    -> BlackwellMaskedLayout(permute_x [E·M, H], permute_sf [E, align(M, 128), KB] uint8,
    permuted_indice_map [W, K_top] int32, token_nums_per_expert [E, 1] int32), KB = sf_columns(H, group).
    Slots and errors as moe_ref.layout.prefill_permute_to_masked_gemm (SPEC §5).
    """
    check_tensor(x, "x", dtypes=(paddle.float8_e4m3fn,), ndim=2)
    check_tensor(scale, "scale", dtypes=(paddle.int32, paddle.uint8), ndim=2)
    check_tensor(topk_ids, "topk_ids", dtypes=(paddle.int64,), ndim=2)
    check_dim(scale, 0, int(x.shape[0]), "scale", "W (rows of x)")
    e = check_positive_int(num_local_experts, "num_local_experts")
    m = check_positive_int(max_token_num, "max_token_num")
    h = int(x.shape[1])
    b, group = _scale_bytes(scale, h)
    lay = prefill_permute_to_masked_gemm(x, _stand_in_words(int(x.shape[0]), h), topk_ids, e, m)
    flat = lay.permuted_indice_map.flatten().astype(paddle.int64)
    src = _scatter_sources(flat, flat >= 0, e * m, int(topk_ids.shape[1]))
    sf = ue8m0_bytes_to_cutlass_sf(gather_rows_zero_fill(b, src).reshape([e, m, -1]), group, sf_columns(h, group))
    return BlackwellMaskedLayout(lay.permute_x.reshape([e * m, h]), sf, lay.permuted_indice_map,
                                 lay.token_nums_per_expert)


def _stand_in_words(w: int, h: int) -> paddle.Tensor:
    """Zero packed scales [W, ceil(S/4)] int32: moe_ref.layout wants a scale beside fp8 x; its copy is unused.

    The scale bytes are permuted through the indice map instead: they may be 1x32 bytes, which layout does not take.
    """
    return paddle.zeros([w, -(-(-(-h // GROUP_SIZE)) // BYTES_PER_WORD)], dtype=paddle.int32)


def fused_mask_swiglu_fp8_quant_blackwell(up: paddle.Tensor, token_nums_per_expert: paddle.Tensor,
                                          group_size: int = GROUP_SIZE):
    """SwiGLU + UE8M0 FP8 quantization on the masked layout, scales as the GEMM's SF bytes (#7374, blackwell_ops).

    up [E·M, 2I] bf16 (gate = up[:, :I], lin = up[:, I:]); token_nums_per_expert [E] | [E, 1]
    int32 | int64 in [0, M], E its length and M = rows(up) / E -> (act [E·M, I] float8_e4m3fn,
    act_sf [E, align(M, 128), KB] uint8 CUTLASS SF bytes, KB = sf_columns(I, group_size)).
    y = bf16(lin · gate / (1 + exp(-gate))) in float32; per group_size-wide group amax = max(|y|, 1e-10),
    s = ceil_to_ue8m0(amax / 448), q = e4m3(y / s) (SPEC §7, no log2 bias). Rows at or past the
    count of an expert are not read (they may hold garbage) and are zero in act and act_sf.
    """
    check_tensor(up, "up", dtypes=(paddle.bfloat16,), ndim=2)
    check_tensor(token_nums_per_expert, "token_nums_per_expert", dtypes=INT_DTYPES, ndim=(1, 2))
    counts = token_nums_per_expert.reshape([-1]).astype(paddle.int64)
    e = int(counts.shape[0])
    rows, two_i = (int(d) for d in up.shape)
    if e == 0 or rows % e or two_i % 2:
        raise ValueError(f"up: expected [E·M, 2I] with E = {e} (length of token_nums_per_expert), got {list(up.shape)}")
    m, i = rows // e, two_i // 2
    if bool(((counts < 0) | (counts > m)).any()):
        raise ValueError(f"token_nums_per_expert: expected values in [0, M={m}], got {counts.tolist()}")
    if group_size not in RECIPE_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {RECIPE_GROUP_SIZES}, got {group_size!r}")
    valid = (paddle.arange(m, dtype=paddle.int64).unsqueeze(0) < counts.unsqueeze(1)).reshape([rows, 1])
    # rows past the counts are never read: upstream allocates `up` with paddle.empty since #7374 (BW:740)
    up32 = paddle.where(valid, up.astype(paddle.float32), paddle.zeros([1, two_i], dtype=paddle.float32))
    y = swiglu(up32).astype(paddle.bfloat16)
    q, s = per_token_group_quant(y, group_size=group_size, use_ue8m0=True, amax_floor=SWIGLU_AMAX_FLOOR)
    q_bits = q.view(paddle.uint8).astype(paddle.int32)
    q = paddle.where(valid, q_bits, paddle.zeros_like(q_bits)).astype(paddle.uint8).view(paddle.float8_e4m3fn)
    b = paddle.where(valid, ue8m0_encode(s).astype(paddle.int32), paddle.zeros(s.shape, dtype=paddle.int32))
    sf = ue8m0_bytes_to_cutlass_sf(b.astype(paddle.uint8).reshape([e, m, -1]), group_size, sf_columns(i, group_size))
    return q, sf


# ---------------------------------------------------------------------------------------------
# The 1x32 recipe of #7666: blackwell_ops.group_wise_quant (docs/upstream.md §2)
# ---------------------------------------------------------------------------------------------

def group_wise_quant(x: paddle.Tensor, use_swizzle: bool = False, amax_floor: float = SWIGLU_AMAX_FLOOR,
                     name: str = "x"):
    """1x32 UE8M0 quantization, #7666's `blackwell_ops.group_wise_quant(x, False, use_swizzle)`.

    x [..., N, K] bf16 | fp32 -> (q [..., N, K] float8_e4m3fn, sf [..., N, ceil(K/32)] uint8): per row and 32-wide
    group amax = max(|x|, amax_floor), s = ceil_to_ue8m0(amax / 448), q = e4m3(x / s), sf = the UE8M0 byte of s.
    use_swizzle=False (activations, BW f0ea6f80:632): sf row-major. use_swizzle=True (weights, BW:454-458): the same
    bytes in CUTLASS SF order (`cutlass_sf.swizzle` per [N, ceil(K/32)] matrix, so N % 128 == 0 and ceil(K/32) % 4 == 0),
    what `group_gemm_masked` reads as sfb; the container keeps create_weights' shape [E, N, ceil(K/32)].
    amax_floor: not known upstream (closed kernel); default FastDeploy's 1e-10. Errors name x as `name`;
    NaN/inf is a ValueError (SPEC §1).
    """
    check_tensor(x, name, dtypes=(paddle.bfloat16, paddle.float32), min_ndim=2)
    check_finite(x, name)                            # SPEC §1; no nan_policy here
    q, s = per_token_group_quant(x, group_size=cutlass_sf.SF_VEC_SIZE, use_ue8m0=True, amax_floor=amax_floor)
    sf = ue8m0_encode(s)
    if use_swizzle:
        n, kb = int(sf.shape[-2]), int(sf.shape[-1])
        if n % cutlass_sf.SF_TILE_ROWS or kb % cutlass_sf.SF_TILE_COLS:
            raise ValueError(f"{name}: use_swizzle needs N a multiple of {cutlass_sf.SF_TILE_ROWS} and ceil(K/32) "
                             f"a multiple of {cutlass_sf.SF_TILE_COLS} (whole SfAtom tiles), got shape {list(x.shape)}")
        sf = cutlass_sf.swizzle(sf)
    return q, sf


def quantize_weights_1x32(w_up: paddle.Tensor, w_down: paddle.Tensor):
    """#7666's weight processing (BW f0ea6f80:450-461): each expert's [N, K] rows in 1x32 UE8M0 groups, swizzled.

    w_up [E, 2I, H], w_down [E, H, I] bf16 | fp32 (NT, SPEC §0) -> (up_q [E, 2I, H] fp8, up_sf [E, 2I, H/32] uint8,
    down_q [E, H, I] fp8, down_sf [E, H, I/32] uint8), the sf in CUTLASS SF order per expert (group_wise_quant).
    """
    up_q, up_sf = group_wise_quant(w_up, use_swizzle=True, name="w_up")
    down_q, down_sf = group_wise_quant(w_down, use_swizzle=True, name="w_down")
    return up_q, up_sf, down_q, down_sf


def dequant_group_wise(q: paddle.Tensor, sf: paddle.Tensor, swizzled: bool = False) -> paddle.Tensor:
    """Inverse of group_wise_quant: q [..., N, K] fp8, sf [..., N, ceil(K/32)] uint8 -> [..., N, K] float32 = q · 2^(sf-127)."""
    check_tensor(q, "q", dtypes=(paddle.float8_e4m3fn,), min_ndim=2)
    check_tensor(sf, "sf", dtypes=(paddle.uint8,), min_ndim=2)
    b = cutlass_sf.unswizzle(sf) if swizzled else sf
    k = int(q.shape[-1])
    s = ue8m0_decode(b).repeat_interleave(cutlass_sf.SF_VEC_SIZE, axis=-1)[..., :k]
    return e4m3_to_float32(q) * s
