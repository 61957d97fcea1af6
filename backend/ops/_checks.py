"""Argument checks of the `blackwell_ops` contract (backend.ops), run once per call before the provider.

`CHECKS[op]` takes the arguments of a row of `backend.ops.contract.OPS` (defaults applied, keyword-only
options as keywords) and returns them validated and normalized, in the row's parameter order.
Imported by `backend.ops` at the first op, not at import: this module imports Paddle, and
`backend.ops` must not (its subpackage `triton` runs on machines without Paddle).
Errors name the argument, the expected and the seen value (`moe_ref.checks`).
"""
from __future__ import annotations

import numpy as np
import paddle

from moe_ref.checks import check_dim, check_finite, check_ids_in_range, check_positive_int, check_tensor, first_index
from moe_ref.messages import expert_overflow_message
from moe_ref.fp8 import BYTES_PER_WORD, UE8M0_NAN, align, dtype_view
from moe_ref.constants import MX_GROUP_SIZE, RECIPE_GROUP_SIZES, num_scale_groups, packed_words
from moe_ref.quant import GROUP_SIZE

from .contract import RECIPES
from .device_errors import check_record, value_checks_on
from moe_ref.cutlass_sf import SF_TILE_COLS, SF_TILE_ROWS, SF_VEC_SIZE

FP8 = paddle.float8_e4m3fn
_INT_IDS = (paddle.int32, paddle.int64)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a bool, got {value!r}")
    return bool(value)


def _check_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    return int(value)


def _check_counts(counts, name: str, num_experts: int, max_rows: int, max_name: str) -> paddle.Tensor:
    """counts int32/int64 [E] or [E, 1], each in [0, max_rows] -> [E] int32."""
    check_tensor(counts, name, dtypes=_INT_IDS, ndim=(1, 2))
    if counts.ndim == 2 and int(counts.shape[1]) != 1:
        raise ValueError(f"{name}: expected shape [E] or [E, 1] with E = {num_experts}, got {list(counts.shape)}")
    check_dim(counts, 0, num_experts, name, "E")
    flat = counts.reshape([-1])
    bad = paddle.logical_or(flat < 0, flat > max_rows)
    if value_checks_on() and bool(bad.any()):
        e = first_index(bad)[0]
        raise ValueError(f"{name}: expert {e} has count {int(flat[e])}, expected 0 <= count <= {max_name} = {max_rows}")
    return flat.astype(paddle.int32)


def _check_no_nan_byte(words: paddle.Tensor, name: str) -> None:
    """Packed UE8M0 words: no byte may be 255 (the UE8M0 NaN); skipped in deferred mode (a host read)."""
    if not value_checks_on():
        return
    b = dtype_view(words, paddle.uint8)
    bad = b == UE8M0_NAN
    if bool(bad.any()):
        *lead, byte = first_index(bad.reshape(list(words.shape) + [BYTES_PER_WORD]))
        raise ValueError(f"{name}: UE8M0 byte {byte} of word {tuple(lead)} is {UE8M0_NAN} (NaN); "
                         f"expected exponents 0..{UE8M0_NAN - 1}")


def _check_no_nan_bytes(b: paddle.Tensor, name: str) -> None:
    """UE8M0 bytes (uint8): no byte may be 255 (the UE8M0 NaN); skipped in deferred mode (a host read)."""
    if not value_checks_on():
        return
    bad = b == UE8M0_NAN
    if bool(bad.any()):
        raise ValueError(f"{name}: byte at index {tuple(first_index(bad))} is {UE8M0_NAN} (UE8M0 NaN); "
                         f"expected exponents 0..{UE8M0_NAN - 1}")


def _check_no_nan_sf_bytes(sfa: paddle.Tensor, sfb: paddle.Tensor) -> None:
    """CUTLASS SF bytes (uint8) of both operands: no byte may be 255 (the UE8M0 NaN); one synchronization."""
    if not value_checks_on():
        return
    bad_a, bad_b = sfa == UE8M0_NAN, sfb == UE8M0_NAN
    if bool(paddle.logical_or(bad_a.any(), bad_b.any())):
        name, sf = ("sfa", sfa) if bool(bad_a.any()) else ("sfb", sfb)
        _check_no_nan_bytes(sf, name)


def _check_per_token_quant(x, block_size, use_ue8m0):
    check_tensor(x, "x", dtypes=(paddle.bfloat16, paddle.float32), ndim=2)
    block_size = check_positive_int(block_size, "block_size")
    use_ue8m0 = _check_bool(use_ue8m0, "use_ue8m0")
    if value_checks_on():
        check_finite(x, "x")
    return x, block_size, use_ue8m0


def _check_prefill_permute(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    check_tensor(x, "x", dtypes=(FP8, paddle.bfloat16), ndim=2)
    w, h = (int(d) for d in x.shape)
    check_tensor(topk_ids, "topk_ids", dtypes=_INT_IDS, ndim=2)
    check_dim(topk_ids, 0, w, "topk_ids", "W (rows of x)")
    e = check_positive_int(num_local_experts, "num_local_experts")
    m = check_positive_int(max_token_num, "max_token_num")
    if scale is not None:
        check_tensor(scale, "scale", dtypes=(paddle.float32, paddle.int32), ndim=2)
        check_dim(scale, 0, w, "scale", "W (rows of x)")
        s = num_scale_groups(h)
        if scale.dtype == paddle.float32:
            check_dim(scale, 1, s, "scale", "S = ceil(H/128) (FP32 scales)")
        else:
            check_dim(scale, 1, -(-s // BYTES_PER_WORD), "scale", "ceil(S/4) (packed UE8M0 scales)")
    elif x.dtype == FP8:
        raise ValueError("scale: expected a [W, S'] scale tensor for fp8 x, got None")
    _check_routing_or_record(topk_ids, e, m, errors)
    return x, scale, topk_ids, e, m, errors


def _check_routing_or_record(topk_ids, e: int, m: int, errors) -> None:
    """Eager (errors None): the routing check now. Deferred: only the record's type (the provider records)."""
    if errors is None:
        _check_routing(topk_ids, e, m)
    else:
        check_record(errors)


def _check_routing(topk_ids, e: int, m: int) -> None:
    """topk_ids [W, K_top] int: ids in [-1, E), at most M rows per expert (ValueError naming topk_ids)."""
    ids = check_ids_in_range(topk_ids, "topk_ids", e, "expert ids", note=f" (num_local_experts = {e})")
    valid = ids.flatten()
    valid = valid[valid >= 0] if bool((valid >= 0).any()) else paddle.zeros([0], dtype=paddle.int64)
    counts = paddle.bincount(valid, minlength=e)
    if bool((counts > m).any()):
        ex = first_index(counts > m)[0]
        raise ValueError(expert_overflow_message(ex, int(counts[ex]), m))


def _check_blackwell_permute(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    check_tensor(x, "x", dtypes=(FP8,), ndim=2)
    w, h = (int(d) for d in x.shape)
    check_tensor(scale, "scale", dtypes=(paddle.int32, paddle.uint8), ndim=2)
    check_dim(scale, 0, w, "scale", "W (rows of x)")
    deferred = errors is not None      # no host read: the NaN-byte check reads every scale byte
    if scale.dtype == paddle.int32:
        check_dim(scale, 1, packed_words(num_scale_groups(h)), "scale",
                  "ceil(S/4) (packed UE8M0 scales, 1x128 groups)")
        if not deferred:
            _check_no_nan_byte(scale, "scale")
    else:
        check_dim(scale, 1, num_scale_groups(h, MX_GROUP_SIZE), "scale", "ceil(H/32) (UE8M0 bytes, 1x32 groups)")
        if not deferred:
            _check_no_nan_bytes(scale, "scale")
    check_tensor(topk_ids, "topk_ids", dtypes=_INT_IDS, ndim=2)
    check_dim(topk_ids, 0, w, "topk_ids", "W (rows of x)")
    e = check_positive_int(num_local_experts, "num_local_experts")
    m = check_positive_int(max_token_num, "max_token_num")
    _check_routing_or_record(topk_ids, e, m, errors)
    return x, scale, topk_ids, e, m, errors


def _check_unpack(scale, masked_m):
    if isinstance(scale, paddle.Tensor) and scale.dtype != paddle.int32:
        raise TypeError(f"scale: expected packed UE8M0 scales (int32 words, 4 exponent bytes each), got dtype "
                        f"{str(scale.dtype).replace('paddle.', '')}; FP32 scales must be rounded to powers of two "
                        f"and packed first")
    check_tensor(scale, "scale", dtypes=(paddle.int32,), ndim=3)
    e, mn, c = (int(d) for d in scale.shape)
    if e == 0 or mn == 0 or c == 0:
        raise ValueError(f"scale: expected a non-empty [E, MN, C] tensor, got shape {list(scale.shape)}")
    if masked_m is not None:
        masked_m = _check_counts(masked_m, "masked_m", e, mn, "MN")
    _check_no_nan_byte(scale, "scale")
    return scale, masked_m


def _check_cutlass_to_fp32(sf, num_rows):
    check_tensor(sf, "sf", dtypes=(paddle.uint8,), ndim=3)
    _, mn_pad, kb = (int(d) for d in sf.shape)
    if mn_pad == 0 or mn_pad % SF_TILE_ROWS or kb == 0 or kb % SF_TILE_COLS:
        raise ValueError(f"sf: expected [E, MN_pad, KB] with MN_pad a multiple of {SF_TILE_ROWS} and KB a "
                         f"multiple of {SF_TILE_COLS}, got shape {list(sf.shape)}")
    if num_rows is None:
        num_rows = mn_pad
    num_rows = check_positive_int(num_rows, "num_rows")
    if num_rows > mn_pad:
        raise ValueError(f"num_rows: expected <= MN_pad = {mn_pad}, got {num_rows}")
    return sf, num_rows


def _check_recipe(recipe):
    if recipe is not None and not (isinstance(recipe, str) and recipe in RECIPES):
        raise ValueError(f"recipe: expected None (#7053's nine arguments) or {' or '.join(map(repr, RECIPES))} "
                         f"(develop's tenth argument), got {recipe!r}")
    return recipe


def _check_group_gemm(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, recipe, *, sfb_per_block,
                      sfb_prepared, sfa_per_group, expected_m):
    check_tensor(b, "b", dtypes=(FP8,), ndim=3)
    e, n, k = (int(d) for d in b.shape)
    m = check_positive_int(max_m_per_expert, "max_m_per_expert")
    check_tensor(a, "a", dtypes=(FP8,), ndim=2)
    check_dim(a, 0, e * m, "a", "E·M (E from b, M = max_m_per_expert)")
    check_dim(a, 1, k, "a", "K (from b)")
    kb_needed = -(-k // SF_VEC_SIZE)
    for name, sf, rows in (("sfa", sfa, m), ("sfb", sfb, n)):
        check_tensor(sf, name, dtypes=(paddle.uint8,), ndim=3)
        check_dim(sf, 0, e, name, "E")
        check_dim(sf, 1, align(rows, SF_TILE_ROWS), name, f"align({'M' if name == 'sfa' else 'N'}, 128)")
        kb = int(sf.shape[2])
        if kb % SF_TILE_COLS or kb < kb_needed:
            raise ValueError(f"{name}: expected shape[2] a multiple of {SF_TILE_COLS} and >= ceil(K/32) = "
                             f"{kb_needed}, got shape {list(sf.shape)}")
    masked_m = _check_counts(masked_m, "masked_m", e, m, "max_m_per_expert")
    check_tensor(out, "out", dtypes=(paddle.bfloat16,), ndim=2)
    check_dim(out, 0, e * m, "out", "E·M")
    check_dim(out, 1, n, "out", "N (from b)")
    if bias is not None:
        check_tensor(bias, "bias", dtypes=(paddle.bfloat16, paddle.float32), ndim=2)
        check_dim(bias, 0, e, "bias", "E")
        check_dim(bias, 1, n, "bias", "N")
    sm_count = _check_int(sm_count, "sm_count")
    recipe = _check_recipe(recipe)
    sfb_per_block = _check_bool(sfb_per_block, "sfb_per_block")
    sfa_per_group = _check_bool(sfa_per_group, "sfa_per_group")
    if expected_m is not None:
        expected_m = check_positive_int(expected_m, "expected_m")
    _check_no_nan_sf_bytes(sfa, sfb)
    # sfb_prepared is opaque (the provider's own format, made by its prepare_weight_scales): passed through
    return a, b, sfa, sfb, masked_m, out, bias, m, sm_count, recipe, sfb_per_block, sfb_prepared, sfa_per_group, \
        expected_m


def _check_finite_rows(x: paddle.Tensor, counts: paddle.Tensor, name: str, count_name: str) -> None:
    """x [E, M, L] float: no NaN / inf in rows m < counts[e] (the rows an op reads; the others may hold
    anything), ValueError naming the first; one synchronization."""
    if not value_checks_on():
        return
    m = int(x.shape[1])
    valid = paddle.arange(m, dtype=paddle.int32).unsqueeze(0) < counts.unsqueeze(1)
    bad = paddle.logical_and(paddle.logical_not(paddle.isfinite(x)), valid.unsqueeze(-1))
    if bool(bad.any()):
        e, row, col = first_index(bad)
        raise ValueError(f"{name}: non-finite value {float(x[e, row, col])} at index ({e}, {row}, {col}), a valid row "
                         f"(row {row} < {count_name}[{e}] = {int(counts[e])}); SPEC §1: quantization input must be "
                         f"finite")


def _check_swiglu(up, token_nums_per_expert, block_size, use_ue8m0):
    check_tensor(up, "up", dtypes=(paddle.bfloat16, paddle.float32), ndim=3)
    e, m, i2 = (int(d) for d in up.shape)
    if i2 == 0 or i2 % 2:
        raise ValueError(f"up: expected shape[2] == 2I (even, > 0), got shape {list(up.shape)}")
    counts = _check_counts(token_nums_per_expert, "token_nums_per_expert", e, m, "M")
    _check_finite_rows(up, counts, "up", "token_nums_per_expert")
    block_size = check_positive_int(block_size, "block_size")
    use_ue8m0 = _check_bool(use_ue8m0, "use_ue8m0")
    return up, counts, block_size, use_ue8m0


def _check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or group_size not in RECIPE_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {', '.join(map(str, RECIPE_GROUP_SIZES))}, got {group_size!r}")
    return int(group_size)


def _check_swiglu_blackwell(up, token_nums_per_expert, *, group_size):
    check_tensor(up, "up", dtypes=(paddle.bfloat16,), ndim=2)
    check_tensor(token_nums_per_expert, "token_nums_per_expert", dtypes=_INT_IDS, ndim=(1, 2))
    e = int(token_nums_per_expert.shape[0])
    rows, i2 = (int(d) for d in up.shape)
    if e == 0 or rows % e or i2 == 0 or i2 % 2:
        raise ValueError(f"up: expected shape [E·M, 2I] with E = {e} (rows of token_nums_per_expert) and 2I even, "
                         f"> 0, got {list(up.shape)}")
    m = rows // e
    counts = _check_counts(token_nums_per_expert, "token_nums_per_expert", e, m, "M = rows(up) / E")
    _check_finite_rows(up.reshape([e, m, i2]), counts, "up", "token_nums_per_expert")
    return up, counts, _check_group_size(group_size)


def _check_group_wise_quant(x, flag, use_swizzle):
    check_tensor(x, "x", dtypes=(paddle.bfloat16, paddle.float32), ndim=(2, 3))
    flag = _check_bool(flag, "flag")
    if flag:
        raise ValueError("flag: expected False (the only value upstream passes; what True does is unknown), got True")
    use_swizzle = _check_bool(use_swizzle, "use_swizzle")
    n, k = int(x.shape[-2]), int(x.shape[-1])
    kb = -(-k // SF_VEC_SIZE)
    if use_swizzle and (n % SF_TILE_ROWS or kb % SF_TILE_COLS):
        raise ValueError(f"x: use_swizzle needs N a multiple of {SF_TILE_ROWS} and ceil(K/32) a multiple of "
                         f"{SF_TILE_COLS} (whole SfAtom tiles), got shape {list(x.shape)}")
    if value_checks_on():
        check_finite(x, "x")
    return x, flag, use_swizzle


def _check_depermute(ffn_out, indice_map, topk_weights, num_worst_tokens):
    check_tensor(ffn_out, "ffn_out", dtypes=(paddle.bfloat16, paddle.float32), ndim=3)
    e, m, _ = (int(d) for d in ffn_out.shape)
    check_tensor(indice_map, "indice_map", dtypes=_INT_IDS, ndim=2)
    w = _check_int(num_worst_tokens, "num_worst_tokens")
    check_dim(indice_map, 0, w, "indice_map", "W = num_worst_tokens")
    check_tensor(topk_weights, "topk_weights", dtypes=(paddle.float32,), ndim=2)
    if list(topk_weights.shape) != list(indice_map.shape):
        raise ValueError(f"topk_weights: expected shape {list(indice_map.shape)} (as indice_map), "
                         f"got {list(topk_weights.shape)}")
    if value_checks_on():
        check_ids_in_range(indice_map, "indice_map", e * m, "values", note=" (E·M)")
    return ffn_out, indice_map, topk_weights, w


CHECKS = {
    "per_token_quant": _check_per_token_quant,
    "prefill_permute_to_masked_gemm": _check_prefill_permute,
    "unpack_and_convert_scale": _check_unpack,
    "cutlass_scale_to_fp32": _check_cutlass_to_fp32,
    "group_gemm_masked": _check_group_gemm,
    "fused_mask_swiglu_fp8_quant": _check_swiglu,
    "depermute_prefill_combine": _check_depermute,
    "prefill_permute_to_blackwell_masked_gemm": _check_blackwell_permute,
    "fused_mask_swiglu_fp8_quant_blackwell": _check_swiglu_blackwell,
    "group_wise_quant": _check_group_wise_quant,
}
