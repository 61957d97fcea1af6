"""DeepGEMM's masked grouped FP8 GEMM behind the contract's formats: torch tensors, no Paddle (issue 11).

The contract (SPEC §6) hands `group_gemm_masked` CUTLASS SF bytes (`unpack_and_convert_scale`'s output);
DeepGEMM's `m_grouped_fp8_gemm_nt_masked` takes its own scale formats, per architecture
(DeepGEMM csrc/apis/layout.hpp `transform_sf_into_required_layout`, csrc/utils/layout.hpp):

    SM90   sfa fp32 1x128, MN-major TMA-aligned, logical [E, M, ceil(K/128)]; sfb fp32 128x128
           [E, ceil(N/128), ceil(K/128)]; `disable_ue8m0_cast=True` (the values are used as given)
    SM100  sfa and sfb packed UE8M0 int32 1x128 (recipe (1, 1, 128)), MN-major TMA-aligned,
           logical [E, MN, ceil(K/512)]

This module converts (`activation_scales`, `weight_scales`: the provider and the GPU tests use them; the SM90
FP32 conversions are launch.activation_scales_fp32 / weight_scales_fp32, shared with the `triton` provider's CuTe
path), decides whether DeepGEMM can serve a call exactly (`unsupported_reason`), and runs it (`run_masked`).
Importing it imports torch and the standard library only (the GPU machine has no Paddle); the SM90 scale
conversions and the tail-row copy run Triton kernels (backend.ops.triton.launch), imported at the call.
"""
from __future__ import annotations

import torch

from moe_ref.constants import BYTES_PER_WORD, GROUP_SIZE, ceil_div
from moe_ref.fp8_torch import mn_major_view, mn_major_zeros

from moe_ref.cutlass_sf import SF_TILE_COLS, SF_TILE_PERM, SF_TILE_ROWS, SF_TILE_SHAPE, check_sf_shape

MASKED_GEMM = "m_grouped_fp8_gemm_nt_masked"                 # DeepGEMM >= 2.0 (torch build, PFCC / PaddleFleet)
MASKED_GEMM_OLD = "m_grouped_gemm_fp8_fp8_bf16_nt_masked"    # DeepGEMM 1.x (FastDeploy's Paddle build on SM90)
ARCHS = (9, 10)                                               # compute capability majors DeepGEMM serves


def _group_bytes(sf: torch.Tensor, rows: torch.Tensor | slice, k: int) -> torch.Tensor:
    """CUTLASS SF bytes [E, MN_pad, KB] -> uint8 [E, rows, ceil(k/128), 4]: the 4 bytes (one per 32 K) of each
    128-wide K group of the given rows (an index tensor or a slice). One view and one copy of the whole matrix
    through cutlass_sf's tile dimensions (SF_TILE_SHAPE / SF_TILE_PERM), no per-byte index."""
    e_num, mn_pad, kb = sf.shape
    check_sf_shape(mn_pad, kb)
    tiles = sf.reshape(e_num, mn_pad // SF_TILE_ROWS, kb // SF_TILE_COLS, *SF_TILE_SHAPE)
    perm = (0,) + tuple(1 + d for d in SF_TILE_PERM)
    groups = tiles.permute(*perm).reshape(e_num, mn_pad, kb // SF_TILE_COLS, SF_TILE_COLS)
    return groups[:, rows, :ceil_div(k, GROUP_SIZE)]


def bytes_repeat_per_group(sf: torch.Tensor, num_rows: int, k: int) -> bool:
    """True when each 128-wide K group of rows < num_rows holds one byte 4 times (one synchronization): then one
    scale per 128 K is exact, as DeepGEMM's 1x128 / 128x128 recipes need."""
    g = _group_bytes(sf, slice(0, num_rows), k)
    return bool(torch.all(g == g[..., :1]))


def _pack(b: torch.Tensor) -> torch.Tensor:
    """uint8 [E, MN, G] (one byte per 128-group) -> packed UE8M0 int32 [E, MN, ceil(G/4)], groups 4p..4p+3 in
    word p little-endian, missing groups byte 0 (SPEC §2)."""
    e_num, mn, groups = b.shape
    padded = torch.zeros((e_num, mn, ceil_div(groups, BYTES_PER_WORD) * BYTES_PER_WORD), dtype=torch.uint8,
                         device=b.device)
    padded[..., :groups] = b
    return padded.view(torch.int32)


def _mn_major(x: torch.Tensor) -> torch.Tensor:
    """[E, MN, C] -> the same values as an MN-major TMA-aligned view (DeepGEMM's get_mn_major_tma_aligned_tensor)."""
    e_num, mn, c = x.shape
    view = mn_major_view(mn_major_zeros(e_num, mn, c, x.dtype, x.device), mn)
    view.copy_(x)
    return view


def activation_scales(sfa: torch.Tensor, m: int, k: int, arch: int) -> torch.Tensor:
    """CUTLASS SF bytes sfa [E, align(M,128), KB] -> DeepGEMM's activation scales for compute capability major
    `arch`: fp32 [E, M, ceil(K/128)] (SM90) or packed UE8M0 int32 [E, M, ceil(K/512)] (SM100), MN-major
    TMA-aligned. The first byte of each 128-group is used (bytes_repeat_per_group says when that is exact)."""
    if arch == 9:       # one launch, no synchronization: the Triton conversion straight into the MN-major layout
        from .triton import launch as L
        return L.activation_scales_fp32(sfa, m, k)
    return _mn_major(_pack(_group_bytes(sfa, slice(0, m), k)[..., 0]))


def weight_scales(sfb: torch.Tensor, n: int, k: int, arch: int) -> torch.Tensor:
    """CUTLASS SF bytes sfb [E, align(N,128), KB'] -> DeepGEMM's weight scales: fp32 128x128
    [E, ceil(N/128), ceil(K/128)] from the first row of each block (SM90: needs block-uniform bytes, the
    contract's sfb_per_block), or packed UE8M0 int32 [E, N, ceil(K/512)] MN-major TMA-aligned (SM100, per row).
    Pure: the method can call it once at weight load and keep the result (the weights do not change)."""
    if arch == 9:       # the Triton conversion of the first row of each block (the `triton` provider's, too)
        from .triton import launch as L
        return L.weight_scales_fp32(sfb, n, k)
    return _mn_major(_pack(_group_bytes(sfb, slice(0, n), k)[..., 0]))


def unsupported_reason(arch: int, bias, sfb_per_block: bool, sfa: torch.Tensor, sfb: torch.Tensor, m: int,
                       n: int, k: int, sfa_per_group: bool = False) -> str | None:
    """None when DeepGEMM computes this call exactly as the contract states; else why not (the provider then
    hands the call to the next provider). May synchronize once (the 4-bytes-per-group checks); never when the
    caller vouches for both operands' bytes (sfa_per_group, sfb_per_block: taken as stated, not looked at)."""
    if arch not in ARCHS:
        return f"DeepGEMM serves compute capability 9.x and 10.x, this GPU is {arch}.x"
    if bias is not None:
        return "bias: DeepGEMM's masked GEMM has none (adding it after the bf16 store would round twice)"
    if arch == 9 and not sfb_per_block:
        return "sfb_per_block=False: DeepGEMM's SM90 kernel takes one weight scale per 128x128 block"
    if not sfa_per_group and not bytes_repeat_per_group(sfa, m, k):
        return "sfa: bytes differ inside a 128-wide K group; DeepGEMM's recipe is one scale per 128 K"
    if not sfb_per_block and not bytes_repeat_per_group(sfb, n, k):
        return "sfb: bytes differ inside a 128-wide K group; DeepGEMM's recipe is one scale per 128 K"
    return None


def masked_gemm_function(dg):
    """(function, new_api) of a DeepGEMM module: the 2.x name, else the 1.x one (FastDeploy's SM90 build)."""
    fn = getattr(dg, MASKED_GEMM, None)
    if fn is not None:
        return fn, True
    fn = getattr(dg, MASKED_GEMM_OLD, None)
    if fn is None:
        raise AttributeError(f"deep_gemm module {getattr(dg, '__name__', dg)!r}: expected {MASKED_GEMM} or "
                             f"{MASKED_GEMM_OLD}, found neither")
    return fn, False


def call_masked(dg, a3, sa, b, sb, d3, counts, expected_m: int, arch: int, to_dg=lambda t: t) -> None:
    """DeepGEMM's masked GEMM: a3 [E, M, K] fp8, b [E, N, K] fp8, d3 [E, M, N] bf16, counts [E] int32, scales in
    DeepGEMM's format; to_dg maps each tensor to the module's framework (identity for the torch build)."""
    fn, new_api = masked_gemm_function(dg)
    args = ((to_dg(a3), to_dg(sa)), (to_dg(b), to_dg(sb)), to_dg(d3), to_dg(counts), int(expected_m))
    if new_api:
        fn(*args, disable_ue8m0_cast=arch == 9)
    else:
        fn(*args)


# DeepGEMM's masked kernels store whole BLOCK_M-row tiles, so rows past masked_m up to the next tile boundary are
# written too: BLOCK_M is 64 or 128 on SM90 (csrc/jit_kernels/heuristics/sm90.hpp, MGroupedMasked) and the M
# alignment of the grouped layouts (128) on SM100 (sm100.hpp). The rows a call may clobber are kept from here.
STORE_TAIL_ROWS = 256


def run_masked(dg, a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor, counts: torch.Tensor,
               out: torch.Tensor, m: int, arch: int, expected_m: int | None = None, to_dg=lambda t: t) -> torch.Tensor:
    """out[e·M + r] = a · bᵀ with DeepGEMM for r < counts[e]; rows past the counts untouched (SPEC §6).

    a [E·M, K] fp8; b [E, N, K] fp8; sa, sb: activation_scales / weight_scales; counts [E] int32; out [E·M, N]
    bf16. DeepGEMM writes straight into out; the up to STORE_TAIL_ROWS rows per expert past masked_m that its
    whole-tile stores may overwrite are read before and written back after (two Triton launches, no host
    synchronization).
    """
    from .triton import launch as L
    e_num, n, k = b.shape
    counts = counts.reshape(-1).to(torch.int32).contiguous()
    kept = torch.empty((e_num * min(STORE_TAIL_ROWS, m), n), dtype=out.dtype, device=out.device)
    L.rows_window_copy(out, kept, counts, m, restore=False)
    call_masked(dg, a.view(e_num, m, k), sa, b.contiguous(), sb, out.view(e_num, m, n), counts,
                max(1, int(expected_m) if expected_m is not None else m), arch, to_dg)
    L.rows_window_copy(out, kept, counts, m, restore=True)
    return out
