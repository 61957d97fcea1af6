"""The torch front-end of `moe_ref.fp8`'s storage helpers (SPEC §2), for the Triton launchers.

The GPU machine has torch and no Paddle, so `backend.ops.triton.launch` cannot use the Paddle
front-end (`moe_ref.fp8`). The layout formulas are shared: both front-ends take shapes and strides
from `moe_ref.constants` (`mn_major_strides`, `align`), so the two cannot drift apart.
Importing this module imports torch and the standard library only, never Paddle.
"""
from __future__ import annotations

import torch

from .constants import TMA_ALIGN, align, mn_major_strides


def as_bytes(x: torch.Tensor) -> torch.Tensor:
    """x [...] float8_e4m3fn -> the same bytes as uint8 (a view); any other dtype unchanged."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def mn_major_zeros(b: int, mn: int, c: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The zeroed physical buffer [B, C, align(MN, 4)] of an MN-major TMA-aligned [B, MN, C] scale
    (rows past MN stay zero, as SPEC §2 wants)."""
    return torch.zeros((int(b), int(c), align(mn, TMA_ALIGN)), dtype=dtype, device=device)


def mn_major_view(physical: torch.Tensor, mn: int) -> torch.Tensor:
    """physical [B, C, align(MN, 4)] -> the logical [B, MN, C] strided view (no copy), strides
    (C · align(MN, 4), 1, align(MN, 4)): `moe_ref.fp8.mn_major_view` for torch tensors."""
    b, c, _ = physical.shape
    return physical.as_strided((b, int(mn), c), mn_major_strides(mn, c))
