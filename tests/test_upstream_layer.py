"""BlackwellGemmFusedMoeMethod inside a stand-in of FastDeploy's FusedMoE (tests/upstream_fused_moe.py: upstream's
attributes, hook call order, weight_loader and loader replay; docs/upstream.md §4), against the reference.

Bounds as in tests/test_blackwell_method.py: the same FP8 math as `moe_ref.moe.moe_forward_fp8` /
`moe_forward_ep` (use_ue8m0=True), so calc_diff < 1e-6 on any provider (summation order only), and bit for bit
on the paddle provider.
"""
import numpy as np
import paddle
import pytest

from backend import ops
from backend.moe.blackwell_method import BlackwellGemmFusedMoeMethod
from backend.moe.ep_runner import InProcessEPGroup
from backend.moe.upstream import TensorTracker
from backend.moe.layer import FusedMoE as OurFusedMoE
from backend.quantization import BlockWiseFP8Config
from moe_ref import moe, quant, routing
from moe_ref.metrics import calc_diff, max_abs_diff
from upstream_fused_moe import FusedMoE, Gate, bf16_shards, fd_config, load_checkpoint

E, H, I, K_TOP = 8, 256, 128, 4
REF_BOUND = 1e-6


@pytest.fixture(autouse=True)
def _blackwell(monkeypatch):
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")


@pytest.fixture(scope="module")
def weights():
    w = moe.make_moe_weights(E, H, I, seed=11)
    gate_w = paddle.to_tensor(np.random.default_rng(12).normal(size=(H, E)).astype(np.float32))
    return w.w_up, w.w_down, gate_w


def f32(t):
    return t.astype(paddle.float32).numpy()


def make_layer(cfg, ckpt="bf16", **kw):
    return FusedMoE(cfg, BlockWiseFP8Config(is_checkpoint_bf16=ckpt == "bf16"), num_experts=E, top_k=K_TOP,
                    hidden_size=H, moe_intermediate_size=I, **kw)


def close_to(out, ref, exact: bool):
    diff = calc_diff(out, ref)
    assert diff < REF_BOUND, diff
    if exact and ops.get_provider().name == "paddle":
        assert max_abs_diff(out, ref) == 0.0


def test_create_weights_as_upstream(weights):
    """create_weights(layer, **extra_weight_attrs): BF16 [E, H, 2I] / [E, I, H] with tensor_track and the loader's
    attributes (develop BW:328-364)."""
    layer = make_layer(fd_config())
    up, down = layer.up_gate_proj_weight, layer.down_proj_weight
    assert list(up.shape) == [E, H, 2 * I] and list(down.shape) == [E, I, H]
    assert up.dtype == down.dtype == paddle.bfloat16
    assert up.weight_loader == layer.weight_loader and up.model_format == "paddle"
    assert up.tensor_track.track_dim == 2 and down.tensor_track.track_dim == 1
    assert not up.tensor_track.is_fully_copied()
    assert layer.quant_method.added_scale_attrs == ["up_gate_proj_weight_scale_inv", "down_proj_weight_scale_inv"]


def test_tp_bf16_hooks_in_upstream_order_and_output(weights):
    """Per-weight processing as the loader calls it: gate-up converted when its last shard lands, down when its
    last shard lands; uint8 CUTLASS bytes in *_scale_inv; forward(x, gate) equals the reference."""
    w_up, w_down, gate_w = weights
    layer = make_layer(fd_config())
    seen = load_checkpoint(layer, bf16_shards(w_up, w_down, range(E)))
    assert seen == [("up_gate_proj_weight", E - 1, "up", ("up_gate_proj",)),
                    ("down_proj_weight", E - 1, "down", ("up_gate_proj", "down_proj"))]
    assert layer.up_gate_proj_weight.dtype == paddle.float8_e4m3fn
    assert list(layer.up_gate_proj_weight.shape) == [E, 2 * I, H]
    assert layer.up_gate_proj_weight_scale_inv.dtype == paddle.uint8
    assert layer.down_proj_weight_scale_fp32.dtype == paddle.float32
    layer.quant_method.process_weights_after_loading(layer)          # the final call: nothing left, no change
    x, _, _ = moe.make_moe_inputs(24, H, E, K_TOP, seed=13)
    hooked = []
    out = layer(x, Gate(gate_w), lambda topk_ids: hooked.append(topk_ids))
    tw, ti = routing.softmax_topk(paddle.matmul(x.astype(paddle.float32), gate_w), K_TOP, True)
    np.testing.assert_array_equal(hooked[0].numpy(), ti.numpy())
    close_to(out, moe.moe_forward_fp8(x, w_up, w_down, tw, ti, use_ue8m0=True), exact=True)
    assert layer.quant_method.last_path == "tp"


def test_shared_experts_and_latent_projections_are_applied(weights):
    w_up, w_down, gate_w = weights
    layer = make_layer(fd_config())
    load_checkpoint(layer, bf16_shards(w_up, w_down, range(E)))
    x, _, _ = moe.make_moe_inputs(8, H, E, K_TOP, seed=14)
    plain = layer(x, Gate(gate_w))
    doubled = layer(x, Gate(gate_w), None, lambda t: t, None, lambda t: t * 2)
    want = (plain.astype(paddle.float32) * 2 + x.astype(paddle.float32)).astype(paddle.bfloat16)   # plain·2 exact
    np.testing.assert_array_equal(f32(doubled), f32(want))
    assert np.abs(f32(doubled) - f32(plain)).max() > 0


def test_forward_before_down_is_loaded_names_what_is_missing(weights):
    w_up, w_down, gate_w = weights
    layer = make_layer(fd_config())
    load_checkpoint(layer, bf16_shards(w_up, w_down, range(E))[:-1])
    x, _, _ = moe.make_moe_inputs(4, H, E, K_TOP, seed=15)
    with pytest.raises(RuntimeError, match=r"converted so far: \['up_gate_proj'\]"):
        layer(x, Gate(gate_w))


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_ep_two_ranks(weights, phase):
    """ep_size 2: FusedMoE calls init_ep; the runners are set on the method (upstream's attribute names) and the
    forward goes through MoEMethodBase.apply's dispatch. M = ep_size · max_num_batched_tokens (upstream's sizing)."""
    w_up, w_down, gate_w = weights
    x, _, _ = moe.make_moe_inputs(20, H, E, K_TOP, seed=16)
    xs = [x[:12], x[12:]]
    group = InProcessEPGroup(2, E, timeout_s=30)
    layers = []
    for r in range(2):
        layer = make_layer(fd_config(phase=phase, ep_size=2, ep_rank=r, max_num_batched_tokens=12,
                                     num_max_dispatch_tokens_per_rank=12))
        load_checkpoint(layer, bf16_shards(w_up, w_down, range(E)))
        layer.quant_method.init_ep(layer, group.runner(r), group.runner(r))
        layers.append(layer)
    outs = group.run(lambda r: layers[r](xs[r], Gate(gate_w)))
    assert [lay.quant_method.last_path for lay in layers] == ["ht" if phase == "prefill" else "ll"] * 2
    routed = [routing.softmax_topk(paddle.matmul(xr.astype(paddle.float32), gate_w), K_TOP, True) for xr in xs]
    if phase == "prefill":
        refs = moe.moe_forward_ep(xs, w_up, w_down, [r[0] for r in routed], [r[1] for r in routed], use_ue8m0=True,
                                  num_worst_tokens=24, max_token_num=24)
        for out, ref in zip(outs, refs):
            close_to(out, ref, exact=True)
    else:
        tw, ti = routing.softmax_topk(paddle.matmul(x.astype(paddle.float32), gate_w), K_TOP, True)
        # Not bit for bit: each rank multiplies its 4 experts' rows, the single-rank reference all 8 experts',
        # and Paddle's float32 matmul sums in a shape-dependent order when it runs on 2 threads (make test's
        # OMP_NUM_THREADS=2): measured 6 of 5120 outputs one bf16 step apart there, none with 1 thread.
        close_to(paddle.concat(outs), moe.moe_forward_fp8(x, w_up, w_down, tw, ti, use_ue8m0=True), exact=False)


def test_fp8_checkpoint_through_process_prequanted_weights(weights):
    """FP8 checkpoint, upstream's v0 path: process_prequanted_weights(layer, state_dict) with the layer's
    weight_key_map (Paddle-format [K, N] weights, [ceil(K/128), ceil(N/128)] scales); equals our FusedMoE on the
    same checkpoint and the reference on its dequantized weights."""
    w_up, w_down, gate_w = weights
    (qu, su), (qd, sd) = quant.per_block_quant(w_up), quant.per_block_quant(w_down)
    keys = {"up_gate_proj_expert_weight_key": "e{}.up_gate.w", "down_proj_expert_weight_key": "e{}.down.w",
            "up_gate_proj_expert_weight_scale_key": "e{}.up_gate.s", "down_proj_expert_weight_scale_key": "e{}.down.s"}
    t = lambda v: v.view(paddle.uint8).transpose([1, 0]).clone().view(paddle.float8_e4m3fn)   # noqa: E731
    state = {}
    for e in range(E):
        state.update({f"e{e}.up_gate.w": t(qu[e]), f"e{e}.down.w": t(qd[e]),
                      f"e{e}.up_gate.s": su[e].transpose([1, 0]), f"e{e}.down.s": sd[e].transpose([1, 0])})
    layer = make_layer(fd_config(is_checkpoint_bf16=False), ckpt="fp8", weight_key_map=keys)
    assert list(layer.up_gate_proj_weight_scale_inv.shape) == [E, H // 128, 2 * I // 128]
    layer.quant_method.process_prequanted_weights(layer, state)
    assert not state                                         # popped, as upstream does
    ours = OurFusedMoE(E, K_TOP, H, I, BlockWiseFP8Config(is_checkpoint_bf16=False))
    ours.load_weights(qu, qd, su, sd)
    x, _, _ = moe.make_moe_inputs(16, H, E, K_TOP, seed=17)
    out = layer(x, Gate(gate_w))
    tw, ti = routing.softmax_topk(paddle.matmul(x.astype(paddle.float32), gate_w), K_TOP, True)
    np.testing.assert_array_equal(f32(out), f32(ours(x, topk=(tw, ti))))
    ref = moe.moe_forward_fp8(x, quant.dequant_per_block(qu, su), quant.dequant_per_block(qd, sd), tw, ti,
                              use_ue8m0=True)
    close_to(out, ref, exact=True)


def test_develop_positional_call_that_breaks_upstream_works_here(weights):
    """develop's MoEMethodBase.apply passes seven positional arguments to apply_ep_prefill / apply_ep_decode and
    six to apply_tp (BASE:220-254); upstream's Blackwell method takes five / four (TypeError). Ours takes them."""
    w_up, w_down, gate_w = weights
    layer = make_layer(fd_config())
    load_checkpoint(layer, bf16_shards(w_up, w_down, range(E)))
    x, _, _ = moe.make_moe_inputs(4, H, E, K_TOP, seed=18)
    method = layer.quant_method
    out = method.apply_tp(layer, x, Gate(gate_w), None, None, None)
    np.testing.assert_array_equal(f32(out), f32(layer(x, Gate(gate_w))))


def test_noaux_tc_routing_from_upstream_attributes(weights):
    """DeepSeek-V3 routing read from upstream's attribute names (gate_correction_bias [1, E] as upstream stores it)."""
    w_up, w_down, gate_w = weights
    bias = paddle.to_tensor(np.random.default_rng(19).normal(size=(1, E)).astype(np.float32))
    layer = make_layer(fd_config(), topk_method="noaux_tc", n_group=2, topk_group=1, routed_scaling_factor=2.5,
                       gate_correction_bias=bias)
    load_checkpoint(layer, bf16_shards(w_up, w_down, range(E)))
    x, _, _ = moe.make_moe_inputs(8, H, E, K_TOP, seed=20)
    seen = []
    out = layer(x, Gate(gate_w), lambda topk_ids: seen.append(topk_ids))
    tw, ti = routing.noaux_tc_topk(paddle.matmul(x.astype(paddle.float32), gate_w), bias.reshape([-1]), 2, 1, K_TOP,
                                   True, 2.5)
    np.testing.assert_array_equal(seen[0].numpy(), ti.numpy())
    close_to(out, moe.moe_forward_fp8(x, w_up, w_down, tw, ti, use_ue8m0=True), exact=True)


def test_hook_argument_errors(weights):
    w_up, w_down, gate_w = weights
    with pytest.raises(NotImplementedError, match="model_format: expected 'paddle' or None, got 'torch'"):
        BlackwellGemmFusedMoeMethod(BlockWiseFP8Config(is_checkpoint_bf16=True)).create_weights(
            make_layer(fd_config()), model_format="torch")
    layer = make_layer(fd_config())
    with pytest.raises(ValueError, match="process_prequanted_weights: loads FP8 checkpoints"):
        layer.quant_method.process_prequanted_weights(layer, {})
    fp8 = make_layer(fd_config(is_checkpoint_bf16=False), ckpt="fp8", weight_key_map={
        "up_gate_proj_expert_weight_key": "w{}", "up_gate_proj_expert_weight_scale_key": "s{}"})
    with pytest.raises(NotImplementedError, match="is_rearrange"):
        fp8.quant_method.process_prequanted_weights(fp8, {}, True)
    state = {f"w{e}": paddle.zeros([H, I], dtype=paddle.float8_e4m3fn) for e in range(E)}   # [K, N/2]: wrong
    with pytest.raises(ValueError, match=r"w\{\}: expected per-expert shape \[256, 256\], got \[256, 128\]"):
        fp8.quant_method.process_prequanted_weights(fp8, state)
    ep = make_layer(fd_config(ep_size=2))
    load_checkpoint(ep, bf16_shards(w_up, w_down, range(E)))
    x, _, _ = moe.make_moe_inputs(4, H, E, K_TOP, seed=21)
    with pytest.raises(ValueError, match="runner: ep_size = 2 needs an EP runner"):
        ep(x, Gate(gate_w))
    with pytest.raises(ValueError, match="apply_tp needs 1"):
        ep.quant_method.apply_tp(ep, x, Gate(gate_w))
    with pytest.raises(ValueError, match="pass runner= or set method.ep_prefill_runner"):
        ep.quant_method.apply_ep_prefill(ep, x, Gate(gate_w))


def test_tensor_tracker_checks():
    track = TensorTracker([2, 3, 4], output_dim=True)
    with pytest.raises(ValueError, match="batch_id"):
        track.mark(0, 4, None)
    with pytest.raises(ValueError, match="start, end"):
        track.mark(3, 2, 0)
    with pytest.raises(ValueError, match="3-D"):
        TensorTracker([2, 3], output_dim=False)
    track.mark(0, 2, 0)
    track.mark(2, 4, 0)
    track.mark(0, None, 1)
    assert track.is_fully_copied()
