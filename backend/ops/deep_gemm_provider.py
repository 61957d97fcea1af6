"""`deep_gemm` provider of the ops contract: DeepGEMM's masked grouped FP8 GEMM on SM90 / SM100 (issue 11).

Optional like `blackwell_ops`: `auto` takes it after blackwell_ops when a DeepGEMM build imports and the GPU is
SM90 or SM100; `FD_MOE_OPS_PROVIDER=deep_gemm` asks for it. Which builds (tried in this order):

    deep_gemm                                   the torch build (DeepGEMM's own), or PFCC's Paddle-compat build
                                                of the same name: told apart by what its `torch` is
    fastdeploy.model_executor.ops.gpu.deep_gemm FastDeploy's Paddle build (SM90; 1.x API name
                                                m_grouped_gemm_fp8_fp8_bf16_nt_masked)
    paddlefleet.ops.deep_gemm                   PaddleFleet's (SM100), imported as FastDeploy's fp8_utils does,
                                                after paddle.enable_compat(scope={"deep_gemm"})

group_gemm_masked: the CUTLASS SF bytes are converted to DeepGEMM's formats (`deep_gemm_launch`: fp32 1x128
MN-major activation and fp32 128x128 weight scales with `disable_ue8m0_cast=True` on SM90, packed UE8M0 on
SM100), DeepGEMM writes a scratch buffer and the valid rows are copied into `out` (it stores whole tiles).
The conversions run in torch (tensors cross through DLPack on the GPU, NumPy on CPU), so torch is needed
with a Paddle build too. The weight scales are converted per call unless the caller passes what
`prepare_weight_scales` made at weight load (`sfb_prepared`). DeepGEMM's `expected_m` is the contract's
expected_m option (the caller's estimate), else M (max_m_per_expert): the counts are on the device. sm_count is
not passed (DeepGEMM has a global `set_num_sms`). A call DeepGEMM cannot compute as the contract states
(`deep_gemm_launch.unsupported_reason`: a bias, per-row weight bytes on SM90, bytes that differ inside a
128-group) goes to the next provider; the byte checks are skipped (no synchronization) for the operands the
caller vouches for (sfa_per_group, sfb_per_block).

The other ops are DeepGEMM-free: they run on the next provider of auto's order, `triton` when it is
available with a CUDA GPU, else `paddle` (`next_provider()`).
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import paddle

from . import deep_gemm_launch as DG
from . import paddle_provider
from .blackwell_provider import device_capability as _capability     # the one Paddle capability query
from .contract import OPS
from .triton import provider as triton_provider
from .triton.provider import to_torch

NAME = "deep_gemm"
TORCH_BUILD = "deep_gemm"
FASTDEPLOY_BUILD = "fastdeploy.model_executor.ops.gpu.deep_gemm"
PADDLEFLEET_BUILD = "paddlefleet.ops.deep_gemm"


def _import(name: str) -> tuple[ModuleType | None, str]:
    if name == PADDLEFLEET_BUILD and hasattr(paddle, "enable_compat"):
        paddle.enable_compat(scope={"deep_gemm"})          # as FastDeploy does before importing it
    try:
        return importlib.import_module(name), ""
    except Exception as e:            # ImportError, or a build for another CUDA / GPU raising at import
        return None, f"{name}: {type(e).__name__}: {e}"


def find_build(capability: tuple[int, int] | None) -> tuple[ModuleType | None, str, str]:
    """(module, framework "torch" | "paddle", "") of the first DeepGEMM build that imports, else (None, "", what
    was tried and why each failed). PaddleFleet's build is tried on SM100 only (FastDeploy's rule)."""
    names = [TORCH_BUILD, FASTDEPLOY_BUILD] + ([PADDLEFLEET_BUILD] if capability and capability[0] >= 10 else [])
    tried = []
    for name in names:
        module, why = _import(name)
        if module is not None:
            own_torch = getattr(getattr(module, "torch", None), "__name__", "torch")
            paddle_build = name != TORCH_BUILD or own_torch.startswith("paddle")
            return module, "paddle" if paddle_build else "torch", ""
        tried.append(why)
    return None, "", "no DeepGEMM build imports (tried " + "; ".join(tried) + ")"


def is_available() -> tuple[bool, str]:
    """(True, description) with a DeepGEMM build, torch, and an SM90 / SM100 GPU; else (False, what is missing)."""
    try:
        import torch  # noqa: F401  (the scale conversions run in torch)
    except ImportError as e:
        return False, f"torch cannot be imported ({e}); the deep_gemm provider converts scales with torch"
    capability = _capability()
    if capability is None:
        return False, "no CUDA GPU visible to Paddle (DeepGEMM needs compute capability 9.x or 10.x)"
    if capability[0] not in DG.ARCHS:
        return False, (f"GPU compute capability {capability[0]}.{capability[1]} found, DeepGEMM needs 9.x (Hopper) "
                       f"or 10.x (Blackwell)")
    module, framework, why = find_build(capability)
    if module is None:
        return False, why + "; install DeepGEMM (pip, or benchmarks/build_deepgemm.sh) or FastDeploy's GPU ops"
    return True, (f"{module.__name__} ({framework} tensors) on a GPU with compute capability "
                  f"{capability[0]}.{capability[1]}")


def next_provider() -> ModuleType:
    """The provider that serves what DeepGEMM does not: triton when available with a CUDA GPU (auto's rule),
    else paddle."""
    ok, _ = triton_provider.is_available()
    if ok and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return triton_provider
    return paddle_provider


def _to_paddle_view(t):
    """torch tensor -> a paddle tensor on the same memory (DLPack, CPU or GPU), for a Paddle build of DeepGEMM
    (it writes d in place). Strided scale views go as contiguous copies: DeepGEMM makes them MN-major itself."""
    import torch
    t = t if t.is_contiguous() else t.contiguous()
    if t.dtype == torch.float8_e4m3fn:
        as_bytes = paddle.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t.view(torch.uint8)))
        return as_bytes.view(paddle.float8_e4m3fn)
    return paddle.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t))


def prepare_weight_scales(b, sfb, sfb_per_block: bool):
    """DeepGEMM's weight scales for b [E, N, K] fp8 and its CUTLASS bytes sfb [E, align(N,128), KB']
    (`deep_gemm_launch.weight_scales`), made once at weight load; None where DeepGEMM cannot take these bytes
    (the GEMM then hands the call on, as without)."""
    capability = _capability()
    arch = capability[0] if capability else 0
    if arch not in DG.ARCHS or (arch == 9 and not sfb_per_block):
        return None
    _, n, k = (int(d) for d in b.shape)
    return DG.weight_scales(to_torch(sfb), n, k, arch)


def group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, recipe, *, sfb_per_block,
                      sfb_prepared, sfa_per_group, expected_m):
    # recipe: None or "w8a8" (checked by the contract), the one recipe DeepGEMM's FP8 GEMM computes
    capability = _capability()
    arch = capability[0] if capability else 0
    e_num, n, k = (int(d) for d in b.shape)
    sfa_t, sfb_t = to_torch(sfa), to_torch(sfb)
    why = DG.unsupported_reason(arch, bias, sfb_per_block, sfa_t, sfb_t, max_m_per_expert, n, k, sfa_per_group)
    if why is not None:
        return next_provider().group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count,
                                                 recipe, sfb_per_block=sfb_per_block, sfb_prepared=None,
                                                 sfa_per_group=sfa_per_group, expected_m=expected_m)
    module, framework, reason = find_build(capability)
    if module is None:
        raise RuntimeError(f"deep_gemm provider: {reason}")
    out_t = to_torch(out)
    sb = DG.weight_scales(sfb_t, n, k, arch) if sfb_prepared is None else sfb_prepared   # prepared: made at load
    DG.run_masked(module, to_torch(a), to_torch(b), DG.activation_scales(sfa_t, max_m_per_expert, k, arch), sb,
                  to_torch(masked_m), out_t, max_m_per_expert, arch, expected_m=expected_m,
                  to_dg=_to_paddle_view if framework == "paddle" else (lambda t: t))
    if not out_t.is_cuda or out_t.data_ptr() != triton_provider.data_ptr_of(out):
        paddle.assign(triton_provider.to_paddle(out_t), output=out)      # CPU: the torch copy goes back into out
    return out


def _delegate(name: str):
    def op(*args, **options):
        return getattr(next_provider(), name)(*args, **options)
    op.__name__ = op.__qualname__ = name
    op.__doc__ = f"`{name}` of next_provider() (DeepGEMM has no such op)."
    return op


for _row in OPS:
    if _row.name != "group_gemm_masked":
        globals()[_row.name] = _delegate(_row.name)
del _row
