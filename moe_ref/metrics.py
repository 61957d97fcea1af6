"""How results are compared (SPEC §12)."""
from __future__ import annotations

import numpy as np

from ._paddle import paddle


def _as_float64(x) -> np.ndarray:
    if isinstance(x, paddle.Tensor):
        x = x.astype(paddle.float32).numpy() if x.dtype != paddle.float64 else x.numpy()
    return np.asarray(x, dtype=np.float64)


def _same_shape(fn: str, x, y) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 arrays; a shape mismatch is an error, never a broadcast (a comparison that
    broadcasts `out` against `out[:1]` would pass for the wrong reason)."""
    a, b = _as_float64(x), _as_float64(y)
    if a.shape != b.shape:
        raise ValueError(f"{fn}: x has shape {list(a.shape)}, y has shape {list(b.shape)}; they must be equal")
    return a, b


def calc_diff(x, y) -> float:
    """DeepGEMM's similarity metric in float64: 1 - 2*sum(x*y) / (sum(x^2) + sum(y^2)); 0 means equal.

    x, y: same-shaped paddle.Tensor or array-likes of any float dtype. Two all-zero inputs give 0.
    NaN anywhere gives NaN (so a `< bound` check fails).
    """
    a, b = _same_shape("calc_diff", x, y)
    denom = float((a * a).sum() + (b * b).sum())
    if denom == 0.0:
        return 0.0
    return 1.0 - 2.0 * float((a * b).sum()) / denom


def max_abs_diff(x, y) -> float:
    """max |x - y| in float64; x and y must have the same shape."""
    a, b = _same_shape("max_abs_diff", x, y)
    return float(np.abs(a - b).max()) if a.size else 0.0


def rel_l2(x, y) -> float:
    """||x - y|| / ||y|| in float64 (y is the reference); x and y must have the same shape."""
    a, b = _same_shape("rel_l2", x, y)
    ref = float(np.linalg.norm(b))
    return float(np.linalg.norm(a - b)) / ref if ref else float(np.linalg.norm(a))
