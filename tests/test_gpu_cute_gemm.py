"""The CuTe DSL masked grouped FP8 GEMM (backend/ops/cute/masked_gemm.py) on an SM90 GPU, every config.

Needs a CUDA device (the `gpu` marker: skipped with "no CUDA device" elsewhere) and the DSL (the GPU machine
has none preinstalled: `export PYTHONPATH=$(benchmarks/install_cute_dsl.sh)$PWD` first, after
benchmarks/fetch_cute_dsl.sh filled .cdsl1/ and .cdsl2/ on a machine with network). Each config runs on NaN-
poisoned outputs; checked: every valid row written, rows past masked_m untouched, the values against SPEC §6's
formula in float32 and against the Gluon kernel (launch.group_gemm_masked_fp32 on SM90) on the same inputs.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

# every tile shape x multicast with the TMA A scales + TMA store path (default), and the first path (global
# A scales, 16-byte stores) at both tile shapes; stages are left to the launcher (the most that fit bn)
CONFIGS = ([dict(bn=bn, cluster_m=cm) for bn in (128, 192) for cm in (1, 2)]
           + [dict(bn=bn, cluster_m=2, sa_tma=False, tma_store=False) for bn in (128, 192)]
           + [dict(bn=192, cluster_m=2, partial_smem=False)])


def _name(c: dict) -> str:
    return (f"cute_bn{c['bn']}_cl{c['cluster_m']}" + ("" if c.get("sa_tma", True) else "_v1")
            + ("" if c.get("partial_smem", True) else "_pr"))
REF_TOL = 1e-5         # vs float32: fp8 products are exact, wgmma's accumulation order is not (as test_gpu_providers)
SAME_INPUT_TOL = 1e-6  # vs the Gluon kernel on the same inputs: the same promotion, up to accumulation order


@pytest.fixture(scope="module")
def cute_gemm():
    from backend.ops.cute import masked_gemm
    reason = masked_gemm.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return masked_gemm


def _float_reference(x, counts, m_cap, n, k):
    """out[e, r, :] = Σ_kb sa[e, r, kb] · sb[e, :, kb] ⊙ (a[e, r, kb-block] · b[e, :, kb-block]), float32,
    valid rows only, expert order (the layout of peers.valid_rows)."""
    e_num = counts.numel()
    blocks = k // 128
    a = x["a"].float().view(e_num, m_cap, blocks, 128)
    b = x["b"].float().view(e_num, n, blocks, 128)
    sb_cols = x["fb"].repeat_interleave(128, 1)[:, :n]                    # [E, N, KB]
    outs = []
    for e in range(e_num):
        c = int(counts[e])
        if c:
            part = torch.einsum("rgk,ngk->grn", a[e, :c], b[e])            # per K block [KB, c, N]
            scale = x["fa_mn"][e, :c].t()[:, :, None] * sb_cols[e].t()[:, None, :]
            outs.append((part * scale).sum(0))
    return torch.cat(outs)


def _run_all(cute_gemm, peers, x, counts, e_num, m_cap, n):
    """config name -> valid rows (float), each run on a NaN-poisoned out, the tail checked untouched."""
    from backend.ops.triton import launch as L
    runs = {_name(c): (lambda o, c=c: cute_gemm.group_gemm_masked_fp32(
        x["a"], x["b"], x["fa_mn"], x["fb"], counts, o, m_cap, config=c)) for c in CONFIGS}
    # forced: the launcher's rule runs the CuTe kernel itself from launch.CUTE_FROM_ROWS rows when the DSL imports
    runs["gluon"] = lambda o: L.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, o, None, m_cap,
                                                       kernel="gluon")
    runs["launcher"] = lambda o: L.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, o, None,
                                                          m_cap)
    got = {}
    for name, fn in runs.items():
        out = torch.full((e_num * m_cap, n), float("nan"), dtype=torch.bfloat16, device="cuda")
        fn(out)
        torch.cuda.synchronize()
        assert peers.untouched_tail(out, counts, e_num, m_cap), f"{name}: wrote rows past masked_m"
        rows = peers.valid_rows(out, counts, e_num, m_cap).float()
        assert not torch.isnan(rows).any(), f"{name}: a valid row was not written"
        got[name] = rows
    return got


def _check(peers, got, ref):
    for name, rows in got.items():
        d = peers.BG.calc_diff(rows, ref)
        assert d < REF_TOL, f"{name}: calc_diff vs the float32 formula {d:.2e} >= {REF_TOL}"
        d = peers.BG.calc_diff(rows, got["gluon"])
        assert d < SAME_INPUT_TOL, f"{name} vs the Gluon kernel on the same inputs: calc_diff {d:.2e}"


@pytest.mark.parametrize("n", [320, 576])
def test_small_shapes_partial_tiles_and_odd_pairs(cute_gemm, peers, n):
    """M not a multiple of 128 (a tile past M), N not a multiple of BN or of 128 (clamped weight block),
    counts 0 / 1 / one m-tile / three m-tiles (an odd last m-tile: its cluster pairs go along N) / full; odd
    n-tile counts (N=320 at bn=128, N=576 at bn=192: the last pair's second block lies past N)."""
    e_num, m_cap, k = 6, 400, 384
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = peers.make_inputs(n, k, e_num, m_cap, gen)
    x["fb"] = (torch.rand(e_num, -(-n // 128), k // 128, device="cuda", generator=gen) + 0.5) * 2.0 ** -6
    counts = torch.tensor([0, 1, 77, 300, 400, 129], dtype=torch.int32, device="cuda")
    got = _run_all(cute_gemm, peers, x, counts, e_num, m_cap, n)
    _check(peers, got, _float_reference(x, counts, m_cap, n, k))


@pytest.mark.parametrize("n,k", [(4096, 7168), (7168, 2048)], ids=["N4096_K7168", "N7168_K2048"])
def test_full_shapes(cute_gemm, peers, n, k):
    """DeepSeek-V3 shapes, 32 experts, uneven counts with an empty, a single-row and a full expert."""
    e_num, m_cap = 32, 2048
    gen = torch.Generator(device="cuda").manual_seed(n + k)
    x = peers.make_inputs(n, k, e_num, m_cap, gen)
    counts = torch.randint(0, m_cap + 1, (e_num,), dtype=torch.int32, device="cuda", generator=gen)
    counts[3], counts[5], counts[7] = 0, m_cap, 1
    got = _run_all(cute_gemm, peers, x, counts, e_num, m_cap, n)
    for name, rows in got.items():
        same = float((rows == got["gluon"]).float().mean())
        print(f"{name}: bitwise equal to the Gluon kernel in {same:.6f} of the values")
    _check(peers, got, got["gluon"])


def test_repeated_launch_reads_new_counts_and_writes_again(cute_gemm, peers):
    """The second call with the same buffers reuses the marshalled arguments (masked_gemm._launch): it must still
    read masked_m and the operands afresh (changed in place) and write the output again."""
    e_num, m_cap, n, k = 4, 384, 576, 256
    gen = torch.Generator(device="cuda").manual_seed(13)
    x = peers.make_inputs(n, k, e_num, m_cap, gen)
    x["fb"] = (torch.rand(e_num, -(-n // 128), k // 128, device="cuda", generator=gen) + 0.5) * 2.0 ** -6
    counts = torch.tensor([384, 0, 129, 5], dtype=torch.int32, device="cuda")
    out = torch.full((e_num * m_cap, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    cute_gemm.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, out, m_cap)
    counts.copy_(torch.tensor([1, 300, 0, 384], dtype=torch.int32))
    x["a"].copy_(torch.flip(x["a"], [0]))
    out.fill_(float("nan"))
    cute_gemm.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, out, m_cap)
    torch.cuda.synchronize()
    assert peers.untouched_tail(out, counts, e_num, m_cap)
    rows = peers.valid_rows(out, counts, e_num, m_cap).float()
    assert not torch.isnan(rows).any()
    assert peers.BG.calc_diff(rows, _float_reference(x, counts, m_cap, n, k)) < REF_TOL


def test_graph_capture_reads_counts_on_device(cute_gemm, peers):
    """Captured once, replayed after masked_m changed in place: the new counts are used (no host read)."""
    e_num, m_cap, n, k = 4, 256, 256, 256
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = peers.make_inputs(n, k, e_num, m_cap, gen)
    counts = torch.tensor([256, 0, 128, 5], dtype=torch.int32, device="cuda")
    out = torch.full((e_num * m_cap, n), float("nan"), dtype=torch.bfloat16, device="cuda")
    cfg = dict(bn=128, cluster_m=2)

    def call():
        cute_gemm.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, out, m_cap, config=cfg)
    call()                                           # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    counts.copy_(torch.tensor([3, 256, 0, 200], dtype=torch.int32))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert peers.untouched_tail(out, counts, e_num, m_cap)
    rows = peers.valid_rows(out, counts, e_num, m_cap).float()
    assert not torch.isnan(rows).any()
    assert peers.BG.calc_diff(rows, _float_reference(x, counts, m_cap, n, k)) < REF_TOL
