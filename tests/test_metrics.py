"""moe_ref.metrics (SPEC §12)."""
import re

import numpy as np
import paddle
import pytest

from moe_ref.metrics import calc_diff, max_abs_diff, rel_l2


def test_calc_diff_definition():
    x = np.array([1.0, 2.0, 3.0])
    y = np.array([1.0, 2.0, 4.0])
    want = 1 - 2 * (1 + 4 + 12) / ((1 + 4 + 9) + (1 + 4 + 16))
    assert calc_diff(x, y) == pytest.approx(want, rel=1e-15)
    assert calc_diff(x, x) == 0.0
    assert calc_diff(x, -x) == 2.0
    assert calc_diff(np.zeros(3), np.zeros(3)) == 0.0


def test_calc_diff_is_float64_on_bf16_tensors():
    a = paddle.to_tensor(np.linspace(-1, 1, 1000, dtype=np.float32)).astype(paddle.bfloat16)
    assert calc_diff(a, a) == 0.0
    assert calc_diff(a, a.astype(paddle.float32) * 1.001) > 0


def test_nan_fails_a_bound_and_shape_mismatch_raises():
    assert not calc_diff(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) < 1.0
    with pytest.raises(ValueError, match="shape"):
        calc_diff(np.ones(3), np.ones(4))


def test_other_metrics():
    assert max_abs_diff(np.array([1.0, 5.0]), np.array([1.5, 4.0])) == 1.0
    assert rel_l2(np.array([3.0, 4.0]), np.array([0.0, 5.0])) == pytest.approx(np.sqrt(9 + 1) / 5)


@pytest.mark.parametrize("metric", [calc_diff, max_abs_diff, rel_l2])
@pytest.mark.parametrize("shapes", [((4, 3), (1, 3)), ((4, 3), (3,)), ((2, 1), (2, 5)), ((0, 3), (3,))])
def test_mismatched_shapes_raise_instead_of_broadcasting(metric, shapes):
    # numpy would broadcast every one of these pairs; a comparison that broadcasts lets a test pass
    # for the wrong reason (issue 15, item 6: max_abs_diff(out, out[:1]) was a number)
    x = paddle.to_tensor(np.arange(np.prod(shapes[0]), dtype=np.float32).reshape(shapes[0]))
    y = np.zeros(shapes[1])
    with pytest.raises(ValueError, match=re.escape(f"{metric.__name__}: x has shape {list(shapes[0])}, y has shape {list(shapes[1])}")):
        metric(x, y)
