"""What every strict fake shares: the call log and the argument checks.

A fake op is a plain Python function whose parameters are the upstream op's, in upstream's order:
Python itself rejects a wrong arity or an unknown keyword (TypeError, as the pybind11 binding does);
`need_*` reject a wrong dtype (TypeError) or shape (ValueError), naming the op, the argument, the
expected and the seen value. Each call is recorded in CALL_LOG before its checks run, so a test sees
the call that failed too.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect

import paddle


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded call: module ("blackwell_ops" | "fastdeploy.model_executor.ops.gpu"), op name, and
    each argument described as "dtype[shape]" for tensors (plus "strides=" when not contiguous) or repr."""
    module: str
    op: str
    args: tuple[str, ...]


class CallLog(list):
    """The calls made to installed fakes, in order."""

    def ops(self) -> list[str]:
        """["module.op", ...] in call order."""
        return [f"{c.module}.{c.op}" for c in self]


CALL_LOG = CallLog()


def describe(v) -> str:
    if isinstance(v, paddle.Tensor):
        text = f"{str(v.dtype).replace('paddle.', '')}{list(v.shape)}"
        return text if v.is_contiguous() else f"{text} strides={list(v.strides)}"
    return repr(v)


def fake_op(module: str):
    """Decorator: record every call of the op (arguments as given) into CALL_LOG, then run it."""
    def wrap(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            described = tuple(describe(a) for a in args) + tuple(f"{k}={describe(v)}" for k, v in kwargs.items())
            CALL_LOG.append(Call(module, fn.__name__, described))
            return fn(*args, **kwargs)
        op.__signature__ = inspect.signature(fn)
        return op
    return wrap


def _dtype_name(d) -> str:
    return str(d).replace("paddle.", "")


def need_tensor(op: str, name: str, x, dtypes, ndim=None) -> None:
    """TypeError unless x is a paddle.Tensor of one of `dtypes`; ValueError unless its rank is in `ndim`."""
    if not isinstance(x, paddle.Tensor):
        raise TypeError(f"{op}: {name} expected a paddle.Tensor, got {type(x).__name__}")
    if x.dtype not in tuple(dtypes):
        raise TypeError(f"{op}: {name} expected dtype in ({', '.join(_dtype_name(d) for d in dtypes)}), "
                        f"got {_dtype_name(x.dtype)}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            raise ValueError(f"{op}: {name} expected rank {' or '.join(map(str, allowed))}, got shape {list(x.shape)}")


def need_dim(op: str, name: str, x, axis: int, expected: int, what: str) -> None:
    if int(x.shape[axis]) != expected:
        raise ValueError(f"{op}: {name}.shape[{axis}] expected {expected} ({what}), got {list(x.shape)}")


def need_int(op: str, name: str, v) -> int:
    """pybind11 `int` attribute: a Python int (bool is refused: upstream never passes one there)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{op}: {name} expected int, got {type(v).__name__} {v!r}")
    return v


def need_bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} expected bool, got {type(v).__name__} {v!r}")
    return v


def need_in(op: str, name: str, v, allowed, why: str) -> None:
    if v not in allowed:
        raise ValueError(f"{op}: {name} expected one of {sorted(allowed)} ({why}), got {v!r}")


def need_counts(op: str, name: str, counts, e: int | None = None) -> int:
    """int32 [E] or [E, 1] (the kernels read E contiguous int32): returns E."""
    need_tensor(op, name, counts, (paddle.int32,), ndim=(1, 2))
    if counts.ndim == 2 and int(counts.shape[1]) != 1:
        raise ValueError(f"{op}: {name} expected [E] or [E, 1], got {list(counts.shape)}")
    n = int(counts.shape[0])
    if e is not None and n != e:
        raise ValueError(f"{op}: {name} expected E = {e} entries, got {list(counts.shape)}")
    return n


def mn_major(physical: paddle.Tensor, m: int) -> paddle.Tensor:
    """physical [E, C, M_phys] -> logical [E, m, C] view with strides (C·M_phys, 1, M_phys)."""
    e, c, m_phys = (int(d) for d in physical.shape)
    return paddle.as_strided(physical.contiguous(), [e, m, c], [c * m_phys, 1, m_phys])
