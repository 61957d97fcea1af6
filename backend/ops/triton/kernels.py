"""Triton kernels of the FP8 block-quantized MoE path (SPEC §3-8), framework-neutral.

The kernels take raw pointers; `launch.py` wraps them for torch tensors. Nothing here imports
Paddle or torch (the format constants come from moe_ref.constants and moe_ref.cutlass_sf,
which import neither), and nothing runs at import time (no tuning, no device query).

Layouts, in the order of the data flow:

    per_token_quant        x [T, H] -> q [T, H] e4m3 bytes, scale [T, S] fp32 | [T, ceil(S/4)] packed UE8M0
    permute (3 kernels)    count per chunk -> slots (+ the token of each slot) -> move rows and scales (deterministic)
    unpack_sf              packed UE8M0 [E, MN, C] (any strides) -> CUTLASS SM100 SF bytes [E, MN_pad, 16C]
    group_gemm_masked      a [E·M, K] e4m3 x b [E, N, K] e4m3 -> out [E·M, N] bf16, rows < masked_m[e]
    swiglu_quant           up [E, M, 2I] -> act [E, M, I] e4m3 bytes + MN-major scales
    combine                ffn_out [E, M, H] gathered by indice_map, weighted, float32 sum -> [W, H] bf16

Casts and divisions written out by hand:
- `_e4m3_bits` (float32 -> e4m3fn bits, round to nearest even) is used under the Triton
  interpreter (EXACT_CAST=True): the interpreter of Triton 3.6 rounds values just below a power
  of two wrongly (127.9 -> 64.0); on a GPU the hardware cvt.rn.satfinite is exact and is used.
- `_to_bf16` rounds fp32 -> bf16 in integers under the interpreter, which truncates instead.
- UE8M0 scales are built from the float32 exponent field (SPEC §2: round *up*).
- `_divide_by_scale`: x / s correctly rounded without a division per element (see there).
"""
from __future__ import annotations

import triton
import triton.language as tl
try:        # programmatic dependent launch (the permute's PDL option): Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:         # pragma: no cover - older Triton; launch.PERMUTE_PDL then stays off
    gdc_launch_dependents = gdc_wait = None

from moe_ref import cutlass_sf
from moe_ref import constants as C

# Format constants, imported from their one home (both modules import without Paddle: the GPU
# machine has none), as constexpr so that @triton.jit code may read them.
E4M3_MAX = tl.constexpr(C.E4M3_MAX)
UE8M0_MIN_EXP = tl.constexpr(C.UE8M0_MIN_EXP)
UE8M0_MAX_EXP = tl.constexpr(C.UE8M0_MAX_EXP)
BYTES_PER_WORD = tl.constexpr(C.BYTES_PER_WORD)
SF_VEC_SIZE = tl.constexpr(cutlass_sf.SF_VEC_SIZE)
SF_TILE_ROWS = tl.constexpr(cutlass_sf.SF_TILE_ROWS)
SF_TILE_COLS = tl.constexpr(cutlass_sf.SF_TILE_COLS)
SF_ROW_GROUP = tl.constexpr(cutlass_sf.SF_ROW_GROUP)
SF_TILE_BYTES = tl.constexpr(cutlass_sf.SF_TILE_BYTES)


# ----------------------------------------------------------------------------- helpers

@triton.jit
def _e4m3_bits(y):
    """y float32 already clamped to [-448, 448] -> e4m3fn bit pattern as int32 (RTNE), integer math only."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    a = tl.abs(y)
    abits = a.to(tl.int32, bitcast=True)
    mant = abits & 0x7FFFFF
    # normal range (a >= 2^-6): keep 3 mantissa bits, ties to even; a carry rolls into the exponent
    normal = (((abits >> 23) - 120) << 3) + ((mant + 0x7FFFF + ((mant >> 20) & 1)) >> 20)
    # subnormal range: 2^14 + a rounds a to a multiple of 2^-9 (float32 ulp of 2^14); count the ulps
    sub = (a + 16384.0).to(tl.int32, bitcast=True) - 0x46800000
    return tl.where(a < 0.015625, sub, normal) | sign


@triton.jit
def _to_e4m3_bytes(y, EXACT_CAST: tl.constexpr):
    """float32 y -> clamp to [-448, 448] -> e4m3fn bits as uint8 (SPEC §1: clamp first, then cast)."""
    y = tl.minimum(tl.maximum(y, -E4M3_MAX), E4M3_MAX)
    if EXACT_CAST:
        return _e4m3_bits(y).to(tl.uint8)
    else:
        return y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)


@triton.jit
def _to_bf16(y, EXACT_CAST: tl.constexpr):
    """float32 -> bf16, round to nearest even. EXACT_CAST rounds in integers first (the Triton 3.6
    interpreter truncates fp32 -> bf16); the value is then representable and the cast is exact."""
    if EXACT_CAST:
        b = y.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        y = b.to(tl.float32, bitcast=True)
    return y.to(tl.bfloat16)


@triton.jit
def _scale_from_amax(amax, UE8M0: tl.constexpr):
    """amax float32 > 0 -> (scale float32, UE8M0 exponent byte as int32; 0 when not UE8M0)."""
    s = tl.math.div_rn(amax, E4M3_MAX)
    if UE8M0:
        bits = s.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        e = tl.minimum(tl.maximum(e, UE8M0_MIN_EXP), UE8M0_MAX_EXP)
        return (e << 23).to(tl.float32, bitcast=True), e
    else:
        return s, s.to(tl.int32, bitcast=True) & 0


@triton.jit
def _divide_by_scale(y, s, UE8M0: tl.constexpr, EXACT_CAST: tl.constexpr):
    """y / s, correctly rounded, for a scale s shared by a group (broadcast).

    UE8M0: s is a power of two, so y · (1/s) is exact. FP32 scales on a GPU: one correctly rounded
    reciprocal r per group, q0 = y·r, then the FMA correction q0 + (y - q0·s)·r (Markstein), which
    is the IEEE quotient for normal operands at a fraction of the cost of a division per element.
    Under the interpreter (no true FMA) the division itself.
    """
    if UE8M0:
        return y * (1.0 / s)
    elif EXACT_CAST:
        return tl.math.div_rn(y, s)
    else:
        r = tl.math.div_rn(1.0, s)
        q0 = y * r
        # q0 · (-s) is -(q0 · s) exactly: the negation rides on the per-group s, not on every q0 (one FFMA fewer
        # per element than fma(-q0, s, y) compiles to: -q0 as a multiply of its own)
        return tl.fma(tl.fma(q0, -s, y), r, q0)


@triton.jit
def _sf_byte_offset(r, kb, num_cols):
    """moe_ref.cutlass_sf.sf_byte_offset, written in Triton (byte (r, kb) of a [MN, KB] SF matrix)."""
    tile = (r // SF_TILE_ROWS) * (num_cols // SF_TILE_COLS) + kb // SF_TILE_COLS
    return (tile * SF_TILE_BYTES + (r % SF_ROW_GROUP) * (SF_TILE_COLS * (SF_TILE_ROWS // SF_ROW_GROUP))
            + ((r % SF_TILE_ROWS) // SF_ROW_GROUP) * SF_TILE_COLS + kb % SF_TILE_COLS)


@triton.jit
def _sf_word_offset(r, g, num_groups):
    """Offset in int32 words of the 4 CUTLASS SF bytes (r, 4g..4g+3): the 4 bytes of one 128-wide group
    are contiguous (kb % 4 is the fastest index), so one word holds them. num_groups = KB // 4."""
    return _sf_byte_offset(r, g * SF_TILE_COLS, num_groups * SF_TILE_COLS) // BYTES_PER_WORD


# ----------------------------------------------------------------------------- §3 per-token quant

@triton.jit
def per_token_quant_kernel(x_ptr, q_ptr, s_ptr, T, H, S, stride_x, stride_q, stride_s, amax_floor,
                           GROUP: tl.constexpr, BLOCK_T: tl.constexpr, UE8M0: tl.constexpr,
                           EXACT_CAST: tl.constexpr):
    """One program: BLOCK_T tokens x 4 groups of GROUP columns (one packed UE8M0 word per token).

    x [T, H] bf16|fp32 -> q [T, H] uint8 (e4m3 bits); s [T, S] fp32 or [T, ceil(S/4)] int32 words.
    """
    pid_t = tl.program_id(0)
    pid_w = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = pid_w * (4 * GROUP) + tl.arange(0, 4 * GROUP)
    row_ok = rows < T
    mask = row_ok[:, None] & (cols < H)[None, :]
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x3 = tl.reshape(x, (BLOCK_T, 4, GROUP))
    amax = tl.maximum(tl.max(tl.abs(x3), axis=2), amax_floor)                     # [BLOCK_T, 4]
    s, e = _scale_from_amax(amax, UE8M0)
    q = _to_e4m3_bytes(_divide_by_scale(x3, s[:, :, None], UE8M0, EXACT_CAST), EXACT_CAST)
    tl.store(q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :], tl.reshape(q, (BLOCK_T, 4 * GROUP)),
             mask=mask)
    g = pid_w * 4 + tl.arange(0, 4)
    g_ok = g < S
    if UE8M0:
        e = tl.where(g_ok[None, :], e, 0)                                            # missing groups pad with byte 0
        word = tl.sum(e << (tl.arange(0, 4) * 8)[None, :], axis=1)
        tl.store(s_ptr + rows.to(tl.int64) * stride_s + pid_w, word, mask=row_ok)
    else:
        tl.store(s_ptr + rows[:, None].to(tl.int64) * stride_s + g[None, :], s, mask=row_ok[:, None] & g_ok[None, :])


# ----------------------------------------------------------------------------- §5 permute

@triton.jit
def _onehot_chunk(ids_ptr, W, K_TOP, stride_ids, BLOCK_W: tl.constexpr, KP: tl.constexpr, E_PAD: tl.constexpr):
    """Expert ids of one chunk of BLOCK_W tokens, flattened token-major then k -> (ids, in_range, onehot)."""
    chunk = tl.program_id(0)
    t = chunk * BLOCK_W + tl.arange(0, BLOCK_W)
    k = tl.arange(0, KP)
    ok = (t < W)[:, None] & (k < K_TOP)[None, :]
    ids = tl.load(ids_ptr + t[:, None].to(tl.int64) * stride_ids + k[None, :], mask=ok, other=-1).to(tl.int32)
    ids = tl.reshape(ids, (BLOCK_W * KP,))
    ok = tl.reshape(ok, (BLOCK_W * KP,))
    onehot = (ids[:, None] == tl.arange(0, E_PAD)[None, :]).to(tl.int32)           # [BLOCK_W*KP, E_PAD]
    return ids, ok, onehot


@triton.jit
def permute_count_kernel(ids_ptr, hist_ptr, bad_ptr, first_ptr, W, K_TOP, E, stride_ids,
                         BLOCK_W: tl.constexpr, KP: tl.constexpr, E_PAD: tl.constexpr, PDL: tl.constexpr = False):
    """hist [chunks, E_PAD] int32: rows per expert in this chunk; bad [chunks]: ids outside [-1, E); first
    [chunks]: flat index t·K_TOP + k of the chunk's first such id (W·K_TOP if none). PDL: lets the slot kernel
    launch now (programmatic dependent launch; it waits for this kernel before reading hist)."""
    if PDL:
        gdc_launch_dependents()
    ids, ok, onehot = _onehot_chunk(ids_ptr, W, K_TOP, stride_ids, BLOCK_W, KP, E_PAD)
    chunk = tl.program_id(0)
    p = tl.arange(0, BLOCK_W * KP)
    flat = (chunk * BLOCK_W + p // KP) * K_TOP + p % KP
    is_bad = ok & ((ids < -1) | (ids >= E))
    tl.store(hist_ptr + chunk * E_PAD + tl.arange(0, E_PAD), tl.sum(onehot, axis=0))
    tl.store(bad_ptr + chunk, tl.sum(is_bad.to(tl.int32), axis=0))
    tl.store(first_ptr + chunk, tl.min(tl.where(is_bad, flat, W * K_TOP), axis=0))


@triton.jit
def _hist_rows_sum(hist_ptr, n_rows, E_PAD: tl.constexpr, CB: tl.constexpr):
    """Σ of rows 0..n_rows-1 of hist [chunks, E_PAD] int32 -> [E_PAD] (tiles of CB rows)."""
    acc = tl.zeros((E_PAD,), dtype=tl.int32)
    e = tl.arange(0, E_PAD)
    for c0 in range(0, n_rows, CB):
        c = c0 + tl.arange(0, CB)
        tile = tl.load(hist_ptr + c[:, None] * E_PAD + e[None, :], mask=(c < n_rows)[:, None], other=0)
        acc += tl.sum(tile, axis=0)
    return acc


@triton.jit
def _permute_totals(ids_ptr, hist_ptr, bad_ptr, first_ptr, counts_ptr, problems_ptr, err_ptr, CHUNKS, W, K_TOP, E,
                    M, stride_ids, E_PAD: tl.constexpr, CB: tl.constexpr, RECORD: tl.constexpr,
                    BAD_ID_CODE: tl.constexpr, OVERFLOW_CODE: tl.constexpr):
    """counts [E] = min(routed, M); problems [3] = (bad ids, largest routed count, its first expert); RECORD: the
    first bad id, else the first expert over M, into err [5] int64 if it is clear (backend.ops.device_errors)."""
    e = tl.arange(0, E_PAD)
    routed = tl.where(e < E, _hist_rows_sum(hist_ptr, CHUNKS, E_PAD, CB), 0)
    tl.store(counts_ptr + e, tl.minimum(routed, M), mask=e < E)
    c = tl.arange(0, CB)
    n_bad = tl.zeros((CB,), dtype=tl.int32)
    first = tl.zeros((CB,), dtype=tl.int32) + W * K_TOP                          # W·K_TOP: none
    for c0 in range(0, CHUNKS, CB):
        n_bad += tl.load(bad_ptr + c0 + c, mask=c0 + c < CHUNKS, other=0)
        first = tl.minimum(first, tl.load(first_ptr + c0 + c, mask=c0 + c < CHUNKS, other=W * K_TOP))
    n_bad_all = tl.sum(n_bad, axis=0)
    worst = tl.max(routed, axis=0)
    tl.store(problems_ptr, n_bad_all)
    tl.store(problems_ptr + 1, worst)
    tl.store(problems_ptr + 2, tl.min(tl.where(routed == worst, e, E_PAD), axis=0))
    if RECORD:
        fb = tl.min(first, axis=0)
        ex = tl.min(tl.where(routed > M, e, E_PAD), axis=0)
        if tl.load(err_ptr) == 0:
            if n_bad_all > 0:
                value = tl.load(ids_ptr + (fb // K_TOP).to(tl.int64) * stride_ids + fb % K_TOP).to(tl.int64)
                _store_record(err_ptr, BAD_ID_CODE, fb // K_TOP, fb % K_TOP, value, E)
            elif ex < E_PAD:
                _store_record(err_ptr, OVERFLOW_CODE, ex, tl.sum(tl.where(e == ex, routed, 0), axis=0), M, 0)


@triton.jit
def _store_record(err_ptr, code, a, b, c, d):
    tl.store(err_ptr, tl.full((), code, tl.int64))
    tl.store(err_ptr + 1, tl.full((), 0, tl.int64) + a)
    tl.store(err_ptr + 2, tl.full((), 0, tl.int64) + b)
    tl.store(err_ptr + 3, tl.full((), 0, tl.int64) + c)
    tl.store(err_ptr + 4, tl.full((), 0, tl.int64) + d)


@triton.jit
def permute_slot_kernel(ids_ptr, hist_ptr, bad_ptr, first_ptr, map_ptr, inv_ptr, counts_ptr, problems_ptr, err_ptr, W,
                        K_TOP, E, M, stride_ids, BLOCK_W: tl.constexpr, KP: tl.constexpr, E_PAD: tl.constexpr,
                        CB: tl.constexpr, RECORD: tl.constexpr, BAD_ID_CODE: tl.constexpr,
                        OVERFLOW_CODE: tl.constexpr, HAS_INV: tl.constexpr, PDL: tl.constexpr = False):
    """map [W, K_TOP] int32 = e·M + slot (slot = rows of e before this entry, token-major then k) or -1.
    -1 also for an id outside [0, E) and a slot >= M (dropped: the launcher raises or records them).

    The rows of each expert in earlier chunks: each program sums the hist rows before its own (no separate
    prefix launch). One program more than chunks, the last: the counts, the problems and the record
    (`_permute_totals`), beside the others rather than after one program's own chunk.
    HAS_INV: also inv [E·M] int32, inv[e·M + slot] = token (slots < counts[e] only).
    PDL (launched as a programmatic dependent of the count kernel): lets the move kernel launch, then waits for the
    count kernel's hist before reading it.
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    chunk = tl.program_id(0)
    n_chunks = tl.num_programs(0) - 1
    if chunk < n_chunks:
        ids, ok, onehot = _onehot_chunk(ids_ptr, W, K_TOP, stride_ids, BLOCK_W, KP, E_PAD)
        before = tl.cumsum(onehot, axis=0) - onehot                                # same expert, earlier in chunk
        rank = tl.sum(before * onehot, axis=1)
        offsets = _hist_rows_sum(hist_ptr, chunk, E_PAD, CB)                         # earlier chunks
        slot = tl.sum(onehot * offsets[None, :], axis=1) + rank
        value = tl.where((ids >= 0) & (ids < E) & (slot < M), ids * M + slot, -1)
        flat = chunk * BLOCK_W * KP + tl.arange(0, BLOCK_W * KP)
        t = flat // KP
        k = flat % KP
        tl.store(map_ptr + t.to(tl.int64) * K_TOP + k, value, mask=ok)
        if HAS_INV:        # the token of each slot, for permute_move_kernel's scale gather
            tl.store(inv_ptr + value, t, mask=ok & (value >= 0))
    else:
        _permute_totals(ids_ptr, hist_ptr, bad_ptr, first_ptr, counts_ptr, problems_ptr, err_ptr,
                        n_chunks, W, K_TOP, E, M, stride_ids, E_PAD, CB, RECORD, BAD_ID_CODE, OVERFLOW_CODE)


@triton.jit
def _scatter_token_row(x_ptr, map_ptr, px_ptr, t, c_lo, c_hi, ROW, NUM_ROWS, stride_x, K_TOP: tl.constexpr,
                       KP: tl.constexpr, BLOCK: tl.constexpr, STORE_CACHE: tl.constexpr, PDL: tl.constexpr):
    """Words c_lo..c_hi-1 of token t's row (ROW words) to each of its K_TOP destinations: the map row in one load,
    the row read once per BLOCK words and written to all destinations by one [KP, BLOCK] store (no per-destination
    reduction, branch or barrier between the stores). Destinations outside [0, NUM_ROWS) are skipped.
    PDL: the first BLOCK words are loaded before waiting for the index step (gdc_wait; x does not depend on it), so
    these reads overlap the slot kernel."""
    cols = c_lo + tl.arange(0, BLOCK)
    c_first = tl.minimum(c_hi, c_lo + BLOCK)
    row = tl.load(x_ptr + t.to(tl.int64) * stride_x + cols, mask=cols < c_first)
    if PDL:
        gdc_wait()
    k = tl.arange(0, KP)
    dests = tl.load(map_ptr + t.to(tl.int64) * K_TOP + k, mask=k < K_TOP, other=-1)
    ok = (dests >= 0) & (dests < NUM_ROWS)
    base = tl.where(ok, dests, 0).to(tl.int64) * ROW
    tl.store(px_ptr + base[:, None] + cols[None, :], tl.broadcast_to(row[None, :], (KP, BLOCK)),
             mask=ok[:, None] & (cols < c_first)[None, :], cache_modifier=STORE_CACHE)
    for c0 in range(c_lo + BLOCK, c_hi, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        row = tl.load(x_ptr + t.to(tl.int64) * stride_x + cols, mask=cols < c_hi)
        tl.store(px_ptr + base[:, None] + cols[None, :], tl.broadcast_to(row[None, :], (KP, BLOCK)),
                 mask=ok[:, None] & (cols < c_hi)[None, :], cache_modifier=STORE_CACHE)


@triton.jit
def _zero_dead_rows(px_ptr, e, lo, hi, M, ROW, RB: tl.constexpr, BLOCK: tl.constexpr):
    """Rows lo..hi-1 of expert e in px [E·M, ROW] become zero."""
    for r0 in range(lo, hi, RB):
        rows = r0 + tl.arange(0, RB)
        base = (e.to(tl.int64) * M + rows) * ROW
        for c0 in range(0, ROW, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            zeros = tl.zeros((RB, BLOCK), dtype=px_ptr.dtype.element_ty)
            tl.store(px_ptr + base[:, None] + c[None, :], zeros, mask=(rows < hi)[:, None] & (c < ROW)[None, :])


@triton.jit
def _gather_rows(x_ptr, inv_ptr, px_ptr, e, lo, cnt, hi, M, W, ROW, stride_x, RB: tl.constexpr, BLOCK: tl.constexpr):
    """Rows lo..hi-1 of expert e in px [E·M, ROW]: the x row of the slot's token (inv) below cnt, zero from cnt on."""
    for r0 in range(lo, hi, RB):
        slots = r0 + tl.arange(0, RB)
        src, live = _slot_sources(inv_ptr, e, slots, cnt, M, W)
        dst = (e.to(tl.int64) * M + slots) * ROW
        for c0 in range(0, ROW, BLOCK):
            c = c0 + tl.arange(0, BLOCK)
            v = tl.load(x_ptr + src[:, None] * stride_x + c[None, :], mask=live[:, None] & (c < ROW)[None, :],
                        other=0)
            tl.store(px_ptr + dst[:, None] + c[None, :], v, mask=(slots < hi)[:, None] & (c < ROW)[None, :])


@triton.jit
def _slot_sources(inv_ptr, e, slots, cnt, M, W):
    """(token of each slot as int64, live): inv [E·M] int32 read for slots < cnt only; live = slots < cnt with a
    token in [0, W)."""
    live = slots < cnt
    src = tl.load(inv_ptr + e.to(tl.int64) * M + slots, mask=live, other=0)
    return src.to(tl.int64), live & (src >= 0) & (src < W)


@triton.jit
def _gather_scales_mn(s_ptr, ps_ptr, e, slots, src, live, S_COLS, SF_ROWS, stride_s, BLOCK_SC: tl.constexpr):
    """Scale rows of the slots (token src, valid where live; zero elsewhere) as MN-major int32 words
    [E, S_COLS, SF_ROWS] (slot fastest: coalesced), every slot < SF_ROWS."""
    for c0 in range(0, S_COLS, BLOCK_SC):
        c = c0 + tl.arange(0, BLOCK_SC)
        v = tl.load(s_ptr + src[:, None] * stride_s + c[None, :], mask=live[:, None] & (c < S_COLS)[None, :], other=0)
        tl.store(ps_ptr + (e.to(tl.int64) * S_COLS + c[None, :]) * SF_ROWS + slots[:, None], v,
                 mask=(slots < SF_ROWS)[:, None] & (c < S_COLS)[None, :])


@triton.jit
def _gather_sf_tile(s_ptr, ps_ptr, e, rt, src, live, SF_ROWS, SF_GROUPS, stride_s, REPEAT: tl.constexpr,
                    BLOCK_SC: tl.constexpr):
    """The CUTLASS SF words [E, SF_ROWS, SF_GROUPS] of row tile rt (slots rt·128 ..; src, live [128]: the token of
    each, zero where not live): REPEAT, from packed 1x128 UE8M0 words (each byte 4 times, as unpack_sf_kernel);
    else from words that already hold the 4 bytes of 32-wide groups. Whole tiles per store (`_store_sf_tiles`)."""
    for g0 in range(0, SF_GROUPS, BLOCK_SC):
        g = g0 + tl.arange(0, BLOCK_SC)
        ok = live[None, :] & (g < SF_GROUPS)[:, None]                                  # [BLOCK_SC, 128]
        if REPEAT:
            word = tl.load(s_ptr + src[None, :] * stride_s + (g // 4)[:, None], mask=ok, other=0)
            b = (word >> ((g % 4) * 8)[:, None]) & 0xFF
            v = b | (b << 8) | (b << 16) | (b << 24)
        else:
            v = tl.load(s_ptr + src[None, :] * stride_s + g[:, None], mask=ok, other=0)
        _store_sf_tiles(ps_ptr, e, rt, g, v, SF_GROUPS, SF_ROWS)


@triton.jit
def permute_move_kernel(x_ptr, map_ptr, inv_ptr, counts_ptr, px_ptr, s_ptr, ps_ptr, W, ROW, S_COLS, M, NUM_ROWS,
                        SF_ROWS, SF_GROUPS, NUM_BLOCKS, stride_x, stride_s, K_TOP: tl.constexpr, KP: tl.constexpr,
                        HAS_SCALE: tl.constexpr, SF_MODE: tl.constexpr, BLOCK: tl.constexpr,
                        BLOCK_S: tl.constexpr, BLOCK_SC: tl.constexpr, RB: tl.constexpr, GATHER: tl.constexpr = False,
                        SPLIT: tl.constexpr = 1, ZBLOCK: tl.constexpr = 0, STORE_CACHE: tl.constexpr = "",
                        PDL: tl.constexpr = False):
    """The data movement of the permute in one launch (every byte of px and of the scale output written once).

    Programs 0 .. E·NUM_BLOCKS-1, one per (expert e, block of BLOCK_S slots): rows in [counts[e], M) of the block
    become zero; with HAS_SCALE the block's scale rows are gathered from the tokens that own the slots
    (inv [E·M] int32: the token of each slot < counts[e]) and written in the GEMM's layout, zeros past the count and
    up to SF_ROWS: MN-major (`_gather_scales_mn`, whole slot runs per column), or CUTLASS SF tiles
    (`_gather_sf_tile`, by the programs whose block starts a 128-row tile: whole tiles per store). They come
    first, so that the blocks with dead rows start early. Programs E·NUM_BLOCKS .. + W-1: token t's row to its
    K_TOP slots (map [W, K_TOP] = e·M + slot or -1). px [E·M, ROW], x rows of ROW words (int32 or uint8).
    SPLIT: W·SPLIT token programs instead, each moving one of SPLIT equal column ranges of its token's row (ROW a
    multiple of SPLIT: smaller programs, a shorter tail). ZBLOCK: columns per store of the dead-row zeroing
    (0: BLOCK). STORE_CACHE: the row stores' cache modifier ("" default, ".cs" streaming, ".cg" L2 only).
    GATHER: no token programs; each slot-block program writes all its rows itself, x rows of the slots' tokens
    (through inv) or zeros (`_gather_rows`): sequential writes, each x row read K_top times (from L2 if it stays).
    PDL (launched as a programmatic dependent of the slot kernel): every program waits for the index step (gdc_wait)
    before reading map, inv or counts; the token programs load their first row block before it.
    """
    pid = tl.program_id(0)
    n_blocks = tl.num_programs(0) - (0 if GATHER else W * SPLIT)
    if pid < n_blocks:
        if PDL:
            gdc_wait()
        e = pid // NUM_BLOCKS
        s0 = (pid % NUM_BLOCKS) * BLOCK_S
        cnt = tl.load(counts_ptr + e)
        if GATHER:
            _gather_rows(x_ptr, inv_ptr, px_ptr, e, s0, cnt, tl.minimum(M, s0 + BLOCK_S), M, W, ROW, stride_x, RB,
                         BLOCK)
        else:
            _zero_dead_rows(px_ptr, e, tl.maximum(cnt, s0), tl.minimum(M, s0 + BLOCK_S), M, ROW, RB,
                            BLOCK if ZBLOCK == 0 else ZBLOCK)
        if HAS_SCALE:
            if SF_MODE == 0:
                slots = s0 + tl.arange(0, BLOCK_S)
                src, live = _slot_sources(inv_ptr, e, slots, cnt, M, W)
                _gather_scales_mn(s_ptr, ps_ptr, e, slots, src, live, S_COLS, SF_ROWS, stride_s, BLOCK_SC)
            elif s0 % SF_TILE_ROWS == 0:         # a whole SF tile per program: its stores are contiguous
                tl.static_assert(SF_TILE_ROWS % BLOCK_S == 0)
                src, live = _slot_sources(inv_ptr, e, s0 + tl.arange(0, SF_TILE_ROWS), cnt, M, W)
                _gather_sf_tile(s_ptr, ps_ptr, e, s0 // SF_TILE_ROWS, src, live, SF_ROWS, SF_GROUPS, stride_s,
                                SF_MODE == 1, BLOCK_SC)
    else:
        q = pid - n_blocks
        part = ROW // SPLIT
        c_lo = (q % SPLIT) * part
        _scatter_token_row(x_ptr, map_ptr, px_ptr, q // SPLIT, c_lo, c_lo + part, ROW, NUM_ROWS, stride_x, K_TOP, KP,
                           BLOCK, STORE_CACHE, PDL)


@triton.jit
def permute_inverse_kernel(map_ptr, inv_ptr, N, K_TOP, NUM_ROWS, BLOCK: tl.constexpr):
    """inv[map[t, k]] = t for every map entry in [0, NUM_ROWS) (N = W·K_TOP entries): the token of each slot."""
    flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.load(map_ptr + flat, mask=flat < N, other=-1)
    tl.store(inv_ptr + d, flat // K_TOP, mask=(d >= 0) & (d < NUM_ROWS))


# ----------------------------------------------------------------------------- §4 scales -> CUTLASS SF

@triton.jit
def unpack_sf_kernel(w_ptr, counts_ptr, out_ptr, MN, NUM_GROUPS, stride_e, stride_mn, stride_c,
                     HAS_COUNTS: tl.constexpr, BLOCK_G: tl.constexpr, REPEAT: tl.constexpr = True):
    """Packed UE8M0 words [E, MN, C] (any strides) -> CUTLASS SF bytes, written as int32 words.

    REPEAT (1x128 groups): group g of row r (byte g % 4 of word g // 4) becomes 4 equal bytes (one per
    32 K-elements), i.e. one output word; NUM_GROUPS = 4C = KB // 4. Not REPEAT (1x32 groups, one byte per
    32 K-elements already): word g holds the 4 bytes of output word g; NUM_GROUPS = C = KB // 4.
    Rows >= MN (padding to 128) and rows >= counts[e] are zero. out: [E, MN_pad, KB] bytes viewed as int32,
    expert stride MN_pad·KB/4 words.

    One program: a tile of 128 rows x BLOCK_G groups, stored as whole 512-byte SF tiles (`_store_sf_tiles`); each
    input word is loaded once (REPEAT: its 4 bytes spread to 4 groups after the load).
    """
    e = tl.program_id(0)
    rt = tl.program_id(1)
    pid_g = tl.program_id(2)
    r = rt * SF_TILE_ROWS + tl.arange(0, SF_TILE_ROWS)
    live = r < MN
    if HAS_COUNTS:
        live = live & (r < tl.load(counts_ptr + e))
    base = w_ptr + e.to(tl.int64) * stride_e + r[None, :].to(tl.int64) * stride_mn
    if REPEAT:
        wc = pid_g * (BLOCK_G // 4) + tl.arange(0, BLOCK_G // 4)                     # input word columns
        word = tl.load(base + wc[:, None] * stride_c, mask=live[None, :] & (4 * wc < NUM_GROUPS)[:, None], other=0)
        b = (word[:, None, :] >> (tl.arange(0, 4) * 8)[None, :, None]) & 0xFF      # [BLOCK_G // 4, 4, 128]
        rep = tl.reshape(b | (b << 8) | (b << 16) | (b << 24), (BLOCK_G, SF_TILE_ROWS))
    else:
        g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
        rep = tl.load(base + g[:, None] * stride_c, mask=live[None, :] & (g < NUM_GROUPS)[:, None], other=0)
    _store_sf_tiles(out_ptr, e, rt, pid_g * BLOCK_G + tl.arange(0, BLOCK_G), rep, NUM_GROUPS,
                    tl.num_programs(1) * SF_TILE_ROWS)


@triton.jit
def _store_sf_tiles(out_ptr, e, rt, g, v, NUM_GROUPS, MN_PAD):
    """v [BLOCK_G, 128] int32: the SF words of groups g for rows rt·128 + 0..127 (row order) -> out, CUTLASS SF
    bytes [E, MN_PAD, 4·NUM_GROUPS] as int32 words. The 128 words of one (row tile, group) are one contiguous
    512-byte tile, word (r % 32)·4 + (r % 128) // 32 (`_sf_word_offset`): v is transposed in registers
    ([4, 32] -> [32, 4] per group) so that every store is a whole tile in 16-byte vectors. Groups >= NUM_GROUPS
    are skipped."""
    BLOCK_G: tl.constexpr = v.shape[0]
    v = tl.permute(tl.reshape(v, (BLOCK_G, SF_TILE_ROWS // SF_ROW_GROUP, SF_ROW_GROUP)), (0, 2, 1))
    v = tl.reshape(v, (BLOCK_G, SF_TILE_ROWS))
    dst = (e.to(tl.int64) * MN_PAD * NUM_GROUPS + (rt * NUM_GROUPS + g)[:, None].to(tl.int64) * SF_TILE_ROWS
           + tl.arange(0, SF_TILE_ROWS)[None, :])
    tl.store(out_ptr + dst, v, mask=(g < NUM_GROUPS)[:, None])


@triton.jit
def _ue8m0_to_f32(b):
    """UE8M0 exponent bytes (int32 0..255) -> float32 2^(b - 127) (SPEC §2): byte 0 -> 2^-127 (subnormal,
    not the 0 a plain `b << 23` gives), 255 -> NaN, as moe_ref.fp8.ue8m0_decode."""
    bits = tl.where(b == 0, 1 << 22, tl.where(b == 255, 0x7FC00000, b << 23))
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e4m3_operand(x, EXACT: tl.constexpr):
    """An e4m3 GEMM operand as the tensor cores read it. Under the interpreter (EXACT) as float32 with the
    NaN bytes 0x7F / 0xFF made NaN (the interpreter's own fp8 conversion reads them as +-480); on a GPU
    unchanged (the MMA honours e4m3 NaN)."""
    if EXACT:
        bits = x.to(tl.uint8, bitcast=True)
        return tl.where((bits & 0x7F) == 0x7F, float("nan"), x.to(tl.float32))
    return x


@triton.jit
def sf_to_fp32_kernel(sf_ptr, out_ptr, bad_ptr, NUM_ROWS, MN_PAD, NUM_GROUPS, OUT_GROUPS, stride_oe, stride_or,
                      stride_og, ROW_STEP, BLOCK_G: tl.constexpr, CHECK: tl.constexpr):
    """CUTLASS SF bytes (as int32 words, NUM_GROUPS 128-groups per row) -> fp32 out[e, r, g] for g < OUT_GROUPS (any
    strides; MN-major is DeepGEMM's): 2^(byte - 127) of the first byte of each 128-group of source row r·ROW_STEP
    (ROW_STEP 128: the first row of each 128-row block, a 128x128 weight scale).

    byte 0 -> 2^-127 (subnormal), 255 -> NaN, as moe_ref.fp8.ue8m0_decode. CHECK: bad[program] counts groups
    whose 4 bytes disagree (the launcher raises); without it the first byte is taken as stated.
    """
    e = tl.program_id(0)
    rt = tl.program_id(1)
    pid_g = tl.program_id(2)
    r = rt * SF_TILE_ROWS + tl.arange(0, SF_TILE_ROWS)
    g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    ok = (r < NUM_ROWS)[None, :] & (g < OUT_GROUPS)[:, None]
    word = tl.load(sf_ptr + e.to(tl.int64) * MN_PAD * NUM_GROUPS
                   + _sf_word_offset(r[None, :] * ROW_STEP, g[:, None], NUM_GROUPS), mask=ok, other=0)
    b0 = word & 0xFF
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + r[None, :] * stride_or + g[:, None] * stride_og,
             _ue8m0_to_f32(b0), mask=ok)
    if CHECK:
        same = (((word >> 8) & 0xFF) == b0) & (((word >> 16) & 0xFF) == b0) & (((word >> 24) & 0xFF) == b0)
        flat = (e * tl.num_programs(1) + rt) * tl.num_programs(2) + pid_g
        tl.store(bad_ptr + flat, tl.sum(tl.sum((ok & ~same).to(tl.int32), axis=1), axis=0))


@triton.jit
def rows_window_copy_kernel(out_ptr, kept_ptr, counts_ptr, M, N, T, RESTORE: tl.constexpr, BLOCK: tl.constexpr):
    """The window of T rows per expert e starting at min(masked_m[e], M - T) of out [E·M, N]: copied into kept
    [E·T, N] (RESTORE False), or written back from it where the row is >= masked_m[e] (RESTORE True). One program
    per (expert, window row, BLOCK columns); deep_gemm_launch.run_masked keeps what DeepGEMM's whole-tile stores
    overwrite."""
    e = tl.program_id(0)
    j = tl.program_id(1)
    cnt = tl.load(counts_ptr + e)
    row = tl.minimum(cnt, M - T) + j
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    src = out_ptr + (e.to(tl.int64) * M + row) * N + cols
    dst = kept_ptr + (e.to(tl.int64) * T + j) * N + cols
    if RESTORE:
        tl.store(src, tl.load(dst, mask=cols < N), mask=(cols < N) & (row >= cnt))
    else:
        tl.store(dst, tl.load(src, mask=cols < N), mask=cols < N)


# ----------------------------------------------------------------------------- §6 masked grouped GEMM

@triton.jit
def _masked_tile(tile_id, counts, tiles_incl, tiles, m_tiles, E_PAD: tl.constexpr):
    """Tile id -> (expert, m-tile, n-tile, valid rows of that expert). Order: expert, n-tile, m-tile fastest."""
    lanes = tl.arange(0, E_PAD)
    e = tl.sum((tiles_incl <= tile_id).to(tl.int32), axis=0)
    pick = lanes == e
    local = tile_id - tl.sum(tl.where(pick, tiles_incl - tiles, 0), axis=0)
    mt = tl.maximum(tl.sum(tl.where(pick, m_tiles, 0), axis=0), 1)
    cnt = tl.sum(tl.where(pick, counts, 0), axis=0)
    return e, local % mt, local // mt, cnt


@triton.jit
def _tile_table(counts_ptr, E, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
    """Per-expert valid rows, m-tiles, tiles and inclusive prefix of tiles; total tiles. Only valid rows get tiles."""
    lanes = tl.arange(0, E_PAD)
    counts = tl.load(counts_ptr + lanes, mask=lanes < E, other=0)
    m_tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tiles = m_tiles * tl.cdiv(N, BLOCK_N)
    tiles_incl = tl.cumsum(tiles, axis=0)
    return counts, m_tiles, tiles, tiles_incl, tl.sum(tiles, axis=0)


@triton.jit
def _load_k_step(a_ptrs, b_ptrs, k, K, EVEN_K: tl.constexpr):
    """One K step of both GEMM operands (pointer blocks [BLOCK_M | BLOCK_N, BLOCK_K]); k: the step's K indices.
    Columns k >= K read 0 unless EVEN_K (K a multiple of BLOCK_K: no mask)."""
    if EVEN_K:
        a = tl.load(a_ptrs)
        b = tl.load(b_ptrs)
    else:
        k_ok = k < K
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
    return a, b


@triton.jit
def _store_tile(acc, out_ptr, bias_ptr, e, rows, cols, cols_c, cnt, M, N, HAS_BIAS: tl.constexpr,
                EXACT_CAST: tl.constexpr):
    """Epilogue of a masked GEMM tile: acc (+ bias[e, cols]) -> bf16 out[e·M + rows, cols], rows < cnt only."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + e * N + cols_c).to(tl.float32)[None, :]
    out_ptrs = out_ptr + (e.to(tl.int64) * M + rows)[:, None] * N + cols[None, :]
    tl.store(out_ptrs, _to_bf16(acc, EXACT_CAST), mask=(rows < cnt)[:, None] & (cols < N)[None, :])


@triton.jit
def _step_scales(sa_ptr, sb_ptr, e, rows, cols, pid_n, kb,
                 sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk,
                 SCALE_MODE: tl.constexpr, SB_SCALAR: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scales of one 128-wide K step: (sa [BLOCK_M], sb [BLOCK_N]) float32; with SB_SCALAR, (sa·sb, sb) where
    the tile's weight scale is one number (folded into sa; SCALE_MODE 1: the byte of the tile's first row).

    SCALE_MODE 0 (Hopper recipe): sa fp32 logical [E, M, S] with strides (sa_se, sa_sm, sa_sk);
      sb fp32 [E, ceil(N/128), ceil(K/128)] with strides (sb_se, sb_sn, sb_sk), 128x128 blocks.
    SCALE_MODE 1 (CUTLASS UE8M0 bytes read as int32 words): sa_se / sb_se = expert stride in words,
      sa_sk / sb_sk = KB // 4; the first byte of each group's 4 is used (they are equal when the SF
      bytes come from unpack_and_convert_scale; the dot_scaled kernel honours all 4).
    """
    if SCALE_MODE == 0:
        sa = tl.load(sa_ptr + e * sa_se + rows * sa_sm + kb * sa_sk)
        if SB_SCALAR:
            sb = tl.load(sb_ptr + e * sb_se + ((pid_n * BLOCK_N) // 128) * sb_sn + kb * sb_sk)
            sa = sa * sb
        else:
            sb = tl.load(sb_ptr + e * sb_se + (cols // 128) * sb_sn + kb * sb_sk)
    else:
        wa = tl.load(sa_ptr + e.to(tl.int64) * sa_se + _sf_word_offset(rows, kb, sa_sk))
        sa = _ue8m0_to_f32(wa & 0xFF)
        if SB_SCALAR:
            wb = tl.load(sb_ptr + e.to(tl.int64) * sb_se + _sf_word_offset(pid_n * BLOCK_N, kb, sb_sk))
            sb = _ue8m0_to_f32(wb & 0xFF)
            sa = sa * sb
        else:
            wb = tl.load(sb_ptr + e.to(tl.int64) * sb_se + _sf_word_offset(cols, kb, sb_sk))
            sb = _ue8m0_to_f32(wb & 0xFF)
    return sa, sb


@triton.jit
def _k_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, e, pid_m, pid_n, rows_c, cols_c, M, N, K, k_tiles,
            sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk,
            SCALE_MODE: tl.constexpr, SB_SCALAR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr, SCALE_PREFETCH: tl.constexpr,
            LOOP_STAGES: tl.constexpr, EXACT_CAST: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] fp32 = Σ_kb (a_kb · b_kbᵀ) · scales_kb for one output tile (EXACT_CAST: the
    interpreter, see _e4m3_operand)."""
    offs_k = tl.arange(0, BLOCK_K)
    if not USE_TMA:
        a_ptrs = a_ptr + (e.to(tl.int64) * M + rows_c)[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + (e.to(tl.int64) * N + cols_c)[:, None] * K + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if SCALE_PREFETCH:
        sa_next, sb_next = _step_scales(sa_ptr, sb_ptr, e, rows_c, cols_c, pid_n, 0, sa_se, sa_sm, sa_sk,
                                        sb_se, sb_sn, sb_sk, SCALE_MODE, SB_SCALAR, BLOCK_N)
    for kb in tl.range(0, k_tiles, num_stages=LOOP_STAGES):
        if USE_TMA:
            a = a_ptr.load([e * M + pid_m * BLOCK_M, kb * BLOCK_K])
            b = b_ptr.load([e * N + pid_n * BLOCK_N, kb * BLOCK_K])
        else:
            a, b = _load_k_step(a_ptrs, b_ptrs, kb * BLOCK_K + offs_k, K, EVEN_K)
        if SCALE_PREFETCH:
            sa = sa_next
            sb = sb_next
            sa_next, sb_next = _step_scales(sa_ptr, sb_ptr, e, rows_c, cols_c, pid_n,
                                            tl.minimum(kb + 1, k_tiles - 1), sa_se, sa_sm, sa_sk,
                                            sb_se, sb_sn, sb_sk, SCALE_MODE, SB_SCALAR, BLOCK_N)
        else:
            sa, sb = _step_scales(sa_ptr, sb_ptr, e, rows_c, cols_c, pid_n, kb, sa_se, sa_sm, sa_sk,
                                  sb_se, sb_sn, sb_sk, SCALE_MODE, SB_SCALAR, BLOCK_N)
        d = tl.dot(_e4m3_operand(a, EXACT_CAST), tl.trans(_e4m3_operand(b, EXACT_CAST)))
        if SB_SCALAR:
            acc += d * sa[:, None]                     # one FMA per element
        else:
            acc += d * (sa[:, None] * sb[None, :])
        if not USE_TMA:
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    return acc


@triton.jit
def group_gemm_masked_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, counts_ptr, out_ptr, bias_ptr,
                             E, M, N, K,
                             sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk,
                             SCALE_MODE: tl.constexpr, HAS_BIAS: tl.constexpr, E_PAD: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             EVEN_K: tl.constexpr, USE_TMA: tl.constexpr,
                             SB_SCALAR: tl.constexpr, SCALE_PREFETCH: tl.constexpr, LOOP_STAGES: tl.constexpr,
                             EXACT_CAST: tl.constexpr):
    """Masked grouped GEMM with explicit per-128 scales (SPEC §6), fp32 accumulation.

    a [E·M, K] e4m3, b [E, N, K] e4m3 (both K-contiguous; with USE_TMA, host tensor descriptors of
    a [E·M, K] and b viewed [E·N, K]), out [E·M, N] bf16 written for rows < counts[e] only.
    Tiles exist only for valid rows (a table built from counts in every program), so the time follows
    the valid rows; a program walks tiles pid, pid + nprog, ... (the launcher's grid: one tile per
    program, or a persistent grid). Each 128-wide K step: acc += (a·bᵀ) · sa ⊗ sb.
    The scale loads are not operands of the dot, so Triton's pipeliner leaves them in the loop and
    every step waits for them (ncu: L1TEX scoreboard stalls); SCALE_PREFETCH loads the next step's
    scales one iteration ahead, LOOP_STAGES asks the pipeliner (tl.range num_stages) to pipeline them.
    SB_SCALAR (BLOCK_N dividing 128): the tile lies in one 128x128 weight block, one weight scale per
    K step, so the promotion is one FMA per element, acc += d · (sa·sb), instead of two. SCALE_MODE 0
    always (128x128 FP32 weight scales). SCALE_MODE 1 has per-row weight bytes (SPEC §6 allows any):
    SB_SCALAR is set when the caller states that the bytes are constant over every 128-row block
    (`sfb_per_block`, known when the weights are quantized 128x128; then the tile reads its first row's
    byte); else the per-row, two-multiply promotion. Deciding inside the kernel broke or slowed Triton
    3.6's SM90 pipeliner (benchmarks/NOTES_gpu.md, runs 4-5); a constexpr keeps one K loop.
    """
    gl_counts, m_tiles, tiles, tiles_incl, total = _tile_table(counts_ptr, E, N, BLOCK_M, BLOCK_N, E_PAD)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in range(pid, total, nprog):
        e, pid_m, pid_n, cnt = _masked_tile(tile_id, gl_counts, tiles_incl, tiles, m_tiles, E_PAD)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_c = tl.minimum(rows, cnt - 1)             # rows past the count re-read a valid row: no load mask
        cols_c = tl.minimum(cols, N - 1)
        acc = _k_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, e, pid_m, pid_n, rows_c, cols_c, M, N, K, k_tiles,
                      sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, SCALE_MODE, SB_SCALAR, BLOCK_M, BLOCK_N,
                      BLOCK_K, EVEN_K, USE_TMA, SCALE_PREFETCH, LOOP_STAGES, EXACT_CAST)
        _store_tile(acc, out_ptr, bias_ptr, e, rows, cols, cols_c, cnt, M, N, HAS_BIAS, EXACT_CAST)


@triton.jit
def group_gemm_masked_dot_scaled_kernel(a_ptr, b_ptr, sfa_ptr, sfb_ptr, counts_ptr, out_ptr, bias_ptr,
                                        E, M, N, K, sfa_se, sfa_cols, sfb_se, sfb_cols,
                                        HAS_BIAS: tl.constexpr, E_PAD: tl.constexpr,
                                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                        EVEN_K: tl.constexpr, EMULATE: tl.constexpr,
                                        EXACT_CAST: tl.constexpr):
    """Masked grouped GEMM on `tl.dot_scaled`: e4m3 operands with one UE8M0 byte per 32 K-elements.

    sfa / sfb: CUTLASS SF bytes (uint8), expert strides sfa_se / sfb_se bytes, KB columns sfa_cols / sfb_cols.
    Native on SM100 (tcgen05 block-scaled MMA); on SM90 Triton decomposes it (upcast to bf16 times the
    scale, bf16 MMA). EMULATE=True does that decomposition by hand (the Triton 3.6 interpreter has no
    dot_scaled), so the interpreter still checks the indexing.
    """
    gl_counts, m_tiles, tiles, tiles_incl, total = _tile_table(counts_ptr, E, N, BLOCK_M, BLOCK_N, E_PAD)
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    offs_k = tl.arange(0, BLOCK_K)
    SK: tl.constexpr = BLOCK_K // SF_VEC_SIZE
    offs_s = tl.arange(0, SK)
    for tile_id in range(pid, total, nprog):
        e, pid_m, pid_n, cnt = _masked_tile(tile_id, gl_counts, tiles_incl, tiles, m_tiles, E_PAD)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows_c = tl.minimum(rows, cnt - 1)
        cols_c = tl.minimum(cols, N - 1)
        a_ptrs = a_ptr + (e.to(tl.int64) * M + rows_c)[:, None] * K + offs_k[None, :]
        b_ptrs = b_ptr + (e.to(tl.int64) * N + cols_c)[:, None] * K + offs_k[None, :]
        sfa_base = sfa_ptr + e.to(tl.int64) * sfa_se
        sfb_base = sfb_ptr + e.to(tl.int64) * sfb_se
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, BLOCK_K)):
            a, b = _load_k_step(a_ptrs, b_ptrs, kb * BLOCK_K + offs_k, K, EVEN_K)
            kcol = kb * SK + offs_s
            sa = tl.load(sfa_base + _sf_byte_offset(rows_c[:, None], kcol[None, :], sfa_cols))     # [BM, SK] uint8
            sb = tl.load(sfb_base + _sf_byte_offset(cols_c[:, None], kcol[None, :], sfb_cols))     # [BN, SK]
            if EMULATE:
                fa = _ue8m0_to_f32(sa.to(tl.int32))
                fb = _ue8m0_to_f32(sb.to(tl.int32))
                fa = tl.reshape(tl.broadcast_to(fa[:, :, None], (BLOCK_M, SK, SF_VEC_SIZE)), (BLOCK_M, BLOCK_K))
                fb = tl.reshape(tl.broadcast_to(fb[:, :, None], (BLOCK_N, SK, SF_VEC_SIZE)), (BLOCK_N, BLOCK_K))
                acc += tl.dot(_e4m3_operand(a, True) * fa, tl.trans(_e4m3_operand(b, True) * fb))
            else:
                acc = tl.dot_scaled(a, sa, "e4m3", tl.trans(b), sb, "e4m3", acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        _store_tile(acc, out_ptr, bias_ptr, e, rows, cols, cols_c, cnt, M, N, HAS_BIAS, EXACT_CAST)


# ----------------------------------------------------------------------------- §7 SwiGLU + quant

@triton.jit
def _swiglu_bf16(gate, lin, EXACT_CAST: tl.constexpr):
    """y = bf16(lin · gate / (1 + exp(-gate))) as float32, from float32 gate / lin (SPEC §7). The one home of
    this formula: the SwiGLU kernel and both fused GEMM epilogues (tl, Gluon) call it, so they round alike."""
    # '/' is the fast (<= 2 ulp) division on a GPU; y is rounded to bf16 next, which hides that
    # except in rare ties (the interpreter divides exactly). The exponential is approximate on a GPU too.
    if EXACT_CAST:
        den = 1.0 + tl.exp(-gate)
    else:
        den = 1.0 + _exp_ftz(gate)
    y = (lin * gate) / den
    return _to_bf16(y, EXACT_CAST).to(tl.float32)


@triton.jit
def _exp_ftz(gate):
    """exp(-gate) on a GPU as tl.exp computes it (x · log2(e) rounded to float32, then ex2.approx), with the
    flush-to-zero ex2: one MUFU.EX2 instead of tl.exp's compare, two multiplies and MUFU (its rescaling only
    changes results below 2^-126, which 1 + exp(-gate) rounds away: 1.0 either way). The SwiGLU kernel is
    issue-bound on an H200 (about 40 instructions per element), so these count."""
    return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [gate * -1.4426950408889634],
                                     dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _count_nonfinite(y, ok):
    """Number of NaN / inf elements of the 2-D y where ok (int32 scalar)."""
    bad = ok & ((y != y) | (tl.abs(y) == float("inf")))
    return tl.sum(tl.sum(bad.to(tl.int32), axis=1), axis=0)


@triton.jit
def swiglu_quant_kernel(up_ptr, counts_ptr, q_ptr, s_ptr, bad_ptr, M, I, S_COLS, M_PAD, stride_ue, stride_um,
                        amax_floor, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, UE8M0: tl.constexpr,
                        COUNT_BAD: tl.constexpr, EXACT_CAST: tl.constexpr):
    """up [E, M, 2I] -> q [E, M, I] uint8 (e4m3 bits), s physical [E, S_COLS, M_PAD] (MN-major).

    One program: BLOCK_R rows x 4 groups (one packed word). y = bf16(lin · gate / (1 + exp(-gate)))
    in float32 (fast division and exp on a GPU: see below); rows >= counts[e] are written as zeros
    (q and s) without reading up. COUNT_BAD: bad[program] = number of NaN / inf y in its valid rows.
    """
    e = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_w = tl.program_id(2)
    cnt = tl.load(counts_ptr + e)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_w * (4 * GROUP) + tl.arange(0, 4 * GROUP)
    live = rows < cnt
    in_m = rows < M
    ld = live[:, None] & (cols < I)[None, :]
    base = up_ptr + e.to(tl.int64) * stride_ue + rows[:, None].to(tl.int64) * stride_um + cols[None, :]
    gate = tl.load(base, mask=ld, other=0.0).to(tl.float32)
    lin = tl.load(base + I, mask=ld, other=0.0).to(tl.float32)
    y = _swiglu_bf16(gate, lin, EXACT_CAST)
    if COUNT_BAD:      # SPEC §1: the launcher raises when a valid row's y is NaN or inf
        flat = (e * tl.num_programs(1) + pid_r) * tl.num_programs(2) + pid_w
        tl.store(bad_ptr + flat, _count_nonfinite(y, ld))
    y3 = tl.reshape(y, (BLOCK_R, 4, GROUP))
    amax = tl.maximum(tl.max(tl.abs(y3), axis=2), amax_floor)
    s, ex = _scale_from_amax(amax, UE8M0)
    q = _to_e4m3_bytes(_divide_by_scale(y3, s[:, :, None], UE8M0, EXACT_CAST), EXACT_CAST)
    q = tl.reshape(q, (BLOCK_R, 4 * GROUP))
    q = tl.where(live[:, None], q, tl.zeros_like(q))
    tl.store(q_ptr + (e.to(tl.int64) * M + rows)[:, None] * I + cols[None, :], q,
             mask=in_m[:, None] & (cols < I)[None, :])
    g = pid_w * 4 + tl.arange(0, 4)
    s_base = s_ptr + e.to(tl.int64) * S_COLS * M_PAD
    if UE8M0:
        ex = tl.where(live[:, None] & (g < tl.cdiv(I, GROUP))[None, :], ex, 0)
        word = tl.sum(ex << (tl.arange(0, 4) * 8)[None, :], axis=1)
        tl.store(s_base + pid_w * M_PAD + rows, word, mask=in_m)
    else:
        s = tl.where(live[:, None], s, 0.0)
        tl.store(s_base + g[None, :] * M_PAD + rows[:, None], s, mask=in_m[:, None] & (g < S_COLS)[None, :])


# ----------------------------------------------------------------------------- §6 + §7 fused: GEMM 1 + SwiGLU + quant

@triton.jit
def _quantize_rows(gate, lin, amax_floor, UE8M0: tl.constexpr, EXACT_CAST: tl.constexpr):
    """GEMM 1's fp32 gate / lin blocks [R, 128] (one quant group per row) -> (y, q bytes, scale [R], UE8M0 byte [R]):
    rounded to bf16 where the unfused GEMM stores `up`, SwiGLU, 1x128 quant as swiglu_quant_kernel."""
    gate = _to_bf16(gate, EXACT_CAST).to(tl.float32)
    lin = _to_bf16(lin, EXACT_CAST).to(tl.float32)
    y = _swiglu_bf16(gate, lin, EXACT_CAST)
    amax = tl.maximum(tl.max(tl.abs(y), axis=1), amax_floor)
    s, ex = _scale_from_amax(amax, UE8M0)
    q = _to_e4m3_bytes(_divide_by_scale(y, s[:, None], UE8M0, EXACT_CAST), EXACT_CAST)
    return y, q, s, ex


@triton.jit
def _store_act_scale(s_ptr, e, rows, live, g, s, ex, S_GROUPS, SF_GROUPS, M_PAD, UE8M0: tl.constexpr):
    """The scales of quant group g of `rows` (live only), where GEMM 2 reads them. UE8M0: CUTLASS SF bytes as int32
    words [E, MN_pad, 4·SF_GROUPS bytes] (the byte 4 times, as unpack_and_convert_scale; the group that ends a row
    also writes the zero words of the pad groups S_GROUPS..SF_GROUPS-1); FP32: physical MN-major [E, S, M_PAD]."""
    if UE8M0:
        base = s_ptr + e.to(tl.int64) * M_PAD * SF_GROUPS
        tl.store(base + _sf_word_offset(rows, g, SF_GROUPS), ex | (ex << 8) | (ex << 16) | (ex << 24), mask=live)
        if g == S_GROUPS - 1:
            for gp in range(S_GROUPS, SF_GROUPS):
                tl.store(base + _sf_word_offset(rows, gp, SF_GROUPS), ex & 0, mask=live)
    else:
        tl.store(s_ptr + (e.to(tl.int64) * S_GROUPS + g) * M_PAD + rows, s, mask=live)


@triton.jit
def group_gemm_masked_swiglu_quant_kernel(a_ptr, b_ptr, sa_ptr, sb_ptr, counts_ptr, q_ptr, s_ptr, bad_ptr,
                                          E, M, I, K, sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk,
                                          S_GROUPS, SF_GROUPS, M_PAD, amax_floor,
                                          SCALE_MODE: tl.constexpr, SB_SCALAR: tl.constexpr, E_PAD: tl.constexpr,
                                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                                          USE_TMA: tl.constexpr, COUNT_BAD: tl.constexpr,
                                          EXACT_CAST: tl.constexpr):
    """GEMM 1 of the ht layer with SwiGLU + 1x128 FP8 quant in its epilogue (SPEC §6, §7), masked rows only.

    a [E·M, H] e4m3, b = w_up [E, 2I, H] e4m3 (rows 0..I-1 gate, I..2I-1 up; with USE_TMA descriptors of a and of
    b viewed [E·2I, H], box [128, 128]); scales as group_gemm_masked_kernel (SCALE_MODE 0 fp32 / 1 CUTLASS words).
    A tile is BLOCK_M rows x one 128-wide quant group g of the output: the gate block (w_up rows 128g..) and the
    up block (rows I + 128g..) are two passes of the same K loop (_k_loop), bit for bit the unfused GEMM's
    accumulators; the epilogue is `_quantize_rows`. Writes q [E, M, I] bytes and the scales
    (`_store_act_scale`: UE8M0 bytes with SCALE_MODE 1, fp32 with 0) for rows < counts[e]; rows past are not
    touched. COUNT_BAD: bad[program] = NaN / inf values of y in its valid rows.
    """
    gl_counts, m_tiles, tiles, tiles_incl, total = _tile_table(counts_ptr, E, I, BLOCK_M, 128, E_PAD)
    pid = tl.program_id(0)
    k_tiles = tl.cdiv(K, BLOCK_K)
    n_bad = 0
    for tile_id in range(pid, total, tl.num_programs(0)):
        e, pid_m, g, cnt = _masked_tile(tile_id, gl_counts, tiles_incl, tiles, m_tiles, E_PAD)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = g * 128 + tl.arange(0, 128)
        rows_c = tl.minimum(rows, cnt - 1)
        acc_g = _k_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, e, pid_m, g, rows_c, cols, M, 2 * I, K, k_tiles, sa_se, sa_sm,
                        sa_sk, sb_se, sb_sn, sb_sk, SCALE_MODE, SB_SCALAR, BLOCK_M, 128, BLOCK_K, EVEN_K, USE_TMA,
                        False, None, EXACT_CAST)
        acc_u = _k_loop(a_ptr, b_ptr, sa_ptr, sb_ptr, e, pid_m, g + I // 128, rows_c, cols + I, M, 2 * I, K, k_tiles,
                        sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, SCALE_MODE, SB_SCALAR, BLOCK_M, 128, BLOCK_K, EVEN_K,
                        USE_TMA, False, None, EXACT_CAST)
        y, q, s, ex = _quantize_rows(acc_g, acc_u, amax_floor, SCALE_MODE == 1, EXACT_CAST)
        live = rows < cnt
        if COUNT_BAD:
            n_bad += _count_nonfinite(y, live[:, None])
        tl.store(q_ptr + (e.to(tl.int64) * M + rows)[:, None] * I + cols[None, :], q, mask=live[:, None])
        _store_act_scale(s_ptr, e, rows, live, g, s, ex, S_GROUPS, SF_GROUPS, M_PAD, SCALE_MODE == 1)
    if COUNT_BAD:
        tl.store(bad_ptr + pid, n_bad)


# ----------------------------------------------------------------------------- §8 depermute + combine

@triton.jit
def combine_kernel(ffn_ptr, map_ptr, w_ptr, out_ptr, H, stride_map, stride_w,
                   K_TOP: tl.constexpr, BLOCK_H: tl.constexpr, EXACT_CAST: tl.constexpr):
    """out [W, H] bf16 = Σ_k w[t, k] · ffn[map[t, k]] over map >= 0, float32, k ascending; ffn [E·M, H]."""
    t = tl.program_id(0)
    pid_h = tl.program_id(1)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(K_TOP):
        d = tl.load(map_ptr + t.to(tl.int64) * stride_map + k).to(tl.int64)
        if d >= 0:
            wk = tl.load(w_ptr + t.to(tl.int64) * stride_w + k)
            row = tl.load(ffn_ptr + d * H + cols, mask=cols < H, other=0.0).to(tl.float32)
            acc += wk * row
    tl.store(out_ptr + t.to(tl.int64) * H + cols, _to_bf16(acc, EXACT_CAST), mask=cols < H)


# ----------------------------------------------------------------------------- §9 expert-parallel exchange
# Launched by ep_exchange.py. A dispatch row is int32 words [x (H/4) | scale (SW) | ids int64 as (lo, hi) words
# (2·K) | weights fp32 (K) | pad to ROW_W]; the rank of expert id g is g // E_LOCAL.

@triton.jit
def ep_index_kernel(ids_ptr, map_ptr, counts_ptr, ret_ptr, T, K_TOP, E_LOCAL, CHUNK, NK, stride_ids,
                    R: tl.constexpr, R_PAD: tl.constexpr, KP: tl.constexpr, BLOCK_T: tl.constexpr, LL: tl.constexpr):
    """The whole index step in one program (token blocks in order, a running count per rank):
    map [T, R] int32 = r·CHUNK + slot where token t has >= 1 expert id on rank r (id >= 0, id // E_LOCAL == r < R;
    slot = earlier tokens sent to r), else -1; counts [R] int32 = tokens sent to each rank. With LL also
    ret [T, K_TOP] int32 = q·NK + slot(t on q)·K_TOP + k for an id on rank q = id // E_LOCAL < R, else -1: the row
    of entry (t, k) in the ll combine's receive buffer (NK rows per rank, the received rows' order times K_TOP)."""
    r = tl.arange(0, R_PAD)
    k = tl.arange(0, KP)
    carry = tl.zeros((R_PAD,), dtype=tl.int32)
    for start in range(0, T, BLOCK_T):
        t = start + tl.arange(0, BLOCK_T)
        live = t < T
        ok = live[:, None] & (k < K_TOP)[None, :]
        ids = tl.load(ids_ptr + t[:, None].to(tl.int64) * stride_ids + k[None, :], mask=ok, other=-1).to(tl.int64)
        rank = tl.where(ids >= 0, ids // E_LOCAL, -1)
        rank = tl.where(rank < R, rank, -1)                                              # [BLOCK_T, KP]
        hit = tl.max((rank[:, :, None] == r[None, None, :]).to(tl.int32), axis=1)      # [BLOCK_T, R_PAD]
        slot = carry[None, :] + tl.cumsum(hit, axis=0) - hit
        tl.store(map_ptr + t[:, None].to(tl.int64) * R + r[None, :], tl.where(hit > 0, r[None, :] * CHUNK + slot, -1),
                 mask=live[:, None] & (r < R)[None, :])
        carry += tl.sum(hit, axis=0)
        if LL:
            sl = tl.sum(tl.where(rank[:, :, None] == r[None, None, :], slot[:, None, :], 0), axis=2)   # [BLOCK_T, KP]
            row = rank * NK + sl.to(tl.int64) * K_TOP + k[None, :]
            tl.store(ret_ptr + t[:, None].to(tl.int64) * K_TOP + k[None, :], tl.where(rank >= 0, row, -1), mask=ok)
    tl.store(counts_ptr + r, carry, mask=r < R)


@triton.jit
def ep_pack_kernel(x_ptr, s_ptr, ids_ptr, w_ptr, map_ptr, counts_ptr, pos_ptr, send_ptr, T, XW, SW, K_TOP, ROW_W,
                   CHUNK, stride_x, stride_s, stride_i, stride_w, R: tl.constexpr, R_PAD: tl.constexpr,
                   KP2: tl.constexpr, EXACT: tl.constexpr, BLOCK: tl.constexpr):
    """Program i < T: token i's row of words, once to each rank r with map[i, r] = r·CHUNK + slot >= 0, at send row
    r·CHUNK + slot (fixed chunks of CHUNK rows), or with EXACT at pos[i, r] = Σ_{q<r} counts[q] + slot (chunks back
    to back; column block 0 writes pos, -1 where the token does not go). Fixed chunks: program i < CHUNK (column
    block 0) also marks row r·CHUNK + i as padding when i >= counts[r]: its id words -1, so that the receiver tells
    padding from tokens without the counts (a real row has >= 1 id on its rank)."""
    i = tl.program_id(0)
    t = i.to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    o_i = XW + SW
    if i < T:
        o_w = o_i + 2 * K_TOP
        in_x, in_s = c < XW, (c >= XW) & (c < o_i)
        in_i, in_w = (c >= o_i) & (c < o_w), (c >= o_w) & (c < o_w + K_TOP)
        v = tl.load(x_ptr + t * stride_x + c, mask=in_x, other=0)
        v = tl.where(in_s, tl.load(s_ptr + t * stride_s + (c - XW), mask=in_s, other=0), v)
        v = tl.where(in_i, tl.load(ids_ptr + t * stride_i + (c - o_i), mask=in_i, other=0), v)
        v = tl.where(in_w, tl.load(w_ptr + t * stride_w + (c - o_w), mask=in_w, other=0), v)
        q = tl.arange(0, R_PAD)
        for r in tl.static_range(R):
            d = tl.load(map_ptr + t * R + r)
            p = d
            if EXACT:
                base = tl.sum(tl.load(counts_ptr + q, mask=q < r, other=0), axis=0)
                p = tl.where(d >= 0, d - r * CHUNK + base, -1)
                if tl.program_id(1) == 0:
                    tl.store(pos_ptr + t * R + r, p)
            if p >= 0:
                tl.store(send_ptr + p.to(tl.int64) * ROW_W + c, v, mask=c < ROW_W)
    if not EXACT:
        if tl.program_id(1) == 0:
            w = tl.arange(0, KP2)
            for r in tl.static_range(R):
                if i >= tl.load(counts_ptr + r):
                    tl.store(send_ptr + (r * CHUNK + t) * ROW_W + o_i + w, tl.full((KP2,), -1, tl.int32),
                             mask=w < 2 * K_TOP)


@triton.jit
def ep_unpack_kernel(recv_ptr, cnt_ptr, x_ptr, s_ptr, ids_ptr, w_ptr, XW, SW, K_TOP, ROW_W, E_LOCAL, ME,
                     R, EXACT: tl.constexpr, R_PAD: tl.constexpr, KP: tl.constexpr, BLOCK: tl.constexpr):
    """Received row j -> x [W, XW], scale [W, SW] words, local ids [W, K_TOP] int64 (id - ME·E_LOCAL for ids on
    rank ME, else -1), weights [W, K_TOP] fp32. Row j is real when it holds >= 1 id on rank ME (fixed chunks: the
    sender marked its padding rows with ids -1) or, with EXACT, when j < Σ_s cnt[s, ME] (cnt [R, R] int32:
    cnt[s, r] = tokens source s sends to rank r); other rows come out as padding: zeros, ids -1, weights 0."""
    j = tl.program_id(0).to(tl.int64)
    row = recv_ptr + j * ROW_W
    k = tl.arange(0, KP)
    lo = tl.load(row + XW + SW + 2 * k, mask=k < K_TOP, other=-1)
    hi = tl.load(row + XW + SW + 2 * k + 1, mask=k < K_TOP, other=-1).to(tl.int64)
    gid = (hi << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)                     # lo word zero-extended
    mine = (k < K_TOP) & (gid >= ME * E_LOCAL) & (gid < (ME + 1) * E_LOCAL)
    if EXACT:
        s = tl.arange(0, R_PAD)
        valid = j < tl.sum(tl.load(cnt_ptr + s * R + ME, mask=s < R, other=0), axis=0)
    else:
        valid = tl.max(mine.to(tl.int32), axis=0) > 0
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(row + c, mask=(c < XW + SW) & valid, other=0)
    tl.store(x_ptr + j * XW + c, v, mask=c < XW)
    tl.store(s_ptr + j * SW + (c - XW), v, mask=(c >= XW) & (c < XW + SW))
    if tl.program_id(1) == 0:
        live = (k < K_TOP) & valid
        tl.store(ids_ptr + j * K_TOP + k, tl.where(mine & valid, gid - ME * E_LOCAL, -1), mask=k < K_TOP)
        wv = tl.load(row + XW + SW + 2 * K_TOP + k, mask=live, other=0).to(tl.float32, bitcast=True)
        tl.store(w_ptr + j * K_TOP + k, tl.where(live, wv, 0.0), mask=k < K_TOP)
