"""moe_ref.ep (SPEC §9, docs/design.md "Expert-parallel semantics, exact") and moe_forward_ep.

Dispatch/combine are checked bit for bit against plain loops over (rank, token) written here;
the EP layer against the single-rank layer with a bound derived below.
"""
import ml_dtypes
import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ref.ep import ep_combine, ep_dispatch, ll_combine, ll_dispatch
from moe_ref.layout import depermute_prefill_combine
from moe_ref.moe import (expert_ffn_fp8, make_moe_inputs, make_moe_weights, moe_forward_ep, moe_forward_fp8,
                         quantize_activations, quantize_moe_weights, unpack_scale_ue8m0)

BF16_U = 2.0 ** -8          # unit roundoff of bf16 (8 significant bits, round to nearest)
FP32_U = 2.0 ** -24


def random_global_ids(rng, t, k, e_total, drop=0.2, pad_rows=0.1):
    ids = np.stack([rng.permutation(e_total)[:k] for _ in range(t)]).astype(np.int64)
    ids[rng.random((t, k)) < drop] = -1
    ids[rng.random(t) < pad_rows] = -1
    return ids


def f32(t):
    return t.astype(paddle.float32).numpy()


ep_case = st.fixed_dictionaries({
    "r": st.sampled_from([1, 2, 4, 8]), "e": st.integers(1, 3), "k": st.sampled_from([1, 2, 8]),
    "tokens": st.lists(st.integers(1, 9), min_size=8, max_size=8), "h": st.sampled_from([64, 200]),
    "seed": st.integers(0, 2**16), "fp8": st.booleans(), "extra_w": st.integers(0, 3),
})


@settings(max_examples=50, deadline=None)
@given(case=ep_case)
def test_dispatch_and_combine_match_loops(case):
    r_count, e, h = case["r"], case["e"], case["h"]
    k = min(case["k"], e * r_count)
    rng = np.random.default_rng(case["seed"])
    tokens = case["tokens"][:r_count]
    ids = [random_global_ids(rng, t, k, e * r_count) for t in tokens]
    xf = [rng.normal(size=(t, h)).astype(np.float32) for t in tokens]
    wts = [rng.random((t, k)).astype(np.float32) for t in tokens]
    if case["fp8"]:
        quant = [quantize_activations(paddle.to_tensor(v), use_ue8m0=True) for v in xf]
        x, scale = [q[0] for q in quant], [q[2] for q in quant]
    else:
        x, scale = [paddle.to_tensor(v).astype(paddle.bfloat16) for v in xf], None
    raw = [v.view(paddle.uint8).numpy() if case["fp8"] else f32(v) for v in x]

    # The loop: rank r receives (s, t) in order when any expert of t lives on r.
    expected = [[(s, t) for s in range(r_count) for t in range(tokens[s])
                 if any(g >= 0 and g // e == r for g in ids[s][t])] for r in range(r_count)]
    w_rows = max(1, max(len(v) for v in expected) + case["extra_w"])
    out = ep_dispatch(x, scale, [paddle.to_tensor(v) for v in ids], [paddle.to_tensor(v) for v in wts], e, w_rows)
    assert len(out) == r_count
    for r, d in enumerate(out):
        n = len(expected[r])
        assert d.num_recv_tokens == n
        assert list(d.recv_x.shape) == [w_rows, h] and d.recv_x.dtype == x[0].dtype
        rx = d.recv_x.view(paddle.uint8).numpy() if case["fp8"] else f32(d.recv_x)
        rids, rw = d.recv_topk_ids.numpy(), d.recv_topk_weights.numpy()
        assert d.recv_topk_ids.dtype == paddle.int64
        for row, (s, t) in enumerate(expected[r]):
            np.testing.assert_array_equal(rx[row], raw[s][t])
            local = [g - r * e if g >= 0 and g // e == r else -1 for g in ids[s][t]]
            assert rids[row].tolist() == local
            np.testing.assert_array_equal(rw[row], wts[s][t])
            if scale is not None:
                np.testing.assert_array_equal(d.recv_x_scale.numpy()[row], scale[s].numpy()[t])
        assert not rx[n:].any() and (rids[n:] == -1).all() and not rw[n:].any(), "padding rows: zero, ids -1"
        if scale is not None:
            assert not d.recv_x_scale.numpy()[n:].any()

    # Combine: bf16(Σ_{r ascending} float32(partial_r[row])), one rounding, nothing for unsent tokens.
    # Magnitudes spread over 2^±30: bf16 values of similar size add exactly in float32 in any order;
    # these do not, so the rank order of the sum is checked.
    partial = [paddle.to_tensor((rng.normal(size=(w_rows, h)) * 2.0 ** rng.integers(-30, 30, size=(w_rows, h)))
                                .astype(np.float32)).astype(paddle.bfloat16) for _ in range(r_count)]
    combined = ep_combine(partial, out[0].handle)
    for s in range(r_count):
        acc = np.zeros((tokens[s], h), np.float32)
        for r in range(r_count):
            for row, (s2, t) in enumerate(expected[r]):
                if s2 == s:
                    acc[t] = acc[t] + f32(partial[r])[row]
        assert combined[s].dtype == paddle.bfloat16 and list(combined[s].shape) == [tokens[s], h]
        np.testing.assert_array_equal(f32(combined[s]), acc.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_dispatch_overflow_names_rank_count_and_w():
    x = [paddle.zeros([3, 64], dtype=paddle.bfloat16) for _ in range(2)]
    ids = [paddle.to_tensor([[0, 2], [1, -1], [2, 3]], dtype=paddle.int64),
           paddle.to_tensor([[3, -1], [2, -1], [-1, -1]], dtype=paddle.int64)]
    w = [paddle.ones([3, 2]) for _ in range(2)]
    # rank 0 (experts 0, 1) gets 2 tokens, rank 1 (experts 2, 3) gets 4
    with pytest.raises(ValueError, match="num_worst_tokens: rank 1 receives 4 tokens, more than W = 3"):
        ep_dispatch(x, None, ids, w, 2, 3)
    assert [d.num_recv_tokens for d in ep_dispatch(x, None, ids, w, 2, 4)] == [2, 4]
    with pytest.raises(ValueError, match=r"topk_ids\[1\]: expected global expert ids in \[-1, E·R=4\), got 5"):
        ep_dispatch(x, None, [ids[0], ids[1] + 2], w, 2, 6)
    with pytest.raises(ValueError, match=r"topk_ids: expected 2 entries"):
        ep_dispatch(x, None, ids[:1], w, 2, 6)
    with pytest.raises(ValueError, match=r"x\[1\]: expected shape\[1\] == H"):
        ep_dispatch([x[0], paddle.zeros([3, 32], dtype=paddle.bfloat16)], None, ids, w, 2, 6)


def _split(t, chunks):
    return [paddle.gather(t, paddle.to_tensor(c)) for c in chunks]


def _ep_vs_single(r_count, ids_global, use_ue8m0, seed, t=64, h=200, i=128, e_total=16):
    w = make_moe_weights(e_total, h, i, seed=seed)
    x, tw, _ = make_moe_inputs(t, h, e_total, ids_global.shape[1], seed=seed + 1)
    ti = paddle.to_tensor(ids_global)
    qw = quantize_moe_weights(w.w_up, w.w_down, use_ue8m0=use_ue8m0)
    single, single_trace = moe_forward_fp8(x, None, None, tw, ti, use_ue8m0, quantized_weights=qw, return_trace=True)
    chunks = np.array_split(np.arange(t), r_count)
    out, trace = moe_forward_ep(_split(x, chunks), None, None, _split(tw, chunks), _split(ti, chunks), use_ue8m0,
                                quantized_weights=qw, return_trace=True)
    return single, single_trace, paddle.concat(out), trace, tw


@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_ep_r1_equals_single_rank_layer(use_ue8m0):
    ids = random_global_ids(np.random.default_rng(0), 64, 4, 16)
    single, _, ep1, _, _ = _ep_vs_single(1, ids, use_ue8m0, seed=1)
    np.testing.assert_array_equal(f32(ep1), f32(single))


@pytest.mark.parametrize("r_count", [2, 4, 8])
@pytest.mark.parametrize("k", [1, 8])
def test_ep_exact_when_each_token_stays_on_one_rank(r_count, k):
    """Each rank's experts see the same rows in the same order as with R = 1, and a token's partial
    is its whole sum: one bf16 rounding of the same float32 value, then 0 + that value."""
    rng = np.random.default_rng(r_count * 10 + k)
    e = 16 // r_count
    k = min(k, e)
    home = rng.integers(0, r_count, size=64)
    ids = np.stack([home[t] * e + rng.permutation(e)[:k] for t in range(64)]).astype(np.int64)
    single, _, ep, _, _ = _ep_vs_single(r_count, ids, False, seed=2)
    np.testing.assert_array_equal(f32(ep), f32(single))


@pytest.mark.parametrize("r_count", [2, 4, 8])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_ep_within_bf16_partial_sum_bound(r_count, use_ue8m0):
    """EP differs from R = 1 only in rounding each rank's partial sum to bf16.

    Per element, with p_r the float32 partial of rank r, b_r = bf16(p_r) = p_r(1 + ε_r), |ε| <= u = 2^-8:
      R = 1:  out_1 = bf16(Σ_r p_r) = (Σ_r p_r)(1 + ε_1)
      EP:     out_R = bf16(Σ_r b_r) = (Σ_r p_r + Σ_r ε_r p_r)(1 + ε_2)
      |out_R - out_1| <= u Σ|p_r| + u |Σ b_r| + u |Σ p_r| <= 3u (1 + u) Σ_r |b_r| / (1 - u)
    We get Σ_r |b_r| (one more bf16 rounding, another factor 1/(1-u)) from ep_combine of |b_r|:
    bound 3.05·u·A. The float32 sums are grouped by rank in EP and not with R = 1: that adds at most
    K_top·2^-24·Σ_k |w_k y_k| (C, from the single-rank trace), which covers cancellation inside a rank.
    """
    rng = np.random.default_rng(r_count + 100 * use_ue8m0)
    ids = random_global_ids(rng, 64, 8, 16, drop=0.1, pad_rows=0.05)
    single, strace, ep, trace, tw = _ep_vs_single(r_count, ids, use_ue8m0, seed=3)
    abs_partial = [p.astype(paddle.float32).abs().astype(paddle.bfloat16) for p in trace.partial]   # no bf16 abs on CPU
    a = f32(paddle.concat(ep_combine(abs_partial, trace.dispatch[0].handle)))
    c = f32(depermute_prefill_combine(strace.gemm2_out.astype(paddle.float32).abs(), strace.layout.permuted_indice_map,
                                      tw.abs(), 64))
    bound = 3.05 * BF16_U * a + 2 * 8 * FP32_U * c
    diff = np.abs(f32(ep) - f32(single))
    assert np.all(diff <= bound), f"worst excess {np.max(diff - bound)}"
    assert diff.max() > 0, "partials on several ranks must show the extra rounding (else the bound is vacuous)"


def test_ll_dispatch_layout_and_combine():
    rng = np.random.default_rng(7)
    r_count, e, n, h, k = 4, 2, 6, 200, 3
    tokens = [6, 3, 5, 1]
    ids = [random_global_ids(rng, t, k, e * r_count) for t in tokens]
    xs = [paddle.to_tensor(rng.normal(size=(t, h)).astype(np.float32)).astype(paddle.bfloat16) for t in tokens]
    for use_ue8m0 in (False, True):
        out = ll_dispatch(xs, [paddle.to_tensor(v) for v in ids], n, e, use_fp8=True, use_ue8m0=use_ue8m0)
        quant = [quantize_activations(v, use_ue8m0) for v in xs]
        for r, (recv_x, recv_scale, recv_count, handle) in enumerate(out):
            assert list(recv_x.shape) == [e, r_count * n, h] and recv_x.dtype == paddle.float8_e4m3fn
            assert recv_count.dtype == paddle.int32 and list(recv_count.shape) == [e]
            # slots of expert j of rank r: entries (s, t, k) with id r·e + j, in that order
            for j in range(e):
                entries = [(s, t) for s in range(r_count) for t in range(tokens[s]) for g in ids[s][t]
                           if g == r * e + j]
                assert int(recv_count[j]) == len(entries)
                got_x = recv_x[j].view(paddle.uint8).numpy()
                scale = recv_scale.to_contiguous()[j]
                got_s = (unpack_scale_ue8m0(scale, 2) if use_ue8m0 else scale).numpy()
                for slot, (s, t) in enumerate(entries):
                    np.testing.assert_array_equal(got_x[slot], quant[s][0].view(paddle.uint8).numpy()[t])
                    np.testing.assert_array_equal(got_s[slot], quant[s][1].numpy()[t])
                assert not got_x[len(entries):].any()

    # Whole layer through the ll pair equals the single-rank layer bit for bit: the same rows meet
    # each expert in the same order, and ll_combine is the same k-ordered float32 sum.
    w = make_moe_weights(e * r_count, h, 128, seed=8)
    qw = quantize_moe_weights(w.w_up, w.w_down)
    up_f, down_f = qw.dequantized()
    wts = [paddle.to_tensor(rng.random((t, k)).astype(np.float32)) for t in tokens]
    out = ll_dispatch(xs, [paddle.to_tensor(v) for v in ids], n, e, use_fp8=True)
    expert_out = []
    for r, (recv_x, recv_scale, recv_count, _) in enumerate(out):
        rows = []
        for j in range(e):
            c = int(recv_count[j])
            buf = paddle.zeros([r_count * n, h], dtype=paddle.bfloat16)
            if c:
                *_, y = expert_ffn_fp8(recv_x[j, :c], recv_scale.to_contiguous()[j, :c], up_f[r * e + j],
                                       down_f[r * e + j], False)
                buf = paddle.concat([y, buf[c:]])
            rows.append(buf)
        expert_out.append(paddle.stack(rows))
    ll = paddle.concat(ll_combine(expert_out, [paddle.to_tensor(v) for v in ids], wts, out[0][3]))
    single = moe_forward_fp8(paddle.concat(xs), None, None, paddle.concat(wts),
                             paddle.to_tensor(np.concatenate(ids)), quantized_weights=qw)
    np.testing.assert_array_equal(f32(ll), f32(single))


def test_ll_dispatch_errors():
    xs = [paddle.zeros([5, 64], dtype=paddle.bfloat16)]
    ids = [paddle.zeros([5, 1], dtype=paddle.int64)]
    with pytest.raises(ValueError, match=r"x\[0\]: 5 tokens, more than num_max_dispatch_tokens_per_rank = 4"):
        ll_dispatch(xs, ids, 4, 1)
    with pytest.raises(ValueError, match="use_ue8m0: only meaningful with use_fp8=True"):
        ll_dispatch(xs, ids, 8, 1, use_fp8=False, use_ue8m0=True)


def test_moe_forward_ep_errors():
    w = make_moe_weights(6, 128, 64, seed=0)
    x, tw, ti = make_moe_inputs(8, 128, 6, 2, seed=1)
    with pytest.raises(ValueError, match="do not split evenly over R = 4"):
        moe_forward_ep([x] * 4, w.w_up, w.w_down, [tw] * 4, [ti] * 4)
    with pytest.raises(ValueError, match="num_worst_tokens: rank 0 receives"):
        moe_forward_ep([x, x], w.w_up, w.w_down, [tw, tw], [ti, ti], num_worst_tokens=2)
    with pytest.raises(ValueError, match=r"x\[1\]: expected shape\[1\] == H"):
        moe_forward_ep([x, x[:, :100]], w.w_up, w.w_down, [tw, tw], [ti, ti])
