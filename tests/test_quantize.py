"""backend.moe.quantize: the method's weight quantization at load and token quantization before a dispatch."""
import numpy as np
import paddle
import pytest

from backend import ops
from backend.moe.quantize import pack_row_scales_ue8m0, quantize_tokens, quantize_weight_blocks_ue8m0
from moe_ref import fp8 as ref_fp8
from moe_ref import quant


def test_weight_quantizer_matches_reference_on_ragged_shapes():
    w = paddle.to_tensor(np.random.default_rng(8).normal(0, 0.5, size=(200, 72)).astype(np.float32))
    q, s = quantize_weight_blocks_ue8m0(w)
    q_ref, s_ref = quant.per_block_quant(w, use_ue8m0=True)
    np.testing.assert_array_equal(q.view(paddle.uint8).numpy(), q_ref.view(paddle.uint8).numpy())
    np.testing.assert_array_equal(s.numpy(), s_ref.numpy())


def test_pack_row_scales():
    s = paddle.to_tensor(np.array([[[2.0 ** -3, 1.0, 4.0, 0.5, 2.0]], [[1.0, 1.0, 1.0, 1.0, 1.0]]], dtype=np.float32))
    packed = pack_row_scales_ue8m0(s, 100)                          # [E=2, N=100, ceil(5/4)=2]
    assert list(packed.shape) == [2, 100, 2] and packed.dtype == paddle.int32 and packed.is_contiguous()
    want = ref_fp8.pack_scale_ue8m0(paddle.to_tensor(np.repeat(s.numpy(), 100, axis=1)))
    np.testing.assert_array_equal(packed.numpy(), want.numpy())      # every row of a block carries its scale
    assert int(packed[0, 0, 0]) == (124 | 127 << 8 | 129 << 16 | 126 << 24)   # little-endian exponent bytes
    with pytest.raises(ValueError, match="powers of two"):
        pack_row_scales_ue8m0(paddle.full([1, 1, 1], 0.75), 4)


@pytest.mark.parametrize("use_ue8m0, cols, dtype", [(True, 1, paddle.int32), (False, 3, paddle.float32)])
def test_quantize_tokens_empty_and_full(use_ue8m0, cols, dtype):
    provider = ops.get_provider("paddle")
    q, s = quantize_tokens(provider, paddle.zeros([0, 384], dtype=paddle.bfloat16), use_ue8m0)
    assert q.dtype == paddle.float8_e4m3fn and list(q.shape) == [0, 384]
    assert s.dtype == dtype and list(s.shape) == [0, cols]
    x = paddle.to_tensor(np.random.default_rng(3).normal(size=(5, 384)).astype(np.float32)).astype(paddle.bfloat16)
    q, s = quantize_tokens(provider, x, use_ue8m0)
    q_ref, s_ref = provider.per_token_quant(x, 128, use_ue8m0)
    np.testing.assert_array_equal(q.view(paddle.uint8).numpy(), q_ref.view(paddle.uint8).numpy())
    np.testing.assert_array_equal(s.numpy(), s_ref.numpy())
