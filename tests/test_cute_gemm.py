"""backend/ops/cute on the CPU: the kernel's tile walk (walk.cluster_block) on ints (the kernel runs the
same function on device values, so what holds here holds for the blocks its CTAs compute), and which kernel the
launchers run (the DSL faked: CI cannot install it).

Expected from the definition of the GEMM, not from the function: every (m-tile, n-tile) block of an expert is
computed exactly once; both CTAs of a multicast tile share the n-tile (they load half of B each); no CTA idles
except on the one block past N of an expert with an odd m-tile count and an odd n-tile count.
"""
from __future__ import annotations

import pytest

from backend.ops.cute.walk import cluster_block, expert_units


def _py_select(cond, a, b):
    return a if cond else b


def _walk(m_tiles: int, n_tiles: int, cluster_m: int):
    blocks = []
    for u in range(expert_units(m_tiles, n_tiles, cluster_m)):
        pair = [cluster_block(u, m_tiles, n_tiles, r, cluster_m, _py_select, max) for r in range(cluster_m)]
        blocks.append(pair)
    return blocks


@pytest.mark.parametrize("cluster_m", [1, 2])
@pytest.mark.parametrize("m_tiles", [1, 2, 3, 4, 7, 16])
@pytest.mark.parametrize("n_tiles", [1, 2, 3, 22, 37, 38])
def test_every_block_once(cluster_m, m_tiles, n_tiles):
    units = _walk(m_tiles, n_tiles, cluster_m)
    inside = [(m, n) for pair in units for m, n, _ in pair if n < n_tiles]
    assert sorted(inside) == [(m, n) for m in range(m_tiles) for n in range(n_tiles)]
    idle = [(m, n) for pair in units for m, n, _ in pair if n >= n_tiles]
    # only an odd last m-tile with an odd n-tile count leaves one block past N (its CTA skips it)
    assert len(idle) == (cluster_m == 2 and m_tiles % 2 == 1 and n_tiles % 2 == 1)
    assert all(m < m_tiles and n <= n_tiles for pair in units for m, n, _ in pair)


@pytest.mark.parametrize("m_tiles", [1, 2, 5, 8])
def test_multicast_pairs_share_their_n_tile(m_tiles):
    n_tiles = 22                                   # N = 4096 at 192 columns per tile
    units = _walk(m_tiles, n_tiles, 2)
    for (m0, n0, mc0), (m1, n1, mc1) in units:
        assert mc0 == mc1                          # both CTAs agree whether B is multicast
        if mc0:
            assert n0 == n1 and m1 == m0 + 1       # half of B each, for both
        else:
            assert m0 == m1 == m_tiles - 1 and n1 == n0 + 1
    multicast = sum(mc for (_, _, mc), _ in units)
    assert multicast == m_tiles // 2 * n_tiles     # every pair of m-tiles shares B


def test_one_m_tile_keeps_both_ctas_busy():
    """128 rows per expert: the old walk (pairs of m-tiles only) gave the second CTA nothing to do on every tile."""
    units = _walk(1, 22, 2)
    assert len(units) == 11 and all(n < 22 for pair in units for _, n, _ in pair)


# ----------------------------------------------------------------------------- which kernel a call runs

torch = pytest.importorskip("torch")


@pytest.fixture
def on_hopper_with_dsl(monkeypatch):
    """launch's view of an SM90 GPU with Gluon and the CuTe DSL (nothing compiles: the tests stop at the dispatch)."""
    from backend.ops.cute import masked_gemm
    from backend.ops.triton import gluon_gemm, launch as L
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(gluon_gemm, "available", lambda: True)
    monkeypatch.setattr(masked_gemm, "available", lambda: True)
    return L, masked_gemm


def test_cute_runs_the_plain_fp32_gemm_from_its_rows(on_hopper_with_dsl, monkeypatch):
    L, cute = on_hopper_with_dsl
    cuda = torch.device("cuda", 0)
    rows = L.CUTE_FROM_ROWS
    assert L.masked_gemm_kernel("fp32", cuda, 7168, n=4096, expected_m=rows) == "cute"
    assert L.masked_gemm_kernel("fp32", cuda, 2048, n=7168, expected_m=4096) == "cute"
    assert L.masked_gemm_kernel("fp32", cuda, 7168, n=4096, expected_m=rows - 1) == "gluon"   # few rows
    assert L.masked_gemm_kernel("fp32", cuda, 7168) == "gluon"          # no width / rows: the fused forms
    assert L.masked_gemm_kernel("ue8m0", cuda, 7168, n=4096, expected_m=rows) == "cute"       # bytes converted
    assert L.masked_gemm_kernel("ue8m0", cuda, 7168, False, n=4096, expected_m=rows) == "tl"  # per-row weights
    assert L.masked_gemm_kernel("fp32", cuda, 7168 + 64, n=4096, expected_m=rows) == "gluon"  # K % 128
    assert L.masked_gemm_kernel("fp32", cuda, 7168, n=4100, expected_m=rows) == "gluon"       # N % 8
    big_k = cute.sb_tiles(192, cute.max_stages(192)) * 128 + 128                               # scales overflow
    assert L.masked_gemm_kernel("fp32", cuda, big_k, n=4096, expected_m=rows) == "gluon"
    monkeypatch.setattr(cute, "available", lambda: False)               # the DSL not installed
    assert L.masked_gemm_kernel("fp32", cuda, 7168, n=4096, expected_m=rows) == "gluon"


def _problem(e=2, m=64, n=128, k=256):
    a = torch.zeros(e * m, k, dtype=torch.float8_e4m3fn)
    b = torch.zeros(e, n, k, dtype=torch.float8_e4m3fn)
    out = torch.zeros(e * m, n, dtype=torch.bfloat16)
    return a, b, torch.ones(e, m, k // 128), torch.ones(e, 1, k // 128), torch.tensor([3, 0], dtype=torch.int32), out


def test_fp32_launcher_hands_its_rows_hint_to_the_cute_kernel(on_hopper_with_dsl, monkeypatch):
    L, cute = on_hopper_with_dsl
    from backend.ops.triton import gluon_gemm
    rule = L.masked_gemm_kernel             # the real rule, told the CPU tensors live on a GPU
    monkeypatch.setattr(L, "masked_gemm_kernel", lambda recipe, device, *args, **kw: rule(
        recipe, torch.device("cuda", 0), *args, **kw))
    calls = []
    monkeypatch.setattr(cute, "group_gemm_masked_fp32", lambda *args, **kw: calls.append(("cute", args[6], kw)))
    monkeypatch.setattr(gluon_gemm, "group_gemm_masked_fp32", lambda *args, **kw: calls.append(("gluon", kw)))
    a, b, sa, sb, counts, out = _problem()
    rows = L.CUTE_FROM_ROWS
    assert L.group_gemm_masked_fp32(a, b, sa, sb, counts, out, None, 64, expected_m=rows, sm_count=66) is out
    L.group_gemm_masked_fp32(a, b, sa, sb, counts, out, torch.zeros(2, 128), 64, expected_m=rows)  # bias: Gluon
    L.group_gemm_masked_fp32(a, b, sa, sb, counts, out, None, 64, expected_m=rows - 1)
    L.group_gemm_masked_fp32(a, b, sa, sb, counts, out, None, 64, kernel="cute")    # forced; hint = M
    assert [c[0] for c in calls] == ["cute", "gluon", "gluon", "cute"]
    assert calls[0][1:] == (64, dict(expected_m=rows, sm_count=66))
    assert calls[3][2]["expected_m"] == 64
    with pytest.raises(ValueError, match="bias"):
        L.group_gemm_masked_fp32(a, b, sa, sb, counts, out, torch.zeros(2, 128), 64, kernel="cute")
    with pytest.raises(ValueError, match="kernel: expected one of 'tl', 'gluon', 'cute' or None, got 'cutlass'"):
        L.group_gemm_masked_fp32(a, b, sa, sb, counts, out, None, 64, kernel="cutlass")


def _words(e: torch.Tensor) -> torch.Tensor:
    """Exponent bytes [E, R, G] (G % 4 == 0) -> packed UE8M0 int32 words, groups 4p..4p+3 little-endian (SPEC §2)."""
    b = e.to(torch.int64).view(*e.shape[:-1], -1, 4)
    w = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def test_ue8m0_bytes_reach_the_cute_kernel_as_fp32_scales(on_hopper_with_dsl, monkeypatch):
    """group_gemm_masked on CUTLASS bytes (sfb_per_block) from CUTE_FROM_ROWS rows: the CuTe kernel gets fp32 scales
    equal to 2^(byte - 127) of the exponents the bytes were built from (MN-major activations, one weight scale per
    128-row block), no other kernel runs."""
    L, cute = on_hopper_with_dsl
    rule = L.masked_gemm_kernel
    monkeypatch.setattr(L, "masked_gemm_kernel", lambda recipe, device, *args, **kw: rule(
        recipe, torch.device("cuda", 0), *args, **kw))
    got = {}
    monkeypatch.setattr(cute, "group_gemm_masked_fp32", lambda a, b, sa, sb, c, out, m, **kw: got.update(
        sa=sa.clone(), sa_strides=sa.stride(), sb=sb.clone(), kw=kw))
    e_num, m, n, k = 2, 64, 256, 512
    gen = torch.Generator().manual_seed(3)
    ea = torch.randint(110, 140, (e_num, m, k // 128), generator=gen, dtype=torch.int32)
    eb = torch.randint(110, 140, (e_num, n // 128, k // 128), generator=gen, dtype=torch.int32)
    sfa = L.unpack_and_convert_scale(_words(ea))
    sfb = L.unpack_and_convert_scale(_words(eb.repeat_interleave(128, 1)))       # block byte copied to its rows
    a, b, _, _, counts, out = _problem(e_num, m, n, k)
    L.group_gemm_masked(a, b, sfa, sfb, counts, out, None, m, sfb_per_block=True, expected_m=L.CUTE_FROM_ROWS)
    assert torch.equal(got["sa"], torch.exp2(ea.float() - 127))
    assert got["sa_strides"][1] == 1                                                 # MN-major, as the TMA reads it
    assert torch.equal(got["sb"], torch.exp2(eb.float() - 127))
    assert got["kw"]["expected_m"] == L.CUTE_FROM_ROWS
    assert not out.any()                                                             # nothing else wrote out
    with pytest.raises(ValueError, match="sfb_per_block"):
        L.group_gemm_masked(a, b, sfa, sfb, counts, out, None, m, kernel="cute")
    with pytest.raises(ValueError, match="row_step: 3 rows 128 apart need more than the 256 rows of sf"):
        L.cutlass_scale_to_fp32(sfb, 3, row_step=128)


def test_fused_launchers_refuse_the_cute_kernel(on_hopper_with_dsl):
    L, _ = on_hopper_with_dsl
    a, b, _, _, counts, out = _problem()
    sf = torch.zeros(2, 128, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="kernel: expected one of 'tl', 'gluon' or None, got 'cute'"):
        L.group_gemm_masked_swiglu_fp8_quant(a, b, sf, sf, counts, 64, sfb_per_block=True, kernel="cute")


def test_cute_kernel_without_a_gpu_says_why():
    from backend.ops.cute import masked_gemm
    a, b, sa, sb, counts, out = _problem()
    if masked_gemm.available():
        pytest.skip("this machine can run the kernel")
    with pytest.raises(RuntimeError, match="cute masked_gemm: (nvidia-cutlass-dsl not importable|no CUDA device|needs)"):
        masked_gemm.group_gemm_masked_fp32(a, b, sa, sb, counts, out, 64)
    assert not out.any()


class _FakeCompiled:
    """The two entry points of a DSL-compiled function that masked_gemm._launch uses, recording what it is given."""

    def __init__(self):
        self.marshalled, self.runs = [], []
        self.execution_args = self

    def generate_execution_args(self, args, kwargs):
        self.marshalled.append(args)
        return [f"c{a}" for a in args], [object()]

    def run_compiled_program(self, exe_args):
        self.runs.append(exe_args)


def test_launch_marshals_each_argument_set_once(monkeypatch):
    from backend.ops.cute import masked_gemm
    monkeypatch.setattr(masked_gemm, "_LAUNCHES", type(masked_gemm._LAUNCHES)())
    monkeypatch.setattr(masked_gemm, "LAUNCH_CACHE_SIZE", 2)
    fn, built = _FakeCompiled(), []

    def make(*args):
        return lambda: built.append(args) or args
    for key in ("k1", "k1", "k2", "k1", "k3", "k2"):        # k2 was the least recent when k3 came: evicted
        masked_gemm._launch(fn, key, make(key, 7))
    assert [a[0] for a in built] == ["k1", "k2", "k3", "k2"]
    assert fn.runs == [["ck1", "c7"]] * 2 + [["ck2", "c7"], ["ck1", "c7"], ["ck3", "c7"], ["ck2", "c7"]]
    assert list(masked_gemm._LAUNCHES) == ["k3", "k2"]


def test_launch_without_the_entry_points_calls_plainly(monkeypatch):
    from backend.ops.cute import masked_gemm
    monkeypatch.setattr(masked_gemm, "_LAUNCHES", type(masked_gemm._LAUNCHES)())
    calls = []
    masked_gemm._launch(lambda *a: calls.append(a), "k", lambda: (1, 2))
    masked_gemm._launch(lambda *a: calls.append(a), "k", lambda: (1, 2))
    assert calls == [(1, 2), (1, 2)] and not masked_gemm._LAUNCHES
