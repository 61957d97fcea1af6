"""EP runners (backend.moe.ep_runner) against the moe_ref.ep simulation, bit for bit, and the
failure behaviour of the in-process group (a failing rank ends every rank; nothing hangs)."""
import threading
import time

import numpy as np
import paddle
import pytest

from backend.moe.ep_runner import (DispatchOutput, EPGroupAborted, EPRunner, InProcessEPGroup, SingleRankEPRunner,
                                   run_ranks)
from moe_ref import ep, moe


def _bits(t):
    """Exact comparison key: raw bytes of fp8, float32 values of bf16 (exact), numpy otherwise."""
    if t.dtype == paddle.float8_e4m3fn:
        return t.view(paddle.uint8).numpy()
    if t.dtype == paddle.bfloat16:
        return t.astype(paddle.float32).numpy()
    return t.numpy()


def _eq(a, b):
    np.testing.assert_array_equal(_bits(a), _bits(b))


def make_rank_inputs(num_ranks, num_local_experts, hidden, top_k, tokens, seed=0, drop=0.2):
    """Per-rank bf16 x, distinct global ids per token (some -1, some all -1 rows), weights."""
    rng = np.random.default_rng(seed)
    e_total = num_local_experts * num_ranks
    xs, ids, ws = [], [], []
    for r in range(num_ranks):
        t = tokens[r]
        xs.append(paddle.to_tensor(rng.normal(size=(t, hidden)).astype(np.float32)).astype(paddle.bfloat16))
        a = np.array([rng.permutation(e_total)[:top_k] for _ in range(t)], dtype=np.int64).reshape([t, top_k])
        a[rng.random(a.shape) < drop] = -1
        if t > 2:
            a[1] = -1                                          # a token sent nowhere
        ids.append(paddle.to_tensor(a))
        ws.append(paddle.to_tensor(rng.random((t, top_k)).astype(np.float32)))
    return xs, ids, ws


@pytest.mark.parametrize("num_ranks, tokens", [(1, [9]), (2, [7, 0]), (4, [5, 9, 1, 6])])
@pytest.mark.parametrize("scale_kind", ["ue8m0", "fp32", "bf16"])
def test_ht_dispatch_combine_bit_exact_vs_moe_ref(num_ranks, tokens, scale_kind):
    e, h, k = 3, 320, 3
    xs, ids, ws = make_rank_inputs(num_ranks, e, h, k, tokens, seed=num_ranks)
    if scale_kind == "bf16":
        xq, scales = xs, None
    else:
        quant = [moe.quantize_activations(x, scale_kind == "ue8m0") for x in xs]
        xq, scales = [q[0] for q in quant], [q[2] for q in quant]
    w = sum(tokens) + 2                                           # padding rows on every rank
    ref = ep.ep_dispatch(xq, scales, ids, ws, e, w)
    group = InProcessEPGroup(num_ranks, e * num_ranks, timeout_s=20)

    def rank(r):
        d = group.runner(r).dispatch(xq[r], None if scales is None else scales[r], ids[r], ws[r], w)
        partial = (d.recv_x.astype(paddle.float32) * 0.37 + 0.01 * r).astype(paddle.bfloat16)
        return d, partial, group.runner(r).combine(partial, d.handle)

    got = group.run(rank)
    ref_out = ep.ep_combine([g[1] for g in got], ref[0].handle)
    for r in range(num_ranks):
        d, rd = got[r][0], ref[r]
        assert isinstance(d, DispatchOutput) and d.num_recv_tokens == rd.num_recv_tokens
        assert d.recv_x.dtype == rd.recv_x.dtype and list(d.recv_x.shape) == [w, h]
        _eq(d.recv_x, rd.recv_x)
        if scales is None:
            assert d.recv_x_scale is None
        else:
            assert d.recv_x_scale.dtype == rd.recv_x_scale.dtype
            _eq(d.recv_x_scale, rd.recv_x_scale)
        _eq(d.recv_topk_ids, rd.recv_topk_ids)
        _eq(d.recv_topk_weights, rd.recv_topk_weights)
        assert got[r][2].dtype == paddle.bfloat16 and list(got[r][2].shape) == [tokens[r], h]
        _eq(got[r][2], ref_out[r])


@pytest.mark.parametrize("num_ranks, tokens, n", [(1, [6], 6), (2, [4, 0], 5), (4, [3, 5, 1, 4], 5)])
@pytest.mark.parametrize("use_fp8, use_ue8m0", [(True, True), (True, False), (False, False)])
def test_ll_dispatch_combine_bit_exact_vs_moe_ref(num_ranks, tokens, n, use_fp8, use_ue8m0):
    e, h, k = 2, 200, 2
    xs, ids, ws = make_rank_inputs(num_ranks, e, h, k, tokens, seed=10 + num_ranks)
    ref = ep.ll_dispatch(xs, ids, n, e, use_fp8=use_fp8, use_ue8m0=use_ue8m0)
    group = InProcessEPGroup(num_ranks, e * num_ranks, timeout_s=20)

    def rank(r):
        runner = group.runner(r)
        recv_x, recv_scale, recv_count, handle = runner.low_latency_dispatch(xs[r], ids[r], n, use_fp8, use_ue8m0)
        expert_out = (recv_x.astype(paddle.float32) * (1.5 + r)).astype(paddle.bfloat16)
        return recv_x, recv_scale, recv_count, expert_out, runner.low_latency_combine(expert_out, ids[r], ws[r],
                                                                                       handle)

    got = group.run(rank)
    ref_out = ep.ll_combine([g[3] for g in got], ids, ws, ref[0][3])
    for r in range(num_ranks):
        recv_x, recv_scale, recv_count, _, out = got[r]
        assert list(recv_x.shape) == [e, num_ranks * n, h] and recv_count.dtype == paddle.int32
        _eq(recv_x, ref[r][0])
        _eq(recv_count, ref[r][2])
        if use_fp8:
            _eq(recv_scale, ref[r][1].to_contiguous())
        else:
            assert recv_scale is None and ref[r][1] is None
        _eq(out, ref_out[r])


def test_single_rank_runner_equals_in_process_group():
    xs, ids, ws = make_rank_inputs(1, 4, 128, 2, [6], seed=3)
    single = SingleRankEPRunner(4)
    assert (single.ep_size, single.ep_rank, single.num_local_experts) == (1, 0, 4)
    d1 = single.dispatch(xs[0], None, ids[0], ws[0], 8)
    group = InProcessEPGroup(1, 4)
    d2 = group.runner(0).dispatch(xs[0], None, ids[0], ws[0], 8)
    _eq(d1.recv_x, d2.recv_x)
    _eq(single.combine(d1.recv_x, d1.handle), group.runner(0).combine(d2.recv_x, d2.handle))
    assert "SingleRankEPRunner(ep_size=1" in repr(single)


def _collect(num_ranks, fn, group):
    """Run fn on every rank, returning each rank's result or exception (to see that *every* rank raised)."""
    def wrapped(r):
        try:
            return fn(r)
        except Exception as err:            # noqa: BLE001
            return err
    return run_ranks(num_ranks, wrapped, group=group)


def test_too_many_received_rows_raises_on_every_rank():
    xs, ids, ws = make_rank_inputs(2, 2, 128, 2, [4, 4], seed=4, drop=0.0)
    ids = [paddle.zeros([4, 2], dtype=paddle.int64) + paddle.to_tensor([0, 1]) for _ in range(2)]  # all on rank 0
    group = InProcessEPGroup(2, 4, timeout_s=10)
    got = _collect(2, lambda r: group.runner(r).dispatch(xs[r], None, ids[r], ws[r], 5), group)
    for err in got:
        assert isinstance(err, ValueError) and "rank 0 receives 8 tokens, more than num_worst_tokens W = 5" in str(err)
    group = InProcessEPGroup(2, 4, timeout_s=10)
    with pytest.raises(ValueError, match=r"^rank 0: num_worst_tokens: rank 0 receives 8"):
        group.run(lambda r: group.runner(r).dispatch(xs[r], None, ids[r], ws[r], 5))


@pytest.mark.parametrize("fail_after_dispatch", [False, True])
def test_failing_rank_stops_all_ranks_quickly(fail_after_dispatch):
    xs, ids, ws = make_rank_inputs(4, 2, 128, 2, [3, 3, 3, 3], seed=5)
    group = InProcessEPGroup(4, 8, timeout_s=30)

    def rank(r):
        runner = group.runner(r)
        if r == 2 and not fail_after_dispatch:
            raise KeyError("boom before dispatch")
        d = runner.dispatch(xs[r], None, ids[r], ws[r], 12)
        if r == 2:
            raise ValueError("boom between dispatch and combine")
        return runner.combine(d.recv_x, d.handle)

    start = time.monotonic()
    expected = (ValueError, "rank 2: boom between") if fail_after_dispatch else (KeyError, "rank 2: 'boom before")
    with pytest.raises(expected[0], match=expected[1]) as info:
        run_ranks(4, rank, group=group, timeout_s=60)
    assert time.monotonic() - start < 5.0             # the barrier was aborted, not waited out
    assert info.value.__cause__ is not None
    assert group.broken
    with pytest.raises(EPGroupAborted, match="aborted"):
        group.runner(0).dispatch(xs[0], None, ids[0], ws[0], 12)


def test_without_group_barrier_timeout_bounds_the_wait():
    xs, ids, ws = make_rank_inputs(2, 2, 128, 2, [3, 3], seed=6)
    group = InProcessEPGroup(2, 4, timeout_s=0.5)

    def rank(r):
        if r == 1:
            raise RuntimeError("rank one is gone")
        return group.runner(r).dispatch(xs[r], None, ids[r], ws[r], 6)

    start = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1: rank one is gone"):
        run_ranks(2, rank, timeout_s=20)                 # no group: peers stop at the barrier timeout
    assert time.monotonic() - start < 5.0


def test_run_ranks_timeout_names_the_ranks():
    release = threading.Event()

    def rank(r):
        if r == 1:
            release.wait(3.0)
        return r

    group = InProcessEPGroup(2, 2)
    with pytest.raises(TimeoutError, match=r"ranks \[1\] did not finish within 0.2 s"):
        run_ranks(2, rank, group=group, timeout_s=0.2)
    release.set()
    with pytest.raises(TimeoutError, match="pass group="):
        run_ranks(1, lambda r: time.sleep(1.0), timeout_s=0.1)
    assert run_ranks(3, lambda r: r * r) == [0, 1, 4]


def test_unconstructible_error_type_becomes_runtime_error():
    class Picky(Exception):
        def __init__(self, a, b):
            super().__init__(a, b)

    def rank(r):
        raise Picky(1, 2)

    with pytest.raises(RuntimeError, match="rank 0: Picky"):
        run_ranks(1, rank)


def test_mismatched_collectives_raise():
    xs, ids, ws = make_rank_inputs(2, 2, 128, 2, [2, 2], seed=7)
    group = InProcessEPGroup(2, 4, timeout_s=10)

    def rank(r):
        runner = group.runner(r)
        if r == 0:
            return runner.dispatch(xs[r], None, ids[r], ws[r], 4)
        return runner.low_latency_dispatch(xs[r], ids[r], 4, False, False)

    with pytest.raises(RuntimeError, match="collective #0 mismatch"):
        run_ranks(2, rank, group=group)


def test_values_that_must_agree_across_ranks():
    xs, ids, ws = make_rank_inputs(2, 2, 128, 2, [2, 2], seed=8)
    group = InProcessEPGroup(2, 4, timeout_s=10)
    got = _collect(2, lambda r: group.runner(r).dispatch(xs[r], None, ids[r], ws[r], 4 + r), group)
    assert all(isinstance(g, ValueError) and "W: every rank must pass the same value" in str(g) for g in got)


def test_argument_checks():
    xs, ids, ws = make_rank_inputs(1, 4, 128, 2, [3], seed=9)
    x, i, w = xs[0], ids[0], ws[0]
    r = SingleRankEPRunner(4)
    fp8 = x.astype(paddle.float8_e4m3fn)
    with pytest.raises(ValueError, match="x_scale: expected the"):
        r.dispatch(fp8, None, i, w, 4)
    with pytest.raises(ValueError, match="topk_weights: expected the"):
        r.dispatch(x, None, i, None, 4)
    with pytest.raises(ValueError, match=r"topk_ids: expected global expert ids in \[-1, 4\), got 4 at index \(0, 0\)"):
        r.dispatch(x, None, paddle.full_like(i, 4), w, 4)
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        r.dispatch(x, None, i, w[:, :1], 4)
    with pytest.raises(ValueError, match="x_scale"):
        r.dispatch(fp8, paddle.ones([2, 1]), i, w, 4)
    with pytest.raises(ValueError, match="num_worst_tokens"):
        r.dispatch(x, None, i, w, 0)
    d = r.dispatch(x, None, i, w, 4)
    with pytest.raises(ValueError, match="partial"):
        r.combine(d.recv_x[:3], d.handle)
    with pytest.raises(TypeError, match="handle"):
        r.combine(d.recv_x, object())
    with pytest.raises(ValueError, match="belongs to another runner"):
        SingleRankEPRunner(4).combine(d.recv_x, d.handle)
    with pytest.raises(ValueError, match="more than num_max_dispatch_tokens_per_rank N = 2"):
        r.low_latency_dispatch(x, i, 2)
    with pytest.raises(ValueError, match="use_ue8m0: needs use_fp8"):
        r.low_latency_dispatch(x, i, 4, False, True)
    with pytest.raises(TypeError, match="use_fp8"):
        r.low_latency_dispatch(x, i, 4, 1, True)
    recv_x, _, _, handle = r.low_latency_dispatch(x, i, 4)
    out = paddle.zeros([4, 4, 128], dtype=paddle.bfloat16)
    with pytest.raises(ValueError, match="expert_out: expected shape"):
        r.low_latency_combine(out[:, :2], i, w, handle)
    with pytest.raises(ValueError, match="differ from the ids"):
        r.low_latency_combine(out, paddle.full_like(i, -1), w, handle)
    with pytest.raises(TypeError, match="LLHandle"):
        r.low_latency_combine(out, i, w, d.handle)
    dup = paddle.to_tensor([[0, 0]], dtype=paddle.int64)
    with pytest.raises(ValueError, match=r"expert 0 of rank 0 receives 2 \(token, k\) pairs, more than R·N = 1"):
        r.low_latency_dispatch(x[:1], dup, 1)


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_experts: expected a multiple of ep_size"):
        InProcessEPGroup(3, 4)
    with pytest.raises(ValueError, match="world_size"):
        InProcessEPGroup(0, 4)
    with pytest.raises(ValueError, match="timeout_s"):
        InProcessEPGroup(2, 4, timeout_s=0)
    with pytest.raises(ValueError, match="rank: expected 0 <= rank < world_size = 2"):
        InProcessEPGroup(2, 4).runner(2)
    with pytest.raises(ValueError, match="ep_rank"):
        EPRunner(2, 5, 4)
    with pytest.raises(ValueError, match="group: has world_size 2"):
        run_ranks(3, lambda r: r, group=InProcessEPGroup(2, 4))
