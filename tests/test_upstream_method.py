"""The method's ht, ll and tp paths with FD_MOE_OPS_PROVIDER=blackwell_ops and the strict fakes of upstream's packages
(tests/fakes: wrong module, arity, argument order or dtype raises), per generation: the op log must be exactly what
upstream calls (`fakes.upstream_paths.EXPECTED`, docs/upstream.md §7.6), and the output the reference's.

Where ours differs from upstream, on purpose, the test says so:
- activations: upstream quantizes with Paddle's fp8_quant_blockwise (not an op of either package) unless
  FD_USE_PHI_FP8_QUANT=0, when it calls FastDeploy's per_token_quant before the dispatch (BW:651-654), as ours always
  does; on ll DeepEP quantizes inside its dispatch, our in-process runner with the same per_token_quant. So every
  log has one `per_token_quant` after the two weight conversions, where upstream's EXPECTED has none.
- tp: upstream runs DeepGEMM's contiguous GEMM there (no blackwell_ops op at any generation, BW:1040-1170); ours runs
  the ht chain of the generation with M = T.
- ll at #7053: upstream runs DeepGEMM's masked GEMM (no EXPECTED entry); ours #7053's chain (FD SwiGLU quant and
  conversions, nine-argument GEMMs).
"""
import pytest

import backend.ops as ops
from backend.moe.ep_runner import SingleRankEPRunner
from backend.moe.layer import FusedMoE
from backend.quantization import BlockWiseFP8Config
from fakes import FD_OPS, install_fakes
from fakes.gpu import fake_paddle_gpu
from fakes.upstream_paths import EXPECTED
from moe_ref import moe
from moe_ref.metrics import calc_diff, max_abs_diff

BW = "blackwell_ops"
E, H, I, K_TOP, T = 4, 256, 128, 4, 12
QUANT = [f"{FD_OPS}.per_token_quant"]
WEIGHTS = [f"{BW}.unpack_and_convert_scale"] * 2
LL_7053 = WEIGHTS + QUANT + [f"{BW}.unpack_and_convert_scale", f"{BW}.group_gemm_masked",
                             f"{FD_OPS}.fused_mask_swiglu_fp8_quant", f"{BW}.unpack_and_convert_scale",
                             f"{BW}.group_gemm_masked"]


@pytest.fixture(autouse=True)
def blackwell_selected(monkeypatch):
    """FD_USE_BLACKWELL_GEMM=1, FD_MOE_OPS_PROVIDER=blackwell_ops on a fake SM100 GPU, generation detected."""
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", "blackwell_ops")
    monkeypatch.delenv("FD_BLACKWELL_OPS_GENERATION", raising=False)
    fake_paddle_gpu(monkeypatch, (10, 0))
    ops.reset_provider_cache()
    yield
    ops.reset_provider_cache()


def expected_log(gen, path):
    """Upstream's log (weights, then the experts), with our activation quantization inserted after the weights."""
    if (gen, path) == ("7053", "ll"):
        return LL_7053
    ups = EXPECTED[(gen, "ht" if path == "tp" else path)]
    return ups[:2] + QUANT + ups[2:]


@pytest.mark.parametrize("path", ["ht", "ll", "tp"])
@pytest.mark.parametrize("gen", ["7053", "develop"])
def test_paths_call_what_upstream_calls(gen, path):
    w = moe.make_moe_weights(E, H, I, seed=21)
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=22)
    phase = "decode" if path == "ll" else "prefill"
    with install_fakes(gen) as log:
        assert ops.get_provider().module.generation() == gen
        layer = FusedMoE(E, K_TOP, H, I, BlockWiseFP8Config(is_checkpoint_bf16=True), moe_phase=phase,
                         max_tokens_per_rank=T, num_max_dispatch_tokens_per_rank=T)
        layer.load_weights(w.w_up, w.w_down)
        runner = None if path == "tp" else SingleRankEPRunner(E)
        out = layer(x, topk=(tw, ti), runner=runner)
        ops_called = log.ops()
        recipes = [c.args[9:] for c in log if c.op == "group_gemm_masked"]
    assert layer.quant_method.last_path == path and layer.quant_method.last_provider_name == "blackwell_ops"
    assert ops_called == expected_log(gen, path)
    assert recipes == [("'w8a8'",) if gen == "develop" else ()] * 2     # the tenth argument, develop only
    ref = moe.moe_forward_fp8(x, w.w_up, w.w_down, tw, ti, use_ue8m0=True)
    assert calc_diff(out, ref) < 1e-6
    assert max_abs_diff(out, ref) == 0.0          # the fakes compute with the paddle provider: same bytes


def test_generation_switch_overrides_detection(monkeypatch):
    """FD_BLACKWELL_OPS_GENERATION=7053 with develop's package: the method runs #7053's chain (develop's package still
    has the FD ops and unpack_and_convert_scale), and the GEMM gets develop's ten arguments from the provider only if
    the package is develop's - here the 7053 switch makes the nine-argument call, which develop's fake refuses."""
    monkeypatch.setenv("FD_BLACKWELL_OPS_GENERATION", "7053")
    w = moe.make_moe_weights(E, H, I, seed=23)
    x, tw, ti = moe.make_moe_inputs(T, H, E, K_TOP, seed=24)
    with install_fakes("develop"):
        layer = FusedMoE(E, K_TOP, H, I, BlockWiseFP8Config(is_checkpoint_bf16=True))
        layer.load_weights(w.w_up, w.w_down)
        with pytest.raises(TypeError, match="group_gemm_masked rejected the 9-argument call of generation 7053"):
            layer(x, topk=(tw, ti))
