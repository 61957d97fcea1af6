"""Deferred routing checks (`backend.ops.device_errors`, `BlackwellGemmFusedMoeMethod(checks="deferred")`) on CPU,
on the paddle provider and the triton provider under the Triton interpreter.

What is asserted: in deferred mode a planted bad expert id, a repeated expert and an expert over M rows raise
nothing during the forward / the permute; the explicit check (`layer.check_errors()`,
`device_errors.raise_recorded`) then raises eager mode's exact message once (the record is cleared); the dropped
entries are neither written nor combined, so every output equals, bit for bit, eager mode on the same routing with
those entries set to -1. The GPU counterpart (CUDA-graph capture and replay of the triton chain with the record
inside the graph) is tests/test_gpu_graph.py.
"""
import numpy as np
import paddle
import pytest

from backend import ops
from backend.moe.ep_runner import SingleRankEPRunner
from backend.moe.layer import FusedMoE
from backend.ops import device_errors
from backend.quantization import BlockWiseFP8Config
from moe_ref import moe

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

E_TOTAL, K_TOP, H, I, T = 4, 2, 256, 128, 12
PROVIDERS = ["paddle", "triton"]


@pytest.fixture(autouse=True)
def _blackwell(monkeypatch):
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")


def _interpreter(request, monkeypatch):
    """TRITON_INTERPRET=1 for one test (as tests/test_triton_provider.py); -> torch."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from backend.ops.triton import launch
    if not launch.interpreting():
        pytest.skip("the Triton kernels were compiled for a GPU (TRITON_INTERPRET was 0 before the run)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    return torch


@pytest.fixture
def interpreter(request, monkeypatch):
    return _interpreter(request, monkeypatch)


@pytest.fixture(params=PROVIDERS)
def provider(request, monkeypatch):
    """FD_MOE_OPS_PROVIDER for one test; triton runs under the interpreter."""
    name = request.param
    if name == "triton":
        _interpreter(request, monkeypatch)
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", name)
    ops.reset_provider_cache()
    yield name
    ops.reset_provider_cache()


@pytest.fixture(scope="module")
def checkpoint():
    w = moe.make_moe_weights(E_TOTAL, H, I, seed=3)
    return w.w_up, w.w_down


def _layer(checkpoint, checks, **kw):
    layer = FusedMoE(E_TOTAL, K_TOP, H, I, BlockWiseFP8Config(is_checkpoint_bf16=True), **kw)
    layer.load_global_weights(*checkpoint)
    layer.quant_method.checks = checks
    return layer


def _planted(ti, entries, value):
    ids = ti.numpy().copy()
    for t, k in entries:
        ids[t, k] = value
    return paddle.to_tensor(ids)


def _eager_message(layer, x, tw, ti, **kw):
    with pytest.raises(ValueError) as err:
        layer(x, topk=(tw, ti), **kw)
    return str(err.value)


@pytest.mark.parametrize("path", ["tp", "ht"])
def test_bad_global_id_is_recorded_dropped_and_raised_at_the_check(provider, checkpoint, path):
    x, tw, ti = moe.make_moe_inputs(T, H, E_TOTAL, K_TOP, seed=11)
    bad = _planted(ti, [(5, 1)], 9)
    kw = dict(max_tokens_per_rank=T) if path == "ht" else {}
    run = dict(runner=SingleRankEPRunner(E_TOTAL)) if path == "ht" else {}
    eager, deferred = _layer(checkpoint, "eager", **kw), _layer(checkpoint, "deferred", **kw)
    message = _eager_message(eager, x, tw, bad, **run)
    assert "topk_ids: expected global expert ids in [-1, num_experts = 4), got 9 at index (5, 1)" == message
    out = deferred(x, topk=(tw, bad), **run)                 # no error during the forward
    with pytest.raises(ValueError) as err:
        deferred.check_errors()
    assert str(err.value) == message
    deferred.check_errors()                                  # cleared: nothing more to raise
    dropped = eager(x, topk=(tw, _planted(ti, [(5, 1)], -1)), **run)
    np.testing.assert_array_equal(out.view(paddle.uint16).numpy(), dropped.view(paddle.uint16).numpy())
    assert deferred.quant_method.last_provider_name == provider


def test_repeated_expert_reports_the_eager_message_and_writes_nothing_out_of_range(provider, checkpoint):
    """Token 0 repeats expert 1 and every token routes to expert 1: it receives T + 1 rows with M = T (tp). Eager
    raises the repeat; deferred records it first (the overflow after it is not reported), drops the row past M
    and the output is finite."""
    x, tw, ti = moe.make_moe_inputs(T, H, E_TOTAL, K_TOP, seed=12)
    ids = ti.numpy().copy()
    ids[:, 0] = 1
    ids[:, 1] = np.where(ids[:, 1] == 1, 2, ids[:, 1])
    ids[0] = [1, 1]
    ids = paddle.to_tensor(ids)
    message = _eager_message(_layer(checkpoint, "eager"), x, tw, ids)
    assert message.startswith("topk_ids: token 0 repeats expert 1 at top-k positions [0, 1]")
    layer = _layer(checkpoint, "deferred")
    out = layer(x, topk=(tw, ids))
    assert np.isfinite(out.astype(paddle.float32).numpy()).all()
    with pytest.raises(ValueError) as err:
        layer.check_errors()
    assert str(err.value) == message


@pytest.mark.parametrize("op", ["prefill_permute_to_masked_gemm", "prefill_permute_to_blackwell_masked_gemm"])
def test_permute_overflow_and_bad_local_id_deferred(provider, op):
    """The contract op with errors=: an expert over M and an id >= E give no error; the record raises the eager
    message (first the bad id, which eager meets first); outputs equal eager on the routing with the dropped
    entries (the id, the rows of expert 1 past M in token-then-k order) set to -1."""
    p = ops.get_provider()
    w, h, e, m = 6, 256, 3, 3
    x_f = paddle.to_tensor(np.random.default_rng(0).normal(size=(w, h)).astype(np.float32)).astype(paddle.bfloat16)
    x, scale = p.per_token_quant(x_f, 128, True)
    ids = np.array([[1, 0], [1, 2], [0, 1], [1, 5], [2, 1], [1, -1]], dtype=np.int64)   # expert 1: 6 rows, M = 3
    fn = getattr(p, op)
    with pytest.raises(ValueError) as err:
        fn(x, scale, paddle.to_tensor(ids), e, m)
    eager_bad_id = str(err.value)
    errors = device_errors.new_record()
    got = fn(x, scale, paddle.to_tensor(ids), e, m, errors=errors)
    with pytest.raises(ValueError) as err:
        device_errors.raise_recorded(errors)
    assert str(err.value) == eager_bad_id == ("topk_ids: expected expert ids in [-1, 3) (num_local_experts = 3), "
                                              "got 5 at index (3, 1)")
    ids_over = np.where(ids == 5, -1, ids)                         # only the overflow left
    with pytest.raises(ValueError) as err:
        fn(x, scale, paddle.to_tensor(ids_over), e, m)
    fn(x, scale, paddle.to_tensor(ids_over), e, m, errors=errors)
    with pytest.raises(ValueError) as err2:
        device_errors.raise_recorded(errors)
    assert str(err2.value) == str(err.value) == "topk_ids: expert 1 receives 6 rows, more than max_token_num = 3"
    kept = ids.copy()
    kept[3, 1] = -1                                                # the bad id
    kept[3, 0] = kept[4, 1] = kept[5, 0] = -1                      # expert 1's 4th to 6th rows
    ref = fn(x, scale, paddle.to_tensor(kept), e, m)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.view(paddle.uint8).numpy() if a.dtype == paddle.float8_e4m3fn
                                      else a.numpy(), b.view(paddle.uint8).numpy()
                                      if b.dtype == paddle.float8_e4m3fn else b.numpy())


def test_record_keeps_the_first_error_and_mode_validation(monkeypatch):
    errors = device_errors.new_record()
    device_errors.record_overflow(errors, paddle.to_tensor([1, 9, 9], dtype=paddle.int32), 4)
    device_errors.record_bad_ids(errors, paddle.to_tensor([[0, 7]]), 3, device_errors.BAD_LOCAL_ID)
    assert errors.numpy().tolist() == [device_errors.OVERFLOW, 1, 9, 4, 0]
    device_errors.raise_recorded(paddle.zeros([5], dtype=paddle.int64))             # clear: no error
    with pytest.raises(TypeError, match=r"errors: expected an int64 \[5\] error record"):
        ops.get_provider("paddle").prefill_permute_to_masked_gemm(
            paddle.zeros([1, 128], paddle.bfloat16), None, paddle.zeros([1, 1], paddle.int64), 2, 2,
            errors=paddle.zeros([5], dtype=paddle.int32))
    from backend.moe.blackwell_method import BlackwellGemmFusedMoeMethod
    config = BlockWiseFP8Config(is_checkpoint_bf16=True)
    with pytest.raises(ValueError, match="checks: expected one of eager, deferred"):
        BlackwellGemmFusedMoeMethod(config, checks="lazy")
    monkeypatch.setenv("FD_MOE_DEFERRED_CHECKS", "1")
    assert BlackwellGemmFusedMoeMethod(config).checks == "deferred"
    monkeypatch.setenv("FD_MOE_DEFERRED_CHECKS", "0")
    assert BlackwellGemmFusedMoeMethod(config).checks == "eager"


def test_triton_launch_chain_records_and_drops(interpreter):
    """backend.ops.triton.chain.HtChain (the chain tests/test_gpu_graph.py captures in a CUDA graph), eagerly under
    the interpreter: a planted bad id, then an expert over M, raise nothing in run(); check() raises eager mode's
    message once; the output equals the chain on the routing with the dropped entries set to -1, bit for bit."""
    torch = interpreter
    from backend.ops.triton.chain import HtChain, dropped_ids, random_chain
    ch = random_chain(12, 256, 128, 4, 2, "cpu", headroom=1)
    good = ch.topk_ids.clone()

    def reference(ids):
        other = HtChain(ch.x, ids, ch.topk_weights, ch.w_up, ch.sfb_up, ch.w_dn, ch.sfb_dn, ch.m)
        out = other.run()
        other.check()                                            # nothing recorded on the kept routing
        return out

    ch.run()
    ch.check()
    bad = good.clone()
    bad[5, 1] = 7
    ch.topk_ids.copy_(bad)
    out = ch.run()
    with pytest.raises(ValueError) as err:
        ch.check()
    assert str(err.value) == "topk_ids: expected expert ids in [-1, 4) (num_local_experts = 4), got 7 at index (5, 1)"
    ch.check()
    assert torch.equal(out.view(torch.int16), reference(dropped_ids(bad, 4, ch.m)).view(torch.int16))
    over = good.clone()
    over[~(over == 0).any(dim=1), 0] = 0                         # all 12 tokens to expert 0, M < 12
    assert ch.m < 12
    ch.topk_ids.copy_(over)
    out = ch.run()
    with pytest.raises(ValueError) as err:
        ch.check()
    assert str(err.value) == f"topk_ids: expert 0 receives 12 rows, more than max_token_num = {ch.m}"
    kept = dropped_ids(over, 4, ch.m)
    assert int((kept == -1).sum()) == 12 - ch.m
    assert torch.equal(out.view(torch.int16), reference(kept).view(torch.int16))


@pytest.mark.parametrize("w, e, k_top, m", [(1000, 32, 8, 260), (1000, 32, 8, 240), (37, 3, 2, 30), (5, 6, 4, 2)])
def test_triton_index_step_matches_paddle_across_chunks(interpreter, w, e, k_top, m):
    """The two-launch index step (count kernel, slot kernel with the per-program prefix and program 0's totals):
    map and counts bit-equal to the paddle provider's permute on the same routing, with planted bad ids and,
    where m is small, overflowing experts; at W = 1000, K_top = 8, E = 32 there are 63 chunks of 16 tokens, more
    than one tile (32 rows) of the prefix sum. The record holds the contract's first error."""
    torch = interpreter
    from backend.ops.triton import launch as L
    rng = np.random.default_rng(w + m)
    ids = np.stack([rng.permutation(e)[:k_top] for _ in range(w)]).astype(np.int64)
    ids[rng.random(ids.shape) < 0.1] = -1
    ids[w // 2, 0], ids[w - 1, k_top - 1] = e + 1, -7                # bad ids
    errors = torch.zeros(device_errors.RECORD_LEN, dtype=torch.int64)
    imap, counts, problems = L.permute_indices(torch.from_numpy(ids), e, m, check=False, errors=errors)
    x = paddle.zeros([w, 128], dtype=paddle.bfloat16)
    rec = device_errors.new_record()
    _, _, imap_p, counts_p = ops.get_provider("paddle").prefill_permute_to_masked_gemm(
        x, None, paddle.to_tensor(ids), e, m, errors=rec)
    np.testing.assert_array_equal(imap.numpy(), imap_p.numpy())
    np.testing.assert_array_equal(counts.numpy(), counts_p.numpy().reshape(-1))
    assert errors.tolist() == rec.numpy().tolist()
    routed = np.bincount(ids[(ids >= 0) & (ids < e)], minlength=e)
    assert problems.tolist() == [2, int(routed.max()), int(np.argmax(routed))]


def test_deferred_contract_checks_and_recorders_read_nothing_back(monkeypatch):
    """Inside device_errors.deferred(), the contract's checks of the develop chain's ops (quant, permute with a
    record, GEMM, SwiGLU + quant, combine) and the method's routing recorders never read a tensor value on the
    host: every Tensor -> Python conversion is patched to raise. (Eager, the same checks do read: the last
    assert.)"""
    from backend.ops._checks import CHECKS
    p = ops.get_provider("paddle")
    e, m, h, i2, w, k_top = 2, 4, 128, 256, 3, 2
    x = paddle.ones([w, h], dtype=paddle.bfloat16)
    xq, s = p.per_token_quant(x, 128, True)
    ids = paddle.to_tensor([[0, 1], [1, -1], [0, 1]])
    rec = device_errors.new_record()
    a, sfa, imap, counts = p.prefill_permute_to_blackwell_masked_gemm(xq, s, ids, e, m, errors=rec)
    b = paddle.zeros([e, i2, h], dtype=paddle.uint8).view(paddle.float8_e4m3fn)
    sfb = paddle.full([e, 256, 16], 127, dtype=paddle.uint8)
    up = paddle.zeros([e * m, i2], dtype=paddle.bfloat16)
    calls = [("per_token_quant", (x, 128, True), {}),
             ("prefill_permute_to_blackwell_masked_gemm", (xq, s, ids, e, m), dict(errors=rec)),
             ("group_gemm_masked", (a, b, sfa, sfb, counts, up, None, m, -1, "w8a8"),
              dict(sfb_per_block=True, sfb_prepared=None, sfa_per_group=True, expected_m=None)),
             ("fused_mask_swiglu_fp8_quant_blackwell", (up, counts), dict(group_size=128)),
             ("depermute_prefill_combine", (up.reshape([e, m, i2]), imap, paddle.ones([w, k_top]), w), {})]

    def host_read(*args, **kwargs):
        raise AssertionError("a tensor value was read on the host")

    with monkeypatch.context() as patch:
        for name in ("__bool__", "__int__", "__float__", "__index__", "numpy", "tolist", "item"):
            patch.setattr(paddle.Tensor, name, host_read)
        with device_errors.deferred():
            for name, args, kwargs in calls:
                CHECKS[name](*args, **kwargs)
            device_errors.record_bad_ids(rec, ids, 4, device_errors.BAD_GLOBAL_ID)
            device_errors.record_repeats(rec, ids)
        with pytest.raises(AssertionError, match="read on the host"):
            CHECKS["per_token_quant"](x, 128, True)
