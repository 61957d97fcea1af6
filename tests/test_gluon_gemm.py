"""The host side of backend/ops/triton/gluon_gemm.py, on any machine (the kernel itself: tests/test_gpu_providers.py).

Gluon has no interpreter, so what CI can check is the launcher: the tile configs fit an SM90 CTA's shared
memory (a config over it fails at launch on the GPU), the tile shape follows the expected rows, and a call
on a machine that cannot run the kernel says why instead of running something else.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from backend.ops.triton import gluon_gemm as G  # noqa: E402

SM90_SHARED_BYTES = 232448          # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100/H200 (227 KB)


@pytest.mark.parametrize("kg", [1, 2])
@pytest.mark.parametrize("n", [4096, 7168, 320])
@pytest.mark.parametrize("expected_m", [1, 64, 65, 512, 4096])
def test_pick_config_fits_shared_memory(expected_m, n, kg):
    cfg = G.pick_config(expected_m, n, kg=kg)
    na, nb = (1, 2) if cfg["SPLIT_N"] else (2, 1)
    ring = cfg["STAGES"] * kg * (na * G.WG_ROWS + nb * cfg["BN"]) * G.BLOCK_K      # fp8 A and B slots
    out_bufs = 2 * G.WG_ROWS * cfg["BN"] * 2                                          # bf16 store buffers
    barriers = 2 * cfg["STAGES"] * 8
    assert cfg["STAGES"] >= 2, "one slot loading while the other is read"
    assert ring + out_bufs + barriers <= SM90_SHARED_BYTES
    assert cfg["SPLIT_N"] == (expected_m <= G.WG_ROWS)      # 64 x 2BN tiles for few rows, else 128 x BN
    assert 128 % cfg["BN"] == 0                             # one 128x128 weight scale per sub-tile and K step


def test_wide_tile_fits_shared_memory_and_is_picked_for_ue8m0_only():
    """The 128 x 192 tile: A [128, 128] + B [128 + 64, 128] fp8 per stage, two bf16 store buffers per math
    warpgroup ([64, 128] and [64, 64]); picked for CUTLASS bytes from UE8M0_WIDE_FROM_ROWS rows, never for FP32."""
    cfg = G.wide_config()
    ring = cfg["STAGES"] * (128 + 192) * G.BLOCK_K
    out_bufs = 2 * (G.WG_ROWS * 128 + G.WG_ROWS * 64) * 2
    assert cfg["STAGES"] >= 2 and ring + out_bufs + 2 * cfg["STAGES"] * 8 <= SM90_SHARED_BYTES
    assert G.pick_config(G.UE8M0_WIDE_FROM_ROWS, 4096, ue8m0=True)["WIDE"]
    assert not G.pick_config(G.UE8M0_WIDE_FROM_ROWS - 1, 4096, ue8m0=True).get("WIDE")
    assert not G.pick_config(4096, 4096).get("WIDE")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_launcher_refuses_without_a_gpu():
    e, m, n, k = 2, 64, 128, 256
    a = torch.zeros(e * m, k, dtype=torch.float8_e4m3fn)
    b = torch.zeros(e, n, k, dtype=torch.float8_e4m3fn)
    out = torch.zeros(e * m, n, dtype=torch.bfloat16)
    counts = torch.tensor([3, 0], dtype=torch.int32)
    assert not G.available()
    with pytest.raises(RuntimeError, match="no CUDA device|not importable"):
        G.group_gemm_masked_fp32(a, b, torch.ones(e, m, 2), torch.ones(e, 1, 2), counts, out, None, m)
    assert not out.any()                                    # nothing was written


@pytest.fixture
def on_hopper(monkeypatch):
    """launch's view of an SM90 GPU with Gluon (no kernel is compiled: the tests below stop at the dispatch)."""
    from backend.ops.triton import launch as L
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(G, "available", lambda: True)
    return L


def test_which_kernel_runs_a_masked_gemm(on_hopper, monkeypatch):
    L, cuda = on_hopper, torch.device("cuda", 0)
    assert L.masked_gemm_kernel("fp32", cuda, 7168) == "gluon"                 # FP32 recipe: always on SM90
    assert L.masked_gemm_kernel("ue8m0", cuda, 7168) == "gluon"                # its tile from the rows hint
    assert L.masked_gemm_kernel("ue8m0", cuda, 2048) == "gluon"
    assert L.masked_gemm_kernel("ue8m0", cuda, 7168, sfb_per_block=False) == "tl"          # per-row weight bytes
    assert L.masked_gemm_kernel("fp32", cuda, 200) == "tl"                     # TMA needs K % 16 == 0
    assert L.masked_gemm_kernel("fp32", torch.device("cpu"), 7168) == "tl"
    monkeypatch.setattr(G, "available", lambda: False)                         # SM100, or no Gluon
    assert L.masked_gemm_kernel("fp32", cuda, 7168) == "tl"
    with pytest.raises(ValueError, match="recipe: expected 'fp32' or 'ue8m0', got 'fp8'"):
        L.masked_gemm_kernel("fp8", cuda, 7168)


def test_launchers_hand_sm90_calls_to_the_gluon_kernel(on_hopper, monkeypatch):
    L = on_hopper
    calls = []
    monkeypatch.setattr(L, "masked_gemm_kernel", lambda recipe, device, k, sfb_per_block=True, n=None,
                        expected_m=None: calls.append(("rule", recipe, k, sfb_per_block)) or "gluon")
    for name in ("group_gemm_masked", "group_gemm_masked_fp32"):
        monkeypatch.setattr(G, name, lambda *args, _n=name, **kw: calls.append((_n, args[2].dtype, kw)) or args[5])
    e, m, n, k = 2, 64, 128, 256
    a = torch.zeros(e * m, k, dtype=torch.float8_e4m3fn)
    b = torch.zeros(e, n, k, dtype=torch.float8_e4m3fn)
    out = torch.zeros(e * m, n, dtype=torch.bfloat16)
    counts = torch.tensor([3, 0], dtype=torch.int32)
    assert L.group_gemm_masked_fp32(a, b, torch.ones(e, m, 2), torch.ones(e, 1, 2), counts, out, None, m) is out
    sf = torch.zeros(e, 128, 8, dtype=torch.uint8)
    L.group_gemm_masked(a, b, sf, sf, counts, out, None, m, sm_count=7, sfb_per_block=True, expected_m=32)
    assert calls == [("rule", "fp32", k, True), ("group_gemm_masked_fp32", torch.float32,
                                                  dict(expected_m=None, sm_count=-1)),
                     ("rule", "ue8m0", k, True),
                     ("group_gemm_masked", torch.uint8, dict(expected_m=32, sm_count=7))]
    assert not out.any()                                   # the tl kernel did not run as well
    calls.clear()
    L.group_gemm_masked_fp32(a, b, torch.ones(e, m, 2), torch.ones(e, 1, 2), counts, out, None, m, kernel="gluon")
    assert [c[0] for c in calls] == ["group_gemm_masked_fp32"]                 # a caller's choice skips the rule
    with pytest.raises(ValueError, match="kernel: expected one of 'tl', 'gluon', 'cute' or None, got 'cutlass'"):
        L.group_gemm_masked_fp32(a, b, torch.ones(e, m, 2), torch.ones(e, 1, 2), counts, out, None, m,
                                 kernel="cutlass")


def test_provider_path_with_stated_bytes_goes_to_gluon_without_a_byte_check(on_hopper, monkeypatch):
    """impl="auto" (what the triton provider runs) with sfa_per_group and sfb_per_block stated: no pass over the
    bytes (no synchronization), the rule gets the expected_m hint and picks Gluon (its tile chosen by the hint);
    per-row weight bytes go to tl; without sfa_per_group the activation bytes are looked at once first."""
    L = on_hopper
    calls = []
    monkeypatch.setattr(G, "group_gemm_masked", lambda *args, **kw: calls.append(("gluon", kw["expected_m"])))
    monkeypatch.setattr(L, "_run_tuned", lambda name, *args, **kw: calls.append((name, None)))
    real = L._repeats_per_128
    monkeypatch.setattr(L, "_repeats_per_128", lambda w: calls.append(("look", None)) or real(w))
    rule = L.masked_gemm_kernel                       # the real rule, told the CPU tensors are on an SM90 GPU
    monkeypatch.setattr(L, "masked_gemm_kernel", lambda recipe, device, *args: rule(recipe, torch.device("cuda", 0),
                                                                                   *args))
    e, m, n, k = 2, 512, 128, 256
    a = torch.zeros(e * m, k, dtype=torch.float8_e4m3fn)
    b = torch.zeros(e, n, k, dtype=torch.float8_e4m3fn)
    out = torch.zeros(e * m, n, dtype=torch.bfloat16)
    counts = torch.tensor([3, 0], dtype=torch.int32)
    sfa, sfb = torch.zeros(e, m, 8, dtype=torch.uint8), torch.zeros(e, 128, 8, dtype=torch.uint8)
    for expected_m in (64, 4096):
        calls.clear()
        L.group_gemm_masked(a, b, sfa, sfb, counts, out, None, m, impl="auto", sfb_per_block=True,
                            sfa_per_group=True, expected_m=expected_m)
        assert calls == [("gluon", expected_m)]
    calls.clear()
    sfb_rows = torch.arange(e * 128 * 8, dtype=torch.int32).to(torch.uint8).view(e, 128, 8)   # per-row weight bytes
    L.group_gemm_masked(a, b, sfa, sfb_rows, counts, out, None, m, impl="explicit", sfa_per_group=True,
                        expected_m=64)
    assert calls == [("explicit_ue8m0_per_row", None)]
    calls.clear()
    L.group_gemm_masked(a, b, sfa, sfb, counts, out, None, m, impl="auto", sfb_per_block=True, expected_m=64)
    assert calls == [("look", None), ("gluon", 64)]
    calls.clear()
    L.group_gemm_masked(a, b, sfa, sfb, counts, out, None, m, impl="auto", sfb_per_block=True, sfa_per_group=True)
    assert calls == [("gluon", None)]                          # no hint: the Gluon launcher assumes M rows


def _compile_sm90(fn, args: dict, constexprs: dict, **options):
    """Compile a Gluon kernel for sm_90a on this machine (no GPU needed: Triton's bundled ptxas) -> (compiled, ptxas -v
    report of its PTX)."""
    import inspect
    import os
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type
    names = list(inspect.signature(fn.fn).parameters)
    sig = {k: "constexpr" if k in constexprs else mangle_type(args[k]) for k in names}
    src = GluonASTSource(fn, sig, {(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp, "k.cubin")],
                                capture_output=True, text=True, check=True).stderr
    return compiled, report


def _outside_the_interpreter(request) -> bool:
    """True when this test was re-run in a child pytest without the interpreter hook (tests/conftest.py decorates the
    kernels for TRITON_INTERPRET=1, under which nothing compiles for a GPU): the caller returns then. The child's
    result is asserted here, so the compile checks run in CI too (no GPU needed: Triton's bundled ptxas)."""
    from backend.ops.triton import launch as L
    if not L.interpreting():
        return False
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(root))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", request.node.nodeid],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
    return True


def test_wide_kernel_compiles_for_sm90_without_spills(request):
    """The 128 x 192 kernel as wide_config() launches it (CUTLASS bytes; FP32 scales from global memory or through the
    TMA): 0 spills within the 232 registers its math partitions get (setmaxnreg; the 64 x 192 sub-tile holds two
    accumulators and two promoted sums), shared memory within a CTA's."""
    pytest.importorskip("triton.experimental.gluon")
    if _outside_the_interpreter(request):
        return
    e, m, n, k = 2, 256, 4096, 7168
    a, b, out, _ = _gemm_operands(e, m, n, k)
    descs = dict(zip(("a_desc", "b_desc", "b64_desc", "c_desc", "c64_desc"), G._wide_descriptors(a, b, out)))
    for ue8m0, sa_smem in ((True, False), (False, False), (False, True)):
        sp = torch.zeros(4, dtype=torch.int32) if ue8m0 else torch.zeros(4)
        sa_desc = G._sa_descriptor(torch.zeros(e, k // 128, m).transpose(1, 2), (7, 1, 7)) if sa_smem else descs["a_desc"]
        args = dict(descs, counts_ptr=torch.zeros(4, dtype=torch.int32), sa_ptr=sp, sb_ptr=sp, out_ptr=out,
                    bias_ptr=out, E=e, M=m, N=n, K=k, sa_se=7, sa_sm=7, sa_sk=7, sb_se=7, sb_sn=7, sb_sk=7,
                    sa_desc=sa_desc)
        const = dict(STAGES=G.wide_config()["STAGES"], UE8M0=ue8m0, HAS_BIAS=False, TMA_STORE=True, M_FAST=True,
                     MATH_REGS=232, PRODUCER_REGS=40, SA_SMEM=sa_smem)
        compiled, report = _compile_sm90(G.masked_gemm_ws_wide_kernel, args, const, num_warps=4, maxnreg=168)
        assert compiled.metadata.shared <= SM90_SHARED_BYTES
        assert "0 bytes spill stores, 0 bytes spill loads" in report, report


@pytest.mark.parametrize("count_bad", [False, True])
@pytest.mark.parametrize("ue8m0", [True, False])
def test_fused_swiglu_kernel_compiles_for_sm90_without_spills(ue8m0, count_bad, request):
    """The PAIR kernel (GEMM 1 + SwiGLU + quant) at DeepSeek-V3 shapes as its launcher configures it: it compiles for
    sm_90a, fits the CTA's shared memory, and ptxas keeps every partition within the 168-register cap without
    spilling (a spill there made the math warpgroups 2x slower, benchmarks/NOTES_gpu.md)."""
    pytest.importorskip("triton.experimental.gluon")
    if _outside_the_interpreter(request):
        return
    e, m, n, k = 2, 256, 4096, 7168
    a, b, _, _ = _gemm_operands(e, m, n, k)
    cfg = dict(G.pick_config(G.WG_ROWS, n), BN=G.BLOCK_K, SPLIT_N=True)
    a_desc, b_desc, x_desc = G._descriptors(a, b, torch.zeros(G.WG_ROWS, G.BLOCK_K, dtype=torch.bfloat16), cfg)
    i32, f32 = torch.zeros(4, dtype=torch.int32), torch.zeros(4)
    sp = i32 if ue8m0 else f32
    args = dict(a_desc=a_desc, b_desc=b_desc, x_desc=x_desc, counts_ptr=i32, sa_ptr=sp, sb_ptr=sp,
                q_ptr=torch.zeros(4, dtype=torch.uint8), s_ptr=sp, bad_ptr=i32, E=e, M=m, N=n, K=k, sa_se=7, sa_sm=7,
                sa_sk=7, sb_se=7, sb_sn=7, sb_sk=7, S_GROUPS=16, SF_GROUPS=16, M_PAD=m, amax_floor=1e-10,
                sa_desc=a_desc if ue8m0 else G._sa_descriptor(torch.zeros(e, k // 128, m).transpose(1, 2), (7, 1, 7)))
    const = dict(STAGES=cfg["STAGES"], UE8M0=ue8m0, COUNT_BAD=count_bad, M_FAST=True, KG=1, MATH_REGS=232,
                 PRODUCER_REGS=40, SA_SMEM=not ue8m0)       # as the launcher: FP32 MN-major A scales through the TMA
    compiled, report = _compile_sm90(G.masked_gemm_swiglu_ws_kernel, args, const, num_warps=4, maxnreg=168)
    assert compiled.metadata.shared <= SM90_SHARED_BYTES
    assert "0 bytes spill stores, 0 bytes spill loads" in report, report


class _Recorder:
    """Stands in for a Gluon kernel: `kernel[grid](*args, **kw)` records the call instead of launching."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append((grid, args, kw))


@pytest.fixture
def launch_spy(monkeypatch):
    """The launchers' host side on CPU tensors: an SM90 with 132 SMs, kernels replaced by recorders."""
    monkeypatch.setattr(G, "unavailable_reason", lambda: None)
    monkeypatch.setattr(G, "_sm_count", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    spies = {name: _Recorder() for name in ("masked_gemm_ws_kernel", "masked_gemm_ws_wide_kernel",
                                           "masked_gemm_swiglu_ws_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(G, name, spy, raising=False)
    return spies


def _gemm_operands(e=2, m=256, n=4096, k=512):
    a = torch.zeros(e * m, k, dtype=torch.float8_e4m3fn)
    b = torch.zeros(e, n, k, dtype=torch.float8_e4m3fn)
    out = torch.zeros(e * m, n, dtype=torch.bfloat16)
    return a, b, out, torch.tensor([3, 0], dtype=torch.int32)


def test_fp32_launch_plumbs_the_picked_tile(launch_spy):
    """FP32 scales: 64 x 256 CTA tiles (one A box, two B boxes) for <= 64 expected rows, 128 x 128 above; one CTA per
    SM unless sm_count caps it; the descriptors' boxes are the tile's; strides of the scales passed through."""
    a, b, out, counts = _gemm_operands()
    sa, sb = torch.ones(2, 256, 4), torch.ones(2, 32, 4)
    for expected_m, (na, nb, bm), sms in ((64, (1, 2, 64), -1), (1024, (2, 1, 128), 100)):
        G.group_gemm_masked_fp32(a, b, sa, sb, counts, out, None, 256, expected_m=expected_m, sm_count=sms)
        grid, args, kw = launch_spy["masked_gemm_ws_kernel"].calls[-1]
        assert grid == ((132,) if sms < 0 else (100,))
        assert (kw["NA"], kw["NB"], kw["BM"], kw["UE8M0"]) == (na, nb, bm, False)
        assert [d.block_shape for d in args[:3]] == [[64, 128], [128, 128], [64, 128]]
        assert args[12:18] == tuple(sa.stride()) + tuple(sb.stride())
        assert kw["STAGES"] == G.pick_config(expected_m, 4096)["STAGES"] and kw["TMA_STORE"]
    assert not launch_spy["masked_gemm_ws_wide_kernel"].calls
    assert not kw["SA_SMEM"] and args[18] is args[0]             # row-major sa: global loads, no sa descriptor


def test_fp32_launch_reads_mn_major_scales_through_tma(launch_spy):
    """MN-major FP32 A scales (as the permute writes them: [E, S, M_pad] storage) go to the kernel as a 1-D TMA
    descriptor (box 64 rows) over their storage, flat index e·S·M_pad + step·M_pad + row; config SA_SMEM=False, a
    misaligned base, or a row stride other than 1 keep the global loads."""
    a, b, out, counts = _gemm_operands()
    e, m, steps = 2, 256, 4
    phys = torch.ones(e, steps, m + 4)                               # M_pad = 260: rows 256..259 padding
    sa, sb = phys.transpose(1, 2)[:, :m], torch.ones(2, 32, steps)
    G.group_gemm_masked_fp32(a, b, sa, sb, counts, out, None, m, expected_m=1024)
    grid, args, kw = launch_spy["masked_gemm_ws_kernel"].calls[-1]
    desc = args[18]
    assert kw["SA_SMEM"] and desc.block_shape == [64] and desc.strides == [1]
    assert desc.shape == [(e - 1) * steps * (m + 4) + (steps - 1) * (m + 4) + m]
    assert desc.base.data_ptr() == phys.data_ptr()
    for sa_other, cfg in ((sa, dict(G.pick_config(1024, 4096), SA_SMEM=False)),
                          (torch.ones(e * steps * (m + 4) + 1)[1:].view(e, steps, m + 4).transpose(1, 2), None)):
        G.group_gemm_masked_fp32(a, b, sa_other, sb, counts, out, None, m, expected_m=1024, config=cfg)
        assert not launch_spy["masked_gemm_ws_kernel"].calls[-1][2]["SA_SMEM"]


def test_ue8m0_launch_goes_wide_from_256_rows(launch_spy):
    """CUTLASS bytes: the 128 x 192 kernel with its five descriptors (A [64,128], B [128,128] and [64,128], out
    [64,128] and [64,64]) from UE8M0_WIDE_FROM_ROWS expected rows; the SF words' strides in 32-bit words."""
    a, b, out, counts = _gemm_operands()
    sfa, sfb = torch.zeros(2, 256, 16, dtype=torch.uint8), torch.zeros(2, 4096, 16, dtype=torch.uint8)
    G.group_gemm_masked(a, b, sfa, sfb, counts, out, None, 256, expected_m=G.UE8M0_WIDE_FROM_ROWS)
    grid, args, kw = launch_spy["masked_gemm_ws_wide_kernel"].calls[-1]
    assert [d.block_shape for d in args[:5]] == [[64, 128], [128, 128], [64, 128], [64, 128], [64, 64]]
    assert kw["UE8M0"] and kw["STAGES"] == G.wide_config()["STAGES"] and grid == (132,)
    assert args[14:20] == (256 * 16 // 4, 0, 16 // 4, 4096 * 16 // 4, 0, 16 // 4)
    G.group_gemm_masked(a, b, sfa, sfb, counts, out, None, 256, expected_m=64)
    assert launch_spy["masked_gemm_ws_kernel"].calls[-1][2]["UE8M0"]            # below: the 64 x 256 tile
    with pytest.raises(ValueError, match="K: the TMA row stride must be 16-byte aligned, expected a multiple of 16, "
                                         "got 200"):
        G.group_gemm_masked(a[:, :200], b[:, :, :200], sfa, sfb, counts, out, None, 256)


def test_fused_swiglu_launch_counts_bad_values_only_when_asked(launch_spy):
    """GEMM 1 + SwiGLU: 64-row tiles of one 128-column group (BN = 128, SPLIT_N); the count buffer has two ints per
    CTA with check_finite, one unused int without (no host read needed)."""
    a, b, _, counts = _gemm_operands(n=512)
    q, s_out = torch.zeros(512, 256, dtype=torch.uint8), torch.zeros(2, 2, 256)
    for check, size in ((True, 2 * 132), (False, 1)):
        bad = G.group_gemm_masked_swiglu_quant(a, b, torch.ones(2, 256, 4), torch.ones(2, 4, 4), (1,) * 6, counts, q,
                                               s_out, 256, False, 2, 0, 256, 1e-10, check)
        grid, args, kw = launch_spy["masked_gemm_swiglu_ws_kernel"].calls[-1]
        assert bad.numel() == size and not bad.any() and kw["COUNT_BAD"] is check
        assert [d.block_shape for d in args[:3]] == [[64, 128], [128, 128], [64, 128]]
        assert kw["SA_SMEM"] and args[23].block_shape == [64]        # FP32 scales, row stride 1: through the TMA
