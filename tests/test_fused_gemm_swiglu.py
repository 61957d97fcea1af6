"""GEMM 1 with SwiGLU + 1x128 FP8 quant in its epilogue (launch.group_gemm_masked[_fp32]_swiglu_fp8_quant, issue 12)
under the Triton interpreter, at small shapes.

What is asserted: for the rows below masked_m the fused op's FP8 bytes and scales equal, bit for bit, the unfused
chain on the same inputs (GEMM 1 -> fused_mask_swiglu_fp8_quant (-> unpack_and_convert_scale on the UE8M0 recipe));
rows at or past masked_m are not written (a sentinel in the caller's buffers survives); an expert with no rows,
an uneven fill and I with pad groups in the CUTLASS bytes are covered, both recipes. check_finite raises the
unfused op's message (same count). Independently of both, the dequantized activations match a float64 SwiGLU of
the float64 GEMM within the rounding bound derived at `test_fused_matches_float64_reference`. The GPU twin at
DeepSeek-V3 shapes (the Gluon kernel) is tests/test_gpu_fused_gemm_swiglu.py.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from moe_ref import cutlass_sf  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

E_NUM, M, H = 3, 80, 256
COUNTS = [70, 0, 5]                  # two m-tiles of 64 (one partial), an empty expert, a short one


@pytest.fixture(scope="module")
def L(triton_launch):
    return triton_launch


def _problem(L, recipe: str, inter: int, seed: int = 0):
    """Quantized a [E·M, H], w_up [E, 2I, H] and their scales as the chain feeds GEMM 1, counts [E] int32."""
    from backend.ops.triton.chain import random_gemm1
    return random_gemm1(COUNTS, M, H, inter, recipe, "cpu", seed)


def _unfused(L, recipe, a, w_q, sa, sb, counts):
    """GEMM 1 -> fused_mask_swiglu_fp8_quant (-> unpack_and_convert_scale): the three launches of the chain."""
    from backend.ops.triton.chain import gemm1_swiglu_quant
    return gemm1_swiglu_quant(a, w_q, sa, sb, counts, M, recipe, fused=False)


def _fused(L, recipe, a, w_q, sa, sb, counts, out=None, **kw):
    if recipe == "ue8m0":
        return L.group_gemm_masked_swiglu_fp8_quant(a, w_q, sa, sb, counts, M, sfb_per_block=True, out=out, **kw)
    return L.group_gemm_masked_fp32_swiglu_fp8_quant(a, w_q, sa, sb, counts, M, out=out, **kw)


def _sf_row_of_byte(mn_pad: int, kb: int) -> torch.Tensor:
    """[mn_pad · kb] int64: the row each CUTLASS SF byte belongs to (from moe_ref.cutlass_sf's formula)."""
    r = np.arange(mn_pad)[:, None]
    c = np.arange(kb)[None, :]
    rows = np.empty(mn_pad * kb, dtype=np.int64)
    rows[cutlass_sf.sf_byte_offset(r, c, kb).reshape(-1)] = np.broadcast_to(r, (mn_pad, kb)).reshape(-1)
    return torch.from_numpy(rows)


def _sentinel_out(L, recipe, inter):
    """Caller buffers filled with a sentinel byte (0x5A) that no valid row should keep everywhere."""
    act = torch.full((E_NUM, M, inter), 0x5A, dtype=torch.uint8).view(torch.float8_e4m3fn)
    s = inter // 128
    if recipe == "ue8m0":
        return act, torch.full((E_NUM, 128, 16 * -(-s // 4)), 0x5A, dtype=torch.uint8)
    phys = torch.full((E_NUM, s, 4 * ((M + 3) // 4 * 4)), 0x5A, dtype=torch.uint8).view(torch.float32)
    return act, phys.permute(0, 2, 1)[:, :M]


def _valid_rows_equal_and_rest_untouched(recipe, got, want, sentinel_bytes):
    """Per expert: rows < count equal `want` bit for bit; rows >= count still hold the sentinel bytes."""
    act, scale = got
    for e, cnt in enumerate(COUNTS):
        a_got = act[e].view(torch.uint8)
        assert torch.equal(a_got[:cnt], want[0][e, :cnt].view(torch.uint8)), f"act, expert {e}"
        assert torch.equal(a_got[cnt:], sentinel_bytes[0][e, cnt:].view(torch.uint8)), f"act tail, expert {e}"
        if recipe == "ue8m0":
            rows = _sf_row_of_byte(scale.shape[1], scale.shape[2])
            flat, ref, sen = scale[e].reshape(-1), want[1][e].reshape(-1), sentinel_bytes[1][e].reshape(-1)
            assert torch.equal(flat[rows < cnt], ref[rows < cnt]), f"CUTLASS bytes, expert {e}"
            assert torch.equal(flat[rows >= cnt], sen[rows >= cnt]), f"CUTLASS bytes tail, expert {e}"
        else:
            assert torch.equal(scale[e, :cnt].view(torch.int32), want[1][e, :cnt].view(torch.int32))
            assert torch.equal(scale[e, cnt:].view(torch.int32), sentinel_bytes[1][e, cnt:].view(torch.int32))


@pytest.mark.parametrize("recipe", ["ue8m0", "fp32"])
@pytest.mark.parametrize("inter", [256, 512])        # S = 2 groups: CUTLASS pad groups 2, 3; S = 4: none
def test_fused_equals_unfused_chain_bit_for_bit(L, recipe, inter):
    a, w_q, sa, sb, counts = _problem(L, recipe, inter)
    want = _unfused(L, recipe, a, w_q, sa, sb, counts)
    out = _sentinel_out(L, recipe, inter)
    keep = (out[0].clone(), out[1].clone())
    got = _fused(L, recipe, a, w_q, sa, sb, counts, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    if recipe == "ue8m0":
        assert got[1].shape == want[1].shape
    _valid_rows_equal_and_rest_untouched(recipe, got, want, keep)
    assert got[0][0, :COUNTS[0]].view(torch.uint8).any()          # not all zero: the comparison has content


def test_new_buffers_have_the_unfused_shapes(L):
    a, w_q, sa, sb, counts = _problem(L, "fp32", 256)
    act, scale = _fused(L, "fp32", a, w_q, sa, sb, counts)
    want_act, want_scale = _unfused(L, "fp32", a, w_q, sa, sb, counts)
    assert act.shape == want_act.shape and act.dtype == torch.float8_e4m3fn
    assert scale.shape == want_scale.shape and scale.stride() == want_scale.stride()


@pytest.mark.parametrize("recipe", ["ue8m0", "fp32"])
def test_fused_matches_float64_reference(L, recipe):
    """Dequantized act vs y = silu(gate)·lin of the float64 GEMM of the dequantized operands. Bound per element:
    gate and lin rounded to bf16 (2^-9 relative each; y's relative error from gate's is at most 1.28x it, the max
    of 1 + g(1 - sigmoid(g))), y rounded to bf16 (2^-9): < 2^-7 relative; the e4m3 cast: 2^-4 relative for
    normals, half a subnormal step s·2^-10 absolute. fp32 accumulation order adds ~2^-20, inside the margin."""
    inter = 256
    a, w_q, sa, sb, counts = _problem(L, recipe, inter, seed=1)
    act, scale = _sentinel_out(L, recipe, inter)
    act.view(torch.uint8).zero_(), scale.zero_()                             # rows past the counts: zero bytes
    act, scale = _fused(L, recipe, a, w_q, sa, sb, counts, out=(act, scale))
    if recipe == "ue8m0":
        a_s = L.cutlass_scale_to_fp32(sa, M)[:, :, :H // 128]
        b_s = L.cutlass_scale_to_fp32(sb, 2 * inter)[:, ::128, :H // 128]
        s_act = L.cutlass_scale_to_fp32(scale, M)[:, :, :inter // 128]
    else:
        a_s, b_s, s_act = sa, sb, scale
    a_deq = a.double().view(E_NUM, M, H // 128, 128) * a_s.double()[..., None]
    w_deq = (w_q.double().view(E_NUM, 2 * inter // 128, 128, H // 128, 128)
             * b_s.double()[:, :, None, :, None]).view(E_NUM, 2 * inter, H)
    up = torch.einsum("emk,enk->emn", a_deq.view(E_NUM, M, H), w_deq)
    y = torch.nn.functional.silu(up[..., :inter]) * up[..., inter:]
    s_el = s_act.double().repeat_interleave(128, dim=2)
    deq = act.double() * s_el
    for e, cnt in enumerate(COUNTS):
        err = (deq[e, :cnt] - y[e, :cnt]).abs()
        bound = (2.0 ** -4 + 2.0 ** -7) * y[e, :cnt].abs() + s_el[e, :cnt] * 2.0 ** -10
        assert bool((err <= bound).all()), f"expert {e}: worst excess {float((err - bound).max())}"


@pytest.mark.parametrize("recipe", ["ue8m0", "fp32"])
def test_check_finite_raises_the_unfused_message(L, recipe):
    a, w_q, sa, sb, counts = _problem(L, recipe, 256)
    a = a.clone()
    a.view(torch.uint8)[3, :5] = 0x7F                         # e4m3 NaN in a valid row of expert 0
    a.view(torch.uint8)[M + 2, 0] = 0x7F                      # expert 1 has no rows: not counted
    with pytest.raises(ValueError) as want:
        if recipe == "ue8m0":
            up = torch.zeros(E_NUM * M, 512, dtype=torch.bfloat16)
            L.group_gemm_masked(a, w_q, sa, sb, counts, up, None, M, impl="explicit", sfb_per_block=True)
        else:
            up = torch.zeros(E_NUM * M, 512, dtype=torch.bfloat16)
            L.group_gemm_masked_fp32(a, w_q, sa, sb, counts, up, None, M)
        L.fused_mask_swiglu_fp8_quant(up.view(E_NUM, M, 512), counts, 128, recipe == "ue8m0", check_finite=True)
    with pytest.raises(ValueError) as got:
        _fused(L, recipe, a, w_q, sa, sb, counts, check_finite=True)
    assert str(got.value) == str(want.value)
    assert "256 non-finite values" in str(got.value)           # the whole row: a NaN reaches every output column
    _fused(L, recipe, a, w_q, sa, sb, counts)                  # check_finite=False: nothing looked for, no raise


def test_arguments_are_checked(L):
    a, w_q, sa, sb, counts = _problem(L, "ue8m0", 256)
    with pytest.raises(ValueError, match=r"out: expected \(act \[3, 80, 256\] float8_e4m3fn contiguous"):
        _fused(L, "ue8m0", a, w_q, sa, sb, counts, out=(torch.empty(3, 80, 128, dtype=torch.float8_e4m3fn),
                                                        torch.empty(3, 128, 16, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="kernel: expected one of 'tl', 'gluon' or None, got 'cutlass'"):
        _fused(L, "ue8m0", a, w_q, sa, sb, counts, kernel="cutlass")
    with pytest.raises(ValueError, match="I a multiple of 128, got 2I = 320"):
        _fused(L, "ue8m0", a, w_q[:, :320], sa, sb, counts)
    with pytest.raises(ValueError, match="sfb_per_block: the Gluon kernel reads one weight byte per 128x128 block"):
        L.group_gemm_masked_swiglu_fp8_quant(a, w_q, sa, sb, counts, M, kernel="gluon")
    a32, w32, sa32, sb32, _ = _problem(L, "fp32", 256)
    with pytest.raises(ValueError, match=r"scale MN-major view of \[3, 2, 80\] torch.float32\), got act"):
        _fused(L, "fp32", a32, w32, sa32, sb32, counts, out=(torch.empty(3, 80, 256, dtype=torch.float8_e4m3fn),
                                                             torch.empty(3, 80, 2)))


def test_chain_fused_equals_unfused(L):
    """HtChain(fused=True) (the default at this size) against fused=False on the same inputs: the layer output bit for bit."""
    from backend.ops.triton.chain import HtChain, random_chain
    ch = random_chain(12, 256, 128, 4, 2, "cpu", headroom=1)
    assert ch.fused
    unfused = HtChain(ch.x, ch.topk_ids, ch.topk_weights, ch.w_up, ch.sfb_up, ch.w_dn, ch.sfb_dn, ch.m, fused=False)
    want = unfused.run().clone()
    assert torch.equal(ch.run(), want)
    assert want.abs().max() > 0


@pytest.mark.parametrize("recipe", ["ue8m0", "fp32"])
def test_zero_outputs_make_whole_tensors_equal(L, recipe):
    """chain.zero_outputs as `out`: rows past the counts stay zero, as the unfused path writes them, so the whole
    tensors compare equal (what tests/test_gpu_fused_gemm_swiglu.py asserts at DeepSeek-V3 shapes)."""
    from backend.ops.triton.chain import gemm1_swiglu_quant, zero_outputs
    a, w_q, sa, sb, counts = _problem(L, recipe, 256)
    want = _unfused(L, recipe, a, w_q, sa, sb, counts)
    got = gemm1_swiglu_quant(a, w_q, sa, sb, counts, M, recipe, out=zero_outputs(E_NUM, M, 256, recipe, "cpu"))
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert got[1].shape == want[1].shape and got[1].stride() == want[1].stride()
    assert torch.equal(got[1].view(torch.uint8) if recipe == "ue8m0" else got[1], want[1])


def test_per_row_weight_bytes_equal_the_unfused_per_row_path(L):
    """sfb_per_block=False (per-row weight bytes, two multiplies per promotion) against the unfused chain with the
    same GEMM mode: valid rows bit for bit."""
    a, w_q, sa, sb, counts = _problem(L, "ue8m0", 256, seed=2)
    up = torch.zeros(E_NUM * M, 512, dtype=torch.bfloat16)
    L.group_gemm_masked(a, w_q, sa, sb, counts, up, None, M, impl="explicit", sfb_per_block=False)
    act, act_s = L.fused_mask_swiglu_fp8_quant(up.view(E_NUM, M, 512), counts, 128, True)
    want = (act, L.unpack_and_convert_scale(act_s, counts))
    out = _sentinel_out(L, "ue8m0", 256)
    keep = (out[0].clone(), out[1].clone())
    got = L.group_gemm_masked_swiglu_fp8_quant(a, w_q, sa, sb, counts, M, sfb_per_block=False, out=out)
    _valid_rows_equal_and_rest_untouched("ue8m0", got, want, keep)


def test_htchain_fuses_only_where_it_measured_faster():
    """fused=None: fused at W·K_top / E <= FUSED_MAX_ROWS rows per expert, the three launches above; an explicit
    choice wins."""
    from backend.ops.triton import chain as C
    ch = C.random_chain(12, 256, 128, 4, 2, "cpu", headroom=1)
    assert ch.fused                                                    # 6 rows per expert
    args = (ch.x, ch.topk_ids, ch.topk_weights, ch.w_up, ch.sfb_up, ch.w_dn, ch.sfb_dn, ch.m)
    big_ids = ch.topk_ids.repeat(C.FUSED_MAX_ROWS, 1)                  # 6 · FUSED_MAX_ROWS rows per expert
    big = C.HtChain(ch.x.repeat(C.FUSED_MAX_ROWS, 1), big_ids, ch.topk_weights.repeat(C.FUSED_MAX_ROWS, 1),
                    *args[3:7], ch.m)
    assert not big.fused and big.up is not None
    assert not C.HtChain(*args, fused=False).fused and C.HtChain(*args, fused=True).fused
