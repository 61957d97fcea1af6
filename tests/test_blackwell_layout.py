"""moe_ref.blackwell_layout: the two fused blackwell_ops ops of FastDeploy #7374 (docs/upstream.md §2).

The old path of #7053 (FastDeploy's permute / SwiGLU quant, then unpack_and_convert_scale) and the new
fused ops must hand the GEMM the same bytes where both apply (1x128 UE8M0 scales): compared exactly.
"""
import ml_dtypes
import numpy as np
import paddle
import pytest

from backend.ops import get_provider
from moe_ref import cutlass_sf
from moe_ref import layout
from moe_ref.blackwell_layout import (dequant_group_wise, fused_mask_swiglu_fp8_quant_blackwell, group_wise_quant,
                                      prefill_permute_to_blackwell_masked_gemm, quantize_weights_1x32, sf_columns,
                                      ue8m0_bytes_to_cutlass_sf)
from moe_ref.fp8 import pack_scale_ue8m0
from moe_ref.quant import per_token_group_quant


def _routing(w, k_top, e, seed, pad_rows=2):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(e, size=k_top, replace=False) for _ in range(w)]).astype(np.int64)
    ids[rng.random(ids.shape) < 0.2] = -1
    ids[rng.choice(w, size=pad_rows, replace=False)] = -1          # all -1 padding rows anywhere
    return paddle.to_tensor(ids)


def _quantized_tokens(w, h, seed, group_size=128):
    rng = np.random.default_rng(seed)
    x = paddle.to_tensor((rng.standard_normal((w, h)) * np.exp(rng.uniform(-4, 4, (w, 1)))).astype(np.float32))
    return per_token_group_quant(x, group_size=group_size, use_ue8m0=True)


@pytest.mark.parametrize("w,h,e,m,k_top", [(40, 256, 4, 48, 4), (33, 640, 8, 130, 6), (20, 1024, 8, 24, 8)])
def test_permute_agrees_with_fastdeploy_permute_plus_unpack_and_convert_scale(w, h, e, m, k_top):
    q, s = _quantized_tokens(w, h, seed=w)
    words = pack_scale_ue8m0(s)                                          # [W, ceil(S/4)] int32, as DeepEP delivers
    ids = _routing(w, k_top, e, seed=h)
    new = prefill_permute_to_blackwell_masked_gemm(q, words, ids, e, m)
    old = layout.prefill_permute_to_masked_gemm(q, words, ids, e, m)
    paddle_ops = get_provider("paddle")
    old_sf = paddle_ops.unpack_and_convert_scale(old.permute_scale.logical_view(), old.token_nums_per_expert)
    assert new.permute_sf.dtype == paddle.uint8
    assert list(new.permute_sf.shape) == list(old_sf.shape) == [e, -(-m // 128) * 128, sf_columns(h, 128)]
    np.testing.assert_array_equal(new.permute_sf.numpy(), old_sf.numpy())
    assert list(new.permute_x.shape) == [e * m, h]
    np.testing.assert_array_equal(new.permute_x.view(paddle.uint8).numpy(),
                                  old.permute_x.view(paddle.uint8).reshape([e * m, h]).numpy())
    np.testing.assert_array_equal(new.permuted_indice_map.numpy(), old.permuted_indice_map.numpy())
    np.testing.assert_array_equal(new.token_nums_per_expert.numpy(), old.token_nums_per_expert.numpy())
    assert new.permuted_indice_map.dtype == paddle.int32 and list(new.token_nums_per_expert.shape) == [e, 1]


@pytest.mark.parametrize("e,m,i,group", [(3, 40, 256, 128), (2, 130, 384, 128), (4, 16, 96, 32), (2, 129, 160, 32)])
def test_swiglu_quant_scales_are_the_gemm_bytes(e, m, i, group):
    rng = np.random.default_rng(e * m + i)
    up = paddle.to_tensor(rng.standard_normal((e * m, 2 * i)).astype(np.float32) * 3).astype(paddle.bfloat16)
    counts = paddle.to_tensor(rng.integers(0, m + 1, size=e).astype(np.int32))
    act, sf = fused_mask_swiglu_fp8_quant_blackwell(up, counts, group_size=group)
    assert act.dtype == paddle.float8_e4m3fn and list(act.shape) == [e * m, i]
    assert sf.dtype == paddle.uint8 and list(sf.shape) == [e, -(-m // 128) * 128, sf_columns(i, group)]
    # Independent derivation (numpy + ml_dtypes): bf16 SwiGLU, per-group amax, exponent of the next power of two.
    u = up.astype(paddle.float32).numpy().astype(np.float64)
    gate, lin = u[:, :i], u[:, i:]
    y = (lin * gate / (1.0 + np.exp(-gate))).astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
    amax = np.maximum(np.abs(y).reshape(e * m, -1, group).max(-1), 1e-10)
    mant, ex = np.frexp((amax / np.float32(448.0)).astype(np.float32))
    exp_byte = (ex - 1 + (mant != 0.5) + 127).astype(np.uint8)         # ceil(log2(s)) + 127
    valid = (np.arange(m)[None, :] < counts.numpy()[:, None]).reshape(e * m, 1)
    exp_byte = np.where(valid, exp_byte, 0)
    want = np.zeros(sf.shape, np.uint8)
    wide = np.repeat(exp_byte, group // 32, axis=1).reshape(e, m, -1)
    want[:, :m, : wide.shape[2]] = wide
    np.testing.assert_array_equal(cutlass_sf.unswizzle(sf).numpy(), want)
    s = 2.0 ** (exp_byte.astype(np.float64) - 127)
    q_want = np.clip(y / np.repeat(s, group, axis=1), -448, 448).astype(ml_dtypes.float8_e4m3fn)
    q_want = np.where(valid, q_want.view(np.uint8), 0)
    np.testing.assert_array_equal(act.view(paddle.uint8).numpy(), q_want)


@pytest.mark.parametrize("e,m,i", [(3, 40, 256), (2, 130, 640)])
def test_swiglu_quant_agrees_with_fused_mask_swiglu_plus_unpack_and_convert_scale(e, m, i):
    rng = np.random.default_rng(m)
    up = paddle.to_tensor(rng.standard_normal((e, m, 2 * i)).astype(np.float32) * 5).astype(paddle.bfloat16)
    counts = paddle.to_tensor(rng.integers(0, m + 1, size=(e, 1)).astype(np.int32))
    paddle_ops = get_provider("paddle")
    act_old, scale_old = paddle_ops.fused_mask_swiglu_fp8_quant(up, counts, 128, True)
    sf_old = paddle_ops.unpack_and_convert_scale(scale_old, counts)
    act, sf = fused_mask_swiglu_fp8_quant_blackwell(up.reshape([e * m, 2 * i]), counts, group_size=128)
    np.testing.assert_array_equal(sf.numpy(), sf_old.numpy())
    np.testing.assert_array_equal(act.view(paddle.uint8).numpy(), act_old.view(paddle.uint8).reshape([e * m, i]).numpy())


def test_permute_takes_1x32_bytes():
    w, h, e, m = 24, 192, 5, 24
    q, s = _quantized_tokens(w, h, seed=5, group_size=32)
    b = (np.log2(s.numpy()).astype(np.int32) + 127).astype(np.uint8)     # [W, H/32] raw bytes, as group_wise_quant
    ids = _routing(w, 4, e, seed=6)
    out = prefill_permute_to_blackwell_masked_gemm(q, paddle.to_tensor(b), ids, e, m)
    rm = cutlass_sf.unswizzle(out.permute_sf).numpy()
    idx = out.permuted_indice_map.numpy()
    for t, k in zip(*np.nonzero(idx >= 0)):
        ex, slot = divmod(int(idx[t, k]), m)
        np.testing.assert_array_equal(rm[ex, slot, : h // 32], b[t])
    counts = out.token_nums_per_expert.numpy().ravel()
    for ex in range(e):
        assert not rm[ex, counts[ex]:].any()


def test_errors_name_the_argument():
    q, s = _quantized_tokens(8, 256, seed=1)
    words = pack_scale_ue8m0(s)
    ids = _routing(8, 4, 4, seed=2, pad_rows=0)
    with pytest.raises(TypeError, match="topk_ids"):
        prefill_permute_to_blackwell_masked_gemm(q, words, ids.astype(paddle.int32), 4, 16)
    with pytest.raises(ValueError, match="scale"):
        prefill_permute_to_blackwell_masked_gemm(q, words[:, :0], ids, 4, 16)
    up = paddle.zeros([10, 64], dtype=paddle.bfloat16)
    with pytest.raises(ValueError, match="up"):
        fused_mask_swiglu_fp8_quant_blackwell(up, paddle.to_tensor([1, 2, 3], dtype=paddle.int32))
    with pytest.raises(ValueError, match="group_size"):
        ue8m0_bytes_to_cutlass_sf(paddle.zeros([1, 4, 2], dtype=paddle.uint8), 64, 8)


# ------------------------------------------------------------------ the 1x32 recipe of #7666 (group_wise_quant)

def _ue8m0_bytes_numpy(x32: np.ndarray, group: int = 32, floor: float = 1e-10) -> np.ndarray:
    """Per row and group: the UE8M0 byte of the smallest power of two >= amax/448 (numpy, zero-padded ragged group)."""
    n, k = x32.shape
    pad = np.zeros((n, -(-k // group) * group), np.float32)
    pad[:, :k] = x32
    amax = np.maximum(np.abs(pad).reshape(n, -1, group).max(-1), floor).astype(np.float32)
    mant, ex = np.frexp(amax / np.float32(448.0))
    return (ex - 1 + (mant != 0.5) + 127).astype(np.uint8)


@pytest.mark.parametrize("n,k", [(7, 256), (5, 200), (128, 96)])
def test_group_wise_quant_matches_numpy_and_ml_dtypes(n, k):
    rng = np.random.default_rng(n + k)
    x = paddle.to_tensor((rng.standard_normal((n, k)) * np.exp(rng.uniform(-6, 6, (n, 1)))).astype(np.float32))
    x = x.astype(paddle.bfloat16)
    q, sf = group_wise_quant(x)
    x32 = x.astype(paddle.float32).numpy()
    want = _ue8m0_bytes_numpy(x32)
    assert sf.dtype == paddle.uint8 and list(sf.shape) == [n, -(-k // 32)]
    np.testing.assert_array_equal(sf.numpy(), want)
    s = np.repeat(2.0 ** (want.astype(np.float64) - 127), 32, axis=1)[:, :k]
    q_want = np.clip(x32 / s, -448, 448).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(q.view(paddle.uint8).numpy(), q_want)
    np.testing.assert_array_equal(dequant_group_wise(q, sf).numpy(), q_want.view(ml_dtypes.float8_e4m3fn).astype(np.float32) * s)


def test_group_wise_quant_scales_are_never_coarser_than_1x128():
    rng = np.random.default_rng(3)
    x = paddle.to_tensor((rng.standard_normal((64, 512)) * np.exp(rng.uniform(-5, 5, (64, 512)))).astype(np.float32))
    _, sf32 = group_wise_quant(x)
    _, s128 = per_token_group_quant(x, group_size=128, use_ue8m0=True, amax_floor=1e-10)
    e128 = np.log2(s128.numpy()).astype(np.int64) + 127
    # a 32-group's amax is at most its 128-group's: its power-of-two scale can only be smaller or equal
    assert (sf32.numpy().astype(np.int64) <= np.repeat(e128, 4, axis=1)).all()
    assert (sf32.numpy().astype(np.int64) < np.repeat(e128, 4, axis=1)).any()


def test_group_wise_quant_swizzled_weights_and_1x32_gemm():
    e, m, n, k = 2, 16, 128, 256
    rng = np.random.default_rng(11)
    w_up = paddle.to_tensor(rng.standard_normal((e, n, k)).astype(np.float32) * 0.05).astype(paddle.bfloat16)
    w_down = paddle.to_tensor(rng.standard_normal((e, 128, n)).astype(np.float32)).astype(paddle.bfloat16)
    up_q, up_sf, down_q, down_sf = quantize_weights_1x32(w_up, w_down)
    assert list(up_sf.shape) == [e, n, k // 32] and list(down_sf.shape) == [e, 128, n // 32]
    plain_q, plain_sf = group_wise_quant(w_up)
    np.testing.assert_array_equal(up_sf.numpy(), cutlass_sf.swizzle(plain_sf).numpy())
    np.testing.assert_array_equal(up_q.view(paddle.uint8).numpy(), plain_q.view(paddle.uint8).numpy())
    with pytest.raises(ValueError, match="use_swizzle"):
        group_wise_quant(w_up[:, :100], use_swizzle=True)
    # activations in 1x32 groups -> GEMM-ready bytes -> the masked GEMM reads one byte per 32 K-elements
    a = paddle.to_tensor(rng.standard_normal((e * m, k)).astype(np.float32) * np.exp(rng.uniform(-3, 3, (1, k))))
    a_q, a_sf = group_wise_quant(a.astype(paddle.bfloat16))
    sfa = ue8m0_bytes_to_cutlass_sf(a_sf.reshape([e, m, -1]), 32, sf_columns(k, 32))
    counts = paddle.to_tensor([m, 9], dtype=paddle.int32)
    out = paddle.zeros([e * m, n], dtype=paddle.bfloat16)
    out = get_provider("paddle").group_gemm_masked(a_q, up_q, sfa, up_sf, counts, out, None, m, -1)
    a_deq = dequant_group_wise(a_q, a_sf).numpy().astype(np.float64).reshape(e, m, k)
    w_deq = dequant_group_wise(up_q, up_sf, swizzled=True).numpy().astype(np.float64)
    want = np.einsum("emk,enk->emn", a_deq, w_deq)
    got = out.astype(paddle.float32).numpy().reshape(e, m, n)
    for ex, c in enumerate([m, 9]):
        # only float32 summation order and the final bf16 rounding (2^-8 relative) separate the two
        np.testing.assert_allclose(got[ex, :c], want[ex, :c], rtol=2 ** -8, atol=1e-6 * np.abs(want).max())
        assert not got[ex, c:].any()


def test_swiglu_quant_never_reads_rows_past_the_counts():
    e, m, i = 2, 8, 128
    up = paddle.randn([e * m, 2 * i]).astype(paddle.bfloat16)
    counts = paddle.to_tensor([3, 8], dtype=paddle.int32)
    garbage = up.clone()
    garbage[3:m] = float("nan")                                   # paddle.empty leftovers of expert 0
    act, sf = fused_mask_swiglu_fp8_quant_blackwell(up, counts)
    act_g, sf_g = fused_mask_swiglu_fp8_quant_blackwell(garbage, counts)
    np.testing.assert_array_equal(act_g.view(paddle.uint8).numpy(), act.view(paddle.uint8).numpy())
    np.testing.assert_array_equal(sf_g.numpy(), sf.numpy())
