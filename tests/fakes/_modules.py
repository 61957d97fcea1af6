"""Install the strict fakes under the real module names: `blackwell_ops` and `fastdeploy.model_executor.ops.gpu`.

    with install_fakes("develop") as log:          # "7053" | "develop" | "7666"
        ...                                        # code under test imports the real names
    assert log.ops() == [...]

Parent packages `fastdeploy`, `fastdeploy.model_executor`, `fastdeploy.model_executor.ops` are empty
stand-ins (only when no real FastDeploy is imported). Everything is put back on exit.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
import types

from ._base import CALL_LOG, CallLog

FD_OPS = "fastdeploy.model_executor.ops.gpu"
_FD_PARENTS = ("fastdeploy", "fastdeploy.model_executor", "fastdeploy.model_executor.ops")
_GENERATIONS = {"7053": "blackwell_ops_7053", "develop": "blackwell_ops_develop", "7666": "blackwell_ops_7666"}
# where upstream takes each op (docs/upstream.md §1): asking the wrong module names the right one
_HOME = {"per_token_quant": FD_OPS, "prefill_permute_to_masked_gemm": FD_OPS, "fused_mask_swiglu_fp8_quant": FD_OPS,
         "depermute_prefill_combine": FD_OPS, "group_gemm_masked": "blackwell_ops",
         "unpack_and_convert_scale": "blackwell_ops", "prefill_permute_to_blackwell_masked_gemm": "blackwell_ops",
         "fused_mask_swiglu_fp8_quant_blackwell": "blackwell_ops", "group_wise_quant": "blackwell_ops"}


def missing_op(module: str, generation: str, name: str) -> AttributeError:
    if name.startswith("__"):
        return AttributeError(name)
    home = _HOME.get(name)
    where = f"; upstream takes it from {home}" if home and home != module else (
        f"; not in the {generation} generation" if home else "")
    return AttributeError(f"module '{module}' ({generation} fake) has no attribute '{name}'{where}")


def _fd_ops_module(generation: str) -> types.ModuleType:
    from . import fastdeploy_ops_gpu as impl
    mod = types.ModuleType(FD_OPS, impl.__doc__)
    for name in impl.OPS:
        setattr(mod, name, getattr(impl, name))
    def __getattr__(name):
        raise missing_op(FD_OPS, generation, name)

    mod.__getattr__ = __getattr__
    return mod


def _blackwell_module(generation: str) -> types.ModuleType:
    if generation not in _GENERATIONS:
        raise ValueError(f"generation: expected one of {sorted(_GENERATIONS)}, got {generation!r}")
    impl = importlib.import_module(f"{__package__}.{_GENERATIONS[generation]}")
    mod = types.ModuleType("blackwell_ops", impl.__doc__)
    for name in impl.OPS:
        setattr(mod, name, getattr(impl, name))
    mod.GENERATION = generation
    mod.__getattr__ = impl.__getattr__
    return mod


@contextlib.contextmanager
def install_fakes(generation: str = "develop", blackwell: bool = True, fastdeploy_ops: bool = True):
    """Put the fakes of `generation` into sys.modules; yields the CallLog (emptied on entry)."""
    names = ["blackwell_ops", FD_OPS, *_FD_PARENTS]
    saved = {n: sys.modules.get(n) for n in names}
    modules = {}
    if blackwell:
        modules["blackwell_ops"] = _blackwell_module(generation)
    if fastdeploy_ops:
        gpu = _fd_ops_module(generation)
        parents = [sys.modules.get(p) or types.ModuleType(p) for p in _FD_PARENTS]
        for parent, child, attr in zip(parents, parents[1:] + [gpu], ("model_executor", "ops", "gpu")):
            setattr(parent, attr, child)
        modules.update(zip(_FD_PARENTS, parents))
        modules[FD_OPS] = gpu
    CALL_LOG.clear()
    sys.modules.update(modules)
    try:
        yield CALL_LOG
    finally:
        for n, old in saved.items():
            if old is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = old


__all__ = ["install_fakes", "CallLog", "missing_op", "FD_OPS"]
