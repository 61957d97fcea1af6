"""The portable Paddle provider of backend.ops, op by op (SPEC §4-8).

Each op is checked three ways: a small case worked out by hand, the reference `moe_ref`
(integer outputs and FP8 bits exact; float outputs within the bound stated at the assert),
and the layout contract (shapes, strides, zeroed padding, untouched masked rows).
"""
import math

import ml_dtypes
import numpy as np
import paddle
import pytest

import backend.ops as ops
from backend.ops import paddle_provider
from moe_ref import cutlass_sf
from moe_ref.fp8 import E4M3_MAX, pack_scale_ue8m0, to_mn_major_tma_aligned
from moe_ref.metrics import calc_diff
from moe_ref.quant import (dequant_per_block, dequant_per_token_group, expand_block_scale_to_rows, per_block_quant,
                           per_token_group_quant)

P = ops.get_provider("paddle")
BF16_UNIT_ROUNDOFF = 2.0 ** -8     # bf16 keeps 8 significant bits: rounding moves a value by <= 2^-8 of it
FP32_EPS = 2.0 ** -23


def bits(q: paddle.Tensor) -> np.ndarray:
    """Raw bytes of an fp8 tensor."""
    return q.view(paddle.uint8).numpy()


def e4m3_values(q: paddle.Tensor) -> np.ndarray:
    return bits(q).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


packed = pack_scale_ue8m0      # float32 powers of two [.., G] -> packed UE8M0 words (the reference's packing)


def rng_tensor(shape, seed, scale=1.0, dtype=paddle.float32):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def assert_mn_major(view: paddle.Tensor, e: int, m: int, c: int):
    m_pad = -(-m // 4) * 4
    assert list(view.shape) == [e, m, c]
    assert list(view.strides) == [c * m_pad, 1, m_pad]


# ----------------------------------------------------------------------------- per_token_quant

def test_per_token_quant_by_hand():
    x = paddle.zeros([2, 128], dtype=paddle.float32)
    x[0, 0], x[0, 1] = 3.5, -1.75          # amax 3.5: s = 3.5/448 = 2^-7 exactly
    x[1, 0] = 1.0                          # amax 1: s = 1/448; UE8M0 rounds up to 2^-8
    q, s = P.per_token_quant(x, 128, False)
    np.testing.assert_array_equal(s.numpy(), np.array([[2.0 ** -7], [1.0 / 448]], dtype=np.float32))
    assert bits(q)[0, :3].tolist() == [0x7E, 0xF6, 0x00]          # 448, -224, 0 in e4m3
    q, s = P.per_token_quant(x, 128, True)
    assert s.dtype == paddle.int32 and s.numpy().tolist() == [[127 - 7], [127 - 8]]   # one byte per word
    assert e4m3_values(q)[1, 0] == 256.0                                              # 1 / 2^-8


@pytest.mark.parametrize("h", [128, 300, 640])
@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("dtype", [paddle.bfloat16, paddle.float32])
def test_per_token_quant_matches_reference(h, use_ue8m0, dtype):
    x = rng_tensor([7, h], seed=h, scale=3.0) * paddle.to_tensor([[10.0 ** (i - 3)] for i in range(7)])
    x[2] = 0.0                                                     # amax floor row
    x = x.astype(dtype)
    q, s = P.per_token_quant(x, 128, use_ue8m0)
    q_ref, s_ref = per_token_group_quant(x, 128, use_ue8m0=use_ue8m0)
    np.testing.assert_array_equal(bits(q), bits(q_ref))
    assert q.shape == [7, h] and q.dtype == paddle.float8_e4m3fn
    s_expected = packed(s_ref) if use_ue8m0 else s_ref
    assert s.dtype == s_expected.dtype and s.shape == s_expected.shape
    np.testing.assert_array_equal(s.numpy(), s_expected.numpy())


def test_per_token_quant_other_block_size():
    x = rng_tensor([3, 96], seed=1)
    q, s = P.per_token_quant(x, 32, False)
    q_ref, s_ref = per_token_group_quant(x, 32)
    np.testing.assert_array_equal(bits(q), bits(q_ref))
    np.testing.assert_array_equal(s.numpy(), s_ref.numpy())


# ----------------------------------------------------------------------------- permute

HAND_IDS = [[0, 2], [-1, -1], [2, 1], [0, -1], [1, 0]]
# token-major then k: expert 0 gets (0,0), (3,0), (4,1); expert 1 gets (2,1), (4,0); expert 2 gets (0,1), (2,0)
HAND_MAP = [[0, 12], [-1, -1], [13, 6], [1, -1], [7, 2]]
HAND_SOURCES = {0: 0, 1: 3, 2: 4, 6: 2, 7: 4, 12: 0, 13: 2}      # row e·M + slot -> token


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_permute_by_hand(use_ue8m0):
    e, m, h = 3, 6, 300
    x = rng_tensor([5, h], seed=3)
    q, s = P.per_token_quant(x, 128, use_ue8m0)
    ids = paddle.to_tensor(HAND_IDS, dtype=paddle.int64)
    px, ps, imap, counts = P.prefill_permute_to_masked_gemm(q, s, ids, e, m)
    assert imap.dtype == paddle.int32 and imap.numpy().tolist() == HAND_MAP
    assert counts.dtype == paddle.int32 and counts.numpy().tolist() == [[3], [2], [2]]
    assert px.shape == [e, m, h] and px.dtype == paddle.float8_e4m3fn
    rows, srows = bits(px).reshape(e * m, h), ps.numpy().reshape(e * m, -1)
    for r in range(e * m):
        if r in HAND_SOURCES:
            np.testing.assert_array_equal(rows[r], bits(q)[HAND_SOURCES[r]])
            np.testing.assert_array_equal(srows[r], s.numpy()[HAND_SOURCES[r]])
        else:
            assert not rows[r].any() and not srows[r].any(), f"row {r} should be zero"
    assert_mn_major(ps, e, m, int(s.shape[1]))
    assert ps.dtype == s.dtype


def test_permute_bf16_without_scale_and_int32_ids():
    x = rng_tensor([5, 64], seed=4, dtype=paddle.bfloat16)
    px, ps, imap, _ = P.prefill_permute_to_masked_gemm(x, None, paddle.to_tensor(HAND_IDS, dtype=paddle.int32), 3, 6)
    assert ps is None and px.dtype == paddle.bfloat16
    assert imap.numpy().tolist() == HAND_MAP
    np.testing.assert_array_equal(px.reshape([18, 64])[12].astype(paddle.float32).numpy(),
                                  x[0].astype(paddle.float32).numpy())


def test_permute_all_padding():
    x = rng_tensor([4, 128], seed=5)
    q, s = P.per_token_quant(x, 128, False)
    px, ps, imap, counts = P.prefill_permute_to_masked_gemm(q, s, paddle.full([4, 2], -1, dtype=paddle.int64), 2, 3)
    assert not bits(px).any() and not ps.numpy().any()
    assert (imap.numpy() == -1).all() and counts.numpy().ravel().tolist() == [0, 0]


def _random_routing(w, k, e, seed, pad_fraction=0.2):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(e)[:k] for _ in range(w)]).astype(np.int64)
    ids[rng.random((w, k)) < 0.15] = -1                           # single unrouted entries
    ids[rng.random(w) < pad_fraction] = -1                        # padding rows anywhere, not only last
    return paddle.to_tensor(ids)


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_permute_matches_reference(use_ue8m0):
    layout = pytest.importorskip("moe_ref.layout")
    w, k, e, m, h = 37, 4, 5, 40, 384
    x = rng_tensor([w, h], seed=6)
    q, s = P.per_token_quant(x, 128, use_ue8m0)
    ids = _random_routing(w, k, e, seed=7)
    px, ps, imap, counts = P.prefill_permute_to_masked_gemm(q, s, ids, e, m)
    ref = layout.prefill_permute_to_masked_gemm(q, s, ids, e, m)
    np.testing.assert_array_equal(bits(px), bits(ref.permute_x))
    np.testing.assert_array_equal(imap.numpy(), ref.permuted_indice_map.numpy())
    np.testing.assert_array_equal(counts.numpy(), ref.token_nums_per_expert.numpy())
    np.testing.assert_array_equal(ps.numpy(), ref.permute_scale.to_contiguous().numpy())
    assert list(ps.strides) == list(ref.permute_scale.strides)


# ----------------------------------------------------------------------------- unpack_and_convert_scale

def test_unpack_golden_by_hand():
    # E = 1, MN = 3 rows, C = 2 words (8 groups of 128 -> KB = 32 columns of one byte per 32 K).
    # Row r, group g has exponent byte 0x70 + 16·r + g for g < 5; groups 5..7 are padding (byte 0).
    words = [[0x73727170, 0x74], [0x83828180, 0x84], [0x93929190, 0x94]]
    scale = paddle.to_tensor(np.array(words, dtype=np.int64).astype(np.uint32).view(np.int32)[None])
    sf = P.unpack_and_convert_scale(scale, None)
    assert sf.dtype == paddle.uint8 and sf.shape == [1, 128, 32]      # MN padded to 128, KB = 16·C
    expected = np.zeros(128 * 32, dtype=np.uint8)
    # KB = 32: column tile j (columns 4j..4j+3, i.e. group j) starts at byte 512·j; row r adds 16·r (r < 32).
    for r in range(3):
        for g in range(5):
            expected[512 * g + 16 * r: 512 * g + 16 * r + 4] = 0x70 + 16 * r + g
    np.testing.assert_array_equal(sf.numpy().ravel(), expected)


def _pow2_scales(shape, seed):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor(np.ldexp(1.0, rng.integers(-20, 5, size=shape)).astype(np.float32))


@pytest.mark.parametrize("mn", [128, 200, 5])
def test_unpack_round_trip_any_mn(mn):
    e, groups = 2, 7                                        # 7 groups -> 2 words, last byte is padding
    s = _pow2_scales([e, mn, groups], seed=mn)
    words = packed(s)
    sf = P.unpack_and_convert_scale(words, None)
    mn_pad = -(-mn // 128) * 128
    assert sf.shape == [e, mn_pad, 32]
    back = P.cutlass_scale_to_fp32(sf, mn)
    assert back.shape == [e, mn, 8] and back.dtype == paddle.float32
    np.testing.assert_array_equal(back.numpy()[..., :groups], s.numpy())
    np.testing.assert_array_equal(back.numpy()[..., groups:], np.float32(2.0 ** -127))   # byte 0
    # padding rows MN..MN_pad-1 are zero bytes
    rm = cutlass_sf.unswizzle(sf).numpy()
    assert not rm[:, mn:].any()
    full = P.cutlass_scale_to_fp32(sf)
    assert full.shape == [e, mn_pad, 8]


def test_unpack_mn_major_view_equals_contiguous_and_masked_rows_zero():
    e, m, groups = 3, 10, 4
    s = _pow2_scales([e, m, groups], seed=11)
    words = packed(s)                                                    # [E, M, 1] contiguous
    view = to_mn_major_tma_aligned(words).logical_view()                 # MN-major strides
    assert list(view.strides) != list(words.strides)
    for masked in (paddle.to_tensor([10, 3, 0], dtype=paddle.int32),
                   paddle.to_tensor([[10], [3], [0]], dtype=paddle.int32),
                   paddle.to_tensor([10, 3, 0], dtype=paddle.int64)):
        a = P.unpack_and_convert_scale(view, masked)
        b = P.unpack_and_convert_scale(words, masked)
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    rm = cutlass_sf.unswizzle(a).numpy()
    full = cutlass_sf.unswizzle(P.unpack_and_convert_scale(words, None)).numpy()
    np.testing.assert_array_equal(rm[0, :10], full[0, :10])
    np.testing.assert_array_equal(rm[1, :3], full[1, :3])
    assert not rm[1, 3:].any() and not rm[2].any()
    assert full[1, 3:10].all()


def test_unpack_rejects_nan_byte_and_float_scales():
    words = paddle.to_tensor(np.array([[[0x7F7FFF7F]]], dtype=np.int64).astype(np.uint32).view(np.int32))
    with pytest.raises(ValueError, match=r"scale: UE8M0 byte 1 of word \(0, 0, 0\) is 255"):
        P.unpack_and_convert_scale(words, None)
    with pytest.raises(TypeError, match="scale: expected packed UE8M0.*float32"):
        P.unpack_and_convert_scale(paddle.ones([1, 4, 1]), None)


def test_cutlass_scale_to_fp32_rejects_disagreeing_bytes():
    sf = P.unpack_and_convert_scale(packed(_pow2_scales([1, 128, 4], seed=2)), None)
    raw = sf.numpy().copy()
    raw.ravel()[cutlass_sf.sf_byte_offset(5, 2, 16)] += 1              # row 5, 32-column 2 (group 0)
    with pytest.raises(ValueError, match="group 0 of expert 0, row 5 differ"):
        P.cutlass_scale_to_fp32(paddle.to_tensor(raw))


# ----------------------------------------------------------------------------- group_gemm_masked

def _sf_from_words(words_emc, masked_m=None):
    """Packed UE8M0 words [E, MN, C] -> CUTLASS SF bytes, through an MN-major view like the real path."""
    return P.unpack_and_convert_scale(to_mn_major_tma_aligned(words_emc).logical_view(), masked_m)


def test_group_gemm_by_hand():
    # E = 1, M = N = 1, K = 64 (one 128-group): a = 1.0 everywhere with scale 2^0 (byte 127),
    # b = 0.5 everywhere with scale 2^1 (byte 128): out = 64 · (1 · 1) · (0.5 · 2) = 64, + bias 3 = 67.
    a = paddle.ones([1, 64]).astype(paddle.float8_e4m3fn)
    b = paddle.full([1, 1, 64], 0.5).astype(paddle.float8_e4m3fn)
    sfa = _sf_from_words(paddle.to_tensor([[[127]]], dtype=paddle.int32))
    sfb = _sf_from_words(paddle.to_tensor([[[128]]], dtype=paddle.int32))
    out = paddle.zeros([1, 1], dtype=paddle.bfloat16)
    res = P.group_gemm_masked(a, b, sfa, sfb, paddle.to_tensor([1], dtype=paddle.int32), out,
                              paddle.to_tensor([[3.0]]), 1)
    assert out.astype(paddle.float32).numpy()[0, 0] == 67.0
    assert res is out


def _gemm_problem(e, m, n, k, seed):
    a_f = rng_tensor([e * m, k], seed=seed, scale=2.0)
    w_f = rng_tensor([e, n, k], seed=seed + 1, scale=0.05)
    a_q, a_s = per_token_group_quant(a_f, use_ue8m0=True)                       # [E·M, S] powers of two
    w_q, w_s = per_block_quant(w_f, use_ue8m0=True)                             # [E, ceil(N/128), S]
    a_words = packed(a_s).reshape([e, m, -1])
    w_words = packed(expand_block_scale_to_rows(w_s, n))                        # per-row weight scales, SPEC §3
    return dict(a_f=a_f, w_f=w_f, a_q=a_q, a_s=a_s, w_q=w_q, w_s=w_s, a_words=a_words, w_words=w_words)


@pytest.mark.parametrize("with_bias", [False, True])
def test_group_gemm_masked_rows_untouched_and_accuracy(with_bias, monkeypatch):
    e, m, n, k = 3, 40, 96, 320                      # M, N not multiples of 128, K = 2.5 groups
    pr = _gemm_problem(e, m, n, k, seed=20)
    masked_m = paddle.to_tensor([17, 0, 40], dtype=paddle.int32)
    sfa = _sf_from_words(pr["a_words"], masked_m)
    sfb = _sf_from_words(pr["w_words"])
    bias = rng_tensor([e, n], seed=23) if with_bias else None
    poison = -1232.0                                  # exactly representable in bf16
    out = paddle.full([e * m, n], poison, dtype=paddle.bfloat16)

    calls = []
    real_matmul = paddle.matmul

    def spy(x, y, *args, **kwargs):
        calls.append(int(x.shape[0]))
        return real_matmul(x, y, *args, **kwargs)

    monkeypatch.setattr(paddle, "matmul", spy)
    P.group_gemm_masked(pr["a_q"], pr["w_q"], sfa, sfb, masked_m, out, bias, m)
    monkeypatch.setattr(paddle, "matmul", real_matmul)
    assert sum(calls) == 17 + 40, "work must scale with the valid rows"

    got = out.astype(paddle.float32).numpy().reshape(e, m, n)
    counts = masked_m.numpy()
    for ex in range(e):
        assert (got[ex, counts[ex]:] == poison).all(), f"expert {ex}: rows >= masked_m were written"

    # float64 of the same dequantized operands: only float32 summation and the bf16 rounding differ.
    a_deq = dequant_per_token_group(pr["a_q"], pr["a_s"]).numpy().astype(np.float64).reshape(e, m, k)
    w_deq = dequant_per_block(pr["w_q"], pr["w_s"]).numpy().astype(np.float64)
    bias64 = np.zeros((e, n)) if bias is None else bias.numpy().astype(np.float64)
    for ex in range(e):
        c = counts[ex]
        ref = a_deq[ex, :c] @ w_deq[ex].T + bias64[ex]
        abs_terms = np.abs(a_deq[ex, :c]) @ np.abs(w_deq[ex]).T + np.abs(bias64[ex])
        # bf16 rounding (<= 2^-8 relative) + float32 accumulation of K + 1 terms (<= (K+1)·2^-23 · Σ|terms|)
        bound = BF16_UNIT_ROUNDOFF * np.abs(ref) + (k + 1) * FP32_EPS * abs_terms
        assert (np.abs(got[ex, :c] - ref) <= bound).all()

    # moe_ref-based dequant-matmul in float32: agrees far tighter than FP8 vs the unquantized product.
    valid = np.concatenate([np.arange(c) + ex * m for ex, c in enumerate(counts)])
    ref32 = np.concatenate([(paddle.matmul(paddle.to_tensor(a_deq[ex, :c].astype(np.float32)),
                                           paddle.to_tensor(w_deq[ex].astype(np.float32)), transpose_y=True)
                             + (0 if bias is None else bias[ex])).astype(paddle.bfloat16).astype(paddle.float32)
                            .numpy() for ex, c in enumerate(counts) if c])
    unq = np.concatenate([pr["a_f"].numpy().reshape(e, m, k)[ex, :c] @ pr["w_f"].numpy()[ex].T + bias64[ex]
                          for ex, c in enumerate(counts) if c])
    got_valid = got.reshape(e * m, n)[valid]
    d_impl, d_fp8 = calc_diff(got_valid, ref32), calc_diff(ref32, unq)
    print(f"group_gemm_masked: calc_diff vs moe_ref dequant-matmul {d_impl:.2e}, FP8 vs unquantized {d_fp8:.2e}")
    assert d_impl < 1e-5 and d_fp8 > 1e-4 and d_impl < d_fp8 / 100, (d_impl, d_fp8)


def test_group_gemm_all_masked_touches_nothing():
    pr = _gemm_problem(2, 8, 16, 128, seed=30)
    masked_m = paddle.zeros([2], dtype=paddle.int32)
    out = paddle.full([16, 16], 7.0, dtype=paddle.bfloat16)
    P.group_gemm_masked(pr["a_q"], pr["w_q"], _sf_from_words(pr["a_words"], masked_m), _sf_from_words(pr["w_words"]),
                        masked_m, out, None, 8)
    assert (out.astype(paddle.float32).numpy() == 7.0).all()


def test_group_gemm_dequantizes_only_valid_rows_and_experts_with_rows(monkeypatch):
    # K = 100: the last 32-wide scale block is ragged. Experts 1 and 3 have no rows: their weights are
    # never converted, and of A only the valid rows are (work follows masked_m, not E·M or E).
    e, m, n, k = 4, 64, 48, 100
    pr = _gemm_problem(e, m, n, k, seed=40)
    masked_m = paddle.to_tensor([5, 0, 64, 0], dtype=paddle.int32)
    converted = []
    real = paddle_provider._fp8_to_float

    def spy(x):
        converted.append(int(x.numel()))
        return real(x)

    monkeypatch.setattr(paddle_provider, "_fp8_to_float", spy)
    out = paddle.full([e * m, n], 5.0, dtype=paddle.bfloat16)
    P.group_gemm_masked(pr["a_q"], pr["w_q"], _sf_from_words(pr["a_words"], masked_m), _sf_from_words(pr["w_words"]),
                        masked_m, out, None, m)
    assert sum(converted) == (5 + 64) * k + 2 * n * k

    got = out.astype(paddle.float32).numpy().reshape(e, m, n)
    a_deq = dequant_per_token_group(pr["a_q"], pr["a_s"]).numpy().astype(np.float64).reshape(e, m, k)
    w_deq = dequant_per_block(pr["w_q"], pr["w_s"]).numpy().astype(np.float64)
    for ex, c in enumerate(masked_m.numpy()):
        assert (got[ex, c:] == 5.0).all(), f"expert {ex}: rows >= masked_m were written"
        ref = a_deq[ex, :c] @ w_deq[ex].T
        bound = BF16_UNIT_ROUNDOFF * np.abs(ref) + k * FP32_EPS * (np.abs(a_deq[ex, :c]) @ np.abs(w_deq[ex]).T)
        assert (np.abs(got[ex, :c] - ref) <= bound).all()


# ----------------------------------------------------------------------------- fused SwiGLU + quant

def test_swiglu_by_hand():
    # gate = 2, lin = 1: y = 2 / (1 + e^-2) = 1.76159... -> bf16 1.7578125; amax/448 = 0.00392 -> UE8M0 2^-7
    # (byte 120); y / 2^-7 = 225 -> e4m3 224 (step 16 in [128, 256)).
    up = paddle.concat([paddle.full([1, 1, 128], 2.0), paddle.ones([1, 1, 128])], axis=2).astype(paddle.bfloat16)
    up = paddle.concat([up, up], axis=1)                                     # M = 2, only row 0 valid
    act, s = P.fused_mask_swiglu_fp8_quant(up, paddle.to_tensor([1], dtype=paddle.int32), 128, True)
    assert act.shape == [1, 2, 128] and (e4m3_values(act)[0, 0] == 224.0).all()
    assert not bits(act)[0, 1].any()
    assert s.dtype == paddle.int32 and s.numpy().ravel().tolist() == [120, 0]
    assert_mn_major(s, 1, 2, 1)
    assert math.isclose(2 / (1 + math.exp(-2)), 1.76159, rel_tol=1e-5)


@pytest.mark.parametrize("use_ue8m0", [False, True])
@pytest.mark.parametrize("i", [256, 640])
def test_swiglu_matches_reference(use_ue8m0, i):
    moe = pytest.importorskip("moe_ref.moe")
    e, m = 3, 9
    up = rng_tensor([e, m, 2 * i], seed=i, scale=3.0, dtype=paddle.bfloat16)
    counts = paddle.to_tensor([[9], [0], [4]], dtype=paddle.int32)
    act, s = P.fused_mask_swiglu_fp8_quant(up, counts, 128, use_ue8m0)
    act_ref, s_ref = moe.fused_mask_swiglu_fp8_quant_ref(up, counts, use_ue8m0=use_ue8m0)
    np.testing.assert_array_equal(bits(act), bits(act_ref))
    np.testing.assert_array_equal(s.numpy(), s_ref.to_contiguous().numpy())
    assert list(s.strides) == list(s_ref.strides)
    groups = -(-i // 128)
    assert_mn_major(s, e, m, -(-groups // 4) if use_ue8m0 else groups)
    assert not bits(act)[1].any() and not bits(act)[2, 4:].any()


# ----------------------------------------------------------------------------- depermute + combine

def test_depermute_by_hand():
    # E = 2, M = 2: rows (e, m) hold the constant 1 + e·M + m.
    ffn = paddle.to_tensor(np.arange(1, 5, dtype=np.float32).reshape(2, 2, 1).repeat(3, axis=2)).astype(paddle.bfloat16)
    imap = paddle.to_tensor([[0, 3], [-1, -1], [2, -1]], dtype=paddle.int32)
    w = paddle.to_tensor([[0.5, 0.25], [1.0, 1.0], [2.0, 9.0]])
    out = P.depermute_prefill_combine(ffn, imap, w, 3)
    assert out.dtype == paddle.bfloat16
    np.testing.assert_array_equal(out.astype(paddle.float32).numpy(),
                                  np.array([[0.5 * 1 + 0.25 * 4] * 3, [0.0] * 3, [2.0 * 3] * 3]))


def test_depermute_matches_reference_and_float64():
    w_rows, k, e, m, h = 29, 4, 5, 30, 64
    ids = _random_routing(w_rows, k, e, seed=40)
    x = rng_tensor([w_rows, h], seed=41, dtype=paddle.bfloat16)
    _, _, imap, _ = P.prefill_permute_to_masked_gemm(x, None, ids, e, m)
    ffn = rng_tensor([e, m, h], seed=42, dtype=paddle.bfloat16)
    weights = paddle.to_tensor(np.random.default_rng(43).random((w_rows, k)).astype(np.float32))
    out = P.depermute_prefill_combine(ffn, imap, weights, w_rows).astype(paddle.float32).numpy()

    idx = imap.numpy().astype(np.int64)
    rows = ffn.astype(paddle.float32).numpy().astype(np.float64).reshape(e * m, h)
    terms = np.where((idx >= 0)[..., None], weights.numpy()[..., None] * rows[np.clip(idx, 0, None)], 0.0)
    ref64 = terms.sum(axis=1)
    bound = BF16_UNIT_ROUNDOFF * np.abs(ref64) + 2 * k * FP32_EPS * np.abs(terms).sum(axis=1)
    assert (np.abs(out - ref64) <= bound).all()
    assert not out[(idx < 0).all(axis=1)].any(), "tokens routed nowhere must be zero"

    layout = pytest.importorskip("moe_ref.layout")
    ref = layout.depermute_prefill_combine(ffn, imap, weights, w_rows)
    # same terms, same k order, float32 accumulation: bit-identical
    np.testing.assert_array_equal(out, ref.astype(paddle.float32).numpy())


def test_e4m3_max_is_the_shared_constant():
    # The provider saturates at the shared constant: a huge value in a group with a tiny amax floor
    x = paddle.to_tensor([[1e30] + [0.0] * 127])
    q, s = P.per_token_quant(x, 128, False)
    assert e4m3_values(q)[0, 0] == E4M3_MAX


def test_unpack_leaves_the_callers_strided_view_alone():
    # Paddle 3.3's Tensor.contiguous() converts a strided view in place; the provider must not do that.
    view = to_mn_major_tma_aligned(packed(_pow2_scales([2, 6, 4], seed=9))).logical_view()
    strides = list(view.strides)
    ops.unpack_and_convert_scale(view, paddle.to_tensor([6, 2], dtype=paddle.int32))
    assert list(view.strides) == strides


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_swiglu_with_no_valid_rows_is_all_zero(use_ue8m0):
    act, s = P.fused_mask_swiglu_fp8_quant(paddle.ones([2, 3, 256], dtype=paddle.bfloat16),
                                           paddle.zeros([2], dtype=paddle.int32), 128, use_ue8m0)
    assert not bits(act).any() and not s.numpy().any()


def test_empty_inputs():
    q, s = P.per_token_quant(paddle.zeros([0, 256]), 128, True)
    assert q.shape == [0, 256] and s.shape == [0, 1] and s.dtype == paddle.int32
    px, ps, imap, counts = P.prefill_permute_to_masked_gemm(q, s, paddle.zeros([0, 2], dtype=paddle.int64), 2, 4)
    assert px.shape == [2, 4, 256] and not bits(px).any() and imap.shape == [0, 2]
    assert counts.numpy().ravel().tolist() == [0, 0]
    assert_mn_major(ps, 2, 4, 1)
    out = P.depermute_prefill_combine(paddle.zeros([2, 4, 8]), imap, paddle.zeros([0, 2]), 0)
    assert out.shape == [0, 8] and out.dtype == paddle.bfloat16


# ----------------------------------------------------------------------------- develop's fused ops, #7666's quant

def _routed(w, e, k_top, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(e, size=k_top, replace=False) for _ in range(w)]).astype(np.int64)
    ids[rng.random(ids.shape) < 0.3] = -1
    return paddle.to_tensor(ids)


def _assert_same(got, want):
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and list(g.shape) == list(r.shape)
        np.testing.assert_array_equal(g.view(paddle.uint8).numpy() if g.dtype == paddle.float8_e4m3fn else g.numpy(),
                                      r.view(paddle.uint8).numpy() if r.dtype == paddle.float8_e4m3fn else r.numpy())


@pytest.mark.parametrize("h,scales", [(384, "1x128"), (640, "1x128"), (384, "1x32"), (352, "1x32")])
def test_blackwell_permute_equals_reference_and_the_old_path(h, scales):
    """Byte for byte: moe_ref.blackwell_layout, and (1x128) FastDeploy's permute + unpack_and_convert_scale."""
    from moe_ref import blackwell_layout as BL
    w, e, m = 14, 4, 16
    x = rng_tensor([w, h], seed=h)
    if scales == "1x128":
        q, s = per_token_group_quant(x, use_ue8m0=True)
        scale = packed(s)
    else:
        q, scale = BL.group_wise_quant(x)
    ids = _routed(w, e, 4, seed=h + 1)
    got = P.prefill_permute_to_blackwell_masked_gemm(q, scale, ids.astype(paddle.int32), e, m)
    _assert_same(got, BL.prefill_permute_to_blackwell_masked_gemm(q, scale, ids, e, m))
    if scales == "1x128":
        px, ps, imap, counts = P.prefill_permute_to_masked_gemm(q, scale, ids, e, m)
        _assert_same(got, (px.reshape([e * m, h]), P.unpack_and_convert_scale(ps, counts), imap, counts))


@pytest.mark.parametrize("i,group", [(256, 128), (384, 128), (256, 32), (96, 32)])
def test_blackwell_swiglu_equals_reference_and_the_old_path(i, group):
    """Byte for byte: moe_ref.blackwell_layout, and (1x128) fused_mask_swiglu_fp8_quant + unpack_and_convert_scale;
    rows past the counts hold NaN and are never read."""
    from moe_ref import blackwell_layout as BL
    e, m = 3, 8
    counts = paddle.to_tensor([8, 0, 5], dtype=paddle.int32)
    up = rng_tensor([e, m, 2 * i], seed=i, scale=3.0).numpy()
    up[2, 5:] = np.nan
    up = paddle.to_tensor(up).astype(paddle.bfloat16).reshape([e * m, 2 * i])
    got = P.fused_mask_swiglu_fp8_quant_blackwell(up, counts, group_size=group)
    _assert_same(got, BL.fused_mask_swiglu_fp8_quant_blackwell(up, counts, group_size=group))
    if group == 128:
        act, s = P.fused_mask_swiglu_fp8_quant(up.reshape([e, m, 2 * i]), counts)
        _assert_same(got, (act.reshape([e * m, i]), P.unpack_and_convert_scale(s, counts)))


@pytest.mark.parametrize("shape,swizzle", [([12, 256], False), ([5, 200], False), ([2, 256, 384], True)])
def test_group_wise_quant_equals_reference(shape, swizzle):
    from moe_ref import blackwell_layout as BL
    x = rng_tensor(shape, seed=len(shape), scale=5.0, dtype=paddle.bfloat16)
    _assert_same(P.group_wise_quant(x, False, swizzle), BL.group_wise_quant(x, use_swizzle=swizzle))


def test_unpack_and_convert_scale_of_an_expert_slice_reads_its_own_words():
    # a slice that starts inside its buffer (experts 2..3 of 4) once made Paddle 3.3's int32 -> uint8 view
    # read other bytes (moe_ref.fp8.dtype_view); the result must equal the one of a fresh copy
    rng = np.random.default_rng(0)
    words = paddle.to_tensor(rng.integers(100, 140, size=(4, 128, 2, 4), dtype=np.uint8).view(np.int32)[..., 0])
    P = ops.get_provider("paddle")
    got = P.unpack_and_convert_scale(words[2:4], None)
    want = P.unpack_and_convert_scale(words[2:4].clone(), None)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
