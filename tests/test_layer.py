"""FusedMoE: argument validation, routing against moe_ref.routing (exact), weights loading."""
import numpy as np
import paddle
import pytest

from backend.moe.layer import FusedMoE
from backend.quantization import BlockWiseFP8Config
from moe_ref import routing


@pytest.fixture(autouse=True)
def _blackwell(monkeypatch):
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")


def make(**kw):
    args = dict(num_experts=8, top_k=2, hidden_size=128, moe_intermediate_size=64,
                quant_config=BlockWiseFP8Config(is_checkpoint_bf16=True))
    args.update(kw)
    return FusedMoE(**args)


@pytest.mark.parametrize("kw, match", [
    (dict(num_experts=0), "num_experts"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=9), "top_k: expected <= num_experts = 8"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(moe_intermediate_size=1.5), "moe_intermediate_size"),
    (dict(ep_size=3), "num_experts: expected a multiple of ep_size = 3"),
    (dict(ep_size=2, ep_rank=2), "ep_rank: expected 0 <= ep_rank < ep_size = 2"),
    (dict(ep_rank=-1), "ep_rank"),
    (dict(topk_method="sigmoid"), "topk_method"),
    (dict(routed_scaling_factor=2.0), "routed_scaling_factor: applies to topk_method='noaux_tc' only"),
    (dict(routed_scaling_factor=float("nan"), topk_method="noaux_tc"), "routed_scaling_factor"),
    (dict(routed_scaling_factor=0, topk_method="noaux_tc"), "routed_scaling_factor"),
    (dict(n_group=2), "n_group, topk_group: apply to topk_method='noaux_tc' only"),
    (dict(topk_method="noaux_tc", n_group=3), "n_group: expected a divisor of num_experts = 8"),
    (dict(topk_method="noaux_tc", n_group=4, topk_group=5), "topk_group: expected <= n_group = 4"),
    (dict(topk_method="noaux_tc", n_group=4, topk_group=1, top_k=3), "top_k: expected <= topk_group"),
    (dict(topk_method="noaux_tc", e_score_correction_bias=paddle.zeros([7])), "e_score_correction_bias"),
    (dict(topk_method="noaux_tc", e_score_correction_bias=paddle.full([8], float("inf"))), "e_score_correction_bias"),
    (dict(moe_phase="train"), "moe_phase"),
    (dict(max_tokens_per_rank=0), "max_tokens_per_rank"),
    (dict(num_worst_tokens=0), "num_worst_tokens"),
    (dict(num_max_dispatch_tokens_per_rank=0), "num_max_dispatch_tokens_per_rank"),
])
def test_invalid_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_type_errors():
    with pytest.raises(TypeError, match="renormalize"):
        make(renormalize=1)
    with pytest.raises(TypeError, match="quant_config"):
        make(quant_config=None)


def test_sizes_and_ranks():
    layer = make(num_experts=16, ep_size=4, ep_rank=2, max_tokens_per_rank=5, num_max_dispatch_tokens_per_rank=3)
    assert layer.num_local_experts == 4 and layer.local_expert_range() == (8, 12)
    assert layer.num_worst_tokens == 20 and layer.ht_rows_per_expert() == 20 and layer.ep_mode == "ht"
    assert layer.ll_rows_per_expert() == 12
    small_w = make(num_experts=16, ep_size=4, max_tokens_per_rank=5, num_worst_tokens=7)
    assert small_w.ht_rows_per_expert() == 7          # a rank receives at most W rows
    assert make(moe_phase="decode").ep_mode == "ll"
    bare = make()
    with pytest.raises(ValueError, match="max_tokens_per_rank"):
        bare.ht_rows_per_expert()
    with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
        bare.ll_rows_per_expert()
    assert "num_experts=8" in repr(bare) and "BlackwellGemmFusedMoeMethod" in repr(bare)


def _assert_same(a, b):
    assert a[0].dtype == b[0].dtype == paddle.float32 and a[1].dtype == b[1].dtype == paddle.int64
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())


@pytest.mark.parametrize("renormalize", [True, False])
def test_softmax_routing_matches_reference(renormalize):
    logits = paddle.to_tensor(np.random.default_rng(0).normal(size=(33, 8)).astype(np.float32))
    logits[3] = 0.5                                   # a row of ties: lowest ids win
    layer = make(top_k=3, renormalize=renormalize)
    _assert_same(layer.route(logits), routing.softmax_topk(logits, 3, renormalize))
    assert layer.route(logits)[1][3].tolist() == [0, 1, 2]


@pytest.mark.parametrize("n_group, topk_group, renormalize, scale", [(4, 2, True, 2.5), (4, 4, False, 1.0),
                                                                      (1, 1, True, 1.0), (8, 3, True, 1.5)])
def test_noaux_tc_routing_matches_reference(n_group, topk_group, renormalize, scale):
    rng = np.random.default_rng(1)
    logits = paddle.to_tensor(rng.normal(size=(40, 16)).astype(np.float32)).astype(paddle.bfloat16)
    bias = paddle.to_tensor(rng.normal(0, 0.1, size=16).astype(np.float32))
    layer = make(num_experts=16, top_k=3, topk_method="noaux_tc", n_group=n_group, topk_group=topk_group,
                 e_score_correction_bias=bias, renormalize=renormalize, routed_scaling_factor=scale)
    _assert_same(layer.route(logits),
                 routing.noaux_tc_topk(logits, bias, n_group, topk_group, 3, renormalize, scale))


def test_noaux_tc_default_bias_is_zero():
    logits = paddle.to_tensor(np.random.default_rng(2).normal(size=(5, 8)).astype(np.float32))
    layer = make(topk_method="noaux_tc", n_group=2, topk_group=1)
    _assert_same(layer.route(logits), routing.noaux_tc_topk(logits, paddle.zeros([8]), 2, 1, 2))


def test_route_validates():
    layer = make()
    with pytest.raises(ValueError, match="gate_logits"):
        layer.route(paddle.zeros([3, 7]))
    with pytest.raises(ValueError, match="gate_logits: non-finite"):
        layer.route(paddle.full([3, 8], float("nan")))
    with pytest.raises(TypeError, match="gate_logits"):
        layer.route(np.zeros([3, 8]))


def test_forward_needs_exactly_one_routing():
    layer = make()
    x = paddle.zeros([2, 128], dtype=paddle.bfloat16)
    with pytest.raises(ValueError, match="neither"):
        layer(x)
    with pytest.raises(ValueError, match="both"):
        layer(x, paddle.zeros([2, 8]), topk=(paddle.zeros([2, 2]), paddle.zeros([2, 2], dtype=paddle.int64)))


def test_load_weights_validates():
    layer = make()
    up = paddle.zeros([8, 128, 128], dtype=paddle.bfloat16)
    down = paddle.zeros([8, 128, 64], dtype=paddle.bfloat16)
    with pytest.raises(ValueError, match=r"up_gate_proj_weight: expected shape \[8, 128, 128\]"):
        layer.load_weights(up[:, :64], down)
    with pytest.raises(TypeError, match="down_proj_weight: expected dtype"):
        layer.load_weights(up, down.astype(paddle.float32))
    with pytest.raises(ValueError, match="up_gate_proj_weight_scale: not part of a BF16 checkpoint"):
        layer.load_weights(up, down, up_gate_proj_weight_scale=paddle.ones([8, 1, 1]))
    fp8 = make(quant_config=BlockWiseFP8Config(is_checkpoint_bf16=False))
    with pytest.raises(TypeError, match="up_gate_proj_weight_scale"):
        fp8.load_weights(up.astype(paddle.float8_e4m3fn), down.astype(paddle.float8_e4m3fn))
