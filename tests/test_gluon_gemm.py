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
