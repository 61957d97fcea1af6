"""The `deep_gemm` provider (backend/ops/deep_gemm_provider.py) against a strict fake DeepGEMM, on CPU.

The fake (tests/fakes/deep_gemm.py) checks DeepGEMM's host assertions (operand majors, scale dtypes, shapes
and MN-major TMA-aligned strides per architecture) and computes as the kernel does, whole 64-row tiles
included. The provider's output is compared with the `paddle` provider's on the same CUTLASS bytes; the real
DeepGEMM runs against the other kernels on the GPU machine (tests/test_gpu_providers.py).
"""
import sys

import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")

import backend.ops as ops  # noqa: E402
from backend.ops import deep_gemm_launch as DG  # noqa: E402
from backend.ops import deep_gemm_provider  # noqa: E402
from moe_ref import cutlass_sf  # noqa: E402
from moe_ref import fp8 as ref_fp8  # noqa: E402
from moe_ref.metrics import calc_diff  # noqa: E402
from moe_ref.quant import per_block_quant, per_token_group_quant  # noqa: E402
from fakes.deep_gemm import install_deep_gemm  # noqa: E402
from fakes.gpu import fake_paddle_gpu  # noqa: E402

BF16_ULP = 2.0 ** -7          # bf16 spacing relative to a value's leading power of two
FD_BUILD = deep_gemm_provider.FASTDEPLOY_BUILD


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    monkeypatch.delenv("FD_MOE_OPS_PROVIDER", raising=False)
    monkeypatch.setitem(sys.modules, "blackwell_ops", None)
    ops.reset_provider_cache()
    yield
    ops.reset_provider_cache()


def _no_builds(monkeypatch):
    for name in (deep_gemm_provider.TORCH_BUILD, FD_BUILD, deep_gemm_provider.PADDLEFLEET_BUILD):
        monkeypatch.setitem(sys.modules, name, None)           # `import name` raises ImportError


def _case(e=3, m=80, n=256, k=384, counts=(0, 57, 80), seed=1):
    rng = np.random.default_rng(seed)
    a, sa = per_token_group_quant(paddle.to_tensor(rng.standard_normal((e * m, k)).astype(np.float32) * 2), 128,
                                  use_ue8m0=True)
    b, sb = per_block_quant(paddle.to_tensor(rng.standard_normal((e, n, k)).astype(np.float32) * 0.5),
                            use_ue8m0=True)
    P = ops.get_provider("paddle")
    sfa = P.unpack_and_convert_scale(ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(sa)).reshape([e, m, -1]), None)
    rows_b = paddle.repeat_interleave(sb, 128, axis=1)[:, :n]
    sfb = P.unpack_and_convert_scale(ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(rows_b)), None)
    return dict(a=a, b=b, sfa=sfa, sfb=sfb, sb=sb, counts=list(counts), m=m, n=n, e=e, k=k,
                masked_m=paddle.to_tensor(np.array(counts, np.int32)))


def _gemm(provider, c, bias=None, **options):
    poison = paddle.full([c["e"] * c["m"], c["n"]], 7.0, dtype=paddle.bfloat16)
    out = provider.group_gemm_masked(c["a"], c["b"], c["sfa"], c["sfb"], c["masked_m"], poison, bias, c["m"],
                                     **options)
    return out.astype(paddle.float32).numpy().reshape(c["e"], c["m"], c["n"])


def _assert_matches_paddle(got, c, bias=None, **options):
    want = _gemm(ops.get_provider("paddle"), c, bias, **options)
    for ex, cnt in enumerate(c["counts"]):
        # same FP8 products, float32 sums in another order: at most one bf16 step apart after rounding
        np.testing.assert_allclose(got[ex, :cnt], want[ex, :cnt], rtol=BF16_ULP, atol=1e-2)
        assert np.all(got[ex, cnt:] == 7.0), "rows past masked_m must stay untouched"


@pytest.mark.parametrize("capability", [(9, 0), (10, 0)])
def test_unavailable_names_every_build_tried(monkeypatch, capability):
    fake_paddle_gpu(monkeypatch, capability)
    _no_builds(monkeypatch)
    ok, reason = deep_gemm_provider.is_available()
    assert not ok
    assert "tried deep_gemm: ModuleNotFoundError" in reason and f"{FD_BUILD}: ModuleNotFoundError" in reason
    assert ("paddlefleet.ops.deep_gemm" in reason) == (capability[0] >= 10)       # FastDeploy's SM100-only build
    with pytest.raises(RuntimeError, match="'deep_gemm' was requested but is not available: no DeepGEMM build"):
        ops.get_provider("deep_gemm")


@pytest.mark.parametrize("capability, needs", [(None, "no CUDA GPU visible to Paddle"),
                                               ((8, 0), "compute capability 8.0 found, DeepGEMM needs 9.x")])
def test_unavailable_without_a_hopper_or_blackwell_gpu(monkeypatch, capability, needs):
    fake_paddle_gpu(monkeypatch, capability)
    with install_deep_gemm("torch"):
        ok, reason = deep_gemm_provider.is_available()
    assert not ok and needs in reason


def test_auto_takes_deep_gemm_after_blackwell_ops(monkeypatch):
    fake_paddle_gpu(monkeypatch, (9, 0))
    assert ops.AUTO_ORDER == ("blackwell_ops", "deep_gemm", "triton", "paddle")
    with install_deep_gemm("torch"):
        assert ops.get_provider().name == "deep_gemm"
    ops.reset_provider_cache()
    _no_builds(monkeypatch)
    assert ops.get_provider().name != "deep_gemm"


@pytest.mark.parametrize("arch", [9, 10])
def test_group_gemm_masked_through_deep_gemm_torch_build(monkeypatch, arch):
    fake_paddle_gpu(monkeypatch, (arch, 0))
    c = _case()
    with install_deep_gemm("torch", arch) as dg:
        got = _gemm(ops.get_provider("deep_gemm"), c, sfb_per_block=True)
    assert ops.last_provider_name() == "deep_gemm"
    [(name, args)] = dg.calls
    assert name == "m_grouped_fp8_gemm_nt_masked" and args["expected_m"] == c["m"]
    assert args["disable_ue8m0_cast"] is (arch == 9)
    if arch == 9:      # fp32 1x128 MN-major activations, fp32 128x128 weights
        assert args["sfa"] == (torch.float32, (3, 80, 3), (3 * 80, 1, 80))
        assert args["sfb"] == (torch.float32, (3, 2, 3), (6, 3, 1))
    else:              # packed UE8M0, 1x128 for both, MN-major TMA-aligned
        assert args["sfa"] == (torch.int32, (3, 80, 1), (80, 1, 80))
        assert args["sfb"] == (torch.int32, (3, 256, 1), (256, 1, 256))
    _assert_matches_paddle(got, c, sfb_per_block=True)


def test_group_gemm_masked_through_fastdeploy_paddle_build(monkeypatch):
    fake_paddle_gpu(monkeypatch, (9, 0))
    monkeypatch.setitem(sys.modules, deep_gemm_provider.TORCH_BUILD, None)
    c = _case(counts=(80, 0, 13))
    with install_deep_gemm("paddle") as dg:
        got = _gemm(ops.get_provider("deep_gemm"), c, sfb_per_block=True)
    assert [name for name, _ in dg.calls] == ["m_grouped_gemm_fp8_fp8_bf16_nt_masked"]
    _assert_matches_paddle(got, c, sfb_per_block=True)


@pytest.mark.parametrize("arch, case", [(9, "bias"), (9, "per_row_weights"), (10, "bias"), (9, "per_32_bytes")])
def test_calls_deep_gemm_cannot_compute_go_to_the_next_provider(monkeypatch, arch, case):
    fake_paddle_gpu(monkeypatch, (arch, 0))
    c = _case()
    bias = paddle.to_tensor(np.linspace(-1, 1, c["e"] * c["n"], dtype=np.float32).reshape(c["e"], c["n"])) \
        if case == "bias" else None
    per_block = case != "per_row_weights"
    if case == "per_32_bytes":          # one byte of a 128-group differs: one scale per 128 K would be wrong
        raw = c["sfa"].numpy().copy()
        raw[1, 0, 1] += 1
        c["sfa"] = paddle.to_tensor(raw)
    assert deep_gemm_provider.next_provider().NAME == "paddle"          # no CUDA GPU for triton here
    with install_deep_gemm("torch", arch) as dg:
        got = _gemm(ops.get_provider("deep_gemm"), c, bias, sfb_per_block=per_block)
    assert dg.calls == []
    _assert_matches_paddle(got, c, bias, sfb_per_block=per_block)


@pytest.mark.parametrize("arch", [9, 10])
def test_stated_bytes_are_not_looked_at_and_expected_m_reaches_deep_gemm(monkeypatch, arch):
    """sfa_per_group and sfb_per_block stated by the caller: no byte check (no synchronization) before DeepGEMM,
    the same output; expected_m is DeepGEMM's expected_m (M without it). A false sfa_per_group (one 32-K chunk of
    expert 1's row 0 differs inside its 128-K group) reads the group's first byte: that row alone is wrong, as if
    the byte had not changed; without the promise the call goes to the next provider, right."""
    fake_paddle_gpu(monkeypatch, (arch, 0))
    c = _case()
    looks = []
    real = DG.bytes_repeat_per_group
    monkeypatch.setattr(DG, "bytes_repeat_per_group", lambda *a: looks.append(1) or real(*a))
    with install_deep_gemm("torch", arch) as dg:
        provider = ops.get_provider("deep_gemm")
        promised = _gemm(provider, c, sfb_per_block=True, sfa_per_group=True, expected_m=40)
        assert looks == [] and dg.calls[-1][1]["expected_m"] == 40
        checked = _gemm(provider, c, sfb_per_block=True)
        assert looks == [1] and dg.calls[-1][1]["expected_m"] == c["m"]
        np.testing.assert_array_equal(promised, checked)
        raw = cutlass_sf.unswizzle(c["sfa"]).numpy().copy()
        raw[1, 0, 1] += 1                                        # expert 1, row 0, K 32..63 (group 0)
        bad = dict(c, sfa=cutlass_sf.swizzle(paddle.to_tensor(raw)))
        got = _gemm(provider, bad, sfb_per_block=True, sfa_per_group=True)
        assert len(dg.calls) == 3
        honest = _gemm(provider, bad, sfb_per_block=True)
        assert len(dg.calls) == 3                                 # handed on: the bytes differ inside a group
    want = _gemm(ops.get_provider("paddle"), bad)
    np.testing.assert_array_equal(honest, want)                  # next provider: paddle here (no CUDA for triton)
    assert calc_diff(got[1, 0], want[1, 0]) > 1e-3
    np.testing.assert_array_equal(got[1, 0], checked[1, 0])
    keep = np.ones((c["e"], c["m"]), bool)
    keep[1, 0] = False
    np.testing.assert_array_equal(got[keep], checked[keep])


def test_other_ops_run_on_the_next_provider(monkeypatch):
    fake_paddle_gpu(monkeypatch, (9, 0))
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32))
    with install_deep_gemm("torch") as dg:
        q, s = ops.get_provider("deep_gemm").per_token_quant(x, 128, True)
    q_p, s_p = ops.get_provider("paddle").per_token_quant(x, 128, True)
    assert dg.calls == []
    np.testing.assert_array_equal(q.view(paddle.uint8).numpy(), q_p.view(paddle.uint8).numpy())
    np.testing.assert_array_equal(s.numpy(), s_p.numpy())


@pytest.mark.parametrize("arch", [9, 10])
def test_weight_scales_are_the_block_scales(arch):
    """weight_scales (what the method would keep from weight load) decodes the blocks' power-of-two scales."""
    c = _case(n=320)
    sfb = torch.from_numpy(c["sfb"].numpy())
    got = DG.weight_scales(sfb, c["n"], c["k"], arch)
    sb = torch.from_numpy(c["sb"].numpy())                                   # [E, ceil(N/128), K/128] fp32
    if arch == 9:
        assert got.dtype == torch.float32 and torch.equal(got, sb)
    else:
        exps = (torch.log2(sb).round().to(torch.int32) + 127).repeat_interleave(128, 1)[:, :c["n"]]
        as_bytes = torch.empty(got.shape, dtype=got.dtype).copy_(got).view(torch.uint8)     # row-major copy
        words = as_bytes.view(c["e"], c["n"], -1)[..., :exps.shape[-1]]
        assert got.dtype == torch.int32 and got.stride()[1] == 1 and torch.equal(words.to(torch.int32), exps)


@pytest.mark.parametrize("arch", [9, 10])
def test_prepared_weight_scales_are_made_once_and_used_as_given(monkeypatch, arch):
    # issue 11: weight scales converted once at weight load, not per call
    fake_paddle_gpu(monkeypatch, (arch, 0))
    c = _case()
    conversions = []
    real = DG.weight_scales
    with install_deep_gemm("torch", arch) as dg:
        provider = ops.get_provider("deep_gemm")
        prepared = provider.prepare_weight_scales(c["b"], c["sfb"], sfb_per_block=True)
        want_sb = DG.weight_scales(deep_gemm_provider.to_torch(c["sfb"]), c["n"], c["k"], arch)
        assert torch.equal(prepared, want_sb)
        monkeypatch.setattr(DG, "weight_scales", lambda *a, **k: conversions.append(1) or real(*a, **k))
        got = _gemm(provider, c, sfb_per_block=True, sfb_prepared=prepared)
        assert conversions == []
        _gemm(provider, c, sfb_per_block=True)                 # without: converted in the call
        assert conversions == [1]
    assert len(dg.calls) == 2
    _assert_matches_paddle(got, c, sfb_per_block=True)


def test_prepare_weight_scales_is_none_where_nothing_is_converted(monkeypatch):
    c = _case()
    assert ops.get_provider("paddle").prepare_weight_scales(c["b"], c["sfb"], sfb_per_block=True) is None
    fake_paddle_gpu(monkeypatch, (9, 0))                      # SM90 needs block-uniform weight bytes
    with install_deep_gemm("torch", 9):
        assert ops.get_provider("deep_gemm").prepare_weight_scales(c["b"], c["sfb"], sfb_per_block=False) is None


@pytest.mark.parametrize("m", [64, 300, 1000])
def test_window_copy_restores_exactly_the_rows_past_the_counts(m):
    """launch.rows_window_copy as run_masked uses it: after save, an overwrite of every row (what a whole-tile store
    could do at worst inside the window), and restore, rows >= masked_m inside [masked_m, masked_m + STORE_TAIL_ROWS)
    hold their old values and rows < masked_m the new ones (derived row by row)."""
    from backend.ops import deep_gemm_launch as DGL
    from backend.ops.triton import launch as L
    counts = torch.tensor([0, 1, m // 2, m - 1, m], dtype=torch.int32)
    e_num, n = len(counts), 40
    old = torch.randn(e_num * m, n).to(torch.bfloat16)
    out = old.clone()
    t = min(DGL.STORE_TAIL_ROWS, m)
    kept = torch.empty(e_num * t, n, dtype=out.dtype)
    L.rows_window_copy(out, kept, counts, m, restore=False)
    new = torch.randn(e_num * m, n).to(torch.bfloat16)
    out.copy_(new)
    L.rows_window_copy(out, kept, counts, m, restore=True)
    for e, c in enumerate(counts.tolist()):
        for r in range(m):
            want = old if c <= r < c + DGL.STORE_TAIL_ROWS else new
            assert torch.equal(out[e * m + r], want[e * m + r]), (e, c, r)
