"""GEMM 1 with SwiGLU + 1x128 FP8 quant in its epilogue on the GPU, at DeepSeek-V3 shapes (issue 12).

launch.group_gemm_masked[_fp32]_swiglu_fp8_quant (the Gluon PAIR kernel on SM90, and the tl twin) against the
unfused chain (GEMM 1 -> fused_mask_swiglu_fp8_quant (-> unpack_and_convert_scale)) on the same inputs: the fp8
bytes and the scales (CUTLASS bytes / fp32) equal bit for bit, whole tensors (the fused op writes into zeroed
buffers, the unfused path zeroes the rows past the counts). Unfused GEMM 1 by launch's rule and by each kernel
(tl and Gluon GEMMs are bit-identical on SM90, benchmarks/NOTES_gpu.md). Also: check_finite's message, and the
whole ht chain fused vs unfused. The CPU twin (interpreter, small shapes): tests/test_fused_gemm_swiglu.py.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

H, I, E_NUM = 7168, 2048, 32
FILLS = {"even256": ([256] * E_NUM, 256),
         "uneven": ([(37 * e) % 385 for e in range(E_NUM)], 384)}      # 0..384 rows, expert 0 empty


def _same(x, y) -> bool:
    return bool(torch.equal(x.view(torch.uint8), y.view(torch.uint8))) if x.dtype != torch.float32 \
        else bool(torch.equal(x, y))


@pytest.fixture(scope="module", params=[(r, f) for r in ("ue8m0", "fp32") for f in FILLS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def case(request):
    from backend.ops.triton.chain import random_gemm1
    recipe, fill = request.param
    counts, m = FILLS[fill]
    assert max(counts) <= m and (0 in counts or fill != "uneven")
    return recipe, m, random_gemm1(counts, m, H, I, recipe, "cuda", seed=5)


@pytest.mark.parametrize("unfused_kernel", [None, "tl", "gluon"])
@pytest.mark.parametrize("fused_kernel", ["gluon", "tl"])
def test_fused_equals_unfused(case, fused_kernel, unfused_kernel):
    from backend.ops.triton import gluon_gemm
    from backend.ops.triton.chain import gemm1_swiglu_quant, zero_outputs
    if "gluon" in (fused_kernel, unfused_kernel) and not gluon_gemm.available():
        pytest.skip(gluon_gemm.unavailable_reason())
    recipe, m, (a, w, sa, sb, counts) = case
    want = gemm1_swiglu_quant(a, w, sa, sb, counts, m, recipe, fused=False, kernel=unfused_kernel)
    got = gemm1_swiglu_quant(a, w, sa, sb, counts, m, recipe, out=zero_outputs(E_NUM, m, I, recipe, "cuda"),
                             kernel=fused_kernel)
    torch.cuda.synchronize()
    assert want[0].view(torch.uint8)[counts.argmax()].any()           # the compared bytes are not all zero
    assert _same(got[0], want[0]), "act bytes differ"
    assert got[1].shape == want[1].shape and got[1].stride() == want[1].stride()
    assert _same(got[1], want[1]), "scales differ"


@pytest.mark.parametrize("fused_kernel", ["gluon", "tl"])
def test_check_finite_message_equals_unfused(fused_kernel):
    from backend.ops.triton import gluon_gemm
    from backend.ops.triton import launch as L
    from backend.ops.triton.chain import random_gemm1
    if fused_kernel == "gluon" and not gluon_gemm.available():
        pytest.skip(gluon_gemm.unavailable_reason())
    counts, m = FILLS["uneven"]
    a, w, sa, sb, cnt = random_gemm1(counts, m, H, I, "ue8m0", "cuda", seed=6)
    a.view(torch.uint8)[1 * m + 3, :7] = 0x7F                          # e4m3 NaN in a valid row of expert 1
    up = torch.empty(E_NUM * m, 2 * I, dtype=torch.bfloat16, device="cuda")
    L.group_gemm_masked(a, w, sa, sb, cnt, up, None, m, sfb_per_block=True)
    with pytest.raises(ValueError) as want:
        L.fused_mask_swiglu_fp8_quant(up.view(E_NUM, m, 2 * I), cnt, 128, True, check_finite=True)
    with pytest.raises(ValueError) as got:
        L.group_gemm_masked_swiglu_fp8_quant(a, w, sa, sb, cnt, m, sfb_per_block=True, check_finite=True,
                                             kernel=fused_kernel)
    assert str(got.value) == str(want.value)
    assert f"{I} non-finite values" in str(got.value)


def test_chain_fused_equals_unfused():
    from backend.ops.triton.chain import HtChain, random_chain
    ch = random_chain(1024, H, I, E_NUM, 8, "cuda")
    assert ch.fused
    other = HtChain(ch.x, ch.topk_ids, ch.topk_weights, ch.w_up, ch.sfb_up, ch.w_dn, ch.sfb_dn, ch.m, fused=False)
    assert torch.equal(ch.run(), other.run())
