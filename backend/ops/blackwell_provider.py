"""Adapter to the real `blackwell_ops` package (FastDeploy PR #7053; SM100+ GPUs only).

Each op forwards its already-validated arguments to `blackwell_ops` in the upstream argument
order (forwarders made from the rows of `backend.ops.contract.OPS`; our keyword-only options stay here). `cutlass_scale_to_fp32` is ours (the package has no inverse), so it runs the portable
Paddle implementation on the same device.

Upstream imports `blackwell_ops` in a bare try/except, so a missing package shows up later as a
NameError (SPEC §13). Here the import happens only when asked (`is_available()` or an op), the
ImportError text is kept, and the GPU check (compute capability >= 10.0) is a separate, explicit
reason. Nothing is queried at import time.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import paddle

from . import paddle_provider
from .contract import OPS, ContractOp

NAME = "blackwell_ops"
PACKAGE = "blackwell_ops"
MIN_CAPABILITY = (10, 0)


def _import_package() -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(PACKAGE), ""
    except ImportError as e:
        return None, (f"the {PACKAGE} package cannot be imported ({e}); build and install FastDeploy's "
                      f"{PACKAGE} for SM100 into this environment")


def _device_capability() -> tuple[int, int] | None:
    """Compute capability of the current Paddle GPU, or None when Paddle sees no CUDA GPU."""
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        return None
    major, minor = paddle.device.cuda.get_device_capability()
    return int(major), int(minor)


def is_available() -> tuple[bool, str]:
    """(True, description) when the package imports and the GPU is SM100+; else (False, what is missing)."""
    package, why = _import_package()
    if package is None:
        return False, why
    capability = _device_capability()
    need = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    if capability is None:
        return False, (f"no CUDA GPU visible to Paddle ({PACKAGE} needs compute capability >= {need}); "
                       f"install paddlepaddle-gpu and run on a Blackwell (SM100+) GPU")
    if capability < MIN_CAPABILITY:
        return False, (f"GPU compute capability {capability[0]}.{capability[1]} found, >= {need} (Blackwell, SM100) "
                       f"needed by {PACKAGE}; use FD_MOE_OPS_PROVIDER=triton or paddle on this GPU")
    return True, f"{PACKAGE} on a GPU with compute capability {capability[0]}.{capability[1]}"


def _package() -> ModuleType:
    package, why = _import_package()
    if package is None:
        raise RuntimeError(why)
    return package


def _forwarder(row: ContractOp):
    """The op `row` of the package, called with the upstream positional arguments; our keyword-only options
    (e.g. group_gemm_masked's sfb_per_block) stay here. An op that writes an argument returns it."""
    def forward(*args, **options):
        result = getattr(_package(), row.name)(*args)
        return args[row.positional.index(row.writes)] if row.writes else result
    forward.__name__ = forward.__qualname__ = row.name
    forward.__doc__ = f"`blackwell_ops.{row.name}` (see backend.ops.contract)."
    return forward


for _row in OPS:
    if _row.upstream:
        globals()[_row.name] = _forwarder(_row)
del _row


def cutlass_scale_to_fp32(sf, num_rows):
    """Ours, not the package's: the portable implementation on the same device."""
    return paddle_provider.cutlass_scale_to_fp32(sf, num_rows)
