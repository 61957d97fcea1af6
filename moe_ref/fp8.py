"""FP8 e4m3fn and UE8M0 numerics and storage (SPEC §1-2), in plain Paddle.

The one home of the format helpers every layer imports (the reference, the providers, the
method, the EP runners): e4m3 cast, UE8M0 ceil/encode/decode/pack/unpack, MN-major TMA-aligned
storage, fp8 byte views, row gather with a zero row. The constants and the integer formulas of
the format live in `moe_ref.constants` (Paddle-free) and are re-exported here; `moe_ref.fp8_torch`
is the torch front-end of the storage helpers (for the Triton launchers, where Paddle is absent).
"""
from __future__ import annotations

import dataclasses

from ._paddle import paddle
from .checks import FLOAT_DTYPES, NAN_POLICY_HINT, check_finite, check_tensor
from .constants import (BYTES_PER_WORD, E4M3_MAX, E4M3_MIN_SUBNORMAL, TMA_ALIGN,  # noqa: F401 - re-exported
                        UE8M0_BIAS, UE8M0_MAX_EXP, UE8M0_MIN_EXP, UE8M0_NAN, align, ceil_div, mn_major_strides,
                        num_scale_groups, packed_words)


_MANTISSA_MASK = (1 << 23) - 1


def check_nan_policy(nan_policy) -> str:
    if nan_policy not in ("raise", "propagate"):
        raise ValueError(f"nan_policy: expected 'raise' or 'propagate', got {nan_policy!r}")
    return nan_policy


def cast_to_e4m3(x: paddle.Tensor, nan_policy: str = "raise") -> paddle.Tensor:
    """Clamp to [-448, 448], then cast to float8_e4m3fn (round to nearest, ties to even).

    x [...] float32 | bf16 | fp16 | fp64 -> [...] float8_e4m3fn.
    Clamping first is the project's rule: frameworks disagree on out-of-range casts.
    nan_policy="raise" (default) raises ValueError naming the first NaN/inf index;
    "propagate" lets them through (NaN becomes the e4m3 NaN, inf saturates to +-448).
    """
    check_tensor(x, "x", dtypes=FLOAT_DTYPES)
    check_nan_policy(nan_policy)
    xf = x.astype(paddle.float32)
    if nan_policy == "raise":
        check_finite(xf, "x", NAN_POLICY_HINT)
    clamped = paddle.clip(xf, -E4M3_MAX, E4M3_MAX)
    if nan_policy == "propagate":
        # Paddle's CPU cast turns NaN into +-448 (SPEC §1): write the NaN pattern 0x7F ourselves.
        q = clamped.astype(paddle.float8_e4m3fn).view(paddle.uint8).astype(paddle.int32)
        q = paddle.where(paddle.isnan(xf), paddle.full_like(q, 0x7F), q)   # (where has no uint8 kernel on CPU)
        return q.astype(paddle.uint8).view(paddle.float8_e4m3fn)
    return clamped.astype(paddle.float8_e4m3fn)


def e4m3_to_float32(q: paddle.Tensor) -> paddle.Tensor:
    """q [...] float8_e4m3fn -> [...] float32 (exact: every e4m3 value is a float32)."""
    check_tensor(q, "q", dtypes=(paddle.float8_e4m3fn,))
    return q.astype(paddle.float32)


def _float32_bits(s: paddle.Tensor) -> paddle.Tensor:
    return s.astype(paddle.float32).view(paddle.int32)


def _check_positive_finite(s: paddle.Tensor, name: str, nan_policy: str = "raise") -> None:
    check_tensor(s, name, dtypes=(paddle.float32,))
    if check_nan_policy(nan_policy) == "raise":
        check_finite(s, name, NAN_POLICY_HINT)
    if bool((s <= 0).any()):
        flat = int(paddle.nonzero((s <= 0).flatten())[0, 0])
        raise ValueError(f"{name}: scales must be > 0, got {float(s.flatten()[flat])} at flat index {flat}")


def ceil_to_ue8m0(s: paddle.Tensor, nan_policy: str = "raise") -> paddle.Tensor:
    """Smallest power of two >= s, bit-exact (SPEC §2).

    s [...] float32, finite and > 0 -> [...] float32 powers of two in [2^-126, 2^127].
    Exponent field of s, plus one when the mantissa is non-zero, clamped to 1..254.
    (Taking only the exponent field would round *down*: the bug that broke B200 serving.)
    nan_policy="raise" (default): a NaN or inf in s raises, naming its index. "propagate": a NaN or
    inf scale becomes 2^127 (byte 254, the largest finite UE8M0 value), as DeepGEMM's reference
    quantizer gives for a group whose amax is not finite; the group's codes then carry the NaN
    (e4m3 0x7F) or saturate to +-448 in `cast_to_e4m3(..., nan_policy="propagate")`.
    """
    _check_positive_finite(s, "s", nan_policy)
    bits = _float32_bits(s)
    exp = paddle.bitwise_right_shift(bits, paddle.to_tensor(23, dtype=paddle.int32))
    exp = paddle.bitwise_and(exp, paddle.to_tensor(0xFF, dtype=paddle.int32))
    mantissa = paddle.bitwise_and(bits, paddle.to_tensor(_MANTISSA_MASK, dtype=paddle.int32))
    exp = exp + (mantissa != 0).astype(paddle.int32)
    exp = paddle.clip(exp, UE8M0_MIN_EXP, UE8M0_MAX_EXP)
    if nan_policy == "propagate":   # exponent field 255 (NaN, inf) would clamp to 254 too; say it outright
        exp = paddle.where(paddle.isfinite(s), exp, paddle.full_like(exp, UE8M0_MAX_EXP))
    return paddle.bitwise_left_shift(exp, paddle.to_tensor(23, dtype=paddle.int32)).view(paddle.float32)


def ue8m0_encode(s: paddle.Tensor) -> paddle.Tensor:
    """Exact powers of two -> UE8M0 bytes.

    s [...] float32, each a power of two in [2^-126, 2^127] -> [...] uint8 (e = log2(s) + 127).
    Anything else (not a power of two, <= 0, subnormal, NaN, inf) raises ValueError with the value:
    encoding must never round silently.
    """
    check_tensor(s, "s", dtypes=(paddle.float32,))
    bits = _float32_bits(s)
    exp = paddle.bitwise_and(paddle.bitwise_right_shift(bits, paddle.to_tensor(23, dtype=paddle.int32)),
                             paddle.to_tensor(0x1FF, dtype=paddle.int32))   # sign bit lands at 0x100
    mantissa = paddle.bitwise_and(bits, paddle.to_tensor(_MANTISSA_MASK, dtype=paddle.int32))
    ok = paddle.logical_and(mantissa == 0, paddle.logical_and(exp >= UE8M0_MIN_EXP, exp <= UE8M0_MAX_EXP))
    if not bool(ok.all()):
        flat = int(paddle.nonzero(paddle.logical_not(ok).flatten())[0, 0])
        raise ValueError(f"s: UE8M0 needs a positive power of two in [2^-126, 2^127], "
                         f"got {float(s.flatten()[flat])!r} at flat index {flat}")
    return exp.astype(paddle.uint8)


def ue8m0_decode(b: paddle.Tensor) -> paddle.Tensor:
    """UE8M0 bytes -> float32: b [...] uint8 -> 2^(b - 127); 0 -> 2^-127 (subnormal); 255 -> NaN."""
    check_tensor(b, "b", dtypes=(paddle.uint8,))
    e = b.astype(paddle.int32)
    out = paddle.bitwise_left_shift(e, paddle.to_tensor(23, dtype=paddle.int32)).view(paddle.float32)
    out = paddle.where(e == 0, paddle.full_like(out, 2.0 ** -127), out)
    return paddle.where(e == UE8M0_NAN, paddle.full_like(out, float("nan")), out)


def pack_ue8m0(b: paddle.Tensor) -> paddle.Tensor:
    """Pack UE8M0 bytes 4 to an int32, little-endian along the group axis (SPEC §2).

    b [..., MN, G] uint8 -> [..., MN, ceil(G/4)] int32; word p holds groups 4p..4p+3
    (byte j of the word = group 4p+j); missing groups pad with byte 0.
    """
    check_tensor(b, "b", dtypes=(paddle.uint8,), min_ndim=1)
    g = int(b.shape[-1])
    words = packed_words(g)
    v = b.astype(paddle.int64)
    if words * BYTES_PER_WORD != g:
        pad = paddle.zeros(list(b.shape[:-1]) + [words * BYTES_PER_WORD - g], dtype=paddle.int64)
        v = paddle.concat([v, pad], axis=-1)
    v = v.reshape(list(b.shape[:-1]) + [words, BYTES_PER_WORD])
    weights = paddle.to_tensor([1, 1 << 8, 1 << 16, 1 << 24], dtype=paddle.int64)
    unsigned = (v * weights).sum(axis=-1)
    # two's complement: bytes >= 0x80 in the top position make a negative int32
    signed = paddle.where(unsigned >= (1 << 31), unsigned - (1 << 32), unsigned)
    return signed.astype(paddle.int32)


def unpack_ue8m0(words: paddle.Tensor, num_groups: int) -> paddle.Tensor:
    """Inverse of pack_ue8m0: words [..., MN, C] int32 -> [..., MN, num_groups] uint8.

    num_groups must satisfy 4(C-1) < num_groups <= 4C; the padding bytes past num_groups
    must be zero (a non-zero one means the caller's num_groups is wrong: nothing is dropped silently).
    """
    check_tensor(words, "words", dtypes=(paddle.int32,), min_ndim=1)
    c = int(words.shape[-1])
    if not (BYTES_PER_WORD * (c - 1) < num_groups <= BYTES_PER_WORD * c):
        raise ValueError(f"num_groups: {c} words hold {BYTES_PER_WORD * (c - 1) + 1}..{BYTES_PER_WORD * c} groups, "
                         f"got {num_groups}")
    u = words.astype(paddle.int64)
    u = paddle.where(u < 0, u + (1 << 32), u)
    shifts = paddle.to_tensor([0, 8, 16, 24], dtype=paddle.int64)
    bytes_ = paddle.bitwise_and(paddle.bitwise_right_shift(u.unsqueeze(-1), shifts),
                                paddle.to_tensor(0xFF, dtype=paddle.int64))
    bytes_ = bytes_.reshape(list(words.shape[:-1]) + [c * BYTES_PER_WORD])
    if num_groups < c * BYTES_PER_WORD and bool((bytes_[..., num_groups:] != 0).any()):
        raise ValueError(f"words: padding bytes past num_groups={num_groups} are non-zero")
    return bytes_[..., :num_groups].astype(paddle.uint8)


def pack_scale_ue8m0(scale: paddle.Tensor) -> paddle.Tensor:
    """UE8M0 scales as float32 powers of two [..., MN, G] -> packed int32 [..., MN, ceil(G/4)] (SPEC §2)."""
    return pack_ue8m0(ue8m0_encode(scale))


def unpack_scale_ue8m0(words: paddle.Tensor, num_groups: int) -> paddle.Tensor:
    """Packed int32 [..., MN, ceil(G/4)] -> float32 powers of two [..., MN, G] (inverse of pack_scale_ue8m0)."""
    return ue8m0_decode(unpack_ue8m0(words, num_groups))


@dataclasses.dataclass
class MNMajorScale:
    """A scale tensor stored MN-major and TMA-aligned (SPEC §2), as DeepGEMM and blackwell_ops want it.

    physical [B, C, align(MN, 4)]: the buffer as it lies in memory, MN contiguous, rows past MN zero.
    logical  [B, MN, C] with strides (C * align(MN, 4), 1, align(MN, 4)): `logical_view()`.
    mn: the number of meaningful MN rows.
    """
    physical: paddle.Tensor
    mn: int

    @property
    def shape(self) -> list[int]:
        """Logical shape [B, MN, C]."""
        b, c, _ = self.physical.shape
        return [int(b), self.mn, int(c)]

    @property
    def strides(self) -> tuple[int, int, int]:
        """Element strides of the logical view: (C * align(MN, 4), 1, align(MN, 4))."""
        return mn_major_strides(self.mn, int(self.physical.shape[1]))

    def logical_view(self) -> paddle.Tensor:
        """[B, MN, C] strided view of the physical buffer (no copy)."""
        return mn_major_view(self.physical, self.mn)

    def to_contiguous(self) -> paddle.Tensor:
        """[B, MN, C] contiguous copy of the logical tensor."""
        return self.physical[:, :, : self.mn].transpose([0, 2, 1]).contiguous()


def to_mn_major_tma_aligned(scale: paddle.Tensor) -> MNMajorScale:
    """scale [B, MN, C] or [MN, C] (any dtype, contiguous) -> MNMajorScale (B = 1 for 2-D input).

    MN is padded to a multiple of 4 with zeros (16 bytes for fp32/int32).
    """
    check_tensor(scale, "scale", ndim=(2, 3))
    s = scale.unsqueeze(0) if scale.ndim == 2 else scale
    b, mn, c = (int(d) for d in s.shape)
    mn_pad = align(mn, TMA_ALIGN)
    physical = s.transpose([0, 2, 1])
    if mn_pad != mn:
        physical = paddle.concat([physical, paddle.zeros([b, c, mn_pad - mn], dtype=s.dtype)], axis=2)
    return MNMajorScale(physical.contiguous(), mn)


def mn_major_view(physical: paddle.Tensor, mn: int) -> paddle.Tensor:
    """physical [B, C, align(MN, 4)] -> the logical [B, MN, C] strided view (no copy), strides
    (C · align(MN, 4), 1, align(MN, 4)): what the ops contract passes as an MN-major scale."""
    b, c, _ = (int(d) for d in physical.shape)
    return paddle.as_strided(physical, [b, int(mn), c], list(mn_major_strides(mn, c)))


def to_mn_major_view(scale: paddle.Tensor) -> paddle.Tensor:
    """scale [B, MN, C] or [MN, C] contiguous -> its MN-major TMA-aligned copy as the logical strided view
    (`to_mn_major_tma_aligned(scale).logical_view()`)."""
    return to_mn_major_tma_aligned(scale).logical_view()


# ---------------------------------------------------------------------------------------------
# fp8 rows as bytes: Paddle's CPU kernels have no float8 gather/concat, so fp8 moves as uint8
# ---------------------------------------------------------------------------------------------

def contiguous_copy(x: paddle.Tensor) -> paddle.Tensor:
    """x itself when contiguous, else a contiguous copy (`clone`). Never `Tensor.contiguous()` on a
    caller's tensor: Paddle 3.3 rewrites a strided view in place, so the caller's view would stop
    sharing memory with the buffer it was sliced from."""
    return x if x.is_contiguous() else x.clone()


def dtype_view(t: paddle.Tensor, dtype) -> paddle.Tensor:
    """t viewed as `dtype` (the same bytes, the last axis rescaled by the size ratio). A strided view is
    copied first (`contiguous_copy`), and so is a tensor that starts inside its buffer (a row slice such as
    words[8:16]) when the element size changes: Paddle 3.3's view to a dtype of another size keeps the byte
    offset but reads it in the new element size, so the view would hold other bytes."""
    src = contiguous_copy(t)
    if src.element_size() != paddle.empty([0], dtype=dtype).element_size() and src._offset():
        src = src.clone()
    return src.view(dtype)


def as_bytes(x: paddle.Tensor) -> paddle.Tensor:
    """x [...] float8_e4m3fn -> the same bytes as uint8 (a view); any other dtype unchanged."""
    return x.view(paddle.uint8) if x.dtype == paddle.float8_e4m3fn else x


def from_bytes(b: paddle.Tensor, dtype) -> paddle.Tensor:
    """Inverse of as_bytes: uint8 bytes back to float8_e4m3fn when dtype is fp8; otherwise b unchanged."""
    return b.view(paddle.float8_e4m3fn) if dtype == paddle.float8_e4m3fn else b


def concat_rows(tensors: list[paddle.Tensor]) -> paddle.Tensor:
    """Row-wise concatenation of [N_i, C] tensors of one dtype, fp8 included (moved as bytes).
    Empty pieces are skipped (all empty: the first one is returned)."""
    dtype = tensors[0].dtype
    pieces = [as_bytes(t) for t in tensors if int(t.shape[0]) > 0]
    if not pieces:
        return tensors[0]
    return from_bytes(paddle.concat(pieces, axis=0) if len(pieces) > 1 else pieces[0], dtype)


def gather_rows_zero_fill(x: paddle.Tensor, src: paddle.Tensor) -> paddle.Tensor:
    """x [N, C] any dtype, src [R] int64: a row of x, or -1 (or N) for a zero row -> [R, C].

    A zero row is appended to x before the gather, which also keeps the source non-empty
    (Paddle's CPU gather reads out of bounds from an empty source instead of failing).
    """
    data = as_bytes(x)
    padded = paddle.concat([data, paddle.zeros([1, int(x.shape[1])], dtype=data.dtype)], axis=0)
    index = paddle.where(src >= 0, src, paddle.full_like(src, int(x.shape[0])))
    return from_bytes(paddle.gather(padded, index, axis=0), x.dtype)
