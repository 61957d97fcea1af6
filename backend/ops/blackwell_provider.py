"""Adapter to upstream's real op packages (SM100+ GPUs only): each op taken where upstream takes it.

docs/upstream.md §1, §7 (SPEC §14):

    blackwell_ops                         group_gemm_masked, unpack_and_convert_scale,
                                          prefill_permute_to_blackwell_masked_gemm,
                                          fused_mask_swiglu_fp8_quant_blackwell (develop),
                                          group_wise_quant (#7666)
    fastdeploy.model_executor.ops.gpu     per_token_quant, prefill_permute_to_masked_gemm,
                                          fused_mask_swiglu_fp8_quant, depermute_prefill_combine

with upstream's casts before the call: `topk_ids` int64 before both permutes, the combine's map int32
(K_top 4, 6 or 8), 2-D `a` and `out` for the GEMM, MN-major scales for `unpack_and_convert_scale`.
`cutlass_scale_to_fp32` is ours (no package has an inverse): the portable Paddle implementation runs it.

Generation (`generation()`): "develop" (FastDeploy #7374 and later: `group_gemm_masked` takes a tenth
argument "w8a8", the two fused Blackwell ops exist) when the installed `blackwell_ops` has
`prefill_permute_to_blackwell_masked_gemm`, else "7053" (nine arguments, no fused ops);
FD_BLACKWELL_OPS_GENERATION=7053|develop overrides the detection (`backend.envs`). A GEMM call the package
rejects with a TypeError raises one naming both signatures. The fused ops on the 7053 generation are a
RuntimeError naming the op, the generation and the #7053 ops to use instead.

Upstream imports `blackwell_ops` in a bare try/except, so a missing package shows up later as a NameError
(SPEC §13). Here both packages are imported only when asked (`is_available()` or an op), the ImportError
text is kept, and the GPU check (compute capability >= 10.0) is a separate, explicit reason. Nothing is
queried at import time.
"""
from __future__ import annotations

import importlib
from types import ModuleType

import paddle

from backend import envs
from moe_ref.fp8 import to_mn_major_view

from . import paddle_provider
from .contract import BLACKWELL_OPS, FD_OPS, RECIPES

NAME = "blackwell_ops"
PACKAGE = BLACKWELL_OPS
PACKAGES = (BLACKWELL_OPS, FD_OPS)
MIN_CAPABILITY = (10, 0)
GENERATIONS = ("7053", "develop")
DETECT_OP = "prefill_permute_to_blackwell_masked_gemm"      # in blackwell_ops since #7374 (develop)
GEMM_SIGNATURES = {
    "7053": "group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count)",
    "develop": 'group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, "w8a8")',
}
COMBINE_TOP_K = (4, 6, 8)                  # depermute_prefill_combine.cu:171-189
KERNEL_GROUP = 128                         # FastDeploy's quant kernels walk 128-wide groups


def _import_package(name: str) -> tuple[ModuleType | None, str]:
    try:
        return importlib.import_module(name), ""
    except ImportError as e:
        what = f"FastDeploy's {name}" if name == BLACKWELL_OPS else f"FastDeploy (its compiled ops {name})"
        return None, f"the {name} package cannot be imported ({e}); build and install {what} for SM100 into this environment"


def device_capability() -> tuple[int, int] | None:
    """Compute capability of the current Paddle GPU, or None when Paddle sees no CUDA GPU."""
    if not paddle.is_compiled_with_cuda() or paddle.device.cuda.device_count() == 0:
        return None
    major, minor = paddle.device.cuda.get_device_capability()
    return int(major), int(minor)


def is_available() -> tuple[bool, str]:
    """(True, description) when both packages import and the GPU is SM100+; else (False, what is missing)."""
    for name in PACKAGES:
        package, why = _import_package(name)
        if package is None:
            return False, why
    capability = device_capability()
    need = f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}"
    if capability is None:
        return False, (f"no CUDA GPU visible to Paddle ({PACKAGE} needs compute capability >= {need}); "
                       f"install paddlepaddle-gpu and run on a Blackwell (SM100+) GPU")
    if capability < MIN_CAPABILITY:
        return False, (f"GPU compute capability {capability[0]}.{capability[1]} found, >= {need} (Blackwell, SM100) "
                       f"needed by {PACKAGE}; use FD_MOE_OPS_PROVIDER=triton or paddle on this GPU")
    return True, f"{PACKAGE} on a GPU with compute capability {capability[0]}.{capability[1]}"


def _package(name: str = BLACKWELL_OPS) -> ModuleType:
    package, why = _import_package(name)
    if package is None:
        raise RuntimeError(why)
    return package


def generation() -> str:
    """"7053" or "develop": FD_BLACKWELL_OPS_GENERATION when set, else detected from the installed blackwell_ops."""
    chosen = envs.get_blackwell_ops_generation()
    if chosen != "auto":
        return chosen
    return "develop" if hasattr(_package(), DETECT_OP) else "7053"


def _how_chosen() -> str:
    if envs.get_blackwell_ops_generation() != "auto":
        return f"set by {envs.GENERATION_VAR}"
    return f"detected: the installed {PACKAGE} {'has' if hasattr(_package(), DETECT_OP) else 'has no'} {DETECT_OP}"


def _develop_op(name: str):
    """blackwell_ops.<name> of the develop generation; RuntimeError naming the generation otherwise."""
    gen = generation()
    if gen != "develop":
        raise RuntimeError(f"{name}: not in {PACKAGE} of generation {gen} ({_how_chosen()}); FastDeploy #7053 runs "
                           f"{FD_OPS}'s prefill_permute_to_masked_gemm / fused_mask_swiglu_fp8_quant followed by "
                           f"{PACKAGE}.unpack_and_convert_scale instead (or set {envs.GENERATION_VAR}=develop with "
                           f"develop's package)")
    return _op(_package(), name, f" (generation {gen}, {_how_chosen()})")


def _op(package: ModuleType, name: str, where: str = ""):
    """package.<name>, or a RuntimeError saying the installed package lacks it (and `where` upstream has it)."""
    try:
        return getattr(package, name)
    except AttributeError:
        raise RuntimeError(f"{name}: the installed {package.__name__} has no {name}{where}") from None


def _need(ok: bool, exc: type, message: str) -> None:
    if not ok:
        raise exc(message)


# ----------------------------------------------------------------------------- FastDeploy's own ops

def per_token_quant(x, block_size, use_ue8m0):
    fd = _package(FD_OPS)
    _need(x.dtype == paddle.bfloat16, TypeError, f"x: {FD_OPS}.per_token_quant takes bf16 | fp16, got "
          f"{str(x.dtype).replace('paddle.', '')} (use FD_MOE_OPS_PROVIDER=paddle or triton for float32 input)")
    _need(block_size == KERNEL_GROUP, ValueError, f"block_size: {FD_OPS}.per_token_quant walks {KERNEL_GROUP}-wide "
          f"groups (per_token_quant_fp8.cu:44), expected {KERNEL_GROUP}, got {block_size}")
    return fd.per_token_quant(x, block_size, use_ue8m0)


def _permute_top_k(x, scale) -> tuple[int, ...]:
    # prefill_permute_to_masked_gemm.cu:189-241: TOP_K = 6 only for bf16 x with fp32 scales
    return (4, 6, 8) if x.dtype == paddle.bfloat16 and scale.dtype == paddle.float32 else (4, 8)


def _no_deferred(errors, name: str) -> None:
    # the compiled permutes do not record routing errors on the device, and what they write for a bad id or a
    # row past M is their own: deferred checks need a provider that drops and records (paddle, triton)
    _need(errors is None, NotImplementedError, f"errors: {name} of the real package cannot record routing errors "
          f"on the device (deferred checks); expected None (eager checks), or FD_MOE_OPS_PROVIDER=triton | paddle")


def prefill_permute_to_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    _no_deferred(errors, "prefill_permute_to_masked_gemm")
    fd = _package(FD_OPS)
    _need(scale is not None, ValueError, f"scale: {FD_OPS}.prefill_permute_to_masked_gemm needs a [W, S'] scale "
          f"tensor, got None")
    k_top = int(topk_ids.shape[1])
    allowed = _permute_top_k(x, scale)
    _need(k_top in allowed, ValueError, f"topk_ids: {FD_OPS}.prefill_permute_to_masked_gemm takes K_top in "
          f"{allowed} for x {str(x.dtype).replace('paddle.', '')}, got K_top = {k_top}")
    return fd.prefill_permute_to_masked_gemm(x, scale, topk_ids.astype(paddle.int64), num_local_experts,
                                             max_token_num)


def fused_mask_swiglu_fp8_quant(up, token_nums_per_expert, block_size, use_ue8m0):
    fd = _package(FD_OPS)
    _need(up.dtype == paddle.bfloat16, TypeError, f"up: {FD_OPS}.fused_mask_swiglu_fp8_quant takes bf16 only, got "
          f"{str(up.dtype).replace('paddle.', '')}")
    i = int(up.shape[2]) // 2
    _need(block_size == KERNEL_GROUP and i % KERNEL_GROUP == 0, ValueError,
          f"block_size: {FD_OPS}.fused_mask_swiglu_fp8_quant quantizes {KERNEL_GROUP}-wide groups of I (a multiple "
          f"of {KERNEL_GROUP}), expected block_size {KERNEL_GROUP} and I % {KERNEL_GROUP} == 0, got block_size "
          f"{block_size}, I = {i}")
    return fd.fused_mask_swiglu_fp8_quant(up, token_nums_per_expert, block_size, use_ue8m0=use_ue8m0)


def depermute_prefill_combine(ffn_out, indice_map, topk_weights, num_worst_tokens):
    fd = _package(FD_OPS)
    _need(ffn_out.dtype == paddle.bfloat16, TypeError, f"ffn_out: {FD_OPS}.depermute_prefill_combine returns the "
          f"dtype of its input and the contract bf16: expected bf16, got {str(ffn_out.dtype).replace('paddle.', '')}")
    k_top = int(indice_map.shape[1])
    _need(k_top in COMBINE_TOP_K, ValueError, f"indice_map: {FD_OPS}.depermute_prefill_combine takes K_top in "
          f"{COMBINE_TOP_K}, got K_top = {k_top}")
    out = fd.depermute_prefill_combine(ffn_out, indice_map.astype(paddle.int32), topk_weights, num_worst_tokens)
    # FastDeploy leaves rows with no valid index unwritten (paddle.empty); the contract makes them zero
    # (through float32: exact for bf16, and Paddle's CPU `where` has no bf16 kernel).
    routed = (indice_map >= 0).any(axis=1, keepdim=True)
    out32 = out.astype(paddle.float32)
    return paddle.where(routed, out32, paddle.zeros_like(out32)).astype(out.dtype)


# ----------------------------------------------------------------------------- blackwell_ops

def unpack_and_convert_scale(scale, masked_m):
    bw = _package()
    # Every upstream caller passes MN-major scales (the weights' .transpose.contiguous.transpose, FastDeploy's
    # permute, DeepEP's ll dispatch): a scale that is not is made MN-major here, its values unchanged.
    if int(scale.shape[1]) > 1 and int(scale.strides[1]) != 1:
        scale = to_mn_major_view(scale if scale.is_contiguous() else scale.clone())
    return bw.unpack_and_convert_scale(scale, masked_m)


def group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, recipe, *, sfb_per_block,
                      sfb_prepared, sfa_per_group, expected_m):
    # sfb_per_block, sfa_per_group, expected_m are ours (what the triton / deep_gemm providers use); recipe None and "w8a8" are the same GEMM: the
    # package gets the arguments of its generation.
    gen = generation()
    args = (a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count)
    if gen == "develop":
        args += (recipe or RECIPES[0],)
    try:
        _package().group_gemm_masked(*args)
    except TypeError as e:
        raise TypeError(f"{PACKAGE}.group_gemm_masked rejected the {len(args)}-argument call of generation {gen} "
                        f"({_how_chosen()}): {e}. FastDeploy #7053's signature is {GEMM_SIGNATURES['7053']}, "
                        f"develop's (#7374) {GEMM_SIGNATURES['develop']}; set {envs.GENERATION_VAR}=7053 or develop "
                        f"to the installed package's generation") from e
    return out


def prefill_permute_to_blackwell_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    _no_deferred(errors, "prefill_permute_to_blackwell_masked_gemm")
    op = _develop_op("prefill_permute_to_blackwell_masked_gemm")
    return tuple(op(x, scale, topk_ids.astype(paddle.int64), num_local_experts, max_token_num))


def fused_mask_swiglu_fp8_quant_blackwell(up, token_nums_per_expert, *, group_size):
    # group_size is ours: the package's op has no such argument and quantizes as it was built (docs/upstream.md §2).
    return tuple(_develop_op("fused_mask_swiglu_fp8_quant_blackwell")(up, token_nums_per_expert))


def group_wise_quant(x, flag, use_swizzle):
    op = _op(_package(), "group_wise_quant", " (upstream calls it from FastDeploy #7666, an open PR)")
    _need(x.dtype == paddle.bfloat16, TypeError, f"x: {PACKAGE}.group_wise_quant takes bf16 (FastDeploy #7666 "
          f"passes bf16), got {str(x.dtype).replace('paddle.', '')}")
    if x.ndim == 2:
        return tuple(op(x, flag, use_swizzle))
    # [E, N, K] weights: upstream quantizes expert by expert and stacks (BW f0ea6f80:450-461)
    pieces = [op(x[e], flag, use_swizzle) for e in range(int(x.shape[0]))]
    q = paddle.stack([p[0].view(paddle.uint8) for p in pieces]).view(paddle.float8_e4m3fn)
    return q, paddle.stack([p[1] for p in pieces])


def cutlass_scale_to_fp32(sf, num_rows):
    """Ours, not the package's: the portable implementation on the same device."""
    return paddle_provider.cutlass_scale_to_fp32(sf, num_rows)
