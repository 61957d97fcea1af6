"""BlockWiseFP8Config.get_quant_method: every combination of the switches, and validation."""
import paddle
import pytest

from backend.moe.blackwell_method import BlackwellGemmFusedMoeMethod
from backend.moe.layer import FusedMoE
from backend.quantization import (BlockWiseFP8Config, CutlassFusedMoeMethod, DeepGemmFusedMoeMethod,
                                  TritonBlockWiseFP8MoEMethod, UpstreamFusedMoeMethod)


def _layer(ep_size=1, **kw):
    return FusedMoE(8, 2, 128, 64, BlockWiseFP8Config(is_checkpoint_bf16=True), ep_size=ep_size,
                    max_tokens_per_rank=4, **kw)


def _set(monkeypatch, blackwell, deep_gemm):
    for name, value in (("FD_USE_BLACKWELL_GEMM", blackwell), ("FD_USE_DEEP_GEMM", deep_gemm)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


# (FD_USE_BLACKWELL_GEMM, FD_USE_DEEP_GEMM, ep_size) -> method; None = unset.
# Upstream asserts FD_USE_DEEP_GEMM=1 whenever FD_USE_BLACKWELL_GEMM=1; ours accepts "0"/unset there.
CASES = [
    (bw, dg, ep, BlackwellGemmFusedMoeMethod if bw == "1"
     else DeepGemmFusedMoeMethod if (dg == "1" or ep > 1) else TritonBlockWiseFP8MoEMethod)
    for bw in (None, "0", "1") for dg in (None, "0", "1") for ep in (1, 2)
]


@pytest.mark.parametrize("blackwell, deep_gemm, ep_size, expected", CASES)
def test_every_switch_combination(monkeypatch, blackwell, deep_gemm, ep_size, expected):
    _set(monkeypatch, blackwell, deep_gemm)
    layer = _layer(ep_size)
    assert type(layer.quant_method) is expected
    assert type(layer.quant_config.get_quant_method(layer)) is expected     # read again at call time


@pytest.mark.parametrize("name", ["FD_USE_BLACKWELL_GEMM", "FD_USE_DEEP_GEMM"])
def test_bad_switch_value_raises(monkeypatch, name):
    _set(monkeypatch, "1", "1")
    layer = _layer()
    monkeypatch.setenv(name, "on")
    with pytest.raises(ValueError, match=f"{name}.*'on'"):
        layer.quant_config.get_quant_method(layer)


def test_switch_flip_changes_method(monkeypatch):
    _set(monkeypatch, "0", None)
    layer = _layer()
    cfg = layer.quant_config
    assert isinstance(cfg.get_quant_method(layer), TritonBlockWiseFP8MoEMethod)
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")
    assert isinstance(cfg.get_quant_method(layer), BlackwellGemmFusedMoeMethod)


@pytest.mark.parametrize("cls", [DeepGemmFusedMoeMethod, TritonBlockWiseFP8MoEMethod, CutlassFusedMoeMethod])
def test_upstream_methods_are_placeholders(cls):
    method = cls(BlockWiseFP8Config())
    assert isinstance(method, UpstreamFusedMoeMethod)
    method.create_weights(object())            # allocates nothing
    for call in (lambda: method.apply(None, None, None), lambda: method.process_weights_after_loading(None)):
        with pytest.raises(NotImplementedError, match=f"{cls.upstream_class}.*FD_USE_BLACKWELL_GEMM=1") as info:
            call()
        assert cls.upstream_module in str(info.value)


def test_layer_with_upstream_method_cannot_load_or_run(monkeypatch):
    _set(monkeypatch, "0", "1")
    layer = _layer()
    x = paddle.zeros([2, 128], dtype=paddle.bfloat16)
    with pytest.raises(NotImplementedError, match="DeepGemmFusedMoeMethod"):
        layer(x, paddle.zeros([2, 8]))
    with pytest.raises(NotImplementedError, match="declares no checkpoint tensors"):
        layer.load_weights(x, x)


@pytest.mark.parametrize("bad, err", [([64, 128], ValueError), ([128], ValueError), ([128, 128, 128], ValueError),
                                      ([-1, -1], ValueError), ([128.0, 128], ValueError), ([True, 128], ValueError),
                                      ("128", TypeError), (128, TypeError)])
def test_weight_block_size_validated(bad, err):
    with pytest.raises(err, match="weight_block_size"):
        BlockWiseFP8Config(weight_block_size=bad)


def test_config_basics():
    cfg = BlockWiseFP8Config((128, 128), is_checkpoint_bf16=True)
    assert cfg.weight_block_size == [128, 128] and cfg.is_checkpoint_bf16
    assert cfg.name() == "block_wise_fp8"
    assert "is_checkpoint_bf16=True" in repr(cfg)
    with pytest.raises(TypeError, match="is_checkpoint_bf16"):
        BlockWiseFP8Config(is_checkpoint_bf16=1)
    assert BlockWiseFP8Config.from_config({}).is_checkpoint_bf16 is True                 # upstream: not is_quantized
    fp8 = BlockWiseFP8Config.from_config({"is_quantized": True, "weight_block_size": [128, 128]})
    assert fp8.is_checkpoint_bf16 is False
    with pytest.raises(ValueError, match="weight_block_size"):
        BlockWiseFP8Config.from_config({"weight_block_size": [64, 64]})


def test_non_moe_layer_rejected(monkeypatch):
    _set(monkeypatch, "1", None)
    with pytest.raises(TypeError, match="FusedMoE.*BlockWiseFP8LinearMethod"):
        BlockWiseFP8Config().get_quant_method(paddle.nn.Linear(4, 4))


def test_quant_group_size_32_is_the_1x32_recipe(monkeypatch):
    """#7666's 1x32 groups: a config value of their own (upstream sets layer.quant_group_size), BF16 checkpoints only;
    weight_block_size [1, 32] is refused with a pointer to it; a method that does not state 32 is never handed it."""
    cfg = BlockWiseFP8Config(is_checkpoint_bf16=True, quant_group_size=32)
    assert cfg.quant_group_size == 32 and "quant_group_size=32" in repr(cfg)
    assert BlockWiseFP8Config().quant_group_size == 128
    assert BlockWiseFP8Config.from_config({"quant_group_size": 32}).quant_group_size == 32
    with pytest.raises(ValueError, match=r"weight_block_size: .* got \[1, 32\] \(1x32 groups are quant_group_size=32"):
        BlockWiseFP8Config(weight_block_size=[1, 32])
    with pytest.raises(ValueError, match="quant_group_size: 32 needs a BF16 checkpoint"):
        BlockWiseFP8Config(is_checkpoint_bf16=False, quant_group_size=32)
    for bad in (64, True, "32"):
        with pytest.raises(ValueError, match=r"quant_group_size: expected one of 128, 32"):
            BlockWiseFP8Config(is_checkpoint_bf16=True, quant_group_size=bad)
    _set(monkeypatch, "1", None)
    from backend.moe.blackwell_method import BlackwellGemmFusedMoeMethod
    layer = _layer()
    if 32 not in getattr(BlackwellGemmFusedMoeMethod, "QUANT_GROUP_SIZES", (128,)):
        with pytest.raises(NotImplementedError, match="quant_group_size: BlackwellGemmFusedMoeMethod runs 128, got 32"):
            cfg.get_quant_method(layer)
    monkeypatch.setattr(BlackwellGemmFusedMoeMethod, "QUANT_GROUP_SIZES", (128, 32), raising=False)
    assert isinstance(cfg.get_quant_method(layer), BlackwellGemmFusedMoeMethod)
