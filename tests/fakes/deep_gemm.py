"""A strict fake of DeepGEMM's masked grouped FP8 GEMM, for the `deep_gemm` provider's CPU tests.

Two builds, as the provider meets them:

- "torch": DeepGEMM 2.x (commit 54e2261, csrc/apis/gemm.hpp `m_grouped_fp8_fp4_gemm_nt_masked`, exported as
  `m_grouped_fp8_gemm_nt_masked`): `(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
  compiled_dims="nk", disable_ue8m0_cast=False)`, torch tensors. Its host asserts are checked: K-major a / b,
  N-major bf16 d, int32 contiguous masked_m, expected_m > 0, and the scale layouts of
  csrc/utils/layout.hpp `check_sf_layout` / `get_default_recipe` for the fake's architecture: SM90 fp32
  [G, MN or MN/128, ceil(K/128)] (sfb contiguous), SM100 int32 packed [G, MN, ceil(K/512)] MN-major
  TMA-aligned (stride(-2) == 1, stride(-1) == align(MN, 4)).
- "paddle": FastDeploy's SM90 Paddle port of DeepGEMM 1.x, `m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs,
  out, masked_m, expected_m)` on paddle tensors, fp32 1x128 / 128x128 scales (it makes them MN-major itself).

Like the real kernels, the fake writes whole 128-row tiles: rows past masked_m are overwritten with garbage
(the provider must keep them out of `out`). Each call is appended to `module.calls` as
(name, {argument: description}) before its checks run.
"""
from __future__ import annotations

import contextlib
import sys
import types

import numpy as np
import torch

TILE_M = 128        # whole tiles of DeepGEMM's largest masked BLOCK_M (SM90 {64, 128}; SM100 the 128 alignment)


def _fail(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(f"DeepGEMM host assertion (fake): {what}")


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _check_sf(sf: torch.Tensor, g: int, mn_groups: int, k: int, arch: int, name: str) -> None:
    if arch == 9:
        _fail(sf.dtype == torch.float32, f"{name}: SM90 scales are float32, got {sf.dtype}")
        _fail(tuple(sf.shape) == (g, mn_groups, _ceil(k, 128)), f"{name}: shape {tuple(sf.shape)}")
    else:
        _fail(sf.dtype == torch.int32, f"{name}: SM100 1D1D scales are packed int32, got {sf.dtype}")
        _fail(tuple(sf.shape) == (g, mn_groups, _ceil(k, 512)), f"{name}: shape {tuple(sf.shape)}")
        aligned = -(-mn_groups // 4) * 4
        _fail(sf.stride(-2) == 1 and sf.stride(-1) == aligned and sf.stride(-3) == aligned * sf.shape[-1],
              f"{name}: expected MN-major TMA-aligned strides, got {sf.stride()}")


def _scale_values(sf: torch.Tensor, rows: int, k: int, per_block_rows: int) -> torch.Tensor:
    """[G, rows, K] float32 scale of every element (fp32 values, or UE8M0 bytes decoded)."""
    if sf.dtype == torch.int32:
        row_major = torch.empty(sf.shape, dtype=sf.dtype).copy_(sf)          # MN-major strides cannot be viewed
        b = row_major.view(torch.uint8).view(*sf.shape, 4).reshape(sf.shape[0], sf.shape[1], -1)
        v = torch.exp2(b.float() - 127)
    else:
        v = sf.float()
    v = v.repeat_interleave(per_block_rows, 1)[:, :rows]
    return v.repeat_interleave(128, 2)[:, :, :k]


def _compute(a, sa, b, sb, d, masked_m, arch) -> None:
    g, m, k = a.shape
    n = b.shape[1]
    da = a.float() * _scale_values(sa, m, k, 1)
    db = b.float() * _scale_values(sb, n, k, 128 if arch == 9 else 1)
    full = torch.einsum("gmk,gnk->gmn", da, db)
    for e in range(g):
        rows = min(m, _ceil(int(masked_m[e]), TILE_M) * TILE_M)      # whole tiles, as the real kernel stores
        d[e, :rows] = full[e, :rows].to(torch.bfloat16)


def _masked_new(arch: int, calls: list):
    def m_grouped_fp8_gemm_nt_masked(a, b, d, masked_m, expected_m, recipe=None, recipe_a=None, recipe_b=None,
                                     compiled_dims="nk", disable_ue8m0_cast=False):
        calls.append(("m_grouped_fp8_gemm_nt_masked", dict(
            a=(a[0].dtype, tuple(a[0].shape)), sfa=(a[1].dtype, tuple(a[1].shape), a[1].stride()),
            b=(b[0].dtype, tuple(b[0].shape)), sfb=(b[1].dtype, tuple(b[1].shape), b[1].stride()),
            d=(d.dtype, tuple(d.shape)), expected_m=expected_m, disable_ue8m0_cast=disable_ue8m0_cast)))
        (x, sa), (w, sb) = a, b
        _fail(x.dtype == torch.float8_e4m3fn and w.dtype == torch.float8_e4m3fn, "a and b are float8_e4m3fn")
        _fail(x.dim() == 3 and w.dim() == 3 and x.stride(-1) == 1 and w.stride(-1) == 1, "K-major a [G, M, K], b")
        g, m, k = x.shape
        _fail(tuple(w.shape[::2]) == (g, k), f"b [G, N, K], got {tuple(w.shape)}")
        n = w.shape[1]
        _fail(d.dtype == torch.bfloat16 and tuple(d.shape) == (g, m, n) and d.stride(-1) == 1, "d bf16 [G, M, N]")
        _fail(masked_m.dtype == torch.int32 and masked_m.is_contiguous() and masked_m.numel() == g, "masked_m")
        _fail(isinstance(expected_m, int) and expected_m > 0, f"expected_m > 0, got {expected_m!r}")
        _fail(recipe is None and recipe_a is None and recipe_b is None, "the default recipe (not passed)")
        _check_sf(sa, g, m, k, arch, "sfa")
        _check_sf(sb, g, _ceil(n, 128) if arch == 9 else n, k, arch, "sfb")
        if arch == 9:
            _fail(sb.is_contiguous(), "SM90 sfb contiguous")
        _compute(x, sa, w, sb, d, masked_m, arch)
    return m_grouped_fp8_gemm_nt_masked


def _masked_old(calls: list):
    import paddle

    def to_t(x):
        if x.dtype == paddle.float8_e4m3fn:
            return torch.from_numpy(x.view(paddle.uint8).numpy()).view(torch.float8_e4m3fn)
        return torch.from_numpy(np.ascontiguousarray(x.numpy()))

    def m_grouped_gemm_fp8_fp8_bf16_nt_masked(lhs, rhs, out, masked_m, expected_m):
        calls.append(("m_grouped_gemm_fp8_fp8_bf16_nt_masked", dict(
            a=(lhs[0].dtype, tuple(lhs[0].shape)), sfa=(lhs[1].dtype, tuple(lhs[1].shape)),
            b=(rhs[0].dtype, tuple(rhs[0].shape)), sfb=(rhs[1].dtype, tuple(rhs[1].shape)),
            d=(out.dtype, tuple(out.shape)), expected_m=expected_m)))
        for x in (*lhs, *rhs, out, masked_m):
            _fail(isinstance(x, paddle.Tensor), f"FastDeploy's build takes paddle tensors, got {type(x).__name__}")
        _fail(out.dtype == paddle.bfloat16 and masked_m.dtype == paddle.int32, "out bf16, masked_m int32")
        _fail(isinstance(expected_m, int) and expected_m > 0, f"expected_m > 0, got {expected_m!r}")
        x, w = to_t(lhs[0]), to_t(rhs[0])
        g, m, k = x.shape
        sa, sb = to_t(lhs[1]), to_t(rhs[1])
        _check_sf(sa, g, m, k, 9, "lhs scales")
        _check_sf(sb, g, _ceil(w.shape[1], 128), k, 9, "rhs scales")
        res = torch.zeros((g, m, w.shape[1]), dtype=torch.bfloat16)
        _compute(x, sa, w, sb, res, to_t(masked_m), 9)
        bits = res.view(torch.int16).numpy().view(np.uint16)
        paddle.assign(paddle.to_tensor(bits).view(paddle.bfloat16), output=out)   # in place, as the kernel
    return m_grouped_gemm_fp8_fp8_bf16_nt_masked


@contextlib.contextmanager
def install_deep_gemm(build: str = "torch", arch: int = 9):
    """Put a fake DeepGEMM under its import name for `build` ("torch": `deep_gemm`; "paddle":
    `fastdeploy.model_executor.ops.gpu.deep_gemm`) computing as on compute capability `arch`.x; yields it."""
    calls: list = []
    if build == "torch":
        name = "deep_gemm"
        mod = types.ModuleType(name, "fake DeepGEMM 2.x (torch build)")
        mod.torch = torch
        mod.m_grouped_fp8_gemm_nt_masked = _masked_new(arch, calls)
        parents = {}
    else:
        name = "fastdeploy.model_executor.ops.gpu.deep_gemm"
        mod = types.ModuleType(name, "fake FastDeploy DeepGEMM 1.x port (Paddle)")
        mod.m_grouped_gemm_fp8_fp8_bf16_nt_masked = _masked_old(calls)
        parts = name.split(".")
        parents = {".".join(parts[:i]): types.ModuleType(".".join(parts[:i])) for i in range(1, len(parts))}
        for pname, pmod in parents.items():
            pmod.__path__ = []
    mod.calls = calls
    saved = {k: sys.modules.get(k) for k in [name, *parents]}
    sys.modules.update(parents)
    sys.modules[name] = mod
    try:
        yield mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
