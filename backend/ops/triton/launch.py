"""torch launchers of the Triton kernels (SPEC §3-8). Torch tensors in and out, no Paddle.

Every function here takes already-shaped tensors on one device (CUDA, or CPU under
TRITON_INTERPRET=1) and returns new torch tensors (group_gemm_* write `out` in place).
Shapes use SPEC §0 names. GEMM tile configs are picked at the first call of a shape
(a short timing of the candidates on the GPU, kept per process in `TUNER`, under a lock;
`FD_TRITON_AUTOTUNE=0` uses the first candidate); nothing is tuned or queried at import. What a
kernel needs to know about the weights (`sfb_per_block`) is passed by the caller, never guessed here.
"""
from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass

import torch
import triton

from moe_ref.constants import DEEPGEMM_AMAX_FLOOR, FASTDEPLOY_AMAX_FLOOR, GROUP_SIZE, TMA_ALIGN
from moe_ref.constants import align as _align
from moe_ref.fp8_torch import as_bytes as _fp8_bytes, mn_major_view, mn_major_zeros
from moe_ref.messages import expert_overflow_message

from .. import device_errors as DE
from . import fast_launch, gluon_gemm
from ..cute import masked_gemm as cute_gemm
from . import kernels as _kernels

K = fast_launch.Kernels(_kernels)     # the same kernels, launched through their compiled launchers (host time)

SWIGLU_AMAX_FLOOR = FASTDEPLOY_AMAX_FLOOR     # fused SwiGLU quant floor (SPEC §7), as the paddle provider


def interpreting() -> bool:
    """True when the kernels were decorated under the Triton interpreter (TRITON_INTERPRET=1 at import of
    `kernels`): they then run on CPU tensors, and the launchers pick exact casts and small grids."""
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(_kernels.per_token_quant_kernel, InterpretedFunction)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# ----------------------------------------------------------------------------- §3

def per_token_quant(x: torch.Tensor, block_size: int = GROUP_SIZE, use_ue8m0: bool = False,
                    amax_floor: float = DEEPGEMM_AMAX_FLOOR):
    """1 x block_size quantization. x [T, H] bf16|fp32 -> (q [T, H] float8_e4m3fn, scale).

    scale: [T, S] fp32 row-major (S = ceil(H/block_size)), x ~= q · s; with use_ue8m0 the scales
    are powers of two (smallest >= amax/448) packed UE8M0 [T, ceil(S/4)] int32 row-major.
    block_size must be a power of two (a Triton block).
    """
    if block_size & (block_size - 1):
        raise ValueError(f"block_size: the Triton kernel needs a power of two, got {block_size}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    t, h = x.shape
    s = -(-h // block_size)
    words = -(-s // 4)
    q = torch.empty((t, h), dtype=torch.float8_e4m3fn, device=x.device)
    if use_ue8m0:
        scale = torch.empty((t, words), dtype=torch.int32, device=x.device)
    else:
        scale = torch.empty((t, s), dtype=torch.float32, device=x.device)
    if t == 0:
        return q, scale
    block_t = max(1, min(16, 4096 // (4 * block_size)))
    grid = (triton.cdiv(t, block_t), words)
    K.per_token_quant_kernel[grid](x, _fp8_bytes(q), scale, t, h, s, x.stride(0), q.stride(0), scale.stride(0),
                                   float(amax_floor), GROUP=block_size, BLOCK_T=block_t, UE8M0=bool(use_ue8m0),
                                   EXACT_CAST=interpreting(), num_warps=4)
    return q, scale


# ----------------------------------------------------------------------------- §5

def byte_words(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., G] -> int32 [..., ceil(G/4)], 4 bytes to a word little-endian, zero-padded."""
    pad = -int(b.shape[-1]) % 4
    if pad:
        b = torch.nn.functional.pad(b, (0, pad))
    return b.contiguous().view(torch.int32)


def _row_view(x: torch.Tensor) -> torch.Tensor:
    """Contiguous [W, H] of any dtype -> its bytes as int32 words per row when they divide, else uint8.
    An empty x gets standard strides first (torch calls any empty tensor contiguous, whatever its strides,
    and refuses to view one whose last stride is not 1)."""
    if x.numel() == 0:
        x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    b = x.view(torch.uint8)
    return b.view(torch.int32) if b.shape[1] % 4 == 0 else b


def prefill_permute_to_masked_gemm(x: torch.Tensor, scale: torch.Tensor | None, topk_ids: torch.Tensor,
                                   num_local_experts: int, max_token_num: int, errors: torch.Tensor | None = None,
                                   sf_group: int | None = None):
    """Scatter tokens to the masked per-expert layout (SPEC §5), deterministic, no atomics.

    x [W, H] fp8|bf16; scale [W, S'] fp32 | packed int32 | None; topk_ids [W, K_top] int32|int64
    (-1 anywhere). Returns (permute_x [E, M, H], permute_scale MN-major view logical [E, M, S']
    strides (S'·align(M,4), 1, align(M,4)) or None, permuted_indice_map [W, K_top] int32,
    token_nums_per_expert [E, 1] int32). Slots follow token order then k. Rows past the count of an
    expert are zero. An id outside [-1, E) or a count above M raises ValueError: checked on the host
    from the count kernel's output, once everything is queued (one synchronization; the kernels
    never write out of range, whatever the ids). Three launches: count, slots, move (`permute_move_kernel`).
    errors (int64 [RECORD_LEN], `backend.ops.device_errors`): deferred instead: nothing is read back (no
    synchronization, capturable in a CUDA graph); the first bad id, else the first expert over M, is recorded
    there. Either way bad ids and rows past M are dropped (map -1) and the counts clamped to M.
    sf_group (128 or 32; scale packed UE8M0 int32 words): permute_scale is instead the CUTLASS SF bytes uint8
    [E, align(M,128), KB] that unpack_and_convert_scale(MN-major permute_scale, counts, sf_group) returns, written
    by the permute itself (one launch and one pass over the scales fewer).
    """
    indice_map, counts, problems, inv = _permute_index_step(topk_ids, num_local_experts, max_token_num, errors, True)
    permute_x, permute_scale = _move_rows(x, scale, indice_map, counts, inv, num_local_experts, max_token_num,
                                          sf_group)
    if errors is None:
        _raise_on_bad_routing(problems, num_local_experts, max_token_num)
    return permute_x, permute_scale, indice_map, counts.view(-1, 1)


def _raise_on_bad_routing(problems: torch.Tensor, e_num: int, m: int) -> None:
    n_bad, worst, ex = (int(v) for v in problems.tolist())
    if n_bad:
        raise ValueError(f"topk_ids: {n_bad} expert ids outside [-1, {e_num}) (num_local_experts = {e_num})")
    if worst > m:
        raise ValueError(expert_overflow_message(ex, worst, m))


def permute_indices(topk_ids: torch.Tensor, num_local_experts: int, max_token_num: int, check: bool = True,
                    errors: torch.Tensor | None = None):
    """topk_ids [W, K_top] -> (indice_map [W, K_top] int32 = e·M + slot or -1, counts [E] int32).

    Two launches, no atomics, no host read: a count kernel (per chunk of tokens, per expert), then a slot kernel
    (each program sums the counts of the chunks before its own, ranks inside its chunk from a cumulative one-hot
    sum; one more program writes the counts, the problems and the record): token-major-then-k order.
    Ids outside [0, E) and entries past M rows of their expert get -1; counts are clamped to M.
    check=True raises ValueError for bad ids / counts > M (one synchronization); check=False returns
    a third tensor [3] int32 (number of bad ids, largest routed count, its expert) for the caller to check later.
    errors (int64 [RECORD_LEN], `backend.ops.device_errors`): the first bad id, else the first expert over M, is
    recorded there on the device when it is clear.
    """
    indice_map, counts, problems, _ = _permute_index_step(topk_ids, num_local_experts, max_token_num, errors, False)
    if check:
        _raise_on_bad_routing(problems, int(num_local_experts), int(max_token_num))
        return indice_map, counts
    return indice_map, counts, problems


# The permute's kernels as programmatic dependent launches (SM90+, not under the interpreter): the slot and move
# kernels launch while their predecessor runs and wait for it (gdc_wait) before reading its outputs; the move kernel's
# token programs read their first row block before that wait. Every write still follows the wait. Off: on an H200
# (2026-12-01, benchmarks/bench_permute.py, results/permute_pdl_h200.json) it saved 1.5-2.2 us of the op's 91-92 us
# in a CUDA-graph replay and cost 18-176 us in eager calls (not understood); output identical either way
# (tests/test_gpu_permute.py, eager and replayed).
PERMUTE_PDL = False


def _permute_pdl(dev: torch.device) -> dict:
    """Launch options of the permute's dependent kernels: {"PDL": bool} plus launch_pdl=True when on."""
    on = (PERMUTE_PDL and dev.type == "cuda" and not interpreting() and _kernels.gdc_wait is not None
          and torch.cuda.get_device_capability(dev)[0] >= 9)
    return dict(PDL=True, launch_pdl=True) if on else dict(PDL=False)


# Prefix tiles of the slot kernel: each program sums the count rows of the chunks before its own, PREFIX_ROWS rows
# per load (independent loads, one round trip per tile; 16k tokens in chunks of 16 need 8 tiles at most).
PREFIX_ROWS = 128


def _permute_index_step(topk_ids: torch.Tensor, num_local_experts: int, max_token_num: int,
                        errors: torch.Tensor | None, with_inverse: bool):
    """(indice_map, counts [E], problems [3], inv [E·M] int32 | None): permute_indices' two launches; with_inverse
    the slot kernel also writes the token of each slot (slots < counts[e]; the rest unwritten)."""
    w, k_top = topk_ids.shape
    e_num, m = int(num_local_experts), int(max_token_num)
    dev = topk_ids.device
    ids = topk_ids if topk_ids.stride(-1) == 1 else topk_ids.contiguous()
    e_pad, kp = _pow2(e_num), _pow2(k_top)
    block_w = max(1, min(64, 4096 // (kp * e_pad)))     # small chunks: many programs, short scans
    block_w = 1 << (block_w.bit_length() - 1)
    chunks = max(1, triton.cdiv(w, block_w))
    work = torch.empty((chunks * (e_pad + 2),), dtype=torch.int32, device=dev)     # hist | bad | first: one allocation
    hist, bad, first = work[:chunks * e_pad].view(chunks, e_pad), work[chunks * e_pad:-chunks], work[-chunks:]
    counts = torch.empty((e_num,), dtype=torch.int32, device=dev)
    problems = torch.empty((3,), dtype=torch.int32, device=dev)
    indice_map = torch.empty((w, k_top), dtype=torch.int32, device=dev)
    inv = torch.empty((e_num * m,), dtype=torch.int32, device=dev) if with_inverse else None
    if w:
        pdl = _permute_pdl(dev)
        K.permute_count_kernel[(chunks,)](ids, hist, bad, first, w, k_top, e_num, ids.stride(0),
                                          BLOCK_W=block_w, KP=kp, E_PAD=e_pad, PDL=pdl["PDL"])
        K.permute_slot_kernel[(chunks + 1,)](ids, hist, bad, first, indice_map, inv if with_inverse else counts, counts,
                                         problems, errors if errors is not None else problems, w, k_top, e_num, m,
                                         ids.stride(0), BLOCK_W=block_w, KP=kp, E_PAD=e_pad,
                                         CB=PREFIX_ROWS, RECORD=errors is not None, BAD_ID_CODE=DE.BAD_LOCAL_ID,
                                         OVERFLOW_CODE=DE.OVERFLOW, HAS_INV=with_inverse, **pdl)
    else:
        counts.zero_(), problems.zero_()
    return indice_map, counts, problems, inv


def permute_rows(x: torch.Tensor, scale: torch.Tensor | None, indice_map: torch.Tensor, counts: torch.Tensor,
                 num_local_experts: int, max_token_num: int, sf_group: int | None = None):
    """Copy rows (and scale rows) to their slots; zero the rows past each expert's count.

    x [W, H], scale [W, S'] | None, indice_map [W, K_top] int32 (permute_indices'), counts [E] int32 ->
    (permute_x [E, M, H], permute_scale MN-major view [E, M, S'] | CUTLASS SF bytes with sf_group | None).
    The token of each slot is rebuilt from the map first (one more launch than prefill_permute_to_masked_gemm,
    which has the slot kernel write it).
    """
    e_num, m = int(num_local_experts), int(max_token_num)
    n = indice_map.numel()
    inv = torch.full((e_num * m,), -1, dtype=torch.int32, device=x.device)
    if n:
        block = min(1024, _pow2(n))
        K.permute_inverse_kernel[(triton.cdiv(n, block),)](indice_map.contiguous(), inv, n, indice_map.shape[1],
                                                            e_num * m, BLOCK=block)
    return _move_rows(x, scale, indice_map, counts, inv, e_num, m, sf_group)


SF_MODES = {None: 0, GROUP_SIZE: 1, 32: 2}      # permute_move_kernel's SF_MODE per sf_group


def _scale_out(scale: torch.Tensor, e_num: int, m: int, sf_group: int | None):
    """(buffer viewed as int32 words, rows, groups, result) of the permute's scale output: MN-major [E, S', M_pad]
    (rows = M_pad) or CUTLASS SF bytes [E, align(M,128), 4·groups] (rows = align(M,128), groups = words per row)."""
    if sf_group not in SF_MODES:
        raise ValueError(f"sf_group: expected None, {GROUP_SIZE} or 32, got {sf_group!r}")
    c = scale.shape[1]
    if sf_group is None:
        phys = torch.empty((e_num, c, _align(m, TMA_ALIGN)), dtype=scale.dtype, device=scale.device)
        return phys.view(torch.int32), phys.shape[2], 0, mn_major_view(phys, m)
    if scale.dtype != torch.int32:
        raise ValueError(f"scale: sf_group needs packed UE8M0 int32 words, got {scale.dtype}")
    groups = 4 * c if sf_group == GROUP_SIZE else c
    rows = _align(m, K.SF_TILE_ROWS.value)
    sf = torch.empty((e_num, rows, 4 * groups), dtype=torch.uint8, device=scale.device)
    return sf.view(torch.int32), rows, groups, sf


# How permute_move_kernel moves the rows: "scatter" (one program per token, its row read once and written to its
# K_top slots; the slot-block programs zero the dead rows) or "gather" (slot-block programs only, each writing its
# rows in order from the slots' tokens). Same bytes out; bench_gpu.py times both at issue 12's shape.
PERMUTE_MOVE = "scatter"
# The scatter's launch shape: each token's row in `split` programs (a row of ROW words not divisible by it runs in
# one), `num_warps` per program, the dead-row zeroing `zblock` words per store (0: as the row copy), the row stores'
# cache modifier `store_cache` ("" default, ".cs" streaming, ".cg" L2 only), `block_s` slots per zeroing / scale
# program (a divisor of 128: an SF tile's programs).
# benchmarks/bench_permute.py swept them on an H200 (2026-11-30): within 1 % of each other up to 2 programs per row,
# 2 x 2 warps was fastest in both runs; block_s 64 / 32 / 16 / 8 / 4 within 1 % (2026-12-01). The move kernel runs at
# 0.67x an int32 fill of the bytes it writes: reading x during its writes costs 13-17 us at W=4096, however the reads
# are issued (benchmarks/bench_write_ceiling.py; benchmarks/NOTES_gpu.md).
PERMUTE_SCATTER = dict(split=2, num_warps=2, zblock=0, store_cache="", block_s=64)


def _move_rows(x, scale, indice_map, counts, inv, e_num: int, m: int, sf_group: int | None):
    """permute_move_kernel: rows to their slots, dead rows zero, scales gathered per slot block (see there)."""
    if PERMUTE_MOVE not in ("scatter", "gather"):
        raise ValueError(f"PERMUTE_MOVE: expected 'scatter' or 'gather', got {PERMUTE_MOVE!r}")
    w, h = x.shape
    k_top = indice_map.shape[1]
    permute_x = torch.empty((e_num, m, h), dtype=x.dtype, device=x.device)
    xv = _row_view(x.contiguous())
    pxv = _row_view(permute_x.view(e_num * m, h))
    row = xv.shape[1]
    ps_words, sf_rows, sf_groups, permute_scale, sv = xv, m, 0, None, xv
    if scale is not None:
        ps_words, sf_rows, sf_groups, permute_scale = _scale_out(scale, e_num, m, sf_group)
        sv = (scale if scale.stride(-1) == 1 else scale.contiguous()).view(torch.int32)
    gather = PERMUTE_MOVE == "gather"
    block_s = 16 if gather else PERMUTE_SCATTER["block_s"]
    n_blocks = triton.cdiv(max(sf_rows, m), block_s)
    s_cols = 0 if scale is None else scale.shape[1]
    block_sc = min(16, _pow2(sf_groups)) if sf_group is not None else min(64, _pow2(s_cols))   # [16, 128] SF tiles
    split = PERMUTE_SCATTER["split"] if not gather and row % PERMUTE_SCATTER["split"] == 0 else 1
    grid = e_num * n_blocks + (0 if gather else w * split)
    if grid == 0:
        return permute_x, permute_scale
    K.permute_move_kernel[(grid,)](
        xv, indice_map, inv, counts, pxv, sv, ps_words, w, row, s_cols, m, e_num * m,
        sf_rows, sf_groups, n_blocks, xv.stride(0), sv.stride(0), K_TOP=k_top, KP=_pow2(k_top),
        HAS_SCALE=scale is not None, SF_MODE=SF_MODES[sf_group], BLOCK=min(2048, _pow2(row // split)),
        BLOCK_S=block_s, BLOCK_SC=block_sc, RB=4 if gather else 8, GATHER=gather, SPLIT=split,
        ZBLOCK=min(PERMUTE_SCATTER["zblock"], _pow2(row)), STORE_CACHE=PERMUTE_SCATTER["store_cache"],
        num_warps=PERMUTE_SCATTER["num_warps"], **_permute_pdl(x.device))
    return permute_x, permute_scale


# ----------------------------------------------------------------------------- §4

def unpack_and_convert_scale(scale: torch.Tensor, masked_m: torch.Tensor | None = None,
                             group_size: int = GROUP_SIZE) -> torch.Tensor:
    """Packed UE8M0 [E, MN, C] int32 (any strides) -> CUTLASS SM100 SF bytes uint8 [E, align(MN,128), KB].

    group_size 128 (the op): each 128-group byte is repeated 4 times (one per 32 K-elements), KB = 16·C;
    group_size 32 (1x32 bytes packed 4 to a word): the bytes as they are, KB = 4·C. Swizzled (SPEC §4);
    rows >= MN and rows >= masked_m[e] (int32 [E] or [E, 1], optional) are zero bytes.
    """
    if group_size not in (K.SF_VEC_SIZE.value, GROUP_SIZE):
        raise ValueError(f"group_size: expected {K.SF_VEC_SIZE.value} or {GROUP_SIZE}, got {group_size!r}")
    e_num, mn, c = scale.shape
    mn_pad = _align(mn, K.SF_TILE_ROWS.value)
    repeat = group_size == GROUP_SIZE
    groups = 4 * c if repeat else c
    out = torch.empty((e_num, mn_pad, 4 * groups), dtype=torch.uint8, device=scale.device)
    counts = None if masked_m is None else masked_m.reshape(-1).to(torch.int32).contiguous()
    block_g = min(16, _pow2(groups))
    grid = (e_num, mn_pad // K.SF_TILE_ROWS.value, triton.cdiv(groups, block_g))
    K.unpack_sf_kernel[grid](scale, counts if counts is not None else scale, out.view(torch.int32), mn, groups,
                             scale.stride(0), scale.stride(1), scale.stride(2), HAS_COUNTS=counts is not None,
                             BLOCK_G=block_g, REPEAT=repeat, num_warps=4)
    return out


def cutlass_scale_to_fp32(sf: torch.Tensor, num_rows: int | None = None, out: torch.Tensor | None = None,
                          check: bool = True, row_step: int = 1) -> torch.Tensor:
    """CUTLASS SF bytes uint8 [E, MN_pad, KB] -> fp32 [E, num_rows, KB/4], 2^(byte-127) per 128-group.

    out: where to write, [E, num_rows, G <= KB/4] (any strides, e.g. the MN-major view DeepGEMM reads; the first G
    groups are written); default a new contiguous tensor of all KB/4 groups.
    check: the 4 bytes of a group must be equal (ValueError otherwise, one synchronization); False takes the first
    byte of each group as the caller states it (no synchronization).
    row_step: output row r is source row r·row_step (128: one row per 128-row block; num_rows defaults to the
    blocks of MN_pad).
    """
    e_num, mn_pad, kb = sf.shape
    rows = -(-mn_pad // row_step) if num_rows is None else int(num_rows)
    if row_step < 1 or (rows - 1) * row_step >= mn_pad:
        raise ValueError(f"row_step: {rows} rows {row_step} apart need more than the {mn_pad} rows of sf, "
                         f"got row_step={row_step}")
    groups = kb // 4
    out = torch.empty((e_num, rows, groups), dtype=torch.float32, device=sf.device) if out is None else out
    out_groups = int(out.shape[2])
    block_g = min(16, _pow2(out_groups))
    grid = (e_num, triton.cdiv(rows, K.SF_TILE_ROWS.value), triton.cdiv(out_groups, block_g))
    bad = torch.empty(grid[0] * grid[1] * grid[2] if check else 1, dtype=torch.int32, device=sf.device)
    K.sf_to_fp32_kernel[grid](sf.contiguous().view(torch.int32), out, bad, rows, mn_pad, groups, out_groups,
                              *out.stride(), int(row_step), BLOCK_G=block_g, CHECK=bool(check), num_warps=4)
    n_bad = int(bad.sum()) if check else 0
    if n_bad:
        raise ValueError(f"sf: {n_bad} groups whose 4 bytes (one per 32 K-elements) differ; "
                         f"FP32 128-group scales need them equal")
    return out


def activation_scales_fp32(sfa: torch.Tensor, m: int, k: int) -> torch.Tensor:
    """CUTLASS SF bytes sfa [E, align(M,128), KB] -> fp32 1x128 scales, MN-major TMA-aligned view logical
    [E, M, ceil(K/128)] (the Hopper recipe's layout: DeepGEMM's SM90 kernel and ours read it). First byte of each
    128-group, taken as stated (no check, no synchronization); one launch."""
    buf = mn_major_view(mn_major_zeros(sfa.shape[0], m, -(-k // GROUP_SIZE), torch.float32, sfa.device), m)
    return cutlass_scale_to_fp32(sfa, m, out=buf, check=False)


def weight_scales_fp32(sfb: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """CUTLASS SF bytes sfb [E, align(N,128), KB'] -> fp32 128x128 scales [E, ceil(N/128), ceil(K/128)] from the
    first row of each 128-row block (block-uniform bytes: the contract's sfb_per_block). One launch, no
    synchronization; pure (a caller may convert once and keep the result)."""
    blocks = -(-n // GROUP_SIZE)
    out = torch.empty((sfb.shape[0], blocks, -(-k // GROUP_SIZE)), dtype=torch.float32, device=sfb.device)
    return cutlass_scale_to_fp32(sfb, blocks, out=out, check=False, row_step=GROUP_SIZE)


def rows_window_copy(out: torch.Tensor, kept: torch.Tensor, counts: torch.Tensor, m: int, restore: bool) -> None:
    """kernels.rows_window_copy_kernel: out [E·M, N] <-> kept [E·T, N] for the T-row window per expert that starts at
    min(masked_m[e], M - T); restore writes back only rows >= masked_m[e]. No synchronization."""
    e_num = counts.numel()
    n = out.shape[-1]
    t = kept.shape[0] // e_num
    block = min(1024, _pow2(n))
    K.rows_window_copy_kernel[(e_num, t, triton.cdiv(n, block))](out, kept, counts, m, n, t, RESTORE=bool(restore),
                                                                 BLOCK=block, num_warps=4)


# ----------------------------------------------------------------------------- §6

# Candidates timed at the first call of a (kernel, N, K, device) on a GPU; the first is the default.
# GRID_MODE (read by the launcher, not passed to the kernel) 0: one program per possible tile (programs
# past the valid tiles exit at once); 1: persistent, one program per SM walking the valid tiles. USE_TMA:
# host tensor descriptors (Hopper's bulk tensor copy) instead of pointer loads. SCALE_PREFETCH /
# LOOP_STAGES: see the kernel. 64x128 tiles with 4 warps fit two CTAs per SM (registers), so one CTA's
# scale promotion overlaps the other's MMAs. Measured on an H200 (benchmarks/NOTES_gpu.md): 64x128 /
# 128x64 with TMA and scale prefetch win; pointer loads, 8-warp 128x128 tiles and LOOP_STAGES lose.
_BASE = dict(GRID_MODE=0, USE_TMA=True, SCALE_PREFETCH=True, LOOP_STAGES=None)
GEMM_CONFIGS = (
    dict(_BASE, BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(_BASE, BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(_BASE, BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4),
    dict(_BASE, BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=4),
    dict(_BASE, BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=4, GRID_MODE=1),
)
DOT_SCALED_CONFIGS = (
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, GRID_MODE=0),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=4, GRID_MODE=0),
)
INTERPRETER_CONFIG = dict(_BASE, BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, GRID_MODE=1, USE_TMA=False,
                          SCALE_PREFETCH=False)
INTERPRETER_CONFIG_DOT_SCALED = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1, GRID_MODE=1)
BLOCK_K = 128
GEMM_IMPLS = ("explicit", "dot_scaled", "auto")


class GemmTuner:
    """The tile config chosen per key (kernel name, N, K, device string): timed at the first call of a key
    on a GPU (a short do_bench of each candidate), then kept for the process. One lock guards the table
    and the timings, so rank threads that reach a new key together time it once and share the result.
    FD_TRITON_AUTOTUNE=0 takes the first candidate. `log` holds every timing made (the benchmark reports it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._chosen: dict[tuple, dict] = {}
        self.log: list[dict] = []

    def chosen(self) -> dict[tuple, dict]:
        """A copy of the table: key -> config."""
        with self._lock:
            return dict(self._chosen)

    def choose(self, key: tuple, cfg: dict) -> None:
        """Fix the config of `key` (e.g. to profile one config)."""
        with self._lock:
            self._chosen[key] = cfg

    def config(self, key: tuple, configs: tuple, launch) -> dict:
        """The config of `key`, timing launch(cfg) for each candidate on its first request."""
        with self._lock:
            if key not in self._chosen:
                self._chosen[key] = self._fastest(key, configs, launch)
            return self._chosen[key]

    def _fastest(self, key: tuple, configs: tuple, launch) -> dict:
        if os.environ.get("FD_TRITON_AUTOTUNE", "1") == "0":
            return configs[0]
        best = None
        for cand in configs:
            entry = dict(kernel=key[0], key=list(key[1:]), config=cand)
            try:
                entry["ms"] = triton.testing.do_bench(lambda: launch(cand), warmup=10, rep=40, return_mode="median")
            except Exception as exc:   # a config that does not fit (shared memory, registers) is skipped
                entry["error"] = repr(exc)[:200]
            self.log.append(entry)
            if "ms" in entry and (best is None or entry["ms"] < best[0]):
                best = (entry["ms"], cand)
        return best[1] if best else configs[0]


TUNER = GemmTuner()     # the launchers' only state: tuned configs, keyed by kernel, shape and device


def _run_tuned(name: str, configs: tuple, key: tuple, launch, interpreter_config: dict = INTERPRETER_CONFIG) -> None:
    """launch(cfg) with the config TUNER holds for (name,) + key; the fixed interpreter config on CPU."""
    launch(interpreter_config if interpreting() else TUNER.config((name,) + key, configs, launch))


@dataclass(frozen=True)
class _MaskedGemm:
    """One masked GEMM call as the kernels take it: a [E·M, K], b [E, N, K] K-contiguous; scales sa, sb
    (CUTLASS bytes, or fp32 scales with their element strides `scale_strides`); counts [E] int32."""
    a: torch.Tensor
    b: torch.Tensor
    sa: torch.Tensor
    sb: torch.Tensor
    counts: torch.Tensor
    out: torch.Tensor
    bias: torch.Tensor | None
    m: int
    sm_count: int
    scale_strides: tuple = ()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(E, M, N, K)."""
        e_num, n, k = self.b.shape
        return e_num, self.m, n, k

    def grid(self, cfg: dict) -> tuple[int]:
        e_num, m, n, _ = self.shape
        return _gemm_grid(cfg, e_num, m, n, self.sm_count, self.a.device)

    def head(self) -> tuple:
        """The kernels' common leading arguments after the scales: counts, out, bias, E, M, N, K."""
        return (self.counts, self.out, self.out if self.bias is None else self.bias, *self.shape)

    def meta(self, cfg: dict) -> dict:
        """Constexprs shared by both kernels, and cfg's kernel settings (GRID_MODE is the launcher's)."""
        e_num, _, _, k = self.shape
        return dict({key: v for key, v in cfg.items() if key != "GRID_MODE"}, HAS_BIAS=self.bias is not None,
                    E_PAD=_pow2(e_num), BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0, EXACT_CAST=interpreting())


def _problem(a, b, sa, sb, masked_m, out, bias, max_m_per_expert, sm_count, scale_strides=()) -> _MaskedGemm:
    m = int(max_m_per_expert) if max_m_per_expert is not None else a.shape[0] // b.shape[0]
    return _MaskedGemm(a.contiguous(), b.contiguous(), sa, sb, _counts_i32(masked_m), out,
                       None if bias is None else bias.contiguous(), m, int(sm_count), scale_strides)


def _gemm_grid(cfg: dict, e_num: int, m: int, n: int, sm_count: int, device) -> tuple[int]:
    upper = e_num * triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"])
    if interpreting():
        return (max(1, min(upper, 4)),)
    if cfg["GRID_MODE"] == 1:
        sms = sm_count if sm_count > 0 else _sm_count(device.index if device.index is not None else 0)
        return (max(1, min(upper, sms)),)
    if sm_count > 0:
        return (max(1, min(upper, sm_count)),)
    return (max(1, upper),)


def _operands(a: torch.Tensor, b: torch.Tensor, cfg: dict):
    """(a, b) as the kernel takes them: tensors, or TMA descriptors a [E·M, K], b [E·N, K] when cfg["USE_TMA"]."""
    if not cfg.get("USE_TMA"):
        return a, b
    from triton.tools.tensor_descriptor import TensorDescriptor
    b2 = b.view(-1, b.shape[-1])
    return (TensorDescriptor.from_tensor(a, [cfg["BLOCK_M"], BLOCK_K]),
            TensorDescriptor.from_tensor(b2, [cfg["BLOCK_N"], BLOCK_K]))


def _counts_i32(masked_m: torch.Tensor) -> torch.Tensor:
    c = masked_m.reshape(-1)
    return c if c.dtype == torch.int32 and c.is_contiguous() else c.to(torch.int32).contiguous()


def _repeats_per_128(w: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: every int32 word (4 SF bytes, one 128-wide K group) holds one byte 4 times."""
    b0 = w & 0xFF
    return torch.all(w == (b0 | (b0 << 8) | (b0 << 16) | (b0 << 24)))


def sf_repeats_per_128(sf: torch.Tensor) -> bool:
    """True when every group of 4 CUTLASS SF bytes (one 128-wide K group) holds one value 4 times,
    as unpack_and_convert_scale writes them (one pass over the bytes, one synchronization)."""
    return bool(_repeats_per_128(sf.contiguous().view(torch.int32)))


def sf_block_uniform(sf: torch.Tensor, num_rows: int, k: int) -> bool:
    """True when the CUTLASS SF bytes [E, MN_pad, KB] hold one byte per 128-row block x 128-wide K group
    (its 4 bytes per row equal, and equal over the block's rows < num_rows), for the ceil(k/128) groups a
    GEMM of depth k reads: what `group_gemm_masked(..., sfb_per_block=True)` assumes of sfb, checked once
    (one pass, one synchronization), e.g. by a test of the weights a loader builds.

    In SPEC §4's layout one 512-byte tile is 128 rows x 4 bytes, rows in the order
    (r % 32)·4 + (r % 128) // 32, so viewed as int32 words [E, MN_pad/128, KB/4, 128] a block's word
    of row r0 (its first row, position 0) must equal every other valid row's word, and repeat its byte.
    """
    e_num, mn_pad, kb = sf.shape
    rows = K.SF_TILE_ROWS.value
    w = sf.contiguous().view(torch.int32).view(e_num, mn_pad // rows, kb // 4, rows)[:, :, :-(-k // BLOCK_K)]
    b0 = w[..., :1] & 0xFF
    same = w == (b0 | (b0 << 8) | (b0 << 16) | (b0 << 24))
    if num_rows % rows:
        p = torch.arange(rows, device=sf.device)
        r = (torch.arange(mn_pad // rows, device=sf.device)[:, None] * rows
             + p // 4 + K.SF_ROW_GROUP.value * (p % 4))                   # row of position p in block nb
        same = same | (r >= num_rows)[None, :, None, :]
    return bool(torch.all(same))


def _word_strides(sf: torch.Tensor) -> tuple[int, int, int]:
    """(expert, unused, K-group) strides in int32 words of CUTLASS SF bytes [E, MN_pad, KB]."""
    return sf.shape[1] * sf.shape[2] // 4, 0, sf.shape[2] // 4


def _explicit_ue8m0(g: _MaskedGemm, sfb_per_block: bool, cfg: dict) -> None:
    """The per-128 kernel on CUTLASS bytes read as int32 words (SCALE_MODE 1); SB_SCALAR: one weight byte
    per tile and K step (sfb_per_block, BLOCK_N dividing 128)."""
    K.group_gemm_masked_kernel[g.grid(cfg)](
        *_operands(g.a, g.b, cfg), g.sa.view(torch.int32), g.sb.view(torch.int32), *g.head(),
        *_word_strides(g.sa), *_word_strides(g.sb), SCALE_MODE=1, SB_SCALAR=sfb_per_block and 128 % cfg["BLOCK_N"] == 0,
        **g.meta(cfg))


def _explicit_fp32(g: _MaskedGemm, cfg: dict) -> None:
    """The per-128 kernel on FP32 scales (SCALE_MODE 0: 1x128 activations, 128x128 weights)."""
    K.group_gemm_masked_kernel[g.grid(cfg)](
        *_operands(g.a, g.b, cfg), g.sa, g.sb, *g.head(), *g.scale_strides,
        SCALE_MODE=0, SB_SCALAR=128 % cfg["BLOCK_N"] == 0, **g.meta(cfg))


def _dot_scaled(g: _MaskedGemm, cfg: dict) -> None:
    """tl.dot_scaled on CUTLASS bytes, one byte per 32 K-elements (emulated under the interpreter)."""
    K.group_gemm_masked_dot_scaled_kernel[g.grid(cfg)](
        g.a, g.b, g.sa, g.sb, *g.head(), g.sa.shape[1] * g.sa.shape[2], g.sa.shape[2],
        g.sb.shape[1] * g.sb.shape[2], g.sb.shape[2], EMULATE=interpreting(), **g.meta(cfg))


# Which kernel runs a masked GEMM (issue 11). The Gluon warp-specialized kernel (gluon_gemm.py) needs an SM90
# GPU, Gluon, and K % 16 == 0 (TMA row stride); the `tl` kernel runs everywhere else (SM100, the interpreter)
# and is its twin (bit-identical outputs on SM90, benchmarks/NOTES_gpu.md). FP32 recipe: Gluon always, it
# beat tl at every fill in both shapes (Gluon 0.81-0.98x DeepGEMM vs tl 0.65-0.83x, H200, 2026-11-30 run 6).
# CUTLASS UE8M0 bytes: Gluon too since its 128 x 192 tile (gluon_gemm.UE8M0_WIDE_FROM_ROWS) beat tl at every
# fill of >= 256 rows in both shapes (0.75-0.89x DeepGEMM vs tl 0.63-0.73x, 16:15 UTC run); below, the
# 128 x 128 / 64 x 256 tiles were already ahead (0.96/0.94, 0.82/0.80 at 64 and 128 rows, N=4096 K=7168).
# Only with block-uniform weight bytes (sfb_per_block): the Gluon kernel reads one weight byte per
# 64 x 128 sub-tile and K step, it has no per-row variant.
# The plain GEMMs (no bias, not fused; with UE8M0 bytes only block-uniform weight bytes, converted to FP32 scales by
# two small launches) run the CuTe DSL kernel (backend/ops/cute: DeepGEMM's 128 x 192 tile with B multicast, which
# Gluon cannot express) from CUTE_FROM_ROWS expected rows per expert on, when the optional DSL is importable: there
# it measured 0.95-0.98x DeepGEMM against the Gluon kernel's 0.85-0.91x (paired, H200, 2026-11-30 23:31 UTC,
# results/gpu_h200.json); below, the Gluon kernel's 64-row tiles are ahead (0.97-1.06x vs CuTe's 0.93-0.98x,
# results/cute_gemm_paired_h200.json).
CUTE_FROM_ROWS = 256


def masked_gemm_kernel(recipe: str, device: torch.device, k: int, sfb_per_block: bool = True,
                       n: int | None = None, expected_m: int | None = None) -> str:
    """"cute", "gluon" or "tl": the kernel group_gemm_masked_fp32 (recipe "fp32"), group_gemm_masked with impl
    "explicit" (recipe "ue8m0") and their fused GEMM 1 + SwiGLU + quant forms run for depth k on `device`; the
    Gluon kernels pick their tile from the rows hint themselves (gluon_gemm.pick_config). "cute" only for the
    plain GEMMs without bias, which pass their width n and rows hint expected_m (the fused forms pass neither);
    with UE8M0 bytes only block-uniform weight bytes (sfb_per_block), converted to FP32 scales first. The rule
    and its measurements: the comment above."""
    if recipe not in ("fp32", "ue8m0"):
        raise ValueError(f"recipe: expected 'fp32' or 'ue8m0', got {recipe!r}")
    if interpreting() or device.type != "cuda" or k % 16 or not gluon_gemm.available():
        return "tl"
    cute = (n is not None and expected_m is not None and expected_m >= CUTE_FROM_ROWS and sfb_per_block
            and cute_gemm.fits(expected_m, n, k) and cute_gemm.available())
    if cute:
        return "cute"
    return "gluon" if recipe == "fp32" or sfb_per_block else "tl"


def _kernel_for(kernel: str | None, recipe: str, device, k: int, sfb_per_block: bool = True,
                n: int | None = None, expected_m: int | None = None) -> str:
    """The caller's `kernel` ("tl" | "gluon", and "cute" where n is given: the plain GEMMs; e.g. a benchmark
    timing each), or masked_gemm_kernel's rule (None)."""
    if kernel is None:
        return masked_gemm_kernel(recipe, device, k, sfb_per_block, n, expected_m)
    kinds = ("tl", "gluon", "cute") if n is not None else ("tl", "gluon")
    if kernel not in kinds:
        raise ValueError(f"kernel: expected one of {', '.join(map(repr, kinds))} or None, got {kernel!r}")
    return kernel


def group_gemm_masked(a: torch.Tensor, b: torch.Tensor, sfa: torch.Tensor, sfb: torch.Tensor,
                      masked_m: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
                      max_m_per_expert: int | None = None, sm_count: int = -1, impl: str = "explicit",
                      sfb_per_block: bool = False, expected_m: int | None = None, kernel: str | None = None,
                      sfa_per_group: bool = False):
    """Masked grouped FP8 GEMM, CUTLASS UE8M0 scale bytes decoded in the kernel (SPEC §6). Writes `out`.

    a [E·M, K] fp8; b [E, N, K] fp8; sfa [E, align(M,128), KB] and sfb [E, align(N,128), KB'] uint8
    (KB, KB' multiples of 4, >= ceil(K/32)); masked_m [E] | [E, 1] int32; out [E·M, N] bf16;
    bias [E, N] bf16|fp32 | None. Rows >= masked_m[e] are not written; tiles exist only for valid rows.
    impl="explicit": one scale per 128 K (first byte of each group of 4; unpack_and_convert_scale
    repeats every byte 4 times, so this is exact for its output). impl="dot_scaled": tl.dot_scaled,
    one byte per 32 K-elements honoured (native on SM100, decomposed to bf16 on SM90, ~10x slower
    there). impl="auto": "explicit" when every group of 4 bytes of sfa (unless sfa_per_group) and of sfb
    (unless sfb_per_block) repeats one byte, else "dot_scaled": bytes that differ inside a group are never
    dropped (one sync). sfa_per_group: True promises that sfa repeats one byte per 128-K group (1x128
    activations through unpack_and_convert_scale): not checked, a group whose bytes differ is read as its
    first byte; with sfb_per_block as well, "auto" is "explicit" with no pass over the bytes and no sync.
    sfb_per_block (explicit kernel): True promises one sfb byte per 128 rows x 128 K (weights quantized
    128x128, the block byte copied to its rows, as `BlackwellGemmFusedMoeMethod` builds them; not checked
    here, `sf_block_uniform` checks it): one weight byte per tile and K step, one FMA per element to
    promote, as the FP32 recipe. False (default): per-row weight bytes, two multiplies per element,
    correct for any bytes. "explicit" runs the CuTe kernel or the Gluon kernel where
    masked_gemm_kernel("ue8m0", ...) says so (SM90, sfb_per_block; CuTe from CUTE_FROM_ROWS rows without bias, the
    bytes converted to FP32 scales first; the tile chosen for expected_m, default M), else the `tl` kernel;
    `kernel` ("tl" | "gluon" | "cute") overrides that rule.
    """
    if impl not in GEMM_IMPLS:
        raise ValueError(f"impl: expected one of {', '.join(GEMM_IMPLS)}, got {impl!r}")
    g = _problem(a, b, sfa.contiguous(), sfb.contiguous(), masked_m, out, bias, max_m_per_expert, sm_count)
    if impl == "auto":
        words = [sf for sf, vouched in ((g.sa, sfa_per_group), (g.sb, sfb_per_block)) if not vouched]
        repeats = [_repeats_per_128(w.view(torch.int32)) for w in words]
        impl = "explicit" if not repeats or bool(torch.stack(repeats).all()) else "dot_scaled"   # one sync, or none
    key = tuple(g.shape[2:]) + (str(g.a.device),)
    rows = int(expected_m) if expected_m is not None else g.m
    which = None if impl == "dot_scaled" else _kernel_for(
        kernel, "ue8m0", g.a.device, g.shape[3], bool(sfb_per_block), n=g.shape[2],
        expected_m=rows if g.bias is None else None)
    if impl == "dot_scaled":
        _run_tuned("dot_scaled", DOT_SCALED_CONFIGS, key, functools.partial(_dot_scaled, g),
                   INTERPRETER_CONFIG_DOT_SCALED)
    elif which == "cute":
        _cute_on_bytes(g, bool(sfb_per_block), rows)
    elif which == "gluon":
        gluon_gemm.group_gemm_masked(g.a, g.b, g.sa, g.sb, g.counts, out, g.bias, g.m, expected_m=expected_m,
                                     sm_count=sm_count)
    else:
        _run_tuned("explicit_ue8m0" if sfb_per_block else "explicit_ue8m0_per_row", GEMM_CONFIGS, key,
                   functools.partial(_explicit_ue8m0, g, bool(sfb_per_block)))
    return out


def _cute_on_bytes(g: _MaskedGemm, sfb_per_block: bool, rows: int) -> None:
    """The CuTe kernel on CUTLASS UE8M0 bytes: converted to the FP32 1x128 / 128x128 scales it reads (two small
    launches, no synchronization; decoded powers of two, so the promotion's products are the Gluon kernel's)."""
    if g.bias is not None or not sfb_per_block:
        raise ValueError("kernel: the CuTe kernel (kernel='cute') takes no bias and needs block-uniform weight bytes "
                         f"(sfb_per_block=True), got bias={'a tensor' if g.bias is not None else None}, "
                         f"sfb_per_block={sfb_per_block}")
    e_num, m, n, k = g.shape
    cute_gemm.group_gemm_masked_fp32(g.a, g.b, activation_scales_fp32(g.sa, m, k), weight_scales_fp32(g.sb, n, k),
                                     g.counts, g.out, m, expected_m=rows, sm_count=g.sm_count)


def group_gemm_masked_fp32(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                           masked_m: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
                           max_m_per_expert: int | None = None, sm_count: int = -1, expected_m: int | None = None,
                           kernel: str | None = None):
    """Masked grouped FP8 GEMM with FP32 scales, the Hopper recipe (DeepGEMM's). Writes `out`.

    a [E·M, K] fp8 with a_scale fp32 logical [E, M, ceil(K/128)] (1x128, any strides: MN-major as
    prefill_permute_to_masked_gemm returns it, or contiguous); b [E, N, K] fp8 with b_scale fp32
    [E, ceil(N/128), ceil(K/128)] (128x128). out [E·M, N] bf16, rows < masked_m[e] only.
    On SM90 the CuTe DSL kernel (from CUTE_FROM_ROWS rows, no bias, the DSL importable) or the Gluon kernel runs
    (masked_gemm_kernel), tuned for expected_m valid rows per expert (default M); elsewhere the `tl` kernel.
    `kernel` ("tl" | "gluon" | "cute") overrides that rule.
    """
    e_num = b.shape[0]
    m = int(max_m_per_expert) if max_m_per_expert is not None else a.shape[0] // e_num
    a_scale = a_scale.view(e_num, m, -1) if a_scale.dim() == 2 else a_scale
    rows = int(expected_m) if expected_m is not None else m
    which = _kernel_for(kernel, "fp32", a.device, b.shape[-1], n=b.shape[1],
                        expected_m=rows if bias is None else None)
    if which == "cute":
        if bias is not None:
            raise ValueError("bias: the CuTe kernel (kernel='cute') takes none, got a tensor")
        cute_gemm.group_gemm_masked_fp32(a, b, a_scale, b_scale, masked_m, out, m, expected_m=rows,
                                         sm_count=sm_count)
        return out
    if which == "gluon":
        gluon_gemm.group_gemm_masked_fp32(a, b, a_scale, b_scale, masked_m, out, bias, m, expected_m=expected_m,
                                          sm_count=sm_count)
        return out
    g = _problem(a, b, a_scale, b_scale, masked_m, out, bias, m, sm_count,
                 tuple(a_scale.stride()) + tuple(b_scale.stride()))
    _run_tuned("explicit_fp32", GEMM_CONFIGS, tuple(g.shape[2:]) + (str(g.a.device),),
               functools.partial(_explicit_fp32, g))
    return out


# ----------------------------------------------------------------------------- §7

def fused_mask_swiglu_fp8_quant(up: torch.Tensor, token_nums_per_expert: torch.Tensor, block_size: int = GROUP_SIZE,
                                use_ue8m0: bool = True, amax_floor: float = SWIGLU_AMAX_FLOOR,
                                check_finite: bool = False):
    """SwiGLU + 1 x block_size FP8 quant on the masked layout (SPEC §7).

    up [E, M, 2I] bf16|fp32 -> (act [E, M, I] float8_e4m3fn, act_scale MN-major view, logical
    [E, M, ceil(I/block_size/4)] packed int32 (use_ue8m0) or [E, M, ceil(I/block_size)] fp32, strides
    (C·align(M,4), 1, align(M,4))). Rows >= token_nums_per_expert[e] are zero in act and act_scale.
    check_finite: a NaN / inf y = SwiGLU(up) in a valid row (non-finite up, or lin · gate overflowing) is a
    ValueError (SPEC §1; counted by the kernel, one synchronization); False: not looked for (the output of
    such rows is then meaningless), as the benchmarks time it.
    """
    if block_size & (block_size - 1):
        raise ValueError(f"block_size: the Triton kernel needs a power of two, got {block_size}")
    e_num, m, i2 = up.shape
    i = i2 // 2
    up = up if up.stride(-1) == 1 else up.contiguous()
    counts = _counts_i32(token_nums_per_expert)
    s = -(-i // block_size)
    s_cols = -(-s // 4) if use_ue8m0 else s
    m_pad = _align(m, TMA_ALIGN)
    act = torch.empty((e_num, m, i), dtype=torch.float8_e4m3fn, device=up.device)
    phys = mn_major_zeros(e_num, m, s_cols, torch.int32 if use_ue8m0 else torch.float32, up.device)
    block_r = max(1, min(16, 4096 // (4 * block_size)))
    grid = (e_num, triton.cdiv(m, block_r), triton.cdiv(s, 4))
    bad = torch.zeros((grid[0] * grid[1] * grid[2],) if check_finite else (1,), dtype=torch.int32, device=up.device)
    if m and i:
        K.swiglu_quant_kernel[grid](up, counts, _fp8_bytes(act), phys, bad, m, i, s_cols, m_pad, up.stride(0),
                                    up.stride(1), float(amax_floor), GROUP=block_size, BLOCK_R=block_r,
                                    UE8M0=bool(use_ue8m0), COUNT_BAD=bool(check_finite), EXACT_CAST=interpreting(),
                                    num_warps=4)
    if check_finite:
        _raise_on_nonfinite(bad)
    return act, mn_major_view(phys, m)


def _raise_on_nonfinite(bad: torch.Tensor) -> None:
    """bad: per-program counts of NaN / inf SwiGLU outputs in valid rows; ValueError if any (one synchronization)."""
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(f"SwiGLU(up): {n_bad} non-finite values in valid rows (non-finite up, or lin · gate "
                         f"overflowing); SPEC §1: quantization input must be finite")


# ----------------------------------------------------------------------------- §6 + §7 fused

FUSED_TL_CONFIG = dict(BLOCK_M=64, num_warps=8, num_stages=3, USE_TMA=True)     # 4 warps: 255 regs + spills (sm_90a)
FUSED_INTERPRETER_CONFIG = dict(BLOCK_M=64, num_warps=4, num_stages=1, USE_TMA=False)


def _fused_outputs(g: _MaskedGemm, ue8m0: bool, out):
    """(act [E, M, I] fp8, the scale tensor returned, the one the kernel writes): new (torch.empty: rows past
    masked_m hold whatever memory held) or the caller's `out` pair, checked."""
    e_num, m, n, _ = g.shape
    i, s = n // 2, n // 2 // GROUP_SIZE
    dev = g.a.device
    if ue8m0:
        want = ((e_num, _align(m, K.SF_TILE_ROWS.value), 16 * (-(-s // 4))), torch.uint8)
    else:
        want = ((e_num, s, _align(m, TMA_ALIGN)), torch.float32)
    if out is None:
        act = torch.empty((e_num, m, i), dtype=torch.float8_e4m3fn, device=dev)
        phys = torch.empty(want[0], dtype=want[1], device=dev)
        return act, (phys if ue8m0 else mn_major_view(phys, m)), phys
    act, scale = out
    if ue8m0:
        phys, scale_ok = scale, tuple(scale.shape) == want[0] and scale.is_contiguous()
    else:                                    # the MN-major view of a [E, S, align(M,4)] buffer, as returned
        m_pad = want[0][2]
        scale_ok = tuple(scale.shape) == (e_num, m, s) and tuple(scale.stride()) == (s * m_pad, 1, m_pad)
        phys = scale.as_strided(want[0], (s * m_pad, m_pad, 1)) if scale_ok else None
    if (tuple(act.shape) != (e_num, m, i) or act.dtype != torch.float8_e4m3fn or not act.is_contiguous()
            or not scale_ok or scale.dtype != want[1]):
        raise ValueError(f"out: expected (act [{e_num}, {m}, {i}] float8_e4m3fn contiguous, scale "
                         f"{'[%d, %d, %d]' % want[0] if ue8m0 else 'MN-major view of [%d, %d, %d]' % want[0]} "
                         f"{want[1]}), got act {tuple(act.shape)} {act.dtype}, scale {tuple(scale.shape)} "
                         f"{scale.dtype} strides {tuple(scale.stride())}")
    return act, scale, phys


def _gemm_swiglu(g: _MaskedGemm, ue8m0: bool, sb_scalar: bool, amax_floor: float, check_finite: bool, out,
                 kernel: str):
    """Run the fused kernel (tl or Gluon, as _kernel_for returned it) of a checked problem; returns (act, scale)."""
    if kernel == "gluon" and not sb_scalar:
        raise ValueError("sfb_per_block: the Gluon kernel reads one weight byte per 128x128 block, expected True "
                         "with kernel='gluon', got False")
    e_num, m, n, k = g.shape
    if n % (2 * GROUP_SIZE):
        raise ValueError(f"b: the fused epilogue needs 2I rows with I a multiple of {GROUP_SIZE}, got 2I = {n}")
    act, scale, phys = _fused_outputs(g, ue8m0, out)
    s = n // 2 // GROUP_SIZE
    sf_groups, m_pad = (phys.shape[2] // 4, phys.shape[1]) if ue8m0 else (s, phys.shape[2])
    strides = _word_strides(g.sa) + _word_strides(g.sb) if ue8m0 else g.scale_strides
    sa, sb = (g.sa.view(torch.int32), g.sb.view(torch.int32)) if ue8m0 else (g.sa, g.sb)
    if kernel == "gluon":
        bad = gluon_gemm.group_gemm_masked_swiglu_quant(g.a, g.b, sa, sb, strides, g.counts, _fp8_bytes(act),
                                                        phys.view(torch.int32) if ue8m0 else phys, m, ue8m0,
                                                        s, sf_groups, m_pad, float(amax_floor), check_finite,
                                                        sm_count=g.sm_count)
    else:
        cfg = FUSED_INTERPRETER_CONFIG if interpreting() else FUSED_TL_CONFIG
        upper = e_num * triton.cdiv(m, cfg["BLOCK_M"]) * s
        grid = (max(1, min(upper, 4)) if interpreting() else max(1, upper),)
        bad = torch.zeros(grid[0] if check_finite else 1, dtype=torch.int32, device=g.a.device)
        K.group_gemm_masked_swiglu_quant_kernel[grid](
            *_operands(g.a, g.b, dict(cfg, BLOCK_N=GROUP_SIZE)), sa, sb, g.counts, _fp8_bytes(act),
            phys.view(torch.int32) if ue8m0 else phys, bad, e_num, m, n // 2, k, *strides, s, sf_groups, m_pad,
            float(amax_floor), SCALE_MODE=int(ue8m0), SB_SCALAR=sb_scalar, E_PAD=_pow2(e_num),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=BLOCK_K, EVEN_K=k % BLOCK_K == 0, USE_TMA=cfg["USE_TMA"],
            COUNT_BAD=bool(check_finite), EXACT_CAST=interpreting(), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    if check_finite:
        _raise_on_nonfinite(bad)
    return act, scale


def group_gemm_masked_swiglu_fp8_quant(a: torch.Tensor, b: torch.Tensor, sfa: torch.Tensor, sfb: torch.Tensor,
                                       masked_m: torch.Tensor, max_m_per_expert: int | None = None,
                                       amax_floor: float = SWIGLU_AMAX_FLOOR, check_finite: bool = False,
                                       sfb_per_block: bool = False, out=None, kernel: str | None = None,
                                       sm_count: int = -1):
    """GEMM 1 + SwiGLU + 1x128 UE8M0 quant in one kernel, CUTLASS bytes in and out (the Blackwell recipe).

    a [E·M, H] fp8, b = w_up [E, 2I, H] fp8 (I a multiple of 128), sfa / sfb CUTLASS SF bytes as group_gemm_masked
    (impl="explicit": the first byte of each 128-group's 4); masked_m [E] | [E, 1] int32. Returns (act [E, M, I]
    float8_e4m3fn, act_sf [E, align(M,128), 16·ceil(I/512)] uint8 CUTLASS SF bytes): for rows < masked_m[e] the
    bytes of group_gemm_masked -> fused_mask_swiglu_fp8_quant(use_ue8m0=True) -> unpack_and_convert_scale, i.e.
    what GEMM 2 reads; rows past masked_m[e] are not written (new buffers: whatever memory held; `out`: a
    caller's (act, act_sf) pair of those shapes, left as they were there). check_finite, amax_floor: as
    fused_mask_swiglu_fp8_quant (False: no synchronization, CUDA-graph safe). sfb_per_block, sm_count, kernel
    ("tl" | "gluon", None: masked_gemm_kernel's rule): as group_gemm_masked (Gluon needs sfb_per_block).
    """
    g = _problem(a, b, sfa.contiguous(), sfb.contiguous(), masked_m, None, None, max_m_per_expert, sm_count)
    kernel = _kernel_for(kernel, "ue8m0", g.a.device, g.shape[3], bool(sfb_per_block))
    return _gemm_swiglu(g, True, bool(sfb_per_block), amax_floor, check_finite, out, kernel)


def group_gemm_masked_fp32_swiglu_fp8_quant(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor,
                                            b_scale: torch.Tensor, masked_m: torch.Tensor,
                                            max_m_per_expert: int | None = None,
                                            amax_floor: float = SWIGLU_AMAX_FLOOR, check_finite: bool = False,
                                            out=None, kernel: str | None = None, sm_count: int = -1):
    """GEMM 1 + SwiGLU + 1x128 FP32-scale quant in one kernel (the Hopper recipe, DeepGEMM's).

    a [E·M, H] fp8 with a_scale fp32 logical [E, M, ceil(H/128)] (any strides), b = w_up [E, 2I, H] fp8 (I a
    multiple of 128) with b_scale fp32 [E, 2I/128, ceil(H/128)]; masked_m [E] | [E, 1] int32. Returns (act
    [E, M, I] float8_e4m3fn, act_scale fp32 MN-major view [E, M, I/128]): for rows < masked_m[e] the values of
    group_gemm_masked_fp32 -> fused_mask_swiglu_fp8_quant(use_ue8m0=False), what group_gemm_masked_fp32 takes
    for GEMM 2; rows past masked_m[e] are not written. Other arguments: group_gemm_masked_swiglu_fp8_quant.
    """
    e_num = b.shape[0]
    m = int(max_m_per_expert) if max_m_per_expert is not None else a.shape[0] // e_num
    a_scale = a_scale.view(e_num, m, -1) if a_scale.dim() == 2 else a_scale
    g = _problem(a, b, a_scale, b_scale, masked_m, None, None, m, sm_count,
                 tuple(a_scale.stride()) + tuple(b_scale.stride()))
    kernel = _kernel_for(kernel, "fp32", g.a.device, g.shape[3])
    return _gemm_swiglu(g, False, True, amax_floor, check_finite, out, kernel)


# ----------------------------------------------------------------------------- §8

def depermute_prefill_combine(ffn_out: torch.Tensor, indice_map: torch.Tensor, topk_weights: torch.Tensor,
                              num_worst_tokens: int) -> torch.Tensor:
    """ffn_out [E, M, H] bf16|fp32, indice_map [W, K_top] int32|int64 (e·M + slot or -1), topk_weights
    [W, K_top] fp32 -> [W, H] bf16 = Σ_{k: idx>=0} w·ffn_out[idx], float32 in k order; rows with no index zero."""
    e_num, m, h = ffn_out.shape
    w = int(num_worst_tokens)
    k_top = indice_map.shape[1]
    ffn = ffn_out.contiguous()
    indice_map = indice_map.contiguous()
    out = torch.empty((w, h), dtype=torch.bfloat16, device=ffn_out.device)
    if w == 0:
        return out
    wts = topk_weights.to(torch.float32).contiguous()
    block_h = min(1024, _pow2(h))
    K.combine_kernel[(w, triton.cdiv(h, block_h))](ffn, indice_map, wts, out, h, indice_map.stride(0), wts.stride(0),
                                                   K_TOP=k_top, BLOCK_H=block_h, EXACT_CAST=interpreting(), num_warps=4)
    return out
