"""#7666's 1x32 recipe through BlackwellGemmFusedMoeMethod (quant_group_size=32): weights and activations in 1x32
UE8M0 groups (`group_wise_quant`), develop's fused permute / SwiGLU with 32-wide groups, tp and ht paths.

Reference: `moe_ref.moe.moe_forward_fp8(..., group_size=32)` with FastDeploy's amax floor 1e-10 (the one
group_wise_quant uses; docs/upstream.md §2): the same FP8 math, so calc_diff < 1e-6 (summation order, as in
tests/test_blackwell_method.py) and bit for bit on the paddle provider. Weights' bytes against
`moe_ref.blackwell_layout.quantize_weights_1x32`.
"""
import numpy as np
import paddle
import pytest

import backend.ops as ops
from backend.moe.ep_runner import InProcessEPGroup, SingleRankEPRunner
from backend.moe.layer import FusedMoE
from moe_ref.cutlass_sf import unswizzle
from backend.quantization import BlockWiseFP8Config
from fakes import FD_OPS, install_fakes
from fakes.gemm_spy import gemm_options_spy
from fakes.gpu import fake_paddle_gpu
from moe_ref import blackwell_layout, moe
from moe_ref.fp8 import ue8m0_decode
from moe_ref.metrics import calc_diff, max_abs_diff

E, H, I, K_TOP, T = 4, 256, 128, 4, 16
FLOOR = 1e-10
REF_BOUND = 1e-6
EP_BOUND = 3e-5           # ht with R > 1: one more bf16 rounding per rank partial (tests/test_blackwell_method.py)


@pytest.fixture(autouse=True)
def _blackwell(monkeypatch):
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")


SMALL = 64               # down_proj rows (output channels) 0..63 are 2^-17 times the others


def make_model():
    """Down-projection rows of very different magnitude in one 128-row block: a 128x128 UE8M0 scale, set by the large
    rows, pushes the small rows' e4m3 values into the subnormal range (or to zero); 1x32 groups along K keep them."""
    w = moe.make_moe_weights(E, H, I, seed=41)
    rows = np.ones([1, H, 1], dtype=np.float32)
    rows[:, :SMALL] = 2.0 ** -17
    return w.w_up, (w.w_down.astype(paddle.float32) * paddle.to_tensor(rows)).astype(paddle.bfloat16)


@pytest.fixture(scope="module")
def model():
    return make_model()


def layer_1x32(model, **kw):
    layer = FusedMoE(E, K_TOP, H, I, BlockWiseFP8Config(is_checkpoint_bf16=True, quant_group_size=32), **kw)
    layer.load_global_weights(*model)
    return layer


def reference(model, x, tw, ti):
    return moe.moe_forward_fp8(x, *model, tw, ti, use_ue8m0=True, amax_floor=FLOOR, group_size=32)


def test_weights_are_group_wise_quant_bytes(model):
    layer = layer_1x32(model)
    up_q, up_sf, down_q, down_sf = blackwell_layout.quantize_weights_1x32(*model)
    for got_q, got_sf, q, sf in ((layer.up_gate_proj_weight, layer.up_gate_proj_weight_scale_inv, up_q, up_sf),
                                 (layer.down_proj_weight, layer.down_proj_weight_scale_inv, down_q, down_sf)):
        assert got_sf.dtype == paddle.uint8 and list(got_sf.shape) == list(sf.shape)
        np.testing.assert_array_equal(got_q.view(paddle.uint8).numpy(), q.view(paddle.uint8).numpy())
        np.testing.assert_array_equal(got_sf.numpy(), sf.numpy())
    assert list(layer.up_gate_proj_weight_scale_inv.shape) == [E, 2 * I, H // 32]     # upstream's create_weights
    np.testing.assert_array_equal(layer.down_proj_weight_scale_fp32.numpy(),
                                  ue8m0_decode(unswizzle(down_sf)).numpy())
    assert not hasattr(layer, "up_gate_proj_weight_scale_ue8m0") and layer.weight_scale_bw_per_block is False


def test_tp_and_ht_vs_reference(model):
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=42)
    ref = reference(model, x, tw, ti)
    tp = layer_1x32(model)(x, topk=(tw, ti))
    ht_layer = layer_1x32(model, max_tokens_per_rank=T)
    ht = ht_layer(x, topk=(tw, ti), runner=SingleRankEPRunner(E))
    assert ht_layer.quant_method.last_path == "ht"
    for out in (tp, ht):
        assert calc_diff(out, ref) < REF_BOUND
        if ops.get_provider().name == "paddle":
            assert max_abs_diff(out, ref) == 0.0
    # With UE8M0 scales, e4m3 rounding is relative: 1x32 and 1x128 differ only where a block's small values go
    # subnormal - here the small output channels, which 1x128 gets wrong (measured 0.34) and 1x32 right (2.7e-3),
    # so a layer that quietly ran 1x128 would fail.
    oracle = moe.moe_forward_oracle(x, *model, tw, ti, dtype=paddle.float64)
    ref_128 = moe.moe_forward_fp8(x, *model, tw, ti, use_ue8m0=True, amax_floor=FLOOR)
    assert calc_diff(ref_128[:, :SMALL], oracle[:, :SMALL]) > 0.1
    assert 5e-4 < calc_diff(tp[:, :SMALL], oracle[:, :SMALL]) < 3e-3      # FP8 error (tests/test_blackwell_method.py)
    assert 5e-4 < calc_diff(tp, oracle) < 3e-3


def _ht_rank(model, rank, runner):
    """Rank `rank` of 2 on the ht path: its half of 16 tokens -> [8, H] float32."""
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=43)
    part = slice(rank * 8, (rank + 1) * 8)
    layer = layer_1x32(model, ep_size=2, ep_rank=rank, max_tokens_per_rank=T // 2)
    return layer(x[part], topk=(tw[part], ti[part]), runner=runner).astype(paddle.float32).numpy()


def _ht_1x32_worker(world_size, rank, cfg):
    from backend.moe.ep_distributed import PaddleDistributedEPRunner
    return _ht_rank(make_model(), rank, PaddleDistributedEPRunner(num_experts=E, timeout_s=60.0))


def test_ht_two_ranks_in_process_and_over_gloo(model):
    """1x32 scales (uint8) travel through both runners: in-process threads, and paddle.distributed processes (gloo)
    bit for bit equal to them (docs/design.md: the runners agree exactly)."""
    import ep_harness

    group = InProcessEPGroup(2, E, timeout_s=30)
    outs = group.run(lambda r: _ht_rank(model, r, group.runner(r)))
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=43)
    assert calc_diff(paddle.to_tensor(np.concatenate(outs)), reference(model, x, tw, ti)) < EP_BOUND
    records = ep_harness.launch(2, {}, worker=_ht_1x32_worker, timeout_s=150.0)
    for rec in records:
        assert rec["status"] == "ok", f"rank {rec['rank']}: {rec['error']}\n{rec.get('traceback')}"
        np.testing.assert_array_equal(rec["result"], outs[rec["rank"]])


def test_ll_and_7053_are_clear_errors(model, monkeypatch):
    x, tw, ti = moe.make_moe_inputs(4, H, E, K_TOP, seed=44)
    decode = layer_1x32(model, moe_phase="decode", num_max_dispatch_tokens_per_rank=4)
    with pytest.raises(NotImplementedError, match="quant_group_size: 32 on the ll path"):
        decode(x, topk=(tw, ti), runner=SingleRankEPRunner(E))
    monkeypatch.setattr(ops, "ops_generation", lambda name=None: "7053")
    with pytest.raises(RuntimeError, match="quant_group_size: 32 needs the fused Blackwell permute"):
        layer_1x32(model)(x, topk=(tw, ti))


def test_7666_fakes_calls(model, monkeypatch):
    """FD_MOE_OPS_PROVIDER=blackwell_ops with #7666's fake package: group_wise_quant for the weights (per expert, as
    BW f0ea6f80:450-461) and the activations (:632), then develop's fused ops with "w8a8" GEMMs and FastDeploy's
    combine; no unpack_and_convert_scale. Upstream's ht runs the permute inside its DeepEP fork (use_mask_prmt);
    ours runs #7666's unfused branch (BW:710-719), which calls prefill_permute_to_blackwell_masked_gemm."""
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", "blackwell_ops")
    fake_paddle_gpu(monkeypatch, (10, 0))
    ops.reset_provider_cache()
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=45)
    bw = "blackwell_ops"
    try:
        with install_fakes("7666") as log:
            layer = layer_1x32(model, max_tokens_per_rank=T)
            assert log.ops() == [f"{bw}.group_wise_quant"] * (2 * E)
            log.clear()
            out = layer(x, topk=(tw, ti), runner=SingleRankEPRunner(E))
            called = log.ops()
    finally:
        ops.reset_provider_cache()
    assert called == [f"{bw}.group_wise_quant", f"{bw}.prefill_permute_to_blackwell_masked_gemm",
                      f"{bw}.group_gemm_masked", f"{bw}.fused_mask_swiglu_fp8_quant_blackwell",
                      f"{bw}.group_gemm_masked", f"{FD_OPS}.depermute_prefill_combine"]
    assert calc_diff(out, reference(model, x, tw, ti)) < REF_BOUND


def test_gemms_are_not_told_the_1x32_bytes_repeat(model, monkeypatch):
    """1x32 activation bytes differ inside a 128-K group: the method never states sfa_per_group (a provider would
    then read one byte per 128 K), nor sfb_per_block for the 1x32 weight bytes."""
    seen = gemm_options_spy(monkeypatch)
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=43)
    layer_1x32(model)(x, topk=(tw, ti))
    assert [(o["sfa_per_group"], o["sfb_per_block"], o["expected_m"]) for o in seen] == [(False, False, T)] * 2
