"""The strict fakes of upstream's op packages (tests/fakes, docs/upstream.md) accept upstream's calls and
reject a wrong module, arity, argument order or dtype - so that tests run against them catch what the real
packages would reject on an SM100 machine."""
import sys

import numpy as np
import paddle
import pytest

from backend.ops import get_provider
from fakes import FD_OPS, install_fakes
from moe_ref.fp8 import pack_scale_ue8m0, to_mn_major_tma_aligned
from moe_ref.quant import per_block_quant, per_token_group_quant

E, M, N, K = 2, 8, 256, 256


def _fp8(shape, seed):
    rng = np.random.default_rng(seed)
    q, s = per_token_group_quant(paddle.to_tensor(rng.standard_normal(shape).astype(np.float32)), use_ue8m0=True)
    return q, s


def _gemm_operands(bw):
    """A valid develop/#7053 GEMM call: a [E·M, K], weights [E, N, K] with per-row MN-major packed scales."""
    a, sa = _fp8([E * M, K], 0)
    rng = np.random.default_rng(1)
    w = paddle.to_tensor(rng.standard_normal([E, N, K]).astype(np.float32))
    wq, ws = per_block_quant(w, use_ue8m0=True)                                  # ws [E, N/128, K/128]
    rows = ws.repeat_interleave(128, axis=1)                                     # per row, SPEC §3
    sfb = bw.unpack_and_convert_scale(to_mn_major_tma_aligned(pack_scale_ue8m0(rows)).logical_view(), None)
    counts = paddle.to_tensor([5, 3], dtype=paddle.int32)
    words = pack_scale_ue8m0(sa).reshape([E, M, -1])
    sfa = bw.unpack_and_convert_scale(to_mn_major_tma_aligned(words).logical_view(), counts)
    out = paddle.zeros([E * M, N], dtype=paddle.bfloat16)
    return a, wq, sfa, sfb, counts, out


def test_ops_live_where_upstream_takes_them():
    with install_fakes("develop"):
        import blackwell_ops
        from fastdeploy.model_executor.ops.gpu import depermute_prefill_combine  # noqa: F401
        with pytest.raises(AttributeError, match="upstream takes it from fastdeploy.model_executor.ops.gpu"):
            blackwell_ops.per_token_quant
        with pytest.raises(AttributeError, match="upstream takes it from blackwell_ops"):
            sys.modules[FD_OPS].group_gemm_masked
        assert callable(blackwell_ops.fused_mask_swiglu_fp8_quant_blackwell)
    with install_fakes("7053"):
        import blackwell_ops
        with pytest.raises(AttributeError, match="not in the 7053 generation"):
            blackwell_ops.prefill_permute_to_blackwell_masked_gemm
    assert "blackwell_ops" not in sys.modules and FD_OPS not in sys.modules


@pytest.mark.parametrize("generation,extra", [("7053", ()), ("develop", ("w8a8",))])
def test_group_gemm_masked_arity_is_the_generations(generation, extra):
    with install_fakes(generation) as log:
        import blackwell_ops as bw
        a, b, sfa, sfb, counts, out = _gemm_operands(bw)
        res = bw.group_gemm_masked(a, b, sfa, sfb, counts, out, None, M, -1, *extra)
        want = get_provider("paddle").group_gemm_masked(a, b, sfa, sfb, counts, paddle.zeros_like(out), None, M, -1)
        np.testing.assert_array_equal(res.astype(paddle.float32).numpy(), want.astype(paddle.float32).numpy())
        assert res is out                                                         # written in place
        other = () if extra else ("w8a8",)
        with pytest.raises(TypeError):
            bw.group_gemm_masked(a, b, sfa, sfb, counts, out, None, M, -1, *other)
        assert log.ops()[-1] == "blackwell_ops.group_gemm_masked"


def test_group_gemm_masked_rejects_order_dtype_and_recipe():
    with install_fakes("develop"):
        import blackwell_ops as bw
        a, b, sfa, sfb, counts, out = _gemm_operands(bw)
        out3 = paddle.zeros([E, M, N], dtype=paddle.bfloat16)
        bw.group_gemm_masked(a, b, sfa, sfb, counts, out3, None, M, -1, "w8a8")   # [E, M, N] out as #7053/ht
        with pytest.raises(ValueError, match="a expected rank 2"):
            bw.group_gemm_masked(b, a, sfa, sfb, counts, out, None, M, -1, "w8a8")
        with pytest.raises(TypeError, match="masked_m"):
            bw.group_gemm_masked(a, b, sfa, sfb, out, counts, None, M, -1, "w8a8")
        with pytest.raises(ValueError, match="sfb expected"):
            bw.group_gemm_masked(a, b, sfb, sfa, counts, out, None, M, -1, "w8a8")
        with pytest.raises(TypeError, match="sfa expected dtype in \\(uint8\\)"):
            bw.group_gemm_masked(a, b, sfa.astype(paddle.int32), sfb, counts, out, None, M, -1, "w8a8")
        with pytest.raises(TypeError, match="masked_m"):
            bw.group_gemm_masked(a, b, sfa, sfb, counts.astype(paddle.int64), out, None, M, -1, "w8a8")
        with pytest.raises(ValueError, match="recipe"):
            bw.group_gemm_masked(a, b, sfa, sfb, counts, out, None, M, -1, "w4a8")
        with pytest.raises(TypeError):
            bw.group_gemm_masked(a, b, sfa, sfb, counts, out, None, M, -1, recipe="w8a8")


def test_unpack_and_convert_scale_wants_mn_major_int32():
    with install_fakes("develop"):
        import blackwell_ops as bw
        _, s = _fp8([E * M, K * 4], 3)
        words = pack_scale_ue8m0(s).reshape([E, M, -1])
        mn_major = to_mn_major_tma_aligned(words).logical_view()
        sf = bw.unpack_and_convert_scale(mn_major, None)
        assert sf.dtype == paddle.uint8 and list(sf.shape) == [E, 128, 32]        # C = ceil(8/4) words: 16·C
        with pytest.raises(ValueError, match="MN-major"):
            bw.unpack_and_convert_scale(words, None)
        with pytest.raises(TypeError, match="int32"):
            bw.unpack_and_convert_scale(mn_major.astype(paddle.float32), None)
        with pytest.raises(TypeError):
            bw.unpack_and_convert_scale(mn_major, masked_m=None)
        with pytest.raises(TypeError):
            bw.unpack_and_convert_scale(mn_major)


def test_fastdeploy_per_token_quant():
    with install_fakes("develop"):
        from fastdeploy.model_executor.ops.gpu import per_token_quant
        x = paddle.randn([6, 640]).astype(paddle.bfloat16)
        q, s = per_token_quant(x, 128, True)
        assert q.dtype == paddle.float8_e4m3fn and s.dtype == paddle.int32 and list(s.shape) == [6, 2]
        q, s = per_token_quant(input=x, block_size=128, use_ue8m0=False)
        assert s.dtype == paddle.float32 and list(s.shape) == [6, 5]
        with pytest.raises(TypeError, match="input expected dtype"):
            per_token_quant(x.astype(paddle.float32), 128, True)
        with pytest.raises(ValueError, match="block_size"):
            per_token_quant(x, 64, True)
        with pytest.raises(TypeError, match="use_ue8m0 expected bool"):
            per_token_quant(x, 128, 1)
        with pytest.raises(TypeError, match="block_size expected int"):
            per_token_quant(x, True, 128)
        with pytest.raises(TypeError):
            per_token_quant(x, 128)


def _routing(w, k_top, e, seed):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(e, size=k_top, replace=False) for _ in range(w)]).astype(np.int64)
    ids[rng.random(ids.shape) < 0.3] = -1
    return paddle.to_tensor(ids)


def test_fastdeploy_permute_and_combine():
    w, h, e, m = 12, 256, 8, 16
    with install_fakes("7053") as log:
        import fastdeploy.model_executor.ops.gpu as fd
        q, s = _fp8([w, h], 4)
        words = pack_scale_ue8m0(s)
        ids = _routing(w, 4, e, 5)
        px, ps, imap, counts = fd.prefill_permute_to_masked_gemm(q, words, ids, e, m)
        assert list(px.shape) == [e, m, h] and list(ps.shape) == [e, m, 1] and list(ps.strides) == [m, 1, m]
        assert imap.dtype == paddle.int32 and list(counts.shape) == [e, 1] and counts.dtype == paddle.int32
        with pytest.raises(TypeError, match="topk_ids expected dtype in \\(int64\\)"):
            fd.prefill_permute_to_masked_gemm(q, words, ids.astype(paddle.int32), e, m)
        with pytest.raises(ValueError, match="K_top"):
            fd.prefill_permute_to_masked_gemm(q, words, _routing(w, 6, e, 6), e, m)
        with pytest.raises(TypeError, match="scale expected dtype"):
            fd.prefill_permute_to_masked_gemm(q, ids, words, e, m)
        ffn = paddle.randn([e, m, h]).astype(paddle.bfloat16)
        weights = paddle.rand([w, 4], dtype=paddle.float32)
        out = fd.depermute_prefill_combine(ffn, imap, weights, w)
        want = get_provider("paddle").depermute_prefill_combine(ffn, imap, weights, w)
        np.testing.assert_array_equal(out.astype(paddle.float32).numpy(), want.astype(paddle.float32).numpy())
        with pytest.raises(TypeError, match="indice_map expected dtype in \\(int32\\)"):
            fd.depermute_prefill_combine(ffn, imap.astype(paddle.int64), weights, w)
        with pytest.raises(TypeError, match="topk_weights"):
            fd.depermute_prefill_combine(ffn, imap, weights.astype(paddle.bfloat16), w)
        with pytest.raises(ValueError, match="K_top"):
            fd.depermute_prefill_combine(ffn, imap[:, :2], weights[:, :2], w)
        with pytest.raises(ValueError, match="x expected rank 3"):
            fd.depermute_prefill_combine(ffn.reshape([e * m, h]), imap, weights, w)
        assert log[0].op == "prefill_permute_to_masked_gemm"
        assert log[0].args[:3] == ("float8_e4m3fn[12, 256]", "int32[12, 1]", "int64[12, 4]")


def test_fastdeploy_fused_mask_swiglu_fp8_quant():
    with install_fakes("7053"):
        from fastdeploy.model_executor.ops.gpu import fused_mask_swiglu_fp8_quant
        up = paddle.randn([E, 6, 2 * 512]).astype(paddle.bfloat16)
        counts = paddle.to_tensor([[6], [2]], dtype=paddle.int32)
        act, scale = fused_mask_swiglu_fp8_quant(up, counts, 128, use_ue8m0=True)
        assert list(act.shape) == [E, 6, 512] and scale.dtype == paddle.int32
        assert list(scale.shape) == [E, 6, 1] and list(scale.strides) == [8, 1, 8]     # M padded to 4
        act, scale = fused_mask_swiglu_fp8_quant(up, counts, 128)
        assert scale.dtype == paddle.float32 and list(scale.strides) == [4 * 6, 1, 6]  # M unpadded
        with pytest.raises(ValueError, match="input expected rank 3"):
            fused_mask_swiglu_fp8_quant(up.reshape([E * 6, -1]), counts, 128, use_ue8m0=True)
        with pytest.raises(TypeError, match="token_nums_per_expert"):
            fused_mask_swiglu_fp8_quant(up, counts.astype(paddle.int64), 128, use_ue8m0=True)
        with pytest.raises(TypeError):
            fused_mask_swiglu_fp8_quant(up, counts, 128, True, 1e-10)


def test_develop_fused_ops():
    w, h, e, m = 10, 512, 4, 8
    with install_fakes("develop") as log:
        import blackwell_ops as bw
        q, s = _fp8([w, h], 7)
        words = pack_scale_ue8m0(s)
        ids = _routing(w, 4, e, 8)
        px, sfa, imap, counts = bw.prefill_permute_to_blackwell_masked_gemm(q, words, ids, e, m)
        assert list(px.shape) == [e * m, h] and sfa.dtype == paddle.uint8 and list(sfa.shape) == [e, 128, 16]
        with pytest.raises(TypeError, match="topk_ids expected dtype in \\(int64\\)"):
            bw.prefill_permute_to_blackwell_masked_gemm(q, words, ids.astype(paddle.int32), e, m)
        with pytest.raises(TypeError, match="scale expected dtype"):
            bw.prefill_permute_to_blackwell_masked_gemm(q, s, ids, e, m)          # fp32 scales: not this op's
        with pytest.raises(TypeError):
            bw.prefill_permute_to_blackwell_masked_gemm(q, words, ids, num_local_experts=e, max_token_num=m)
        up = paddle.randn([e * m, 2 * 256]).astype(paddle.bfloat16)
        act, sf = bw.fused_mask_swiglu_fp8_quant_blackwell(up, counts)
        assert list(act.shape) == [e * m, 256] and list(sf.shape) == [e, 128, 16]
        with pytest.raises(ValueError, match="up expected rank 2"):
            bw.fused_mask_swiglu_fp8_quant_blackwell(up.reshape([e, m, -1]), counts)
        with pytest.raises(TypeError):
            bw.fused_mask_swiglu_fp8_quant_blackwell(up, counts, 128)
        assert log.ops()[:2] == ["blackwell_ops.prefill_permute_to_blackwell_masked_gemm"] * 2


def test_7666_group_wise_quant_and_1x32_path():
    e, m, i, h = 2, 8, 128, 256
    with install_fakes("7666") as log:
        import blackwell_ops as bw
        x = paddle.randn([12, h]).astype(paddle.bfloat16)
        q, sf = bw.group_wise_quant(x, False, False)
        assert q.dtype == paddle.float8_e4m3fn and sf.dtype == paddle.uint8 and list(sf.shape) == [12, h // 32]
        w = paddle.randn([2 * i, h]).astype(paddle.bfloat16)
        wq, wsf = bw.group_wise_quant(w, False, True)
        assert list(wsf.shape) == [2 * i, h // 32]
        with pytest.raises(ValueError, match="flag"):
            bw.group_wise_quant(x, True, False)
        with pytest.raises(TypeError, match="x expected dtype"):
            bw.group_wise_quant(x.astype(paddle.float32), False, False)
        with pytest.raises(TypeError):
            bw.group_wise_quant(x, False)
        ids = _routing(12, 4, e * 2, 9)
        px, sfa, imap, counts = bw.prefill_permute_to_blackwell_masked_gemm(q, sf, ids, e * 2, 2 * m)
        assert sfa.dtype == paddle.uint8 and list(sfa.shape) == [e * 2, 128, h // 32]
        up = paddle.randn([e * m, 2 * i]).astype(paddle.bfloat16)
        act, asf = bw.fused_mask_swiglu_fp8_quant_blackwell(up, paddle.to_tensor([m, 3], dtype=paddle.int32))
        assert list(asf.shape) == [e, 128, i // 32]
        assert log.ops()[0] == "blackwell_ops.group_wise_quant"


# ------------------------------------------------------------------ upstream's call sequences replayed on the fakes

def _recv_tokens(w, h, e, k_top, seed):
    """What DeepEP's normal dispatch hands the rank: fp8 rows, packed UE8M0 int32 scales, local ids (-1 elsewhere)."""
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor(rng.standard_normal((w, h)).astype(np.float32))
    q, s = per_token_group_quant(x, use_ue8m0=True)
    ids = _routing(w, k_top, e, seed + 1)
    weights = paddle.to_tensor(rng.random((w, k_top)).astype(np.float32))
    return x, q, pack_scale_ue8m0(s), ids, weights


def _load_weights(mw):
    from fakes.upstream_paths import load_weights_128
    return (*load_weights_128(mw.w_up), *load_weights_128(mw.w_down))


def test_ht_replays_call_what_each_generation_calls_and_agree():
    from fakes.upstream_paths import EXPECTED, ht_7053, ht_develop
    from moe_ref.metrics import calc_diff
    from moe_ref.moe import make_moe_weights, moe_forward_oracle
    w, h, i, e, m = 24, 256, 128, 6, 32
    mw = make_moe_weights(e, h, i, seed=2)
    x, q, words, ids, topk_weights = _recv_tokens(w, h, e, 4, seed=3)
    outs = {}
    for gen, replay in (("7053", ht_7053), ("develop", ht_develop)):
        with install_fakes(gen) as log:
            outs[gen] = replay(q, words, ids.astype(paddle.int32), topk_weights, _load_weights(mw), e, m)
            assert log.ops() == EXPECTED[(gen, "ht")]
    np.testing.assert_array_equal(outs["7053"].astype(paddle.float32).numpy(),
                                  outs["develop"].astype(paddle.float32).numpy())
    oracle = moe_forward_oracle(x, mw.w_up.astype(paddle.float32), mw.w_down.astype(paddle.float32), topk_weights, ids)
    # two FP8 GEMMs with UE8M0 scales and an FP8 requantization: DeepGEMM accepts 1e-3 for one GEMM (SPEC §12)
    assert calc_diff(outs["develop"], oracle) < 5e-3


def test_ll_replay_calls_what_develop_calls():
    from fakes.upstream_paths import EXPECTED, ll_develop
    from moe_ref.metrics import calc_diff
    from moe_ref.moe import make_moe_weights, moe_forward_oracle
    h, i, e, m = 256, 128, 3, 16
    mw = make_moe_weights(e, h, i, seed=4)
    rng = np.random.default_rng(5)
    x = paddle.to_tensor(rng.standard_normal((e * m, h)).astype(np.float32))
    q, s = per_token_group_quant(x, use_ue8m0=True)
    packed_scale = to_mn_major_tma_aligned(pack_scale_ue8m0(s).reshape([e, m, -1])).logical_view()
    counts = paddle.to_tensor([16, 5, 0], dtype=paddle.int32)
    with install_fakes("develop") as log:
        out = ll_develop(q.reshape([e, m, h]), packed_scale, counts, _load_weights(mw))
        assert log.ops() == EXPECTED[("develop", "ll")]
    for ex, c in enumerate(counts.numpy()):
        if c:
            rows = x.reshape([e, m, h])[ex, :c]
            ones = paddle.ones([int(c), 1], dtype=paddle.float32)
            ref = moe_forward_oracle(rows, mw.w_up[ex:ex + 1].astype(paddle.float32),
                                     mw.w_down[ex:ex + 1].astype(paddle.float32), ones,
                                     paddle.zeros([int(c), 1], dtype=paddle.int64))
            assert calc_diff(out[ex, :c], ref) < 5e-3          # as the ht replay: FP8 vs float oracle
