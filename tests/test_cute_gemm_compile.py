"""The CuTe DSL masked GEMM compiles for sm_90a without a GPU (backend/ops/cute/masked_gemm.compile_only).

Skipped where nvidia-cutlass-dsl is not installed (it is an optional dependency, absent from CI). Checks the
PTX of every config for what the kernel's design says must be there: multicast TMA loads only with 2-CTA
clusters, one fp32 FMA per accumulator value per promotion (64 x BN values over a warpgroup's 128 threads),
the register split between the producer and the math warpgroups, no wgmma serialization.
"""
from __future__ import annotations

import re

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))   # sass_cute_gemm

from backend.ops.cute import masked_gemm

pytest.importorskip("cutlass", reason="nvidia-cutlass-dsl not installed (optional: benchmarks/fetch_cute_dsl.sh)")


@pytest.mark.parametrize("bn", [128, 192])
@pytest.mark.parametrize("cluster_m", [1, 2])
@pytest.mark.parametrize("new", [True, False], ids=["tma_scales_store", "global_scales_16B_store"])
def test_compiles_for_sm90a(bn, cluster_m, new):
    ptx = masked_gemm.compile_only(bn, cluster_m, keep_ptx=True, sa_tma=new, tma_store=new).artifacts.PTX
    assert ".target sm_90a" in ptx
    multicast = len(re.findall(r"cp\.async\.bulk\.tensor\.\S*multicast::cluster", ptx))
    assert (multicast > 0) == (cluster_m == 2)
    # k-major m64nBNk32 e4m3 x e4m3 -> f32, 4 per 128-wide K step; the K loop is unrolled (copies of the step)
    wgmmas = len(re.findall(rf"wgmma\.mma_async\.sync\.aligned\.m64n{bn}k32\.f32\.e4m3\.e4m3", ptx))
    assert wgmmas % 4 == 0 and wgmmas >= 4
    copies = wgmmas // 4
    assert ptx.count("fma.rn.f32") == copies * 64 * bn // 128     # per step: a 64 x bn tile over 128 threads
    # BN = 192: one select per row pair for the middle 64 columns' weight block, per step (was 2 per value)
    assert ptx.count("selp.f32") == copies * (2 if bn == 192 else 0)
    # TMA stores (shared -> global bulk group) of bn / 64 boxes, only with tma_store
    stores = len(re.findall(r"cp\.async\.bulk\.tensor\.\dd\.global\.shared::cta", ptx))
    assert stores == (bn // 64 if new else 0)
    assert re.search(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+232;", ptx)
    assert re.search(r"setmaxnreg\.dec\.sync\.aligned\.u32\s+40;", ptx)


@pytest.mark.parametrize("partial_smem", [True, False], ids=["staged", "registers"])
def test_partial_sub_tile_stores(partial_smem):
    """The sub-tile with rows past masked_m: staged in shared memory, 16-byte stores (64 x 192 bf16 over 128
    threads: 12 each), or the earlier 2-byte stores from registers (one per value: 96)."""
    ptx = masked_gemm.compile_only(192, 2, keep_ptx=True, partial_smem=partial_smem).artifacts.PTX
    vec = len(re.findall(r"st\.global\.v4\.b32", ptx))
    scalar = len(re.findall(r"st\.global\.b16", ptx))
    assert (vec, scalar) == ((64 * 192 // 8 // 128, 0) if partial_smem else (0, 64 * 192 // 128))


# Instructions per K step of the math warpgroup's K loop besides the 4 wgmmas and the bn/2 FFMAs, measured on
# the DSL 4.8.1 cubin (benchmarks/sass_cute_gemm.py): before this bound 96 (bn192_cl2) / 65 (bn128_cl2) with
# two global weight-scale loads per step; now 65.5 / 54. The bound leaves ~5 % for compiler drift.
OTHER_PER_STEP = {192: 69, 128: 57}


@pytest.mark.parametrize("bn", [128, 192])
@pytest.mark.parametrize("cluster_m", [1, 2])
def test_k_loop_sass(bn, cluster_m):
    sass = pytest.importorskip("sass_cute_gemm")
    if sass.tool_dir() is None:
        pytest.skip("triton (its ptxas / cuobjdump) not findable")
    r = sass.report(bn, cluster_m)
    assert r["ops"]["QGMMA"] == 4 and r["ops"]["FFMA"] == 64 * bn // 128
    assert "LDG" not in r["ops"]            # weight scales from shared memory, A scales by TMA
    assert r["other"] <= OTHER_PER_STEP[bn], r["ops"]
    assert r["spill_bytes"] == 0 and r["serialization"] == []


def test_k_too_large_for_the_scale_buffers():
    with pytest.raises(ValueError, match="K"):
        masked_gemm._check_k(masked_gemm.sb_tiles(192, 4) * 128 + 128, 192, 4)
    masked_gemm._check_k(7168, 192, 4)
    # the stage counts stay those that fit without the buffers (room kept for K = 32768)
    assert (masked_gemm.max_stages(128), masked_gemm.max_stages(192)) == (5, 4)
    assert masked_gemm.sb_tiles(192, 4) * 128 >= masked_gemm.SB_RESERVED_K


def test_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="bn"):
        masked_gemm.compile_only(256, 1)
    with pytest.raises(ValueError, match="cluster_m"):
        masked_gemm.compile_only(128, 4)
    with pytest.raises(ValueError, match="stages"):
        masked_gemm.compile_only(192, 1, stages=9)
    with pytest.raises(ValueError, match="num_ctas"):
        masked_gemm.compile_only(128, 2, num_ctas=131)
