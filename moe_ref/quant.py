"""Block quantization (SPEC §3): 1x128 activations, 128x128 weights, FP32 or UE8M0 scales.

Non-finite input (NaN, inf) is an error naming the tensor and its first bad index unless
nan_policy="propagate" (SPEC §1); the one statement of that policy for every quantizing function and
op is the README's "Failure modes" section.

Scale convention: `x ~= q * s`, one float32 scale per 1x128 group (activations) or per
128x128 block (weights), row-major; UE8M0 scales are FP32 powers of two here (pack them
with `moe_ref.fp8.ue8m0_encode` + `pack_ue8m0` when a kernel wants bytes).
"""
from __future__ import annotations

from ._paddle import paddle
import math

from .checks import FLOAT_DTYPES, NAN_POLICY_HINT, check_finite, check_positive_int, check_tensor
from .constants import (BLOCK_SIZE, DEEPGEMM_AMAX_FLOOR, E4M3_MAX, FASTDEPLOY_AMAX_FLOOR,  # noqa: F401 - re-exported
                        FASTDEPLOY_LOG2_BIAS, GROUP_SIZE, align)
from .fp8 import cast_to_e4m3, ceil_to_ue8m0, check_nan_policy, e4m3_to_float32


def _scale_from_amax(amax: paddle.Tensor, use_ue8m0: bool, fd_log2_bias: bool,
                     nan_policy: str = "raise") -> paddle.Tensor:
    s = amax / E4M3_MAX
    if not use_ue8m0:
        if fd_log2_bias:
            raise ValueError("fd_log2_bias: only meaningful with use_ue8m0=True")
        return s
    if fd_log2_bias:
        return paddle.pow(paddle.to_tensor(2.0, dtype=paddle.float32),
                          paddle.ceil(paddle.log2(s + FASTDEPLOY_LOG2_BIAS)))
    return ceil_to_ue8m0(s, nan_policy)


def _floored(amax: paddle.Tensor, amax_floor: float) -> paddle.Tensor:
    # maximum, not clip: Paddle's clip turns an inf amax (nan_policy="propagate") into FLT_MAX
    return paddle.maximum(amax, paddle.full_like(amax, float(amax_floor)))


def _pad_last(x: paddle.Tensor, multiple: int, axis: int) -> paddle.Tensor:
    n = int(x.shape[axis])
    extra = align(n, multiple) - n
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[axis] = extra
    return paddle.concat([x, paddle.zeros(shape, dtype=x.dtype)], axis=axis)


def _check_quant_args(x, name, group_size, amax_floor, nan_policy):
    check_tensor(x, name, dtypes=FLOAT_DTYPES, min_ndim=2 if name == "w" else 1)
    if (isinstance(amax_floor, bool) or not isinstance(amax_floor, (float, int))
            or not math.isfinite(amax_floor) or not amax_floor > 0):
        raise ValueError(f"amax_floor: expected a finite float > 0, got {amax_floor!r}")
    if check_nan_policy(nan_policy) == "raise":
        check_finite(x, name, NAN_POLICY_HINT)


def _block_shape(block_size) -> tuple[int, int]:
    """block_size as (BN, BK): an int means a square block; anything else names what was passed."""
    if isinstance(block_size, (int,)) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not isinstance(block_size, (tuple, list)) or len(block_size) != 2:
        raise ValueError(f"block_size: expected an int (square block) or a pair (BN, BK), got {block_size!r}")
    return (check_positive_int(block_size[0], "block_size[0]"), check_positive_int(block_size[1], "block_size[1]"))


def per_token_group_quant(x: paddle.Tensor, group_size: int = GROUP_SIZE, use_ue8m0: bool = False,
                          amax_floor: float = DEEPGEMM_AMAX_FLOOR, fd_log2_bias: bool = False,
                          nan_policy: str = "raise"):
    """1xG activation quantization.

    x [..., T, H] float -> (q [..., T, H] float8_e4m3fn, scale [..., T, ceil(H/G)] float32).
    Per token and G-wide group: amax = max(|x|, amax_floor); s = amax / 448 (UE8M0: rounded up
    to a power of two); q = e4m3(clamp(x / s)). A ragged last group is zero-padded for the amax
    and kept whole in q (nothing is dropped). fd_log2_bias=True reproduces FastDeploy's
    per_token_quant rounding, 2^ceil(log2(s + 5e-7)) (UE8M0 only).
    """
    _check_quant_args(x, "x", group_size, amax_floor, nan_policy)
    g = check_positive_int(group_size, "group_size")
    h = int(x.shape[-1])
    xp = _pad_last(x.astype(paddle.float32), g, axis=-1)
    groups = xp.reshape(list(xp.shape[:-1]) + [-1, g])
    amax = _floored(groups.abs().max(axis=-1), amax_floor)
    scale = _scale_from_amax(amax, use_ue8m0, fd_log2_bias, nan_policy)
    q = cast_to_e4m3((groups / scale.unsqueeze(-1)).reshape(xp.shape), nan_policy=nan_policy)
    return q[..., :h], scale


def per_block_quant(w: paddle.Tensor, block_size=BLOCK_SIZE, use_ue8m0: bool = False,
                    amax_floor: float = DEEPGEMM_AMAX_FLOOR, nan_policy: str = "raise"):
    """BNxBK weight quantization (block_size: (BN, BK), or an int for a square block).

    w [..., N, K] float -> (q [..., N, K] float8_e4m3fn, scale [..., ceil(N/BN), ceil(K/BK)] float32).
    Same rule as per_token_group_quant with the amax over each block; ragged edges zero-padded.
    Leading dims (e.g. experts) are batched.
    """
    _check_quant_args(w, "w", block_size, amax_floor, nan_policy)
    bn, bk = _block_shape(block_size)
    n, k = int(w.shape[-2]), int(w.shape[-1])
    wp = _pad_last(_pad_last(w.astype(paddle.float32), bk, axis=-1), bn, axis=-2)
    lead = list(wp.shape[:-2])
    nb, kb = int(wp.shape[-2]) // bn, int(wp.shape[-1]) // bk
    blocks = wp.reshape(lead + [nb, bn, kb, bk])
    amax = _floored(blocks.abs().max(axis=[-3, -1]), amax_floor)                     # [..., nb, kb]
    scale = _scale_from_amax(amax, use_ue8m0, False, nan_policy)
    s_full = scale.unsqueeze(-1).unsqueeze(-3)                                       # [..., nb, 1, kb, 1]
    q = cast_to_e4m3((blocks / s_full).reshape(wp.shape), nan_policy=nan_policy)
    return q[..., :n, :k], scale


def dequant_per_token_group(q: paddle.Tensor, scale: paddle.Tensor, group_size: int = GROUP_SIZE) -> paddle.Tensor:
    """q [..., T, H] float8_e4m3fn, scale [..., T, ceil(H/G)] float32 -> [..., T, H] float32 (q * s)."""
    check_tensor(q, "q", dtypes=(paddle.float8_e4m3fn,), min_ndim=1)
    check_tensor(scale, "scale", dtypes=(paddle.float32,), ndim=q.ndim)
    g = check_positive_int(group_size, "group_size")
    h = int(q.shape[-1])
    if list(scale.shape) != list(q.shape[:-1]) + [-(-h // g)]:
        raise ValueError(f"scale: expected shape {list(q.shape[:-1]) + [-(-h // g)]} for q {list(q.shape)}, "
                         f"got {list(scale.shape)}")
    s = paddle.repeat_interleave(scale, g, axis=-1)[..., :h]
    return e4m3_to_float32(q) * s


def expand_block_scale_to_rows(scale: paddle.Tensor, n_rows: int, block_n: int = GROUP_SIZE) -> paddle.Tensor:
    """Per-row weight scales for SM100 (SPEC §3): scale [..., ceil(N/BN), KB] -> [..., N, KB],
    sf_row[n, kb] = sf[n // BN, kb]."""
    check_tensor(scale, "scale", min_ndim=2)
    n = check_positive_int(n_rows, "n_rows")
    if -(-n // block_n) != int(scale.shape[-2]):
        raise ValueError(f"n_rows: {n} rows need {-(-n // block_n)} row blocks, scale has shape {list(scale.shape)}")
    return paddle.repeat_interleave(scale, block_n, axis=-2)[..., :n, :]


def dequant_per_block(q: paddle.Tensor, scale: paddle.Tensor, block_size=BLOCK_SIZE) -> paddle.Tensor:
    """q [..., N, K] float8_e4m3fn, scale [..., ceil(N/BN), ceil(K/BK)] float32 -> [..., N, K] float32."""
    check_tensor(q, "q", dtypes=(paddle.float8_e4m3fn,), min_ndim=2)
    check_tensor(scale, "scale", dtypes=(paddle.float32,), ndim=q.ndim)
    bn, bk = _block_shape(block_size)
    n, k = int(q.shape[-2]), int(q.shape[-1])
    expected = list(q.shape[:-2]) + [-(-n // bn), -(-k // bk)]
    if list(scale.shape) != expected:
        raise ValueError(f"scale: expected shape {expected} for q {list(q.shape)}, got {list(scale.shape)}")
    s = paddle.repeat_interleave(expand_block_scale_to_rows(scale, n, bn), bk, axis=-1)[..., :k]
    return e4m3_to_float32(q) * s
