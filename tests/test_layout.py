"""moe_ref.layout (SPEC §5, §8): masked and contiguous permutes, depermute + weighted combine.

The expected maps come from a plain (t, k) loop written here; values are compared bit for bit.
"""
import ml_dtypes
import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ref.fp8 import BYTES_PER_WORD, TMA_ALIGN, align
from moe_ref.layout import (CONTIGUOUS_SEGMENT_ALIGN, depermute_contiguous_combine, depermute_prefill_combine,
                            permute_to_contiguous, prefill_permute_to_masked_gemm)
from moe_ref.quant import GROUP_SIZE, per_token_group_quant


def random_topk_ids(rng, w, k, e, drop=0.2, pad_rows=0.2, one_expert=False):
    """[W, K_top] int64: distinct local ids per row (as routing gives), some entries -1 (experts
    on other ranks) and some whole rows -1 (padding), anywhere."""
    if one_expert:
        ids = np.full((w, k), -1, np.int64)
        ids[:, 0] = 0
        return ids
    ids = np.stack([rng.permutation(e)[:k] for _ in range(w)]).astype(np.int64)
    ids[rng.random((w, k)) < drop] = -1
    ids[rng.random(w) < pad_rows] = -1
    return ids


def loop_indice_map(ids: np.ndarray, e: int, m: int):
    """Slot order token-major then k: entry (t, k) with expert x takes the next free slot of x."""
    count = [0] * e
    out = np.full(ids.shape, -1, np.int64)
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            x = ids[t, k]
            if x >= 0:
                out[t, k] = x * m + count[x]
                count[x] += 1
    return out, np.array(count, np.int64)


def make_x(rng, w, h, kind):
    """-> (x, scale, raw rows as numpy for bitwise compare, scale rows as numpy or None)."""
    xf = rng.normal(size=(w, h)).astype(np.float32)
    if kind == "bf16":
        x = paddle.to_tensor(xf).astype(paddle.bfloat16)
        return x, None, x.astype(paddle.float32).numpy(), None
    q, s = per_token_group_quant(paddle.to_tensor(xf), use_ue8m0=(kind == "fp8_packed"))
    if kind == "fp8_packed":
        from moe_ref.moe import pack_scale_ue8m0
        s = pack_scale_ue8m0(s)
    return q, s, q.view(paddle.uint8).numpy(), s.numpy()


def raw(t):
    return t.view(paddle.uint8).numpy() if t.dtype == paddle.float8_e4m3fn else t.astype(paddle.float32).numpy()


layout_case = st.fixed_dictionaries({
    "w": st.integers(1, 24), "e": st.integers(1, 9), "k_choice": st.sampled_from([1, 2, 8]),
    "h": st.sampled_from([1, 100, 128, 200, 520]), "seed": st.integers(0, 2**16),
    "kind": st.sampled_from(["bf16", "fp8_fp32", "fp8_packed"]), "one_expert": st.booleans(),
    "m_extra": st.integers(0, 5),
})


@settings(max_examples=40, deadline=None)
@given(case=layout_case)
def test_masked_permute_properties(case):
    rng = np.random.default_rng(case["seed"])
    w, e, h = case["w"], case["e"], case["h"]
    k = min(case["k_choice"], e)
    ids = random_topk_ids(rng, w, k, e, one_expert=case["one_expert"])
    ref_map, ref_counts = loop_indice_map(ids, e, 1)             # M=1 placeholder, counts only
    m = max(int(ref_counts.max()), 1) + case["m_extra"]
    ref_map, _ = loop_indice_map(ids, e, m)
    x, scale, x_raw, s_raw = make_x(rng, w, h, case["kind"])

    lay = prefill_permute_to_masked_gemm(x, scale, paddle.to_tensor(ids), e, m)

    assert lay.permute_x.dtype == x.dtype and list(lay.permute_x.shape) == [e, m, h]
    assert lay.permuted_indice_map.dtype == paddle.int32 and lay.token_nums_per_expert.dtype == paddle.int32
    assert list(lay.token_nums_per_expert.shape) == [e, 1]
    # token_nums_per_expert is the bincount of the valid ids
    np.testing.assert_array_equal(lay.token_nums_per_expert.numpy().ravel(),
                                  np.bincount(ids[ids >= 0], minlength=e)[:e])
    # deterministic slot order: exactly the loop's map
    np.testing.assert_array_equal(lay.permuted_indice_map.numpy(), ref_map)
    # permute_x[map] is the source row, bit for bit; every other row is zero
    px = raw(lay.permute_x).reshape(e * m, h)
    used = np.zeros(e * m, bool)
    for (t, j), idx in np.ndenumerate(ref_map):
        if idx >= 0:
            np.testing.assert_array_equal(px[idx], x_raw[t])
            used[idx] = True
    assert not px[~used].any(), "rows past token_nums_per_expert must be zero"
    if scale is None:
        assert lay.permute_scale is None
        return
    # permute_scale: logical [E, M, S'] MN-major, strides (S'·align(M,4), 1, align(M,4)), physical [E, S', align(M,4)]
    s_cols = int(scale.shape[1])
    m_pad = align(m, TMA_ALIGN)
    ps = lay.permute_scale
    assert ps.shape == [e, m, s_cols] and ps.strides == (s_cols * m_pad, 1, m_pad)
    assert list(ps.physical.shape) == [e, s_cols, m_pad] and ps.physical.dtype == scale.dtype
    logical = ps.to_contiguous().numpy().reshape(e * m, s_cols)
    np.testing.assert_array_equal(ps.logical_view().numpy().reshape(e * m, s_cols), logical)
    for (t, j), idx in np.ndenumerate(ref_map):
        if idx >= 0:
            np.testing.assert_array_equal(logical[idx], s_raw[t])
    assert not logical[~used].any()
    assert not ps.physical.numpy()[:, :, m:].any(), "TMA padding past M must be zero"


@settings(max_examples=30, deadline=None)
@given(case=layout_case)
def test_contiguous_permute_properties(case):
    rng = np.random.default_rng(case["seed"])
    w, e, h = case["w"], case["e"], case["h"]
    k = min(case["k_choice"], e)
    ids = random_topk_ids(rng, w, k, e, one_expert=case["one_expert"])
    x, scale, x_raw, s_raw = make_x(rng, w, h, case["kind"])
    lay = permute_to_contiguous(x, scale, paddle.to_tensor(ids), e)

    counts = np.bincount(ids[ids >= 0], minlength=e)[:e]
    np.testing.assert_array_equal(lay.token_nums_per_expert.numpy().ravel(), counts)
    padded = (counts + CONTIGUOUS_SEGMENT_ALIGN - 1) // CONTIGUOUS_SEGMENT_ALIGN * CONTIGUOUS_SEGMENT_ALIGN
    offsets = np.concatenate([[0], np.cumsum(padded)])
    total = int(offsets[-1])
    assert list(lay.permute_x.shape) == [total, h] and total % CONTIGUOUS_SEGMENT_ALIGN == 0
    # m_indices: expert e on its first count_e rows of its segment, -1 on the padding
    expected_m = np.full(total, -1, np.int64)
    for x_id in range(e):
        expected_m[offsets[x_id]: offsets[x_id] + counts[x_id]] = x_id
    assert lay.m_indices.dtype == paddle.int32
    np.testing.assert_array_equal(lay.m_indices.numpy(), expected_m)
    # map = segment start + the same slot as the masked layout
    slot_map, _ = loop_indice_map(ids, e, 1 << 20)
    expected_map = np.where(ids >= 0, offsets[np.clip(ids, 0, None)] + slot_map % (1 << 20), -1)
    np.testing.assert_array_equal(lay.permuted_indice_map.numpy(), expected_map)
    px = raw(lay.permute_x)
    for (t, j), idx in np.ndenumerate(expected_map):
        if idx >= 0:
            np.testing.assert_array_equal(px[idx], x_raw[t])
            if scale is not None:
                np.testing.assert_array_equal(lay.permute_scale.numpy()[idx], s_raw[t])
    assert not px[expected_m < 0].any(), "padding rows must be zero"


def numpy_weighted_combine(rows: np.ndarray, idx_map: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Σ_k w·row in float32, k ascending, one rounding to bf16 (SPEC §8)."""
    acc = np.zeros((idx_map.shape[0], rows.shape[1]), np.float32)
    for k in range(idx_map.shape[1]):
        valid = (idx_map[:, k] >= 0)[:, None]
        acc = acc + np.where(valid, weights[:, k:k + 1] * rows[np.clip(idx_map[:, k], 0, None)], np.float32(0))
    return acc.astype(ml_dtypes.bfloat16).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(case=layout_case)
def test_identity_experts_round_trip(case):
    """permute -> identity experts -> depermute equals Σ_k w·x (bitwise, both layouts)."""
    rng = np.random.default_rng(case["seed"])
    w, e, h = case["w"], case["e"], case["h"]
    k = min(case["k_choice"], e)
    ids = random_topk_ids(rng, w, k, e, one_expert=case["one_expert"])
    x, _, x_f32, _ = make_x(rng, w, h, "bf16")
    weights = rng.random((w, k)).astype(np.float32)
    weights[ids < 0] = 0.5          # weights of unrouted entries must not leak in
    expected = numpy_weighted_combine(x_f32, np.where(ids >= 0, np.arange(w)[:, None], -1), weights)

    m = w
    lay = prefill_permute_to_masked_gemm(x, None, paddle.to_tensor(ids), e, m)
    out = depermute_prefill_combine(lay.permute_x, lay.permuted_indice_map, paddle.to_tensor(weights), w)
    assert out.dtype == paddle.bfloat16 and list(out.shape) == [w, h]
    np.testing.assert_array_equal(out.astype(paddle.float32).numpy(), expected)
    assert not out.astype(paddle.float32).numpy()[(ids < 0).all(axis=1)].any(), "unrouted rows must be zero"

    clay = permute_to_contiguous(x, None, paddle.to_tensor(ids), e)
    cout = depermute_contiguous_combine(clay.permute_x, clay.permuted_indice_map, paddle.to_tensor(weights), w)
    np.testing.assert_array_equal(cout.astype(paddle.float32).numpy(), expected)
    # and close to the exact float64 sum (one bf16 rounding: relative 2^-8)
    exact = np.einsum("tk,th->th", np.where(ids >= 0, weights, 0).astype(np.float64), x_f32.astype(np.float64))
    assert np.all(np.abs(expected - exact) <= 2.0 ** -8 * np.abs(exact) + 1e-30)


def test_depermute_zero_rows_and_float32_accumulation():
    # Two terms that cancel in float32 but not in bf16 show where the sum is accumulated.
    ffn = paddle.to_tensor([[[1.0 + 2 ** -7, 0.0], [-1.0, 0.0]]], dtype=paddle.float32).astype(paddle.bfloat16)
    idx = paddle.to_tensor([[0, 1], [-1, -1]], dtype=paddle.int32)
    w = paddle.to_tensor([[1.0, 1.0], [3.0, 3.0]])
    out = depermute_prefill_combine(ffn, idx, w, 2).astype(paddle.float32).numpy()
    assert out.tolist() == [[2 ** -7, 0.0], [0.0, 0.0]]
    # k order is part of the contract: (1+2^-8) + 2^-24 + 2^-24 stays 1+2^-8 in float32 (each small term is
    # half an ulp, ties to even) and rounds to 1.0 in bf16 (tie, even); summed from the last k it would be
    # 1+2^-8+2^-23, which rounds up to 1+2^-7.
    one = paddle.ones([1, 1, 1], dtype=paddle.bfloat16)
    w = paddle.to_tensor([[1 + 2 ** -8, 2 ** -24, 2 ** -24]], dtype=paddle.float32)
    out = depermute_prefill_combine(one, paddle.zeros([1, 3], dtype=paddle.int32), w, 1)
    assert out.astype(paddle.float32).numpy().tolist() == [[1.0]]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_overflow_of_m_names_expert_and_count():
    x = paddle.zeros([6, 128], dtype=paddle.bfloat16)
    ids = paddle.to_tensor([[1, 0]] * 5 + [[0, -1]], dtype=paddle.int64)
    with pytest.raises(ValueError, match="expert 0 receives 6 rows, more than M = 5"):
        prefill_permute_to_masked_gemm(x, None, ids, 2, 5)
    lay = prefill_permute_to_masked_gemm(x, None, ids, 2, 6)       # exactly M fits
    assert lay.token_nums_per_expert.numpy().ravel().tolist() == [6, 5]


@pytest.mark.parametrize("bad", [2, -2, 7])
def test_bad_expert_ids(bad):
    x = paddle.zeros([3, 64], dtype=paddle.bfloat16)
    ids = paddle.to_tensor([[0, 1], [1, bad], [-1, -1]], dtype=paddle.int64)
    with pytest.raises(ValueError, match=rf"topk_ids: expected local expert ids in \[-1, E=2\), got {bad} at index \(1, 1\)"):
        prefill_permute_to_masked_gemm(x, None, ids, 2, 4)
    with pytest.raises(ValueError, match="topk_ids: expected local expert ids"):
        permute_to_contiguous(x, None, ids, 2)


def test_shape_and_dtype_errors():
    q, s = per_token_group_quant(paddle.ones([4, 300]))
    ids = paddle.to_tensor([[0]] * 4, dtype=paddle.int64)
    with pytest.raises(ValueError, match="scale: required when x is float8_e4m3fn"):
        prefill_permute_to_masked_gemm(q, None, ids, 1, 4)
    with pytest.raises(ValueError, match=r"scale: expected shape\[1\] == S = ceil\(H/128\) = 3"):
        prefill_permute_to_masked_gemm(q, s[:, :2], ids, 1, 4)
    packed = paddle.zeros([4, 2], dtype=paddle.int32)
    with pytest.raises(ValueError, match=r"scale: expected shape\[1\] == ceil\(S/4\) packed UE8M0 words = 1"):
        prefill_permute_to_masked_gemm(q, packed, ids, 1, 4)
    with pytest.raises(ValueError, match=r"topk_ids: expected shape\[0\] == W \(rows of x\) = 4"):
        prefill_permute_to_masked_gemm(q, s, ids[:3], 1, 4)
    with pytest.raises(TypeError, match="topk_ids: expected dtype"):
        prefill_permute_to_masked_gemm(q, s, ids.astype(paddle.float32), 1, 4)
    with pytest.raises(ValueError, match=r"indice_map: expected values in \[-1, 8\)"):
        depermute_prefill_combine(paddle.zeros([2, 4, 3]), paddle.to_tensor([[8]], dtype=paddle.int32),
                                  paddle.ones([1, 1]), 1)
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        depermute_prefill_combine(paddle.zeros([2, 4, 3]), paddle.to_tensor([[1, 2]], dtype=paddle.int32),
                                  paddle.ones([1, 1]), 1)
    with pytest.raises(ValueError, match=r"indice_map: expected shape\[0\] == num_worst_tokens = 2"):
        depermute_prefill_combine(paddle.zeros([2, 4, 3]), paddle.to_tensor([[1]], dtype=paddle.int32),
                                  paddle.ones([1, 1]), 2)


def test_packed_scale_bytes_follow_rows():
    """Packed UE8M0 words move as whole int32 rows (the 4 bytes of a word stay together)."""
    q, s = per_token_group_quant(paddle.to_tensor(np.random.default_rng(0).normal(size=(5, 5 * GROUP_SIZE))
                                                  .astype(np.float32)), use_ue8m0=True)
    from moe_ref.moe import pack_scale_ue8m0, unpack_scale_ue8m0
    packed = pack_scale_ue8m0(s)
    assert int(packed.shape[1]) == -(-5 // BYTES_PER_WORD)
    ids = paddle.to_tensor([[1], [0], [1], [-1], [0]], dtype=paddle.int64)
    lay = prefill_permute_to_masked_gemm(q, packed, ids, 2, 3)
    got = unpack_scale_ue8m0(lay.permute_scale.to_contiguous(), 5).numpy()
    np.testing.assert_array_equal(got[1, :2], s.numpy()[[0, 2]])
    np.testing.assert_array_equal(got[0, :2], s.numpy()[[1, 4]])
