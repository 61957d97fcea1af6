"""The `blackwell_ops` contract (SPEC §4-8): names, argument orders, checks, provider selection.

The seven public functions keep the upstream names and argument orders of the unpublished
`blackwell_ops` package that FastDeploy's `BlackwellGemmFusedMoeMethod` (PR #7053) calls,
plus `cutlass_scale_to_fp32`, our inverse of `unpack_and_convert_scale`. Each function checks
its arguments once (backend/ops/_checks.py; errors name the argument, the expected and the seen
value), then calls the selected provider, which receives already-validated arguments:

    blackwell_ops   the real package (SM100+ GPUs)                 backend/ops/blackwell_provider.py
    triton          Triton kernels (torch + triton + a CUDA GPU)   backend/ops/triton/provider.py
    paddle          vectorized Paddle, any device                  backend/ops/paddle_provider.py

`get_provider(name)` picks one: `name` None reads `FD_MOE_OPS_PROVIDER` (auto | blackwell_ops |
paddle | triton; default auto). auto takes the first available of blackwell_ops, triton (on a CUDA
GPU only, never the interpreter), paddle.
An explicit request for an unavailable provider raises RuntimeError saying what is missing.
The provider that ran the last op is `last_provider_name()`; each selection logs one INFO line
on the `backend.ops` logger.

A provider module exposes `NAME`, `is_available() -> (bool, reason)` and the seven functions
with the signatures below (paddle tensors in and out).

Layouts used below (SPEC §2): "packed UE8M0" = 4 UE8M0 bytes per int32, little-endian along
the 128-wide group axis (word p holds groups 4p..4p+3, missing groups are byte 0).
"MN-major" = a strided paddle view of logical shape [B, MN, C] with strides
(C · align(MN, 4), 1, align(MN, 4)) over a zero-padded physical [B, C, align(MN, 4)] buffer.
"CUTLASS SF" = uint8 bytes in SM100 SfAtom order (`backend.ops.cutlass_sf`), one byte per
32 K-elements.

Data checks (expert ids in range, per-expert counts <= M, no NaN byte 255 in scales, finite
quantization input) read values, which costs one device synchronization per call on a GPU.

Importing this package does not import Paddle (the checks and the providers import it when first
used), so that `backend.ops.triton.kernels` and `backend.ops.cutlass_sf` import where Paddle is absent.
"""
from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType

from moe_ref.constants import GROUP_SIZE

from backend import envs

__all__ = [
    "per_token_quant", "prefill_permute_to_masked_gemm", "unpack_and_convert_scale", "cutlass_scale_to_fp32",
    "group_gemm_masked", "fused_mask_swiglu_fp8_quant", "depermute_prefill_combine",
    "get_provider", "last_provider_name", "reset_provider_cache", "OpsProvider",
    "PROVIDER_ENV", "PROVIDER_NAMES", "OP_NAMES",
]

logger = logging.getLogger(__name__)

PROVIDER_ENV = envs.OPS_PROVIDER_VAR            # "FD_MOE_OPS_PROVIDER"
PROVIDER_NAMES = envs.OPS_PROVIDERS           # auto, blackwell_ops, paddle, triton
AUTO_ORDER = ("blackwell_ops", "triton", "paddle")
_PROVIDER_MODULES = {
    "blackwell_ops": "backend.ops.blackwell_provider",
    "triton": "backend.ops.triton.provider",
    "paddle": "backend.ops.paddle_provider",
}
OP_NAMES = ("per_token_quant", "prefill_permute_to_masked_gemm", "unpack_and_convert_scale",
            "cutlass_scale_to_fp32", "group_gemm_masked", "fused_mask_swiglu_fp8_quant",
            "depermute_prefill_combine")

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


def _arg_checks() -> ModuleType:
    """backend.ops._checks, imported at the first op: it imports Paddle, and importing this package must
    not (backend.ops.triton.kernels runs where Paddle is absent)."""
    from . import _checks
    return _checks


class OpsProvider:
    """One provider behind the contract: `.name` and the seven validated ops as methods."""

    def __init__(self, module: ModuleType):
        self.module = module
        self.name = module.NAME

    def __repr__(self) -> str:
        return f"OpsProvider({self.name!r})"

    def _run(self, op: str, *args):
        global _last_provider
        _last_provider = self.name
        return getattr(self.module, op)(*args)

    def per_token_quant(self, x, block_size=GROUP_SIZE, use_ue8m0=False):
        return self._run("per_token_quant", *_arg_checks()._check_per_token_quant(x, block_size, use_ue8m0))

    def prefill_permute_to_masked_gemm(self, x, scale, topk_ids, num_local_experts, max_token_num):
        return self._run("prefill_permute_to_masked_gemm",
                         *_arg_checks()._check_prefill_permute(x, scale, topk_ids, num_local_experts, max_token_num))

    def unpack_and_convert_scale(self, scale, masked_m=None):
        return self._run("unpack_and_convert_scale", *_arg_checks()._check_unpack(scale, masked_m))

    def cutlass_scale_to_fp32(self, sf, num_rows=None):
        return self._run("cutlass_scale_to_fp32", *_arg_checks()._check_cutlass_to_fp32(sf, num_rows))

    def group_gemm_masked(self, a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count=-1):
        return self._run("group_gemm_masked", *_arg_checks()._check_group_gemm(a, b, sfa, sfb, masked_m, out, bias,
                                                                 max_m_per_expert, sm_count))

    def fused_mask_swiglu_fp8_quant(self, up, token_nums_per_expert, block_size=GROUP_SIZE, use_ue8m0=True):
        return self._run("fused_mask_swiglu_fp8_quant",
                         *_arg_checks()._check_swiglu(up, token_nums_per_expert, block_size, use_ue8m0))

    def depermute_prefill_combine(self, ffn_out, indice_map, topk_weights, num_worst_tokens):
        return self._run("depermute_prefill_combine",
                         *_arg_checks()._check_depermute(ffn_out, indice_map, topk_weights, num_worst_tokens))


def _requested_name(name: str | None) -> str:
    if name is None:
        return envs.get_ops_provider_name()      # the one reader of the variable (ValueError naming it)
    if not isinstance(name, str) or name not in PROVIDER_NAMES:
        raise ValueError(f"name: expected one of {', '.join(PROVIDER_NAMES)} or None, got {name!r}")
    return name


def get_provider(name: str | None = None) -> OpsProvider:
    """The ops provider for `name` (None: env var FD_MOE_OPS_PROVIDER, default "auto").

    "auto" -> the first available of blackwell_ops (package + SM100+ GPU), triton (torch + triton
    + CUDA GPU), paddle. An explicit name whose provider is unavailable raises RuntimeError with
    the reason (missing package, or compute capability found vs needed) and how to fix it.
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


def last_provider_name() -> str | None:
    """NAME of the provider that ran the most recent op through this contract (None before any)."""
    return _last_provider


# ----------------------------------------------------------------------------- the contract

def per_token_quant(x, block_size=GROUP_SIZE, use_ue8m0=False):
    """1 x block_size activation quantization (SPEC §3).

    x [T, H] bf16 | fp32, finite -> (q [T, H] float8_e4m3fn, scale).
    scale: [T, S] fp32 row-major (S = ceil(H/block_size)), x ~= q · s per group; with
    use_ue8m0=True the scales are powers of two (smallest >= amax/448), returned packed UE8M0
    [T, ceil(S/4)] int32 row-major. amax floor 1e-4 (moe_ref.quant.DEEPGEMM_AMAX_FLOOR), no
    log2 bias (SPEC §3 "ours"; the real package follows FastDeploy's kernel).
    A ragged last group is zero-padded for its amax.
    """
    return get_provider().per_token_quant(x, block_size, use_ue8m0)


def prefill_permute_to_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num):
    """Scatter tokens to the masked per-expert layout (SPEC §5).

    x [W, H] fp8 | bf16; scale [W, S'] fp32 (S' = S = ceil(H/128)) or packed UE8M0 int32
    (S' = ceil(S/4)), or None for bf16 x; topk_ids [W, K_top] int64 | int32 local expert ids or -1
    (-1 rows may sit anywhere); num_local_experts E; max_token_num M.
    Returns (permute_x [E, M, H] dtype of x, permute_scale, permuted_indice_map [W, K_top] int32,
    token_nums_per_expert [E, 1] int32):
    - slots inside an expert follow token order, then k (deterministic);
    - permuted_indice_map[t, k] = e · M + slot, or -1 where topk_ids is -1;
    - permute_scale: MN-major strided view, logical [E, M, S'], strides (S'·align(M,4), 1, align(M,4))
      (None when scale is None);
    - rows past the count of an expert are zero (x and scale).
    ValueError for an id outside [-1, E) or an expert receiving more than M rows (names both).
    """
    return get_provider().prefill_permute_to_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num)


def unpack_and_convert_scale(scale, masked_m=None):
    """Packed UE8M0 scales -> CUTLASS SM100 scale-factor bytes (SPEC §4).

    scale [E, MN, C] int32 packed UE8M0, any strides (MN-major or contiguous); masked_m None
    (weights) or int32 | int64 [E] or [E, 1] (activations: rows >= masked_m[e] become zero bytes).
    Returns uint8 [E, MN_pad, 16·C], MN_pad = align(MN, 128): each 128-group byte repeated 4 times
    (one byte per 32 K-elements), swizzled per expert with `cutlass_sf.sf_byte_offset`. Rows
    MN..MN_pad-1 are zero bytes (upstream requires MN % 128 == 0 and writes out of range otherwise).
    A byte equal to 255 (UE8M0 NaN) is a ValueError; a non-int32 scale is a TypeError.
    """
    return get_provider().unpack_and_convert_scale(scale, masked_m)


def cutlass_scale_to_fp32(sf, num_rows=None):
    """Inverse of unpack_and_convert_scale (ours): CUTLASS SF bytes -> FP32 128-group scales.

    sf [E, MN_pad, KB] uint8 (MN_pad % 128 == 0, KB % 4 == 0) -> [E, num_rows, KB/4] fp32,
    value 2^(byte - 127) (byte 0 gives 2^-127). num_rows (default MN_pad) drops padding rows.
    The 4 bytes of a 128-group (one per 32 K-elements) must agree: ValueError otherwise.
    """
    return get_provider().cutlass_scale_to_fp32(sf, num_rows)


def group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count=-1):
    """Masked grouped FP8 GEMM, NT, block-scaled (SPEC §6); writes `out` in place, returns it.

    a [E·M, K] fp8 (M = max_m_per_expert); b [E, N, K] fp8; sfa [E, align(M,128), KB] and
    sfb [E, align(N,128), KB'] uint8 CUTLASS SF bytes (unpack_and_convert_scale), KB, KB' >= ceil(K/32);
    masked_m [E] (or [E, 1]) int32 in [0, M]; out [E·M, N] bf16; bias [E, N] bf16 | fp32 | None;
    sm_count: SMs the kernel may use (-1 all; ignored by the portable providers).
    For m < masked_m[e]: out[e·M + m, n] = bf16(Σ_k a·2^(sfa-127)·b·2^(sfb-127) (+ bias[e, n])),
    float32 accumulation, one scale byte per 32 K-elements. Rows >= masked_m[e] are not touched.
    """
    return get_provider().group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count)


def fused_mask_swiglu_fp8_quant(up, token_nums_per_expert, block_size=GROUP_SIZE, use_ue8m0=True):
    """SwiGLU on the masked layout, then 1 x block_size FP8 quantization (SPEC §7).

    up [E, M, 2I] bf16 | fp32 (gate = up[..., :I], lin = up[..., I:]); token_nums_per_expert
    int32 | int64 [E] or [E, 1] in [0, M]. y = bf16(lin · gate / (1 + exp(-gate))) in float32;
    amax floor 1e-10; s = amax/448 (use_ue8m0: rounded up to a power of two).
    Returns (act [E, M, I] fp8, act_scale): act_scale is MN-major (M padded to 4) with logical
    shape [E, M, ceil(I/block_size/4)] packed UE8M0 int32 (use_ue8m0) or [E, M, ceil(I/block_size)]
    fp32. Rows >= token_nums_per_expert[e] are zero in act and act_scale.
    """
    return get_provider().fused_mask_swiglu_fp8_quant(up, token_nums_per_expert, block_size, use_ue8m0)


def depermute_prefill_combine(ffn_out, indice_map, topk_weights, num_worst_tokens):
    """Gather expert outputs back to tokens and combine with the routing weights (SPEC §8).

    ffn_out [E, M, H] bf16 | fp32; indice_map [W, K_top] int32 | int64 with values e · M + slot or -1;
    topk_weights [W, K_top] fp32; num_worst_tokens W (= rows of indice_map).
    Returns [W, H] bf16: out[t] = bf16(Σ_{k: idx >= 0} topk_weights[t, k] · ffn_out[idx // M, idx % M]),
    float32 accumulation in k order; rows with no valid index are zero.
    """
    return get_provider().depermute_prefill_combine(ffn_out, indice_map, topk_weights, num_worst_tokens)


for _op in OP_NAMES:
    getattr(OpsProvider, _op).__doc__ = globals()[_op].__doc__
del _op
