"""moe_ref.fp8_torch: the torch front-end of the storage helpers agrees with the Paddle one
(moe_ref.fp8) on layout and values, and imports no Paddle."""
import subprocess
import sys

import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")

from moe_ref import fp8  # noqa: E402
from moe_ref import fp8_torch  # noqa: E402


@pytest.mark.parametrize("b, mn, c", [(2, 5, 3), (1, 8, 1), (3, 1, 2)])
def test_mn_major_matches_the_paddle_front_end(b, mn, c):
    values = np.arange(b * mn * c, dtype=np.int32).reshape(b, mn, c) + 1
    phys = fp8_torch.mn_major_zeros(b, mn, c, torch.int32, "cpu")
    phys[:, :, :mn] = torch.from_numpy(values).transpose(1, 2)
    view = fp8_torch.mn_major_view(phys, mn)
    ref = fp8.to_mn_major_tma_aligned(paddle.to_tensor(values))
    assert tuple(view.shape) == (b, mn, c) and view.stride() == ref.strides
    np.testing.assert_array_equal(phys.numpy(), ref.physical.numpy())   # same bytes, padding rows zero
    np.testing.assert_array_equal(view.numpy(), values)


def test_fp8_bytes_view():
    x = torch.tensor([[1.5, -448.0]]).to(torch.float8_e4m3fn)
    b = fp8_torch.as_bytes(x)
    assert b.dtype == torch.uint8 and b.data_ptr() == x.data_ptr()      # a view, not a copy
    ref = fp8.as_bytes(paddle.to_tensor([[1.5, -448.0]]).astype(paddle.float8_e4m3fn))
    np.testing.assert_array_equal(b.numpy(), ref.numpy())
    y = torch.ones(2)
    assert fp8_torch.as_bytes(y) is y


def test_imports_no_paddle():
    code = "import sys, moe_ref.fp8_torch; assert 'paddle' not in sys.modules, 'paddle imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
