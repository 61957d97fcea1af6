"""moe_ref.fp8 (SPEC §1-2) against independent definitions (ml_dtypes, numpy bit arithmetic)."""
import ml_dtypes
import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moe_ref import fp8


def _bits(q: paddle.Tensor) -> np.ndarray:
    return q.view(paddle.uint8).numpy()


def _e4m3_values_to_test() -> np.ndarray:
    """Over a million float32 values: every e4m3 code, midpoints between neighbours (ties),
    points just beside them, subnormals, +-448 and out-of-range values, and random ones."""
    codes = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    finite = np.sort(codes[np.isfinite(codes)])
    mids = (finite[:-1] + finite[1:]) / 2                         # exact ties in float32
    beside = np.concatenate([np.nextafter(mids, np.inf, dtype=np.float32),
                             np.nextafter(mids, -np.inf, dtype=np.float32)])
    rng = np.random.default_rng(0)
    sub = rng.uniform(-2.0 ** -6, 2.0 ** -6, 200_000).astype(np.float32)       # subnormal range
    wide = (rng.standard_normal(400_000) * np.exp2(rng.integers(-12, 10, 400_000))).astype(np.float32)
    uni = rng.uniform(-600, 600, 400_000).astype(np.float32)                   # includes |x| > 448
    edges = np.array([448, -448, 464, -464, 465, 479.99, 480, 1e30, -1e30, 2.0 ** -9, 2.0 ** -10,
                      3 * 2.0 ** -11, 0.0, -0.0], dtype=np.float32)
    return np.concatenate([finite, mids, beside, sub, wide, uni, edges])


def test_cast_matches_ml_dtypes_bit_for_bit():
    x = _e4m3_values_to_test()
    assert x.size >= 1_000_000
    got = _bits(fp8.cast_to_e4m3(paddle.to_tensor(x)))
    want = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    mismatch = np.nonzero(got != want)[0]
    assert mismatch.size == 0, f"first mismatch x={x[mismatch[0]]!r}: got {got[mismatch[0]]:#x}, want {want[mismatch[0]]:#x}"


def test_cast_rounds_ties_to_even_and_clamps():
    # 1 + 1/16 is halfway between 1 (mantissa 000) and 1.125 (001): ties to even -> 1.0
    x = paddle.to_tensor([1.0625, 1.1875, 500.0, -1e9, 2.0 ** -10], dtype=paddle.float32)
    got = fp8.e4m3_to_float32(fp8.cast_to_e4m3(x)).numpy()
    np.testing.assert_array_equal(got, [1.0, 1.25, 448.0, -448.0, 0.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_cast_rejects_non_finite_naming_index(bad):
    x = paddle.ones([3, 4], dtype=paddle.float32)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"x: non-finite value .* at index \(1, 2\)"):
        fp8.cast_to_e4m3(x)


def test_cast_propagate_policy_keeps_nan():
    x = paddle.to_tensor([1.0, float("nan"), float("inf"), -float("inf")], dtype=paddle.float32)
    q = fp8.cast_to_e4m3(x, nan_policy="propagate")
    out = fp8.e4m3_to_float32(q).numpy()
    assert out[0] == 1.0 and np.isnan(out[1])
    np.testing.assert_array_equal(out[2:], [448.0, -448.0])   # inf clamps first, then casts


def test_cast_argument_errors():
    with pytest.raises(TypeError, match="x: expected dtype"):
        fp8.cast_to_e4m3(paddle.ones([2], dtype=paddle.int32))
    with pytest.raises(TypeError, match="x: expected a paddle.Tensor"):
        fp8.cast_to_e4m3(np.ones(2))
    with pytest.raises(ValueError, match="nan_policy"):
        fp8.cast_to_e4m3(paddle.ones([2]), nan_policy="ignore")
    with pytest.raises(TypeError, match="q: expected dtype"):
        fp8.e4m3_to_float32(paddle.ones([2]))


def test_cast_accepts_bf16():
    x = paddle.to_tensor([0.5, 3.0, 1000.0]).astype(paddle.bfloat16)
    np.testing.assert_array_equal(fp8.e4m3_to_float32(fp8.cast_to_e4m3(x)).numpy(), [0.5, 3.0, 448.0])


# ---- ceil_to_ue8m0 against an independent definition: frexp / exact powers of two -------------

def _ceil_pow2_reference(s: np.ndarray) -> np.ndarray:
    """Smallest power of two >= s via float64 frexp, exponent clamped to [-126, 127]."""
    m, e = np.frexp(s.astype(np.float64))          # s = m * 2^e, 0.5 <= m < 1
    exp = np.where(m == 0.5, e - 1, e)             # exact power of two stays
    return np.exp2(np.clip(exp, -126, 127)).astype(np.float32)


def test_ceil_to_ue8m0_against_frexp():
    rng = np.random.default_rng(1)
    s = np.concatenate([
        np.exp2(np.arange(-126, 128)).astype(np.float32),                  # exact powers stay
        np.nextafter(np.exp2(np.arange(-126, 127)).astype(np.float32), np.inf, dtype=np.float32),  # just above: up
        np.nextafter(np.exp2(np.arange(-125, 128)).astype(np.float32), 0, dtype=np.float32),       # just below: to it
        np.array([1e-45, 1e-40, 2.0 ** -127, 1.1754942e-38, 3.4e38, 0.7, 1.5, 3.0], dtype=np.float32),  # subnormal, top
        (rng.random(100_000) * np.exp2(rng.integers(-60, 60, 100_000))).astype(np.float32) + np.float32(1e-30),
    ])
    got = fp8.ceil_to_ue8m0(paddle.to_tensor(s)).numpy()
    np.testing.assert_array_equal(got, _ceil_pow2_reference(s))
    # and the result is never below the input, except where clamped at 2^127
    assert np.all((got >= s) | (s > 2.0 ** 127))


def test_ceil_to_ue8m0_is_not_truncation():
    s = paddle.to_tensor([0.75], dtype=paddle.float32)
    assert fp8.ceil_to_ue8m0(s).item() == 1.0      # bits >> 23 would give 0.5: the B200 NaN bug


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_ceil_to_ue8m0_rejects(bad):
    with pytest.raises(ValueError, match="s: "):
        fp8.ceil_to_ue8m0(paddle.to_tensor([1.0, bad], dtype=paddle.float32))


def test_ue8m0_encode_decode():
    e = np.arange(1, 255)
    s = np.exp2(e - 127.0).astype(np.float32)
    b = fp8.ue8m0_encode(paddle.to_tensor(s))
    assert b.dtype == paddle.uint8
    np.testing.assert_array_equal(b.numpy(), e.astype(np.uint8))
    np.testing.assert_array_equal(fp8.ue8m0_decode(b).numpy(), s)
    special = fp8.ue8m0_decode(paddle.to_tensor(np.array([0, 255], dtype=np.uint8))).numpy()
    assert special[0] == np.float32(2.0 ** -127) and np.isnan(special[1])


@pytest.mark.parametrize("bad", [1.5, 0.0, -2.0, 2.0 ** -130, float("nan"), float("inf"), 3.0])
def test_ue8m0_encode_rejects_with_value(bad):
    with pytest.raises(ValueError, match="power of two") as info:
        fp8.ue8m0_encode(paddle.to_tensor([1.0, 2.0, bad], dtype=paddle.float32))
    assert "flat index 2" in str(info.value)


def test_ue8m0_decode_wrong_dtype():
    with pytest.raises(TypeError, match="b: expected dtype"):
        fp8.ue8m0_decode(paddle.ones([2], dtype=paddle.int32))


# ---- packing ----------------------------------------------------------------------------------

def test_pack_byte_order_by_hand():
    b = paddle.to_tensor(np.array([[0x01, 0x02, 0x03, 0xC8, 0x05]], dtype=np.uint8))
    w = fp8.pack_ue8m0(b).numpy().view(np.uint32)
    np.testing.assert_array_equal(w, [[0xC8030201, 0x00000005]])   # byte j of word p = group 4p+j


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.uint8, hnp.array_shapes(min_dims=1, max_dims=3, max_side=9)))
def test_pack_unpack_round_trip(arr):
    b = paddle.to_tensor(arr)
    w = fp8.pack_ue8m0(b)
    assert list(w.shape) == list(arr.shape[:-1]) + [-(-arr.shape[-1] // 4)]
    np.testing.assert_array_equal(fp8.unpack_ue8m0(w, arr.shape[-1]).numpy(), arr)


def test_unpack_rejects_wrong_group_count_and_nonzero_padding():
    w = fp8.pack_ue8m0(paddle.to_tensor(np.array([[1, 2, 3, 4, 5]], dtype=np.uint8)))
    with pytest.raises(ValueError, match="num_groups"):
        fp8.unpack_ue8m0(w, 9)
    six = fp8.pack_ue8m0(paddle.to_tensor(np.array([[1, 2, 3, 4, 5, 6]], dtype=np.uint8)))
    with pytest.raises(ValueError, match="padding bytes"):
        fp8.unpack_ue8m0(six, 5)          # byte 6 would be dropped silently
    with pytest.raises(TypeError, match="words: expected dtype"):
        fp8.unpack_ue8m0(paddle.ones([2, 2], dtype=paddle.int64), 8)


def test_mn_major_tma_aligned_layout():
    s = paddle.arange(2 * 5 * 3, dtype=paddle.float32).reshape([2, 5, 3])
    m = fp8.to_mn_major_tma_aligned(s)
    assert list(m.physical.shape) == [2, 3, 8] and m.shape == [2, 5, 3]
    assert m.strides == (24, 1, 8)
    np.testing.assert_array_equal(m.logical_view().numpy(), s.numpy())
    np.testing.assert_array_equal(m.to_contiguous().numpy(), s.numpy())
    assert float(m.physical[:, :, 5:].abs().sum()) == 0.0          # padding rows are zero
    phys = m.physical.numpy().ravel()
    np.testing.assert_array_equal(phys[1 * 24 + 2 * 8 + 4], s.numpy()[1, 4, 2])   # strides as stated
    assert fp8.to_mn_major_tma_aligned(s[0]).shape == [1, 5, 3]
    with pytest.raises(ValueError, match="scale: expected rank"):
        fp8.to_mn_major_tma_aligned(paddle.ones([3]))


def test_storage_helpers_gather_concat_and_mn_major_view():
    x = paddle.to_tensor(np.array([[1.5, -2.0], [448.0, 0.25]], dtype=np.float32)).astype(paddle.float8_e4m3fn)
    got = fp8.gather_rows_zero_fill(x, paddle.to_tensor([1, -1, 0, 2], dtype=paddle.int64))
    assert got.dtype == paddle.float8_e4m3fn                        # fp8 moved as bytes, not converted
    bits = got.view(paddle.uint8).numpy()
    np.testing.assert_array_equal(bits[[0, 2]], x.view(paddle.uint8).numpy()[[1, 0]])
    assert not bits[[1, 3]].any()                                   # -1 and N both select the zero row
    empty = fp8.gather_rows_zero_fill(paddle.zeros([0, 3], dtype=paddle.int32), paddle.full([2], -1, dtype=paddle.int64))
    assert list(empty.shape) == [2, 3] and not empty.numpy().any()  # an empty source still gives zero rows
    cat = fp8.concat_rows([x[:0], x, x[1:]])
    assert cat.dtype == paddle.float8_e4m3fn and list(cat.shape) == [3, 2]
    np.testing.assert_array_equal(cat.view(paddle.uint8).numpy()[2], x.view(paddle.uint8).numpy()[1])
    s = paddle.arange(2 * 5 * 3, dtype=paddle.int32).reshape([2, 5, 3])
    view = fp8.to_mn_major_view(s)
    np.testing.assert_array_equal(view.numpy(), s.numpy())
    assert tuple(view.strides) == fp8.mn_major_strides(5, 3) == (24, 1, 8)


@pytest.mark.parametrize("dtype, to", [(paddle.int32, paddle.uint8), (paddle.uint8, paddle.int32),
                                       (paddle.float32, paddle.uint8), (paddle.int32, paddle.float32)])
def test_dtype_view_of_a_row_slice_keeps_its_bytes(dtype, to):
    """Paddle 3.3 misreads a view to a dtype of another size of a tensor that starts inside its buffer
    (words[8:16].view(uint8) held other bytes): dtype_view must give the slice's own bytes."""
    whole = paddle.to_tensor(np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)).view(dtype)   # [16, 16/size]
    part = whole[8:16]
    want = np.ascontiguousarray(whole.numpy()[8:16]).view(np.dtype(str(to).split(".")[-1]))
    got = fp8.dtype_view(part, to)
    assert got.numpy().tobytes() == want.tobytes()
    assert fp8.dtype_view(whole, to).numpy().tobytes() == whole.numpy().tobytes()
