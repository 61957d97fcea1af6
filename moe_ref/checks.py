"""Argument checks shared by `moe_ref` and the `backend` contract layer.

Every error names the argument, what was expected and what was seen.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from ._paddle import paddle
from .messages import id_out_of_range_message, repeated_expert_message

FLOAT_DTYPES = (paddle.float32, paddle.float16, paddle.bfloat16, paddle.float64)
INT_DTYPES = (paddle.int32, paddle.int64)


def _dtype_names(dtypes: Iterable) -> str:
    return ", ".join(str(d).replace("paddle.", "") for d in dtypes)


def check_tensor(x, name: str, *, dtypes: Sequence | None = None, ndim: int | Sequence[int] | None = None,
                 min_ndim: int | None = None) -> None:
    """Raise TypeError/ValueError unless `x` is a paddle.Tensor of the given dtype(s) and rank."""
    if not isinstance(x, paddle.Tensor):
        raise TypeError(f"{name}: expected a paddle.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in tuple(dtypes):
        raise TypeError(f"{name}: expected dtype in ({_dtype_names(dtypes)}), got {str(x.dtype).replace('paddle.', '')}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(f"{name}: expected rank {' or '.join(map(str, allowed))}, got shape {list(x.shape)}")
    if min_ndim is not None and x.ndim < min_ndim:
        raise ValueError(f"{name}: expected rank >= {min_ndim}, got shape {list(x.shape)}")


def check_dim(x, axis: int, expected: int, name: str, what: str) -> None:
    """Raise ValueError unless x.shape[axis] == expected; `what` names the quantity (e.g. 'H')."""
    if int(x.shape[axis]) != int(expected):
        raise ValueError(f"{name}: expected shape[{axis}] == {what} = {expected}, got shape {list(x.shape)}")


def check_same_shape(x, name: str, like, like_name: str) -> None:
    """Raise ValueError "{name}: expected shape [...] (as {like_name}), got [...]" unless x.shape == like.shape."""
    if list(x.shape) != list(like.shape):
        raise ValueError(f"{name}: expected shape {list(like.shape)} (as {like_name}), got {list(x.shape)}")


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def check_nonnegative_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
    return int(value)


NAN_POLICY_HINT = " (pass nan_policy='propagate' to allow it)"


def check_finite(x, name: str, hint: str = "") -> None:
    """Raise ValueError naming the first NaN/inf element of a float tensor (row-major index).

    `hint` ends the message; functions that take a `nan_policy` argument pass NAN_POLICY_HINT, the
    others pass nothing (their callers have no such argument to set)."""
    xf = x.astype(paddle.float32) if x.dtype != paddle.float64 else x
    bad = paddle.logical_not(paddle.isfinite(xf))
    if bool(bad.any()):
        index = first_index(bad)
        value = float(xf[index])
        raise ValueError(f"{name}: non-finite value {value} at index {index}{hint}")


def first_index(mask: paddle.Tensor) -> tuple[int, ...]:
    """Row-major index of the first True element of a bool tensor (the caller knows one exists)."""
    flat = int(paddle.nonzero(mask.flatten())[0, 0])
    return tuple(int(i) for i in np.unravel_index(flat, tuple(mask.shape)))


def check_ids_in_range(ids: paddle.Tensor, name: str, upper: int, what: str, bound: str | None = None,
                       note: str = "") -> paddle.Tensor:
    """ids (any int dtype) with every value in [-1, upper) -> the same values as int64.

    Otherwise ValueError "{name}: expected {what} in [-1, {bound}){note}, got {value} at index {index}";
    bound defaults to str(upper) (e.g. pass "E=4" to name the quantity).
    """
    ids = ids.astype(paddle.int64)
    bad = paddle.logical_or(ids < -1, ids >= upper)
    if bool(bad.any()):
        at = first_index(bad)
        raise ValueError(id_out_of_range_message(name, what, bound if bound is not None else upper, note,
                                                 int(ids[at]), at))
    return ids


def check_distinct_experts(ids: paddle.Tensor, name: str) -> None:
    """ids [T, K_top] int: every token's top-k experts must be distinct (-1 padding may repeat).

    A repeated expert would take two rows of that expert's masked buffer, so the worst case of
    M rows per expert (one per token) would no longer hold; routers never produce one, so it is
    rejected where the layer's paths start, not met later as a misleading overflow error.
    """
    if int(ids.shape[0]) == 0 or int(ids.shape[1]) < 2:
        return
    srt = paddle.sort(ids.astype(paddle.int64), axis=1)
    same = paddle.logical_and(srt[:, 1:] == srt[:, :-1], srt[:, 1:] >= 0)
    if bool(same.any()):
        t, j = first_index(same)
        expert = int(srt[t, j])
        where = [k for k, v in enumerate(ids[t].astype(paddle.int64).tolist()) if v == expert]
        raise ValueError(repeated_expert_message(name, t, expert, where))
