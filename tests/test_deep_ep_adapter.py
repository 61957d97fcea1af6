"""DeepEPRunner (backend.moe.ep_distributed) against a strict single-rank fake of DeepEP's Buffer (tests/fakes/deep_ep.py):
with num_worst_tokens the combine hands back all W rows (DeepEP asserts src_idx.size(0) == x.size(0)), as upstream
develop's combine does; without it (older DeepEP) the n_recv received rows; PFCC's DeepEP (FD_USE_PFCC_DEEP_EP=1) is
imported under paddle.enable_compat as upstream's load_deep_ep does and gets skip_x_record_stream.
"""
import sys

import numpy as np
import paddle
import pytest

from backend.moe import ep_distributed
from backend.moe.ep_distributed import DeepEPRunner
from backend.moe.ep_runner import SingleRankEPRunner
from backend.moe.layer import FusedMoE
from backend.quantization import BlockWiseFP8Config
from fakes import deep_ep as fake_deep_ep
from moe_ref import moe

E, H, I, K_TOP, T = 4, 256, 128, 4, 10
PADDLE_PORT = "paddle.distributed.communication.deep_ep"


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")
    monkeypatch.delenv("FD_USE_PFCC_DEEP_EP", raising=False)


@pytest.fixture
def paddle_port(monkeypatch):
    """Paddle's DeepEP port importable (a stand-in module; the runner is given a ready buffer)."""
    mod = fake_deep_ep.module(PADDLE_PORT)
    monkeypatch.setitem(sys.modules, PADDLE_PORT, mod)
    monkeypatch.setattr(paddle.distributed.communication, "deep_ep", mod, raising=False)
    return mod


@pytest.fixture(scope="module")
def case():
    w = moe.make_moe_weights(E, H, I, seed=31)
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=32)
    ids = ti.numpy().copy()
    ids[3] = -1                                   # a token routed nowhere: it is not received, so n_recv < W
    return w, x, tw, paddle.to_tensor(ids)


def ht_forward(case, runner):
    w, x, tw, ti = case
    layer = FusedMoE(E, K_TOP, H, I, BlockWiseFP8Config(is_checkpoint_bf16=True), max_tokens_per_rank=T)
    layer.load_weights(w.w_up, w.w_down)
    return layer(x, topk=(tw, ti), runner=runner), layer


@pytest.mark.parametrize("worst", [True, False])
def test_combine_returns_the_rows_the_dispatch_handed_out(paddle_port, case, worst):
    buf = fake_deep_ep.make_buffer(worst=worst)
    runner = DeepEPRunner(num_experts=E, buffer=buf)
    assert runner._mod is paddle_port
    out, layer = ht_forward(case, runner)
    want, _ = ht_forward(case, SingleRankEPRunner(E))
    np.testing.assert_array_equal(out.astype(paddle.float32).numpy(), want.astype(paddle.float32).numpy())
    calls = dict(buf.calls)
    w_rows = layer.num_worst_tokens
    assert calls["dispatch"]["num_worst_tokens"] == (w_rows if worst else 0)
    assert calls["combine"]["rows"] == (w_rows if worst else T - 1)      # all W rows, or the n_recv received


def test_fake_rejects_the_partial_combine_of_before(paddle_port, case):
    """Before issue 16 the adapter passed partial[:n_recv] after a num_worst_tokens dispatch: DeepEP's assert fires."""
    buf = fake_deep_ep.make_buffer(worst=True)
    runner = DeepEPRunner(num_experts=E, buffer=buf)
    _, x, tw, ti = case
    d = runner.dispatch(x.astype(paddle.float8_e4m3fn), paddle.ones([T, 1], dtype=paddle.int32), ti, tw, 16)
    assert d.num_recv_tokens == T - 1
    partial = paddle.zeros([16, H], dtype=paddle.bfloat16)
    with pytest.raises(AssertionError, match=r"src_idx.size\(0\) == x.size\(0\): 16 != 9"):
        buf.combine(partial[: d.num_recv_tokens], d.handle.deep_handle)
    assert list(runner.combine(partial, d.handle).shape) == [T, H]


def test_pfcc_deep_ep_under_enable_compat(monkeypatch, case):
    """FD_USE_PFCC_DEEP_EP=1: paddle.enable_compat(scope={"deep_ep"}) before the import, PaddleFleet's module first
    (ep.py:33-65), and skip_x_record_stream on dispatch and combine when num_worst_tokens is used (ep.py:661-667, 694)."""
    monkeypatch.setenv("FD_USE_PFCC_DEEP_EP", "1")
    events = []
    monkeypatch.setattr(paddle, "enable_compat", lambda scope=None: events.append(("enable_compat", scope)),
                        raising=False)
    fleet = fake_deep_ep.module("paddlefleet.ops.deep_ep")
    parents = [fake_deep_ep.module("paddlefleet"), fake_deep_ep.module("paddlefleet.ops")]
    parents[0].ops, parents[1].deep_ep = parents[1], fleet
    for name, mod in (("paddlefleet", parents[0]), ("paddlefleet.ops", parents[1]), ("paddlefleet.ops.deep_ep", fleet)):
        monkeypatch.setitem(sys.modules, name, mod)
    buf = fake_deep_ep.make_buffer(pfcc=True)
    runner = DeepEPRunner(num_experts=E, buffer=buf)
    assert runner._mod is fleet and events == [("enable_compat", {"deep_ep"})]
    out, _ = ht_forward(case, runner)
    want, _ = ht_forward(case, SingleRankEPRunner(E))
    np.testing.assert_array_equal(out.astype(paddle.float32).numpy(), want.astype(paddle.float32).numpy())
    calls = dict(buf.calls)
    assert calls["dispatch"]["skip_x_record_stream"] is True and calls["combine"]["skip_x_record_stream"] is True


def test_pfcc_falls_back_to_pfcclab_deep_ep_then_names_both(monkeypatch):
    monkeypatch.setenv("FD_USE_PFCC_DEEP_EP", "1")
    monkeypatch.setattr(paddle, "enable_compat", lambda scope=None: None, raising=False)
    monkeypatch.setitem(sys.modules, "paddlefleet", None)              # not installed
    lab = fake_deep_ep.module("deep_ep")
    monkeypatch.setitem(sys.modules, "deep_ep", lab)
    assert ep_distributed.import_deep_ep() == (lab, "paddle")
    monkeypatch.setitem(sys.modules, "deep_ep", None)
    with pytest.raises(RuntimeError, match="FD_USE_PFCC_DEEP_EP=1 but neither paddlefleet.ops.deep_ep .* nor deep_ep"):
        ep_distributed.import_deep_ep()
