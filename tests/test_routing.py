"""moe_ref.routing (SPEC §10): softmax top-k and DeepSeek-V3 noaux_tc, against hand-checked
values and a plain per-token loop written here."""
import math

import numpy as np
import paddle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_ref.routing import noaux_tc_topk, softmax_topk


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


# ---------------------------------------------------------------------------------------------
# Slow loops: one token at a time, every ranking spelled out as "sort by (-score, expert id)".
# They take p (softmax / sigmoid) from Paddle, so they test the selection logic, not the exp.
# ---------------------------------------------------------------------------------------------

def softmax_topk_loop(p: np.ndarray, top_k: int, renormalize: bool):
    t_count, e_total = p.shape
    ids = np.zeros((t_count, top_k), np.int64)
    weights = np.zeros((t_count, top_k), np.float64)
    for t in range(t_count):
        chosen = sorted(range(e_total), key=lambda e: (-p[t, e], e))[:top_k]
        w = np.array([p[t, e] for e in chosen], np.float64)
        ids[t], weights[t] = chosen, (w / w.sum() if renormalize else w)
    return weights, ids


def noaux_tc_loop(p: np.ndarray, bias: np.ndarray, n_group: int, topk_group: int, top_k: int, renormalize: bool,
                  scale: float):
    t_count, e_total = p.shape
    size = e_total // n_group
    choice = (p + bias[None, :]).astype(np.float32)
    ids = np.zeros((t_count, top_k), np.int64)
    weights = np.zeros((t_count, top_k), np.float64)
    for t in range(t_count):
        group_score = []
        for g in range(n_group):
            best = sorted(choice[t, g * size:(g + 1) * size].tolist(), reverse=True)[:2]
            group_score.append(np.float32(sum(np.float32(v) for v in best)))
        groups = sorted(range(n_group), key=lambda g: (-group_score[g], g))[:topk_group]
        candidates = [e for g in groups for e in range(g * size, (g + 1) * size)]
        chosen = sorted(candidates, key=lambda e: (-choice[t, e], e))[:top_k]
        w = np.array([p[t, e] for e in chosen], np.float64)
        if renormalize:
            w = w / max(w.sum(), 1e-12)
        w = w * scale
        order = sorted(range(top_k), key=lambda j: (-w[j], chosen[j]))     # descending weight, ties: lowest id
        ids[t] = [chosen[j] for j in order]
        weights[t] = [w[j] for j in order]
    return weights, ids


# ---------------------------------------------------------------------------------------------
# Hand-checked
# ---------------------------------------------------------------------------------------------

def test_noaux_tc_hand_checked():
    # 8 experts in 4 groups of 2, keep 2 groups, top 3.
    # p = sigmoid(logits) = [.5, .731, .881, .269, .953, .119, .622, .550]
    # choice = p + bias   = [.5, .731, .381, .269, .953, .419, .622, .550]
    # group scores: g0 = .5+.731 = 1.231, g1 = .381+.269 = .650, g2 = .953+.419 = 1.372, g3 = .622+.550 = 1.172
    # kept: g2, g0 -> candidates {0, 1, 4, 5}; top 3 by choice: 4, 1, 0.
    # Expert 2 (2nd best p) is dropped by its bias, expert 6 (choice .622 > .5) by its group.
    logits = [0.0, 1.0, 2.0, -1.0, 3.0, -2.0, 0.5, 0.2]
    bias = [0.0, 0.0, -0.5, 0.0, 0.0, 0.3, 0.0, 0.0]
    # Row 2: logits all 0, so p = .5 and choice = .5 + bias = [.5, .5, 0, .5, .5, .8, .5, .5]; groups
    # g2 (1.3) and g0 (1.0, ties g3 and wins as the lower index); top 3 by choice: 5, then 0 and 1
    # (ties with 4, lowest ids win); equal weights p = .5 order by id: [0, 1, 5].
    w, ids = noaux_tc_topk(paddle.to_tensor([logits, [0.0] * 8]), paddle.to_tensor(bias), n_group=4, topk_group=2,
                           top_k=3, renormalize=True, routed_scaling_factor=2.5)
    assert ids.dtype == paddle.int64 and w.dtype == paddle.float32
    assert ids.numpy().tolist() == [[4, 1, 0], [0, 1, 5]]
    p = [_sigmoid(logits[e]) for e in (4, 1, 0)]
    expected = [2.5 * v / sum(p) for v in p]
    np.testing.assert_allclose(w.numpy()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(w.numpy()[1], [2.5 / 3] * 3, rtol=1e-6)
    # Without renormalization the weights are the raw sigmoid values times the factor.
    w2, _ = noaux_tc_topk(paddle.to_tensor([logits]), paddle.to_tensor(bias), 4, 2, 3, renormalize=False)
    np.testing.assert_allclose(w2.numpy()[0], p, rtol=1e-6)


def test_softmax_topk_hand_checked_and_ties():
    w, ids = softmax_topk(paddle.to_tensor([[1.0, 3.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0]]), top_k=3)
    assert ids.numpy().tolist() == [[1, 3, 2], [0, 1, 2]]          # ties to the lowest expert id
    z = math.exp(3) * 2 + math.exp(2)
    np.testing.assert_allclose(w.numpy()[0], [math.exp(3) / z, math.exp(3) / z, math.exp(2) / z], rtol=1e-6)
    np.testing.assert_allclose(w.numpy()[1], [1 / 3] * 3, rtol=1e-6)
    w_raw, _ = softmax_topk(paddle.to_tensor([[0.0, 0.0, 0.0, 0.0]]), top_k=2, renormalize=False)
    np.testing.assert_allclose(w_raw.numpy()[0], [0.25, 0.25], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Random inputs against the loops
# ---------------------------------------------------------------------------------------------

# Logits on a coarse grid give exact ties often (the tie rule is exercised), never near-ties
# that float32 summation order could flip.
grid_logits = st.integers(-16, 16).map(lambda v: v / 4.0)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), t=st.integers(1, 12), e_total=st.integers(1, 12), renormalize=st.booleans(),
       use_grid=st.booleans())
def test_softmax_topk_matches_loop(data, t, e_total, renormalize, use_grid):
    top_k = data.draw(st.integers(1, e_total))
    if use_grid:
        logits = np.array(data.draw(st.lists(grid_logits, min_size=t * e_total, max_size=t * e_total)),
                          np.float32).reshape(t, e_total)
    else:
        logits = np.random.default_rng(data.draw(st.integers(0, 2**16))).normal(size=(t, e_total)).astype(np.float32)
    w, ids = softmax_topk(paddle.to_tensor(logits), top_k, renormalize)
    p = paddle.nn.functional.softmax(paddle.to_tensor(logits), axis=-1).numpy()
    w_ref, ids_ref = softmax_topk_loop(p, top_k, renormalize)
    np.testing.assert_array_equal(ids.numpy(), ids_ref)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6, atol=1e-7)
    assert np.all(np.diff(w.numpy(), axis=1) <= 0), "columns must be in descending weight"
    if renormalize:
        np.testing.assert_allclose(w.numpy().sum(axis=1), 1.0, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(data=st.data(), t=st.integers(1, 10), n_group=st.sampled_from([1, 2, 4, 8]), group_size=st.integers(1, 4),
       renormalize=st.booleans(), use_grid=st.booleans(), scale=st.sampled_from([1.0, 2.5]))
def test_noaux_tc_matches_loop(data, t, n_group, group_size, renormalize, use_grid, scale):
    e_total = n_group * group_size
    topk_group = data.draw(st.integers(1, n_group))
    top_k = data.draw(st.integers(1, topk_group * group_size))
    if use_grid:
        flat = data.draw(st.lists(grid_logits, min_size=t * e_total, max_size=t * e_total))
        logits = np.array(flat, np.float32).reshape(t, e_total)
        bias = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.25, -0.25]), min_size=e_total,
                                           max_size=e_total)), np.float32)
    else:
        rng = np.random.default_rng(data.draw(st.integers(0, 2**16)))
        logits = rng.normal(size=(t, e_total)).astype(np.float32)
        bias = (0.1 * rng.normal(size=e_total)).astype(np.float32)
    w, ids = noaux_tc_topk(paddle.to_tensor(logits), paddle.to_tensor(bias), n_group, topk_group, top_k,
                           renormalize, scale)
    p = paddle.nn.functional.sigmoid(paddle.to_tensor(logits)).numpy()
    w_ref, ids_ref = noaux_tc_loop(p, bias, n_group, topk_group, top_k, renormalize, scale)
    np.testing.assert_array_equal(ids.numpy(), ids_ref)
    np.testing.assert_allclose(w.numpy(), w_ref, rtol=1e-6, atol=1e-7)
    for row in ids.numpy():                       # chosen experts come from at most topk_group groups
        assert len(set(row.tolist())) == top_k
        assert len({e // group_size for e in row.tolist()}) <= topk_group


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_routing_errors_name_the_argument():
    logits = paddle.zeros([2, 8])
    with pytest.raises(ValueError, match="logits: non-finite"):
        softmax_topk(paddle.to_tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match="top_k: expected <= E_total = 8"):
        softmax_topk(logits, 9)
    with pytest.raises(ValueError, match="logits: expected rank 2"):
        softmax_topk(paddle.zeros([8]), 1)
    with pytest.raises(ValueError, match="n_group: must divide"):
        noaux_tc_topk(logits, paddle.zeros([8]), 3, 1, 1)
    with pytest.raises(ValueError, match="e_score_correction_bias: expected shape\\[0\\] == E_total = 8"):
        noaux_tc_topk(logits, paddle.zeros([7]), 4, 2, 2)
    with pytest.raises(ValueError, match="top_k: expected <= topk_group"):
        noaux_tc_topk(logits, paddle.zeros([8]), 4, 1, 3)
    with pytest.raises(ValueError, match="topk_group: expected <= n_group"):
        noaux_tc_topk(logits, paddle.zeros([8]), 4, 5, 1)
