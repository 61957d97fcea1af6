"""The ht launch chain with deferred routing checks captured in a CUDA graph (issue 12), on a GPU.

`backend.ops.triton.chain.HtChain` (quant, permute recording routing errors on the device, GEMM 1, SwiGLU +
quant, GEMM 2, combine; the chain benchmarks/bench_gpu.py times) is captured once and replayed:
- the replay's output equals the eager run bit for bit (same kernels, same inputs: no tolerance);
- a bad expert id planted in the static ids, then an expert over M rows, are each reported by `check()` after
  the replay with eager mode's message, and the replay's output equals the eager chain on the routing with the
  dropped entries set to -1 (nothing written out of range, nothing silently kept).
The CPU counterpart (the same chain under the Triton interpreter, no capture) is tests/test_deferred_checks.py.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

W_TOK, H, I, E_NUM, K_TOP = 1024, 7168, 2048, 32, 8


@pytest.fixture(scope="module")
def chain():
    from backend.ops.triton.chain import random_chain
    ch = random_chain(W_TOK, H, I, E_NUM, K_TOP, "cuda")
    ch.capture()
    return ch


def _eager(ch, ids):
    """The chain run eagerly (no graph) on routing `ids`, on a copy of the static inputs."""
    from backend.ops.triton.chain import HtChain
    other = HtChain(ch.x, ids.clone(), ch.topk_weights, ch.w_up, ch.sfb_up, ch.w_dn, ch.sfb_dn, ch.m)
    out = other.run().clone()
    other.check()
    return out


def test_replay_equals_eager(chain):
    good = chain.topk_ids.clone()
    chain.graph.replay()
    torch.cuda.synchronize()
    chain.check()
    assert torch.equal(chain.out, _eager(chain, good))


def test_bad_id_after_replay_is_reported_and_dropped(chain):
    from backend.ops.triton.chain import dropped_ids
    good = chain.topk_ids.clone()
    chain.topk_ids[100, 3] = E_NUM + 5
    try:
        chain.graph.replay()
        with pytest.raises(ValueError) as err:
            chain.check()
        assert str(err.value) == (f"topk_ids: expected expert ids in [-1, {E_NUM}) (num_local_experts = {E_NUM}), "
                                  f"got {E_NUM + 5} at index (100, 3)")
        assert torch.equal(chain.out, _eager(chain, dropped_ids(chain.topk_ids, E_NUM, chain.m)))
    finally:
        chain.topk_ids.copy_(good)


def test_overflow_after_replay_is_reported_and_dropped(chain):
    from backend.ops.triton.chain import dropped_ids
    good = chain.topk_ids.clone()
    over = good.clone()
    has0 = (over == 0).any(dim=1)
    over[~has0, 0] = 0                       # every token routes to expert 0 once: W rows > M
    assert W_TOK > chain.m
    chain.topk_ids.copy_(over)
    try:
        chain.graph.replay()
        with pytest.raises(ValueError) as err:
            chain.check()
        assert str(err.value) == f"topk_ids: expert 0 receives {W_TOK} rows, more than max_token_num = {chain.m}"
        assert torch.equal(chain.out, _eager(chain, dropped_ids(over, E_NUM, chain.m)))
    finally:
        chain.topk_ids.copy_(good)
