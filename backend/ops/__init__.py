"""The `blackwell_ops` contract (SPEC §4-8, §14): names, argument orders, checks, provider selection.

The ops keep the names and argument orders upstream FastDeploy calls them with (docs/upstream.md):
`group_gemm_masked`, `unpack_and_convert_scale` and, since #7374 (develop),
`prefill_permute_to_blackwell_masked_gemm`, `fused_mask_swiglu_fp8_quant_blackwell` live in the unpublished
`blackwell_ops` package, as does #7666's `group_wise_quant`; `per_token_quant`,
`prefill_permute_to_masked_gemm`, `fused_mask_swiglu_fp8_quant`, `depermute_prefill_combine` are
FastDeploy's own ops (`fastdeploy.model_executor.ops.gpu`); `cutlass_scale_to_fp32` is ours, the inverse
of `unpack_and_convert_scale`. Each op is one row of `backend.ops.contract.OPS` (package, signature,
defaults, docstring with shapes, layouts and the upstream generation it follows); from it come
the module-level function `backend.ops.<op>(...)` (the selected provider) and the method
`get_provider(name).<op>(...)`. A call checks its arguments once (`backend.ops._checks.CHECKS`;
errors name the argument, the expected and the seen value), then calls the provider module,
which receives validated, complete arguments:

    blackwell_ops   the real packages (SM100+ GPUs)                backend/ops/blackwell_provider.py
    deep_gemm       DeepGEMM's masked GEMM (SM90 / SM100), the     backend/ops/deep_gemm_provider.py
                    other ops on the next provider
    triton          Triton kernels (torch + triton + a CUDA GPU)   backend/ops/triton/provider.py
    paddle          vectorized Paddle, any device                  backend/ops/paddle_provider.py

`get_provider(name)` picks one: `name` None reads `FD_MOE_OPS_PROVIDER` (auto | blackwell_ops | deep_gemm |
paddle | triton; default auto). auto takes the first available of blackwell_ops, deep_gemm, triton (on a
CUDA GPU only, never the interpreter), paddle.
An explicit request for an unavailable provider raises RuntimeError saying what is missing.
The provider that ran the last op is `last_provider_name()`; each selection logs one INFO line
on the `backend.ops` logger.

A provider module exposes `NAME`, `is_available() -> (bool, reason)` and one function per op, with
the row's parameters and no defaults (paddle tensors in and out).

Data checks (expert ids in range, per-expert counts <= M, no NaN byte 255 in scales, finite
quantization input) read values, which costs one device synchronization per call on a GPU.

Importing this package does not import Paddle (the checks and the providers import it when first
used), so that `backend.ops.triton.kernels` and `moe_ref.cutlass_sf` import where Paddle is absent.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import threading
from types import ModuleType

from backend import envs

from .contract import OP_NAMES, OPS, ContractOp

__all__ = [  # noqa: F822 - the op functions are made from contract.OPS at the end of this module
    *OP_NAMES, "get_provider", "last_provider_name", "reset_provider_cache", "OpsProvider", "ops_generation",
    "PROVIDER_ENV", "PROVIDER_NAMES", "OP_NAMES",
]

logger = logging.getLogger(__name__)

PROVIDER_ENV = envs.OPS_PROVIDER_VAR            # "FD_MOE_OPS_PROVIDER"
PROVIDER_NAMES = envs.OPS_PROVIDERS           # auto, blackwell_ops, deep_gemm, paddle, triton
AUTO_ORDER = ("blackwell_ops", "deep_gemm", "triton", "paddle")
_PROVIDER_MODULES = {
    "blackwell_ops": "backend.ops.blackwell_provider",
    "deep_gemm": "backend.ops.deep_gemm_provider",
    "triton": "backend.ops.triton.provider",
    "paddle": "backend.ops.paddle_provider",
}
_last_provider: str | None = None
_provider_cache: dict[str, "OpsProvider"] = {}
# Guards selection: the R threads of the in-process EP runner may ask at once, and each
# requested name must be selected (and logged) once. Reentrant in case a provider's import
# or availability check reaches get_provider again.
_provider_lock = threading.RLock()


# ----------------------------------------------------------------------------- providers

def _load_provider_module(name: str) -> tuple[ModuleType | None, str]:
    """Import a provider module; (module, "") or (None, why it cannot be used)."""
    try:
        return importlib.import_module(_PROVIDER_MODULES[name]), ""
    except ImportError as e:
        return None, f"cannot import {_PROVIDER_MODULES[name]} ({e})"


def _availability(name: str) -> tuple[ModuleType | None, bool, str]:
    module, why = _load_provider_module(name)
    if module is None:
        return None, False, why
    ok, reason = module.is_available()
    return module, bool(ok), reason


def _torch_cuda_gpu() -> tuple[bool, str]:
    """auto takes triton only with a CUDA GPU: the Triton interpreter (TRITON_INTERPRET=1) is for tests."""
    try:
        import torch
    except ImportError as e:
        return False, f"torch cannot be imported ({e})"
    if not torch.cuda.is_available():
        return False, "no CUDA GPU visible to torch (auto never picks the Triton interpreter; request 'triton' for it)"
    return True, ""


def _auto_availability(name: str) -> tuple[ModuleType | None, bool, str]:
    module, ok, reason = _availability(name)
    if ok and name == "triton":
        ok, reason = _torch_cuda_gpu()
    return module, ok, reason


def _check_table() -> dict:
    """backend.ops._checks, imported at the first op: it imports Paddle, and importing this package must
    not (backend.ops.triton.kernels runs where Paddle is absent)."""
    return importlib.import_module("backend.ops._checks").CHECKS


class OpsProvider:
    """One provider behind the contract: `.name` and one method per op of `contract.OPS` (made from its row:
    signature, defaults and docstring), which checks the arguments and calls the provider module."""

    def __init__(self, module: ModuleType):
        self.module = module
        self.name = module.NAME

    def __repr__(self) -> str:
        return f"OpsProvider({self.name!r})"

    def prepare_weight_scales(self, b, sfb, *, sfb_per_block: bool = False):
        """Weight scales in this provider's own layout, made once when the weights are loaded, to pass back as
        `group_gemm_masked(..., sfb_prepared=...)` with the same b and sfb: b [E, N, K] fp8 (the GEMM's b), sfb
        [E, align(N,128), KB'] uint8 CUTLASS bytes (its sfb). None when the provider reads sfb as it is (every
        provider but deep_gemm) or cannot use these bytes (the GEMM call then goes as without)."""
        prepare = getattr(self.module, "prepare_weight_scales", None)
        return None if prepare is None else prepare(b, sfb, bool(sfb_per_block))

    def _call(self, row: ContractOp, args: tuple, kwargs: dict):
        global _last_provider
        bound = row.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        values = _check_table()[row.name](*bound.args, **bound.kwargs)
        n = len(row.positional)
        _last_provider = self.name
        return getattr(self.module, row.name)(*values[:n], **dict(zip(row.options, values[n:])))


def _provider_method(row: ContractOp):
    def method(self, *args, **kwargs):
        return self._call(row, args, kwargs)
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    method.__signature__ = row.signature.replace(parameters=[self_param, *row.signature.parameters.values()])
    method.__name__, method.__qualname__, method.__doc__ = row.name, f"OpsProvider.{row.name}", row.doc
    return method


def _module_function(row: ContractOp):
    def function(*args, **kwargs):
        return getattr(get_provider(), row.name)(*args, **kwargs)
    function.__signature__ = row.signature
    function.__name__ = function.__qualname__ = row.name
    function.__doc__, function.__module__ = row.doc, __name__
    return function


def _requested_name(name: str | None) -> str:
    if name is None:
        return envs.get_ops_provider_name()      # the one reader of the variable (ValueError naming it)
    normalized = envs.normalize_ops_provider_name(name) if isinstance(name, str) else None
    if normalized not in PROVIDER_NAMES:
        raise ValueError(f"name: expected one of {', '.join(PROVIDER_NAMES)} (case and spaces ignored) or None, "
                         f"got {name!r}")
    return normalized


def get_provider(name: str | None = None) -> OpsProvider:
    """The ops provider for `name` (None: env var FD_MOE_OPS_PROVIDER, default "auto").

    "auto" -> the first available of blackwell_ops (package + SM100+ GPU), deep_gemm (a DeepGEMM build +
    torch + SM90 / SM100 GPU), triton (torch + triton + CUDA GPU), paddle. An explicit name whose provider
    is unavailable raises RuntimeError with the reason (missing package, or compute capability found vs
    needed) and how to fix it.
    The choice is cached per requested name (`reset_provider_cache()` forgets it) and logged at INFO,
    once: concurrent first calls (threads) wait for one selection under a lock and share its object.
    """
    requested = _requested_name(name)
    cached = _provider_cache.get(requested)          # fast path, no lock once selected
    if cached is not None:
        return cached
    with _provider_lock:
        cached = _provider_cache.get(requested)      # another thread may have selected it meanwhile
        if cached is None:
            cached = _provider_cache[requested] = _select_provider(requested)
        return cached


def _select_provider(requested: str) -> OpsProvider:
    """Resolve a requested name (not None) to a new OpsProvider and log the choice; the caller caches it."""
    if requested == "auto":
        skipped = []
        for candidate in AUTO_ORDER:
            module, ok, reason = _auto_availability(candidate)
            if ok:
                break
            skipped.append(f"{candidate}: {reason}")
        provider = OpsProvider(module)
        logger.info("backend.ops: provider %r selected (auto%s)", provider.name,
                    "; skipped " + "; ".join(skipped) if skipped else "")
        return provider
    module, ok, reason = _availability(requested)
    if not ok:
        raise RuntimeError(f"backend.ops: provider {requested!r} was requested but is not available: {reason}. "
                           f"Fix that, or set {PROVIDER_ENV}=auto (or paddle) to use another provider.")
    provider = OpsProvider(module)
    logger.info("backend.ops: provider %r selected (requested)", provider.name)
    return provider


def reset_provider_cache() -> None:
    """Forget cached provider choices (e.g. after changing FD_MOE_OPS_PROVIDER) and the last provider name."""
    global _last_provider
    with _provider_lock:
        _provider_cache.clear()
        _last_provider = None


def ops_generation(name: str | None = None) -> str:
    """The upstream generation of ops that provider `name` (None: the selected one) serves: "develop" when it has
    the fused Blackwell ops (`prefill_permute_to_blackwell_masked_gemm`, `fused_mask_swiglu_fp8_quant_blackwell`) and
    `group_gemm_masked`'s recipe, "7053" when it has not. paddle and triton serve every op ("develop"); blackwell_ops
    serves the installed package's generation (`blackwell_provider.generation()`, FD_BLACKWELL_OPS_GENERATION)."""
    generation = getattr(get_provider(name).module, "generation", None)
    return generation() if generation is not None else "develop"


def last_provider_name() -> str | None:
    """NAME of the provider that ran the most recent op through this contract (None before any)."""
    return _last_provider


# ----------------------------------------------------------------------------- the contract ops

for _row in OPS:
    setattr(OpsProvider, _row.name, _provider_method(_row))
    globals()[_row.name] = _module_function(_row)
del _row
