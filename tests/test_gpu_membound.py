"""Memory-bound kernels on a GPU (issue 12): what the interpreter cannot show.

- `kernels._exp_ftz` (the flush-to-zero ex2 of the SwiGLU) gives the same 1 + exp(-gate) as tl.exp for every
  bf16 gate (all 65536 bit patterns: the SwiGLU kernel reads bf16 `up`, and the fused GEMM epilogues round gate
  to bf16 before the SwiGLU), so the SwiGLU + quant outputs are the bytes they were with tl.exp.
- unpack_and_convert_scale at the benchmark's shape (E=32, MN-major words, counts) against the byte formula of
  moe_ref.cutlass_sf written in torch (the interpreter test compares with moe_ref at small shapes).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from backend.ops.triton.kernels import _exp_ftz  # noqa: E402  (conftest has decorated the kernels already)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@triton.jit
def _den_both(g_ptr, a_ptr, b_ptr, N, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    g = tl.load(g_ptr + i, mask=i < N, other=0.0).to(tl.float32)
    tl.store(a_ptr + i, 1.0 + tl.exp(-g), mask=i < N)
    tl.store(b_ptr + i, 1.0 + _exp_ftz(g), mask=i < N)


def test_exp_ftz_equals_tl_exp_for_every_bf16_gate():
    gate = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32, device="cuda").to(torch.int16).view(torch.bfloat16)
    a = torch.empty(gate.numel(), dtype=torch.float32, device="cuda")
    b = torch.empty_like(a)
    _den_both[(triton.cdiv(gate.numel(), 1024),)](gate, a, b, gate.numel(), BLOCK=1024)
    same = (a.view(torch.int32) == b.view(torch.int32)) | (torch.isnan(a) & torch.isnan(b))
    assert bool(same.all()), f"{int((~same).sum())} bf16 gates differ, e.g. {gate[~same][:4].tolist()}"
    assert bool((a[torch.isfinite(gate.float())] >= 1.0).all())      # the denominators are not all NaN / zero


def _sf_reference(words: torch.Tensor, counts: torch.Tensor, repeat: int) -> torch.Tensor:
    """[E, MN, C] packed words -> CUTLASS SF bytes [E, align(MN,128), KB = 4·repeat·C]: each byte `repeat` times,
    swizzled (tile (r // 128, kb // 4) of 512 bytes, byte (r % 32)·16 + ((r % 128) // 32)·4 + kb % 4), rows >= the
    count zero."""
    e_num, mn, c = words.shape
    kb = 4 * repeat * c
    b = words.contiguous().view(torch.uint8).view(e_num, mn, 4 * c).repeat_interleave(repeat, dim=2)    # [E, MN, KB]
    b = torch.where(torch.arange(mn, device=b.device)[None, :, None] < counts.view(-1, 1, 1), b, 0)
    mn_pad = -(-mn // 128) * 128
    full = torch.zeros(e_num, mn_pad, kb, dtype=torch.uint8, device=b.device)
    full[:, :mn] = b
    t = full.view(e_num, mn_pad // 128, 4, 32, kb // 4, 4)               # (e, row tile, r%128//32, r%32, col tile, kb%4)
    return t.permute(0, 1, 4, 3, 2, 5).reshape(e_num, mn_pad, kb)


def test_unpack_and_convert_scale_at_the_benchmark_shape():
    from backend.ops.triton import launch as L
    from moe_ref.fp8_torch import mn_major_view
    gen = torch.Generator(device="cuda").manual_seed(12)
    e_num, mn, c = 32, 4039, 14
    m_pad = -(-mn // 4) * 4
    phys = torch.randint(-2 ** 31, 2 ** 31 - 1, (e_num, c, m_pad), dtype=torch.int32, device="cuda", generator=gen)
    words = mn_major_view(phys, mn)
    counts = torch.randint(0, mn + 1, (e_num,), dtype=torch.int32, device="cuda", generator=gen)
    counts[0] = mn
    for group_size, repeat in ((128, 4), (32, 1)):
        got = L.unpack_and_convert_scale(words, counts, group_size=group_size)
        assert torch.equal(got, _sf_reference(words, counts, repeat)), group_size


@pytest.mark.parametrize("sf_group", [None, 128])
def test_gather_move_equals_scatter_move_at_the_issue_shape(monkeypatch, sf_group):
    """launch.PERMUTE_MOVE="gather" writes the bytes of the default scatter (itself checked against torch in
    tests/test_gpu_permute.py) at W=4096, top-8 of 32, H=7168, UE8M0 words MN-major or as CUTLASS bytes."""
    from backend.ops.triton import launch as L
    gen = torch.Generator(device="cuda").manual_seed(13)
    w, h, e_num, k_top = 4096, 7168, 32, 8
    ids = torch.argsort(torch.rand(w, e_num, device="cuda", generator=gen), 1)[:, :k_top].contiguous()
    ids[torch.rand(w, k_top, device="cuda", generator=gen) < 0.05] = -1
    x = torch.randint(0, 255, (w, h), dtype=torch.uint8, device="cuda", generator=gen).view(torch.float8_e4m3fn)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (w, h // 512), dtype=torch.int32, device="cuda", generator=gen)
    m = int(torch.bincount(ids[ids >= 0], minlength=e_num).max()) + 40
    outs = []
    for mode in ("scatter", "gather"):
        monkeypatch.setattr(L, "PERMUTE_MOVE", mode)
        err = torch.zeros(5, dtype=torch.int64, device="cuda")
        outs.append(L.prefill_permute_to_masked_gemm(x, words, ids, e_num, m, errors=err, sf_group=sf_group))
        assert not any(err.tolist())
    (px, ps, imap, counts), (px2, ps2, imap2, counts2) = outs
    assert torch.equal(px.view(torch.uint8), px2.view(torch.uint8)) and torch.equal(ps, ps2)
    assert torch.equal(imap, imap2) and torch.equal(counts, counts2)
