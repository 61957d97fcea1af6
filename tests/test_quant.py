"""moe_ref.quant (SPEC §3): block quantization properties and an independent numpy check."""
import ml_dtypes
import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from moe_ref import quant
from moe_ref.fp8 import E4M3_MAX

# e4m3 keeps 3 mantissa bits: a normal value rounds with relative error <= 2^-4 (half a step
# of 2^-3); below the smallest normal 2^-6 the step is 2^-9, so the absolute error is <= 2^-10.
# In real units (times the scale s): |dequant - x| <= max(|x| * 2^-4, s * 2^-10).
REL_STEP = 2.0 ** -4
SUBNORMAL_HALF_STEP = 2.0 ** -10

finite_f32 = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


def _check_within_step(x: np.ndarray, dq: np.ndarray, s_per_elem: np.ndarray):
    bound = np.maximum(np.abs(x) * REL_STEP, s_per_elem * SUBNORMAL_HALF_STEP)
    err = np.abs(dq - x)
    worst = np.argmax(err - bound)
    assert np.all(err <= bound * (1 + 1e-6)), f"x={x.flat[worst]} dq={dq.flat[worst]} bound={bound.flat[worst]}"


@settings(max_examples=40, deadline=None)
@given(arr=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.integers(1, 300)), elements=finite_f32),
       use_ue8m0=st.booleans())
def test_token_group_round_trip_within_e4m3_step(arr, use_ue8m0):
    q, s = quant.per_token_group_quant(paddle.to_tensor(arr), use_ue8m0=use_ue8m0)
    h = arr.shape[1]
    assert list(q.shape) == list(arr.shape) and list(s.shape) == [arr.shape[0], -(-h // 128)]
    dq = quant.dequant_per_token_group(q, s).numpy()
    assert np.isfinite(dq).all()
    _check_within_step(arr, dq, np.repeat(s.numpy(), 128, axis=1)[:, :h])
    if use_ue8m0:
        m, _ = np.frexp(s.numpy())
        assert np.all(m == 0.5), "UE8M0 scales must be powers of two"


@settings(max_examples=30, deadline=None)
@given(arr=hnp.arrays(np.float32, st.tuples(st.integers(1, 260), st.integers(1, 260)), elements=finite_f32),
       use_ue8m0=st.booleans())
def test_block_round_trip_within_e4m3_step(arr, use_ue8m0):
    q, s = quant.per_block_quant(paddle.to_tensor(arr), use_ue8m0=use_ue8m0)
    n, k = arr.shape
    assert list(s.shape) == [-(-n // 128), -(-k // 128)]
    dq = quant.dequant_per_block(q, s).numpy()
    s_full = np.repeat(np.repeat(s.numpy(), 128, axis=0), 128, axis=1)[:n, :k]
    _check_within_step(arr, dq, s_full)


def test_block_quant_matches_numpy_definition():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((2, 200, 300)) * 0.02).astype(np.float32)
    w[1, 130:, :] *= 50                                   # a block with a larger range
    q, s = quant.per_block_quant(paddle.to_tensor(w))
    wp = np.zeros((2, 256, 384), np.float32)
    wp[:, :200, :300] = w
    blocks = wp.reshape(2, 2, 128, 3, 128)
    want_s = np.maximum(np.abs(blocks).max(axis=(2, 4)), 1e-4) / np.float32(448)
    np.testing.assert_allclose(s.numpy(), want_s, rtol=1e-7)
    want_q = np.clip(blocks / want_s[:, :, None, :, None], -448, 448).reshape(2, 256, 384)[:, :200, :300]
    np.testing.assert_array_equal(q.view(paddle.uint8).numpy(),
                                  want_q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8))


def test_quantization_never_nan_for_extreme_finite_input():
    x = paddle.to_tensor([[3e38, -3e38, 1e-45, 0.0] * 40], dtype=paddle.float32)
    for ue8m0 in (False, True):
        q, s = quant.per_token_group_quant(x, use_ue8m0=ue8m0)
        assert np.isfinite(s.numpy()).all()
        assert np.isfinite(quant.dequant_per_token_group(q, s).numpy()).all()


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_zero_block_gets_floor_scale_and_zero_codes(use_ue8m0):
    x = paddle.zeros([2, 256])
    q, s = quant.per_token_group_quant(x, use_ue8m0=use_ue8m0, amax_floor=1e-4)
    want = np.float32(1e-4) / np.float32(E4M3_MAX)
    if use_ue8m0:
        want = np.float32(2.0 ** np.ceil(np.log2(np.float64(want))))
    np.testing.assert_array_equal(s.numpy(), np.full([2, 2], want, np.float32))
    assert not q.view(paddle.uint8).numpy().any()
    wq, ws = quant.per_block_quant(paddle.zeros([128, 128]), use_ue8m0=use_ue8m0)
    assert not wq.view(paddle.uint8).numpy().any() and ws.numpy()[0, 0] == want


def test_ragged_hidden_is_kept_not_dropped():
    x = paddle.to_tensor(np.linspace(-3, 3, 2 * 130, dtype=np.float32).reshape(2, 130))
    q, s = quant.per_token_group_quant(x)
    assert list(q.shape) == [2, 130] and list(s.shape) == [2, 2]
    # the 2-element last group has its own scale from its own amax
    np.testing.assert_allclose(s.numpy()[:, 1], np.abs(x.numpy()[:, 128:]).max(axis=1) / 448, rtol=1e-7)


def test_amax_floor_changes_small_groups_only():
    x = paddle.to_tensor(np.full([1, 128], 1e-7, np.float32))
    _, s_dg = quant.per_token_group_quant(x, amax_floor=quant.DEEPGEMM_AMAX_FLOOR)
    _, s_fd = quant.per_token_group_quant(x, amax_floor=quant.FASTDEPLOY_AMAX_FLOOR)
    assert s_dg.item() == pytest.approx(1e-4 / 448) and s_fd.item() == pytest.approx(1e-7 / 448)


def test_fd_log2_bias_reproduces_fastdeploy_rounding():
    amax = np.array([448.0, 448.0 * 1.0000001, 448.0 * 2 ** -20], np.float32)
    x = paddle.to_tensor(np.repeat(amax[:, None], 128, axis=1))
    _, s = quant.per_token_group_quant(x, use_ue8m0=True, fd_log2_bias=True)
    want = np.exp2(np.ceil(np.log2(amax.astype(np.float32) / np.float32(448) + np.float32(5e-7))))
    np.testing.assert_array_equal(s.numpy()[:, 0], want.astype(np.float32))
    with pytest.raises(ValueError, match="fd_log2_bias"):
        quant.per_token_group_quant(x, fd_log2_bias=True)


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="x: expected dtype"):
        quant.per_token_group_quant(paddle.ones([2, 4], dtype=paddle.int32))
    with pytest.raises(ValueError, match=r"x: non-finite value nan at index \(0, 1\)"):
        quant.per_token_group_quant(paddle.to_tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="group_size"):
        quant.per_token_group_quant(paddle.ones([2, 4]), group_size=0)
    with pytest.raises(ValueError, match="amax_floor"):
        quant.per_token_group_quant(paddle.ones([2, 4]), amax_floor=0.0)
    with pytest.raises(ValueError, match="w: expected rank >= 2"):
        quant.per_block_quant(paddle.ones([4]))
    with pytest.raises(ValueError, match="block_size"):
        quant.per_block_quant(paddle.ones([4, 4]), block_size=(128,))
    q, s = quant.per_token_group_quant(paddle.ones([2, 256]))
    with pytest.raises(ValueError, match="scale: expected shape"):
        quant.dequant_per_token_group(q, s[:, :1])
    with pytest.raises(TypeError, match="q: expected dtype"):
        quant.dequant_per_token_group(paddle.ones([2, 256]), s)
    wq, ws = quant.per_block_quant(paddle.ones([256, 256]))
    with pytest.raises(ValueError, match="scale: expected shape"):
        quant.dequant_per_block(wq, ws[:1])
    with pytest.raises(ValueError, match="n_rows"):
        quant.expand_block_scale_to_rows(ws, 1000)


def test_expand_block_scale_to_rows():
    s = paddle.to_tensor([[1.0, 2.0], [3.0, 4.0]])
    rows = quant.expand_block_scale_to_rows(s, 130).numpy()
    assert rows.shape == (130, 2)
    np.testing.assert_array_equal(rows[127], [1.0, 2.0])
    np.testing.assert_array_equal(rows[128], [3.0, 4.0])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_propagate_policy_quantizes_non_finite_groups(bad, use_ue8m0):
    # issue 15 item 9: with nan_policy="propagate" the UE8M0 path raised and told the caller to pass
    # nan_policy='propagate', which they had. Expected (DeepGEMM's reference): the bad group's UE8M0
    # scale is 2^127, its NaN element is the e4m3 NaN code; the other groups are untouched.
    x = np.ones((2, 256), np.float32)
    x[0, 3] = bad
    q, s = quant.per_token_group_quant(paddle.to_tensor(x), use_ue8m0=use_ue8m0, nan_policy="propagate")
    s = s.numpy()
    codes = q.view(paddle.uint8).numpy()
    ref_q, ref_s = quant.per_token_group_quant(paddle.to_tensor(np.ones((1, 128), np.float32)), use_ue8m0=use_ue8m0)
    assert np.array_equal(s[0, 1:], np.broadcast_to(ref_s.numpy()[0, 0], (1,)))
    assert np.array_equal(s[1], np.broadcast_to(ref_s.numpy()[0, 0], (2,)))
    assert np.array_equal(codes[1], np.tile(ref_q.view(paddle.uint8).numpy()[0], 2))
    if use_ue8m0:
        assert s[0, 0] == 2.0 ** 127
    else:
        assert not np.isfinite(s[0, 0])
    if np.isnan(bad):
        assert codes[0, 3] & 0x7F == 0x7F
    elif use_ue8m0:   # inf / 2^127 = inf, saturated to +-448 by the clamp-then-cast rule
        assert codes[0, 3] == (0x7E if bad > 0 else 0xFE)


def test_nan_error_hint_only_where_the_policy_exists():
    x = paddle.to_tensor(np.array([[1.0, np.nan]], np.float32))
    with pytest.raises(ValueError, match="pass nan_policy='propagate'"):
        quant.per_token_group_quant(x)
    from moe_ref.routing import softmax_topk
    with pytest.raises(ValueError, match="logits: non-finite") as err:
        softmax_topk(x, 1)
    assert "nan_policy" not in str(err.value)


def test_block_size_int_is_a_square_block_and_bad_values_are_named():
    w = paddle.to_tensor(np.random.default_rng(0).standard_normal((130, 260)).astype(np.float32))
    q_int, s_int = quant.per_block_quant(w, block_size=64, use_ue8m0=True)
    q_pair, s_pair = quant.per_block_quant(w, block_size=(64, 64), use_ue8m0=True)
    assert list(s_int.shape) == [3, 5]
    assert np.array_equal(q_int.view(paddle.uint8).numpy(), q_pair.view(paddle.uint8).numpy())
    assert np.array_equal(quant.dequant_per_block(q_int, s_int, 64).numpy(),
                          quant.dequant_per_block(q_pair, s_pair, (64, 64)).numpy())
    for bad in ["128", (128,), (128, 128, 1), None]:
        with pytest.raises(ValueError, match="block_size: expected an int"):
            quant.per_block_quant(w, block_size=bad)


@pytest.mark.parametrize("floor", [float("inf"), float("nan"), 0.0, -1.0, True])
def test_amax_floor_must_be_finite_and_positive(floor):
    with pytest.raises(ValueError, match="amax_floor: expected a finite float > 0"):
        quant.per_token_group_quant(paddle.ones([2, 128]), amax_floor=floor)
