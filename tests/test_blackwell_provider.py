"""The blackwell_ops provider against the strict fakes of upstream's packages (tests/fakes, docs/upstream.md):
with FD_MOE_OPS_PROVIDER=blackwell_ops every contract op reaches the module upstream takes it from, with the
arity, argument order and dtypes of the installed generation (the fakes reject anything else), and the
generation is detected from the package or set by FD_BLACKWELL_OPS_GENERATION."""
import numpy as np
import paddle
import pytest

import backend.ops as ops
from backend.ops import blackwell_provider, contract
from fakes import FD_OPS, install_fakes
from fakes.gpu import fake_paddle_gpu
from moe_ref.fp8 import pack_scale_ue8m0, to_mn_major_tma_aligned
from moe_ref.quant import per_block_quant, per_token_group_quant

BW = "blackwell_ops"
GEN_ENV = "FD_BLACKWELL_OPS_GENERATION"
E, M, H, I, W, K_TOP = 2, 8, 256, 128, 6, 4


@pytest.fixture(autouse=True)
def blackwell_selected(monkeypatch):
    """FD_MOE_OPS_PROVIDER=blackwell_ops on a fake SM100 GPU; the generation detected unless a test sets it."""
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", "blackwell_ops")
    monkeypatch.delenv(GEN_ENV, raising=False)
    fake_paddle_gpu(monkeypatch, (10, 0))
    ops.reset_provider_cache()
    yield
    ops.reset_provider_cache()


def _tokens(seed=0):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((W, H)).astype(np.float32))
    q, s = per_token_group_quant(x, use_ue8m0=True)
    ids = np.stack([rng.choice(E, size=2, replace=False) for _ in range(W)]).astype(np.int32)
    ids = np.concatenate([ids, np.full((W, K_TOP - 2), -1, np.int32)], axis=1)       # K_top 4, two routed
    weights = paddle.to_tensor(rng.random((W, K_TOP)).astype(np.float32))
    return x, q, pack_scale_ue8m0(s), paddle.to_tensor(ids), weights


def _weights(n, k, seed):
    """A weight [E, N, K] as upstream loads it: fp8, and CUTLASS bytes from contiguous per-row packed scales
    (the provider makes them MN-major, as upstream passes them)."""
    w = paddle.to_tensor(np.random.default_rng(seed).standard_normal((E, n, k)).astype(np.float32))
    q, s = per_block_quant(w, use_ue8m0=True)
    return q, ops.unpack_and_convert_scale(pack_scale_ue8m0(s.repeat_interleave(128, axis=1)))


def _ht_7053(q, words, ids, weights):
    """#7053's expert sequence through the contract (FD permute, conversions, 9-argument GEMMs, FD combine)."""
    up_q, up_sf = _weights(2 * I, H, 1)
    down_q, down_sf = _weights(H, I, 2)
    px, ps, imap, counts = ops.prefill_permute_to_masked_gemm(q, words, ids, E, M)
    up = paddle.zeros([E * M, 2 * I], dtype=paddle.bfloat16)
    ops.group_gemm_masked(px.reshape([E * M, H]), up_q, ops.unpack_and_convert_scale(ps, counts), up_sf, counts, up,
                          None, M)
    act, act_s = ops.fused_mask_swiglu_fp8_quant(up.reshape([E, M, 2 * I]), counts)
    ffn = paddle.zeros([E * M, H], dtype=paddle.bfloat16)
    ops.group_gemm_masked(act.reshape([E * M, I]), down_q, ops.unpack_and_convert_scale(act_s, counts), down_sf,
                          counts, ffn, None, M)
    return ops.depermute_prefill_combine(ffn.reshape([E, M, H]), imap, weights, W)


def _ht_develop(q, words, ids, weights):
    """develop's expert sequence through the contract (fused Blackwell permute and SwiGLU, GEMMs with "w8a8")."""
    up_q, up_sf = _weights(2 * I, H, 1)
    down_q, down_sf = _weights(H, I, 2)
    px, sfa, imap, counts = ops.prefill_permute_to_blackwell_masked_gemm(q, words, ids, E, M)
    up = paddle.zeros([E * M, 2 * I], dtype=paddle.bfloat16)
    ops.group_gemm_masked(px, up_q, sfa, up_sf, counts, up, None, M, -1, "w8a8")
    act, act_sf = ops.fused_mask_swiglu_fp8_quant_blackwell(up, counts)
    ffn = paddle.zeros([E * M, H], dtype=paddle.bfloat16)
    ops.group_gemm_masked(act, down_q, act_sf, down_sf, counts, ffn, None, M, -1, "w8a8")
    return ops.depermute_prefill_combine(ffn.reshape([E, M, H]), imap, weights, W)


EXPECTED = {
    "7053": [f"{BW}.unpack_and_convert_scale"] * 2 + [
        f"{FD_OPS}.prefill_permute_to_masked_gemm", f"{BW}.unpack_and_convert_scale", f"{BW}.group_gemm_masked",
        f"{FD_OPS}.fused_mask_swiglu_fp8_quant", f"{BW}.unpack_and_convert_scale", f"{BW}.group_gemm_masked",
        f"{FD_OPS}.depermute_prefill_combine"],
    "develop": [f"{BW}.unpack_and_convert_scale"] * 2 + [
        f"{BW}.prefill_permute_to_blackwell_masked_gemm", f"{BW}.group_gemm_masked",
        f"{BW}.fused_mask_swiglu_fp8_quant_blackwell", f"{BW}.group_gemm_masked", f"{FD_OPS}.depermute_prefill_combine"],
}


@pytest.mark.parametrize("generation", ["7053", "develop"])
def test_ht_sequence_reaches_the_right_modules_with_the_right_arity(generation):
    """int32 ids (the fakes' permutes take int64 only), contiguous weight scales (the fake's unpack takes MN-major
    only), [E] counts, 9- or 10-argument GEMMs: the provider's casts and the generation make every call pass."""
    x, q, words, ids, weights = _tokens()
    replay = _ht_develop if generation == "develop" else _ht_7053
    with install_fakes(generation) as log:
        assert blackwell_provider.generation() == generation == ops.ops_generation()
        assert ops.ops_generation("paddle") == "develop"
        out = replay(q, words, ids, weights)
        assert log.ops() == EXPECTED[generation]
        gemms = [c.args for c in log if c.op == "group_gemm_masked"]
        assert all(len(a) == (10 if generation == "develop" else 9) for a in gemms)
        assert all(a[-1] == "'w8a8'" for a in gemms) or generation == "7053"
        permute = log[2].args
        assert permute[2] == f"int64[{W}, {K_TOP}]"
        combine = log[-1].args
        assert combine[1] == f"int32[{W}, {K_TOP}]" and combine[2] == f"float32[{W}, {K_TOP}]"
        assert ops.get_provider().name == "blackwell_ops"
    # the two generations compute the same bytes (the develop ops are #7053's permute / SwiGLU + conversion)
    ops.reset_provider_cache()
    with install_fakes("7053" if generation == "develop" else "develop"):
        other = (_ht_7053 if generation == "develop" else _ht_develop)(q, words, ids, weights)
    np.testing.assert_array_equal(out.astype(paddle.float32).numpy(), other.astype(paddle.float32).numpy())


@pytest.mark.parametrize("recipe", [None, "w8a8"])
@pytest.mark.parametrize("generation", ["7053", "develop"])
def test_gemm_gets_the_arity_of_the_generation_whatever_the_caller_passes(generation, recipe):
    with install_fakes(generation) as log:
        a = paddle.zeros([E * M, H], dtype=paddle.float8_e4m3fn)
        b, sfb = _weights(128, H, 3)
        sfa = paddle.full([E, 128, 8], 127, dtype=paddle.uint8)
        out = paddle.zeros([E * M, 128], dtype=paddle.bfloat16)
        counts = paddle.to_tensor([[3], [0]], dtype=paddle.int64)                  # normalized to [E] int32
        assert ops.group_gemm_masked(a, b, sfa, sfb, counts, out, None, M, -1, recipe) is out
        args = log[-1].args
        assert args[4] == f"int32[{E}]" and len(args) == (10 if generation == "develop" else 9)


@pytest.mark.parametrize("installed, chosen", [("7053", "develop"), ("develop", "7053")])
def test_gemm_signature_mismatch_names_both_signatures(monkeypatch, installed, chosen):
    monkeypatch.setenv(GEN_ENV, chosen)
    with install_fakes(installed):
        assert blackwell_provider.generation() == chosen
        a = paddle.zeros([E * M, H], dtype=paddle.float8_e4m3fn)
        b, sfb = _weights(128, H, 3)
        sfa = paddle.full([E, 128, 8], 127, dtype=paddle.uint8)
        out = paddle.zeros([E * M, 128], dtype=paddle.bfloat16)
        with pytest.raises(TypeError, match=rf"generation {chosen} \(set by {GEN_ENV}\).*#7053's signature is "
                                            r"group_gemm_masked\(a, .*sm_count\), develop's .*sm_count, \"w8a8\"\)"):
            ops.group_gemm_masked(a, b, sfa, sfb, paddle.to_tensor([1, 0], dtype=paddle.int32), out, None, M)


def test_generation_variable_is_validated(monkeypatch):
    monkeypatch.setenv(GEN_ENV, "7374")
    with install_fakes("develop"), pytest.raises(ValueError, match=rf"{GEN_ENV}: expected one of auto, 7053, develop"):
        blackwell_provider.generation()
    monkeypatch.setenv(GEN_ENV, " Develop ")
    with install_fakes("7053"):
        assert blackwell_provider.generation() == "develop"


def test_fused_ops_are_rejected_on_the_7053_generation():
    _, q, words, ids, _ = _tokens()
    with install_fakes("7053") as log:
        with pytest.raises(RuntimeError, match=r"prefill_permute_to_blackwell_masked_gemm: not in blackwell_ops of "
                                               r"generation 7053 \(detected: the installed blackwell_ops has no "
                                               r"prefill_permute_to_blackwell_masked_gemm\); FastDeploy #7053 runs"):
            ops.prefill_permute_to_blackwell_masked_gemm(q, words, ids, E, M)
        up = paddle.zeros([E * M, 2 * I], dtype=paddle.bfloat16)
        with pytest.raises(RuntimeError, match="fused_mask_swiglu_fp8_quant_blackwell: not in blackwell_ops of "
                                               "generation 7053"):
            ops.fused_mask_swiglu_fp8_quant_blackwell(up, paddle.to_tensor([1, 2], dtype=paddle.int32))
        with pytest.raises(RuntimeError, match=r"group_wise_quant: the installed blackwell_ops has no group_wise_quant "
                                               r"\(upstream calls it from FastDeploy #7666"):
            ops.group_wise_quant(up)
        assert log.ops() == []


def test_group_wise_quant_on_the_7666_package_per_expert():
    """#7666's group_wise_quant takes one [N, K] matrix: [E, N, K] weights go expert by expert, as upstream."""
    w = paddle.to_tensor(np.random.default_rng(4).standard_normal((E, 128, H)).astype(np.float32))
    want = ops.get_provider("paddle").group_wise_quant(w.astype(paddle.bfloat16), False, True)
    with install_fakes("7666") as log:
        q, sf = ops.group_wise_quant(w.astype(paddle.bfloat16), False, True)
        assert log.ops() == [f"{BW}.group_wise_quant"] * E and log[0].args == (f"bfloat16[128, {H}]", "False", "True")
        with pytest.raises(TypeError, match="x: blackwell_ops.group_wise_quant takes bf16"):
            ops.group_wise_quant(w)
    np.testing.assert_array_equal(q.view(paddle.uint8).numpy(), want[0].view(paddle.uint8).numpy())
    np.testing.assert_array_equal(sf.numpy(), want[1].numpy())


@pytest.mark.parametrize("call, exc, pattern", [
    (lambda q, words, ids, ffn, imap, tw: ops.depermute_prefill_combine(ffn, imap[:, :2], tw[:, :2], W), ValueError,
     r"^indice_map: fastdeploy.model_executor.ops.gpu.depermute_prefill_combine takes K_top in \(4, 6, 8\), got K_top = 2"),
    (lambda q, words, ids, ffn, imap, tw: ops.depermute_prefill_combine(ffn.astype(paddle.float32), imap, tw, W),
     TypeError, r"^ffn_out: .*expected bf16, got float32"),
    (lambda q, words, ids, ffn, imap, tw: ops.prefill_permute_to_masked_gemm(q, words, ids[:, :2], E, M), ValueError,
     r"^topk_ids: fastdeploy.model_executor.ops.gpu.prefill_permute_to_masked_gemm takes K_top in \(4, 8\)"),
    (lambda q, words, ids, ffn, imap, tw: ops.per_token_quant(paddle.ones([2, 128])), TypeError,
     r"^x: fastdeploy.model_executor.ops.gpu.per_token_quant takes bf16 \| fp16, got float32"),
    (lambda q, words, ids, ffn, imap, tw: ops.per_token_quant(paddle.ones([2, 128], dtype=paddle.bfloat16), 64),
     ValueError, r"^block_size: .* expected 128, got 64"),
    (lambda q, words, ids, ffn, imap, tw: ops.fused_mask_swiglu_fp8_quant(
        paddle.zeros([E, M, 2 * 192], dtype=paddle.bfloat16), paddle.to_tensor([1, 1], dtype=paddle.int32)),
     ValueError, r"^block_size: .* got block_size 128, I = 192"),
])
def test_fastdeploy_limits_are_clear_errors(call, exc, pattern):
    _, q, words, ids, tw = _tokens()
    ffn = paddle.zeros([E, M, H], dtype=paddle.bfloat16)
    imap = paddle.to_tensor(np.where(ids.numpy() >= 0, 0, -1).astype(np.int32))
    with install_fakes("develop") as log:
        with pytest.raises(exc, match=pattern):
            call(q, words, ids, ffn, imap, tw)
        assert log.ops() == []                       # refused before the package is called


def test_available_only_with_both_packages():
    with install_fakes("develop", fastdeploy_ops=False):
        ok, reason = blackwell_provider.is_available()
        assert not ok and "fastdeploy.model_executor.ops.gpu package cannot be imported" in reason
    with install_fakes("develop"):
        assert blackwell_provider.is_available() == (True, "blackwell_ops on a GPU with compute capability 10.0")


def test_every_contract_op_has_a_home():
    """The op-to-package map is the contract's: each op of a package is the provider's call into that package."""
    homes = {row.name: row.package for row in contract.OPS}
    assert {n for n, p in homes.items() if p == FD_OPS} == {
        "per_token_quant", "prefill_permute_to_masked_gemm", "fused_mask_swiglu_fp8_quant", "depermute_prefill_combine"}
    assert {n for n, p in homes.items() if p == BW} == {
        "group_gemm_masked", "unpack_and_convert_scale", "prefill_permute_to_blackwell_masked_gemm",
        "fused_mask_swiglu_fp8_quant_blackwell", "group_wise_quant"}
    assert homes["cutlass_scale_to_fp32"] is None


def test_ll_sequence_of_develop():
    """develop's decode path: DeepEP's MN-major packed scales -> unpack_and_convert_scale -> GEMM -> fused SwiGLU -> GEMM."""
    rng = np.random.default_rng(6)
    x = paddle.to_tensor(rng.standard_normal((E * M, H)).astype(np.float32))
    q, s = per_token_group_quant(x, use_ue8m0=True)
    packed = to_mn_major_tma_aligned(pack_scale_ue8m0(s).reshape([E, M, -1])).logical_view()
    counts = paddle.to_tensor([M, 3], dtype=paddle.int32)
    with install_fakes("develop") as log:
        up_q, up_sf = _weights(2 * I, H, 1)
        down_q, down_sf = _weights(H, I, 2)
        up = paddle.zeros([E * M, 2 * I], dtype=paddle.bfloat16)
        ops.group_gemm_masked(q, up_q, ops.unpack_and_convert_scale(packed, counts), up_sf, counts, up, None, M)
        act, sf = ops.fused_mask_swiglu_fp8_quant_blackwell(up, counts)
        ffn = paddle.zeros([E * M, H], dtype=paddle.bfloat16)
        ops.group_gemm_masked(act, down_q, sf, down_sf, counts, ffn, None, M)
        from fakes.upstream_paths import EXPECTED as UPSTREAM
        assert log.ops() == UPSTREAM[("develop", "ll")]
