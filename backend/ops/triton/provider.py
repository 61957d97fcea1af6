"""`triton` provider of the ops contract: Paddle tensors in and out, Triton kernels inside.

Arguments arrive validated by `backend.ops` (the contract layer). Tensors cross to torch through
NumPy on CPU (the Triton interpreter, TRITON_INTERPRET=1, as in CI) and through DLPack on a GPU,
then `backend.ops.triton.launch` runs the kernels. The kernels and launchers import no Paddle;
this adapter is the only Paddle-facing module of the package.
"""
from __future__ import annotations

import os

import numpy as np
import paddle

from moe_ref.fp8 import contiguous_copy, mn_major_view

from ..device_errors import value_checks_on

NAME = "triton"

_FP8 = paddle.float8_e4m3fn


def is_available() -> tuple[bool, str]:
    """(True, "") when torch and triton import and either TRITON_INTERPRET=1 or torch sees a CUDA device."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"torch and triton are needed ({exc}); pip install '.[triton]'"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device visible to torch (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return True, ""


def _launch():
    from . import launch
    return launch


# ----------------------------------------------------------------------------- paddle <-> torch

def to_torch(x: paddle.Tensor | None):
    """Logical (contiguous) torch copy/view of a paddle tensor; fp8 and bf16 keep their bits."""
    if x is None:
        return None
    import torch
    on_gpu = "gpu" in str(x.place).lower() and os.environ.get("TRITON_INTERPRET", "0") != "1"
    if on_gpu:
        # never x.contiguous(): Paddle 3.3 rewrites a strided view in place, and a strided `out` would then be
        # written where its base buffer no longer looks; a copy makes group_gemm_masked write `out` back
        # through paddle.assign (data pointers differ), which reaches the base (issue 15, item 5)
        xc = contiguous_copy(x)
        if xc.dtype == _FP8:
            t = torch.utils.dlpack.from_dlpack(paddle.utils.dlpack.to_dlpack(xc.view(paddle.uint8)))
            return t.view(torch.float8_e4m3fn)
        return torch.utils.dlpack.from_dlpack(paddle.utils.dlpack.to_dlpack(xc))
    arr = x.numpy()                                     # logical values of a strided view too
    if x.dtype == _FP8:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8)).view(torch.float8_e4m3fn)
    if x.dtype == paddle.bfloat16:
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(arr))


def to_paddle(t, like_place=None) -> paddle.Tensor:
    import torch
    if t.is_cuda:
        if t.dtype == torch.float8_e4m3fn:
            p = paddle.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t.contiguous().view(torch.uint8)))
            return p.view(_FP8)
        return paddle.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(t.contiguous()))
    t = t.contiguous()
    if t.dtype == torch.float8_e4m3fn:
        return paddle.to_tensor(t.view(torch.uint8).numpy()).view(_FP8)
    if t.dtype == torch.bfloat16:
        return paddle.to_tensor(t.view(torch.int16).numpy().view(np.uint16))   # uint16 ndarray -> bfloat16
    return paddle.to_tensor(t.numpy())


def _mn_major_to_paddle(view) -> paddle.Tensor:
    """torch MN-major view (logical [B, MN, C], strides (C·MNp, 1, MNp)) -> the same strided view in Paddle."""
    import torch
    b, mn, c = view.shape
    mn_pad = view.stride(2)
    phys = torch.as_strided(view, (b, c, mn_pad), (c * mn_pad, mn_pad, 1))
    return mn_major_view(to_paddle(phys), mn)


# ----------------------------------------------------------------------------- the contract

def per_token_quant(x, block_size, use_ue8m0):
    q, s = _launch().per_token_quant(to_torch(x), block_size, use_ue8m0)
    return to_paddle(q), to_paddle(s)


def prefill_permute_to_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    err_t = to_torch(errors)
    px, ps, imap, counts = _launch().prefill_permute_to_masked_gemm(
        to_torch(x), to_torch(scale), to_torch(topk_ids), num_local_experts, max_token_num, errors=err_t)
    _write_back(err_t, errors)
    return (to_paddle(px), None if ps is None else _mn_major_to_paddle(ps), to_paddle(imap), to_paddle(counts))


def _write_back(t, x) -> None:
    """A torch copy `t` of paddle tensor `x` (to_torch) that a kernel wrote: into x, unless they share memory."""
    if x is not None and (not t.is_cuda or t.data_ptr() != data_ptr_of(x)):
        paddle.assign(to_paddle(t), output=x)


def unpack_and_convert_scale(scale, masked_m):
    return to_paddle(_launch().unpack_and_convert_scale(to_torch(scale), to_torch(masked_m)))


def cutlass_scale_to_fp32(sf, num_rows):
    return to_paddle(_launch().cutlass_scale_to_fp32(to_torch(sf), num_rows))


def group_gemm_masked(a, b, sfa, sfb, masked_m, out, bias, max_m_per_expert, sm_count, recipe, *, sfb_per_block,
                      sfb_prepared, sfa_per_group, expected_m):
    # recipe (None or "w8a8", checked by the contract) names the one computation the kernels do; the kernels
    # read the CUTLASS bytes directly, so there is nothing to prepare (sfb_prepared is None here).
    out_t = to_torch(out)
    # impl="auto": the fast per-128 kernel when every 4-byte group of sfa/sfb repeats one byte (always so
    # for unpack_and_convert_scale's output), else tl.dot_scaled, which honours one byte per 32 K. The bytes
    # the caller vouches for (sfa_per_group, sfb_per_block) are not looked at: with both, no synchronization.
    _launch().group_gemm_masked(to_torch(a), to_torch(b), to_torch(sfa), to_torch(sfb), to_torch(masked_m),
                                out_t, to_torch(bias), max_m_per_expert, sm_count, impl="auto",
                                sfb_per_block=sfb_per_block, sfa_per_group=sfa_per_group, expected_m=expected_m)
    if not out_t.is_cuda or out_t.data_ptr() != data_ptr_of(out):
        paddle.assign(to_paddle(out_t), output=out)      # CPU: the torch copy goes back into `out`
    return out


def data_ptr_of(x: paddle.Tensor) -> int:
    try:
        return int(x.data_ptr())
    except Exception:   # older Paddle: no data_ptr; then always copy back
        return -1


def fused_mask_swiglu_fp8_quant(up, token_nums_per_expert, block_size, use_ue8m0):
    act, s = _launch().fused_mask_swiglu_fp8_quant(to_torch(up), to_torch(token_nums_per_expert),
                                                   block_size, use_ue8m0, check_finite=value_checks_on())
    return to_paddle(act), _mn_major_to_paddle(s)


def depermute_prefill_combine(ffn_out, indice_map, topk_weights, num_worst_tokens):
    return to_paddle(_launch().depermute_prefill_combine(to_torch(ffn_out), to_torch(indice_map),
                                                          to_torch(topk_weights), num_worst_tokens))


# ----------------------------------------------------------------------------- develop's fused ops, #7666's quant
# Composed of this provider's own kernels (permute / SwiGLU quant, then the SF conversion); one fused kernel
# each would save a pass over the scales. Equal byte for byte to moe_ref.blackwell_layout (tests).

def prefill_permute_to_blackwell_masked_gemm(x, scale, topk_ids, num_local_experts, max_token_num, *, errors):
    e, m = num_local_experts, max_token_num
    L = _launch()
    group = 128 if scale.dtype == paddle.int32 else 32
    words = to_torch(scale)
    words = words if group == 128 else L.byte_words(words)
    err_t = to_torch(errors)
    px, sf, imap, counts = L.prefill_permute_to_masked_gemm(to_torch(x), words, to_torch(topk_ids), e, m,
                                                            errors=err_t, sf_group=group)   # CUTLASS bytes directly
    _write_back(err_t, errors)
    return to_paddle(px.view(e * m, -1)), to_paddle(sf), to_paddle(imap), to_paddle(counts)


def fused_mask_swiglu_fp8_quant_blackwell(up, token_nums_per_expert, *, group_size):
    L = _launch()
    e = int(token_nums_per_expert.shape[0])
    rows, i2 = (int(d) for d in up.shape)
    counts = to_torch(token_nums_per_expert)
    act, words = L.fused_mask_swiglu_fp8_quant(to_torch(up).view(e, rows // e, i2), counts, group_size, True,
                                               check_finite=value_checks_on())
    sf = L.unpack_and_convert_scale(words, counts, group_size=group_size)
    return to_paddle(act.view(rows, i2 // 2)), to_paddle(sf)


def group_wise_quant(x, flag, use_swizzle):
    # flag is always False (checked by the contract). The swizzle is the SF conversion of 1x32 bytes,
    # one expert per matrix (N % 128 == 0 and ceil(K/32) % 4 == 0, checked by the contract).
    import torch
    L = _launch()
    n, k = int(x.shape[-2]), int(x.shape[-1])
    groups = -(-k // 32)
    q, words = L.per_token_quant(to_torch(x).reshape(-1, k), 32, True, amax_floor=L.SWIGLU_AMAX_FLOOR)
    lead = list(x.shape[:-2])
    if use_swizzle:
        sf = L.unpack_and_convert_scale(words.view(-1, n, words.shape[-1]), None, group_size=32)
    else:
        sf = words.view(torch.uint8).view(-1, words.shape[-1] * 4)[:, :groups]
    return to_paddle(q).reshape(lead + [n, k]), to_paddle(sf.contiguous()).reshape(lead + [n, groups])
