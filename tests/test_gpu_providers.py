"""Every masked grouped FP8 GEMM this machine can run, at full DeepSeek-V3 shapes, on a GPU (`make test-gpu`).

Runs on the GPU machine only: CI has no GPU by design, so there the whole module is collected and
skipped with the reason "no CUDA device" (the `gpu` marker; nothing else in the suite may skip for it).
The GPU machine has no Paddle, so `moe_ref` cannot run there: the reference is SPEC §6's formula in
torch float32 (dequantize a and b with their scales, one matmul per expert), which
tests/test_triton_provider.py checks against moe_ref on CPU through the `tl` kernel's interpreter run.

Kernels: the `tl` kernel (launch.py, both recipes, forced with kernel="tl"), the Gluon warp-specialized kernel
(gluon_gemm.py, SM90 only, both recipes), the launchers as the `triton` provider calls them (kernel chosen by
launch.masked_gemm_kernel) and DeepGEMM's m_grouped_fp8_gemm_nt_masked when `deep_gemm` imports
(benchmarks/build_deepgemm.sh), raw and as the `deep_gemm` provider runs it (backend/ops/deep_gemm_launch.py:
the CUTLASS bytes converted, valid rows copied; the provider's Paddle adapter cannot run here, no Paddle).
Outputs are poisoned with NaN before each run; inputs are fresh random data per case
(benchmarks/bench_gemm_peers.make_inputs).
"""
from __future__ import annotations


import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

E_NUM, M_CAP = 32, 2048
SHAPES = [(4096, 7168), (7168, 2048)]          # DeepSeek-V3: up (2I x H) and down (H x I)
REF_TOL = 1e-5     # vs the float32 reference: fp8 products are exact, wgmma's accumulation order is not
SAME_INPUT_TOL = 1e-6      # kernel vs kernel on the same inputs (issue 11): same accumulation up to order


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: f"N{s[0]}_K{s[1]}")
def case(request, peers):
    n, k = request.param
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = peers.make_inputs(n, k, E_NUM, M_CAP, gen)
    counts = torch.randint(0, M_CAP + 1, (E_NUM,), dtype=torch.int32, device="cuda", generator=gen)
    counts[3] = 0                                  # an empty expert
    counts[5] = M_CAP                              # a full one
    counts[7] = 1
    ref = {recipe: _reference(x, counts, n, k, recipe) for recipe in ("fp32", "ue8m0")}
    return dict(n=n, k=k, x=x, counts=counts, ref=ref)


def _reference(x, counts, n, k, recipe):
    """SPEC §6 in float32: out[e, r, n] = Σ_kb sa[e, r, kb] · sb[e, n // 128, kb] · (a[e, r, kb-block] ·
    b[e, n, kb-block])."""
    sa, sb = (x["fa_mn"], x["fb"]) if recipe == "fp32" else (x["pa_mn"], x["pb"])
    rows = []
    for e in range(E_NUM):
        c = int(counts[e])
        if c == 0:
            continue
        a = x["a"][e * M_CAP:e * M_CAP + c].float().view(c, -1, 128) * sa[e, :c, :, None]
        b = x["b"][e].float().view(n, -1, 128) * sb[e].repeat_interleave(128, 0)[:n, :, None]
        rows.append(a.view(c, k) @ b.view(n, k).t())
    return torch.cat(rows)


def _kernels(peers, x, out, m_cap, counts):
    from backend.ops.triton import gluon_gemm
    from backend.ops.triton import launch as L
    ks = {"tl_fp32": ("fp32", lambda: L.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, out,
                                                               None, m_cap, kernel="tl")),
          "tl_ue8m0": ("ue8m0", lambda: L.group_gemm_masked(x["a"], x["b"], x["sfa"], x["sfb"], counts, out, None,
                                                            m_cap, kernel="tl")),
          "launch_fp32": ("fp32", lambda: L.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, out,
                                                                   None, m_cap)),
          "launch_ue8m0_m64": ("ue8m0", lambda: L.group_gemm_masked(x["a"], x["b"], x["sfa"], x["sfb"], counts, out,
                                                                    None, m_cap, impl="auto", sfb_per_block=True,
                                                                    expected_m=64)),
          # as the method calls it: activation bytes stated too, no byte check
          "launch_ue8m0_stated_m64": ("ue8m0", lambda: L.group_gemm_masked(
              x["a"], x["b"], x["sfa"], x["sfb"], counts, out, None, m_cap, impl="auto", sfb_per_block=True,
              sfa_per_group=True, expected_m=64))}
    if torch.cuda.get_device_capability()[0] == 9:
        for em in (64, 512):                   # both tile shapes: 64 x 2BN (SPLIT_N) and 128 x BN
            ks[f"gluon_fp32_m{em}"] = ("fp32", lambda em=em: gluon_gemm.group_gemm_masked_fp32(
                x["a"], x["b"], x["fa_mn"], x["fb"], counts, out, None, m_cap, expected_m=em))
            ks[f"gluon_ue8m0_m{em}"] = ("ue8m0", lambda em=em: gluon_gemm.group_gemm_masked(
                x["a"], x["b"], x["sfa"], x["sfb"], counts, out, None, m_cap, expected_m=em))
        # A scales through global loads instead of the TMA into shared memory (the launcher's default for MN-major)
        ks["gluon_fp32_m512_global_sa"] = ("fp32", lambda: gluon_gemm.group_gemm_masked_fp32(
            x["a"], x["b"], x["fa_mn"], x["fb"], counts, out, None, m_cap,
            config=dict(gluon_gemm.pick_config(512, x["b"].shape[1]), SA_SMEM=False)))
        wide = gluon_gemm.wide_config()          # the 128 x 192 tile
        ks["gluon_fp32_wide"] = ("fp32", lambda: gluon_gemm.group_gemm_masked_fp32(
            x["a"], x["b"], x["fa_mn"], x["fb"], counts, out, None, m_cap, config=wide))
        ks["gluon_ue8m0_wide"] = ("ue8m0", lambda: gluon_gemm.group_gemm_masked(
            x["a"], x["b"], x["sfa"], x["sfb"], counts, out, None, m_cap, config=wide))
    dg, _ = peers.optional_import("deep_gemm")
    if dg is not None:
        for recipe in ("fp32", "ue8m0"):
            fn = peers.deepgemm_call(dg, x, out, E_NUM, m_cap, recipe, max(1, int(counts.float().mean())))
            ks[f"deepgemm_{recipe}"] = (recipe, lambda fn=fn: fn(counts))
        ks["deep_gemm_provider"] = ("ue8m0", lambda: peers.deep_gemm_provider_call(dg, x, out, E_NUM, m_cap)(counts))
    return ks


def test_gluon_runs_on_hopper():
    """On an SM90 GPU the Gluon kernel must be usable (a failure here is a broken install, never a skip)."""
    from backend.ops.triton import gluon_gemm
    if torch.cuda.get_device_capability()[0] != 9:
        cap = "".join(map(str, torch.cuda.get_device_capability()))
        pytest.skip(f"the Gluon kernel is SM90-only, this GPU is sm_{cap}")
    assert gluon_gemm.unavailable_reason() is None


def test_masked_gemm_kernels_match_reference_and_each_other(peers, case):
    x, counts, n = case["x"], case["counts"], case["n"]
    out = torch.empty((E_NUM * M_CAP, n), dtype=torch.bfloat16, device="cuda")
    got = {}
    for name, (recipe, fn) in _kernels(peers, x, out, M_CAP, counts).items():
        out.fill_(float("nan"))
        fn()
        torch.cuda.synchronize()
        rows = peers.valid_rows(out, counts, E_NUM, M_CAP).float()
        assert not torch.isnan(rows).any(), f"{name}: a valid row was not written"
        if not name.startswith("deepgemm"):       # DeepGEMM stores whole tiles: rows past masked_m too
            assert peers.untouched_tail(out, counts, E_NUM, M_CAP), f"{name}: wrote rows past masked_m"
        d = peers.BG.calc_diff(rows, case["ref"][recipe])
        assert d < REF_TOL, f"{name}: calc_diff vs the float32 reference {d:.2e} >= {REF_TOL}"
        got[name] = (recipe, rows)
    for name, (recipe, rows) in got.items():
        twin = got[f"tl_{recipe}"][1]
        d = peers.BG.calc_diff(rows, twin)
        assert d < SAME_INPUT_TOL, f"{name} vs tl_{recipe} on the same inputs: calc_diff {d:.2e}"


def test_gluon_bias_and_small_shapes(peers):
    """Bias, K not a multiple of 128, N not a multiple of the tile, counts 0 / 1 / odd."""
    from backend.ops.triton import gluon_gemm
    from backend.ops.triton import launch as L
    if not gluon_gemm.available():
        pytest.skip(gluon_gemm.unavailable_reason())
    e_num, m_cap, n, k = 4, 200, 320, 384 + 64
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = peers.make_inputs(n, k // 128 * 128 + 128, e_num, m_cap, gen)
    a = x["a"][:, :k].contiguous()
    b = x["b"][:, :, :k].contiguous()
    bias = torch.randn(e_num, n, device="cuda", generator=gen).to(torch.bfloat16)
    counts = torch.tensor([0, 1, 77, 200], dtype=torch.int32, device="cuda")
    outs = []
    for fn in (lambda o: L.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], counts, o, bias, m_cap),
               lambda o: gluon_gemm.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], counts, o, bias, m_cap,
                                                           expected_m=64),
               lambda o: gluon_gemm.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], counts, o, bias, m_cap),
               lambda o: gluon_gemm.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], counts, o, bias, m_cap,
                                                           config=gluon_gemm.wide_config())):
        o = torch.full((e_num * m_cap, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        fn(o)
        assert peers.untouched_tail(o, counts, e_num, m_cap)
        outs.append(peers.valid_rows(o, counts, e_num, m_cap).float())
        assert not torch.isnan(outs[-1]).any()
    for o in outs[1:]:
        assert peers.BG.calc_diff(o, outs[0]) < SAME_INPUT_TOL
