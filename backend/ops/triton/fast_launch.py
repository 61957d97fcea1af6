"""Cheaper host launches of Triton JIT kernels: the compiled kernel's launcher called directly after the first call.

`kernel[grid](*args, **meta)` in Triton 3.x binds the arguments, builds a cache key from their specialization
(string of the options included), checks the kernel's globals and then calls the compiled launcher. `Kernels(module)`
wraps every JIT kernel of a module in `FastKernel`, which keeps the compiled kernel per key of its own and calls
`compiled.run` (the C launcher) itself on later calls. Its key refines Triton's specialization, so the kernel it
picks is the one Triton would pick:

    int     (type, == 1, % 16 == 0, i32 / i64 / wider range)
    tensor  (dtype, data_ptr % 16 == 0)
    TMA TensorDescriptor (host; tl's or Gluon's, which also has a shared layout): (type, dtype, block shape,
            layout, padding) - what Triton's
            signature of a descriptor holds (its shape and strides are runtime values of the TMA descriptor)
    other   (type,) for None / float / bool; anything else: the plain JIT path every time
    meta    the constexprs and launch options by name (sorted), and the current device

The first call of a key goes through the plain JIT path (it compiles and launches). The fast path needs every
runtime argument positional and every constexpr after them in the signature (true of the kernels here); a call that
does not fit (a callable grid too), and every call under the interpreter, uses the plain path. Launch hooks
(profilers) are honoured.
"""
from __future__ import annotations

import types

try:                                    # triton >= 3.4; older versions take the plain path
    from triton import knobs as _knobs
except ImportError:                     # pragma: no cover
    _knobs = None

_I32, _I64 = 2 ** 31, 2 ** 63


def _spec(a):
    """Key part of one runtime argument (see the module docstring), None when the fast path cannot key it."""
    tp = type(a)
    if tp is int:
        return (int, a == 1, a % 16 == 0, 0 if -_I32 <= a < _I32 else (1 if -_I64 <= a < _I64 else 2))
    dp = getattr(a, "data_ptr", None)
    if dp is not None and hasattr(a, "dtype"):
        return (a.dtype, dp() % 16 == 0)
    if a is None or tp in (float, bool):       # Triton: fp32 / i1 / None, not specialized on the value
        return (tp,)
    base = getattr(a, "base", None)
    if base is not None and hasattr(a, "block_shape") and hasattr(base, "dtype"):    # a host TMA TensorDescriptor
        return (tp, base.dtype, tuple(a.block_shape), str(getattr(a, "layout", None)), getattr(a, "padding", None))
    return None


class FastKernel:
    """One JIT kernel: `fk[grid](*args, **meta)` as `fn[grid](*args, **meta)` (see the module docstring)."""

    def __init__(self, fn):
        self.fn = fn
        params = list(getattr(fn, "params", []))
        n_run = sum(not p.is_constexpr for p in params)
        self.n_runtime = n_run
        self.constexprs = [p for p in params if p.is_constexpr]
        self.ok = _knobs is not None and not _interpreted(fn) and all(not p.is_constexpr for p in params[:n_run])
        self.cache = {}
        self.launches = 0                   # every call, either path (a count for host-time reports)

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args: tuple, meta: dict):
        self.launches += 1
        if not self.ok or len(args) != self.n_runtime or callable(grid):
            return self.fn[grid](*args, **meta)
        from triton.runtime.driver import driver
        dev = driver.active.get_current_device()
        specs = tuple(map(_spec, args))
        if None in specs:
            return self.fn[grid](*args, **meta)
        key = (dev, specs, tuple(sorted(meta.items())))
        hit = self.cache.get(key)
        if hit is None:
            kernel = self.fn[grid](*args, **meta)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            if kernel is None or not hasattr(kernel, "packed_metadata"):
                return kernel
            consts = tuple(meta[p.name] if p.name in meta else p.default for p in self.constexprs)
            self.cache[key] = (kernel, consts)
            return kernel
        kernel, consts = hit
        stream = driver.active.get_current_stream(dev)
        full = args + consts
        g = tuple(grid) + (1, 1)
        enter, leave = _knobs.runtime.launch_enter_hook, _knobs.runtime.launch_exit_hook
        md = kernel.launch_metadata(grid, stream, *full) if enter is not None else None
        kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, md, enter, leave, *full)
        return kernel


def _interpreted(fn) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(fn, InterpretedFunction)


class Kernels(types.SimpleNamespace):
    """A kernels module with every JIT kernel wrapped in FastKernel (other attributes as they are)."""

    def __init__(self, module):
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
        super().__init__()
        for name in dir(module):
            obj = getattr(module, name)
            wrap = isinstance(obj, (JITFunction, InterpretedFunction))
            setattr(self, name, FastKernel(obj) if wrap else obj)

    def launch_count(self) -> int:
        """Launches so far of every wrapped kernel (host-time reports: launches per call = difference / calls)."""
        return sum(v.launches for v in vars(self).values() if isinstance(v, FastKernel))
