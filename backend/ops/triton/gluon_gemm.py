"""Warp-specialized masked grouped FP8 GEMM for Hopper (SM90), written in Gluon (issue 11).

The same contract and numerics as launch.group_gemm_masked / group_gemm_masked_fp32 (SPEC §6): torch
tensors in, `out` written for rows < masked_m[e] only, fp32 accumulation promoted every 128 K
(`acc += (a_kb · b_kbᵀ) · sa ⊗ sb`, DeepGEMM's recipe), CUTLASS UE8M0 bytes decoded in the kernel or
FP32 1x128 / 128x128 scales. The `tl` kernel (kernels.group_gemm_masked_kernel) stays its CPU-testable
twin: Gluon has no interpreter, so this module runs on an SM90 GPU only.

Why Gluon: the tl kernel promotes in the warpgroup that issues the wgmma, so the tensor core idles
during every promotion (benchmarks/NOTES_gpu.md). Here one CTA per SM runs three partitions:

    producer (1 warp)       TMA loads of the A and B tiles of each 128-wide K step into a ring of
                            STAGES shared-memory slots (mbarriers `ready` / `empty`), and of the step's
                            FP32 A scales when they are MN-major (SA_SMEM, as DeepGEMM)
    math warpgroup 0, 1     each: wgmma of its 64 x BN sub-tile for one K step, wait, release the slot,
                            promote into its fp32 accumulator while the other warpgroup's wgmma runs

The CTA tile is 128 x BN (SPLIT_N=False: the warpgroups take rows 0-63 and 64-127, sharing B) or
64 x 2BN (SPLIT_N=True, for few rows per expert: they take column halves, sharing A). The grid is
persistent (one CTA per SM); every partition walks the same tiles pid, pid + grid, ... of a tile
list built on the device from masked_m (expert, n-tile, m-tile fastest, as the tl kernel), so there
is no host synchronization and the call is CUDA-graph safe. Rows past masked_m get no tile beyond
the last partial one and are never stored.
"""
from __future__ import annotations

import functools

import torch

from . import fast_launch

try:        # Gluon ships with Triton >= 3.5; the module imports without it (CI), available() says so
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    _IMPORT_ERROR = None
except ImportError as exc:       # pragma: no cover - depends on the installed Triton
    _IMPORT_ERROR = exc

BLOCK_K = 128                    # one promotion per 128 K (the scale granularity)
WG_ROWS = 64                     # rows of one warpgroup's wgmma tile (m64nNk32)
SMEM_BYTES = 220 * 1024          # H100/H200: 227 KB of shared memory per CTA, some kept for barriers
SMEM_LIMIT = 226 * 1024          # the most this kernel may ask for (barriers take < 1 KB)


def unavailable_reason() -> str | None:
    """None when this process can run the kernel (Gluon importable, a CUDA device of compute capability 9.x)."""
    if _IMPORT_ERROR is not None:
        return f"triton.experimental.gluon not importable: {_IMPORT_ERROR!r}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = _capability(torch.cuda.current_device())
    if cap[0] != 9:
        return f"needs an SM90 (Hopper) GPU, this one is sm_{cap[0]}{cap[1]}"
    return None


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple:
    return torch.cuda.get_device_capability(device_index)


def available() -> bool:
    return unavailable_reason() is None


if _IMPORT_ERROR is None:
    WG_ROWS_C = gl.constexpr(WG_ROWS)
    BLOCK_K_C = gl.constexpr(BLOCK_K)
    from .kernels import SF_ROW_GROUP, SF_TILE_BYTES, SF_TILE_COLS, SF_TILE_ROWS   # the tl kernels' constexprs
    from . import kernels as tlk        # elementwise tl helpers (the fused epilogue) compile inside Gluon too

    @gluon.jit
    def _sf_word_offset(r, g, num_groups):
        """Word offset of the 4 CUTLASS SF bytes of row r, 128-wide K group g (cutlass_sf.sf_byte_offset of
        (r, 4g) / 4: the group's 4 bytes are one int32 word); num_groups = KB // 4."""
        tile = (r // SF_TILE_ROWS) * num_groups + g
        return (tile * SF_TILE_BYTES + (r % SF_ROW_GROUP) * (SF_TILE_COLS * (SF_TILE_ROWS // SF_ROW_GROUP))
                + ((r % SF_TILE_ROWS) // SF_ROW_GROUP) * SF_TILE_COLS) // SF_TILE_COLS

    @gluon.jit
    def _sa_buffers(sa_desc, count: gl.constexpr, placeholder, SA_SMEM: gl.constexpr):
        """SA_SMEM: `count` shared-memory slots of sa_desc's box (a stage's A scales each), else `placeholder`
        (the kernel never reads it)."""
        if SA_SMEM:
            return gl.allocate_shared_memory(gl.float32, [count] + sa_desc.block_type.shape, sa_desc.layout)
        else:
            return placeholder

    @gluon.jit
    def _total_tiles(counts_ptr, E, N_TILES, BM: gl.constexpr):
        total = 0
        for e in range(E):
            total += gl.cdiv(gl.load(counts_ptr + e), BM) * N_TILES
        return total

    @gluon.jit
    def _advance(t, e, base, tiles_e, counts_ptr, N_TILES, BM: gl.constexpr):
        """Move (expert e, its first tile id base, its tile count) forward until tile t lies in expert e."""
        while t >= base + tiles_e:
            base += tiles_e
            e += 1
            tiles_e = gl.cdiv(gl.load(counts_ptr + e), BM) * N_TILES
        return e, base, tiles_e

    @gluon.jit
    def _tile_mn(local, m_tiles, n_tiles, M_FAST: gl.constexpr):
        """An expert's tile number -> (m-tile, n-tile); M_FAST: m-tiles of one n-tile are consecutive (the CTAs
        working at once share B tiles, as the tl kernel orders them), else n-tiles of one m-tile (share A)."""
        if M_FAST:
            return local % m_tiles, local // m_tiles
        else:
            return local // n_tiles, local % n_tiles

    @gluon.jit
    def _first_tile(counts_ptr, E, n_tiles, BM: gl.constexpr):
        """The persistent tile walk's start: (total tiles, expert 0, its first tile id 0, its tile count)."""
        return _total_tiles(counts_ptr, E, n_tiles, BM), 0, 0, gl.cdiv(gl.load(counts_ptr), BM) * n_tiles

    @gluon.jit
    def _next_tile(t, e, base, tiles_e, counts_ptr, n_tiles, BM: gl.constexpr, M_FAST: gl.constexpr):
        """Tile t of the walk -> (e, base, tiles_e) moved on to its expert, and its (m-tile, n-tile)."""
        e, base, tiles_e = _advance(t, e, base, tiles_e, counts_ptr, n_tiles, BM)
        mt, nt = _tile_mn(t - base, tiles_e // n_tiles, n_tiles, M_FAST)
        return e, base, tiles_e, mt, nt

    @gluon.jit
    def _producer(p, STAGES: gl.constexpr, BN: gl.constexpr, NA: gl.constexpr, NB: gl.constexpr, BM: gl.constexpr,
                  UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr, DIAG: gl.constexpr, TMA_STORE: gl.constexpr,
                  M_FAST: gl.constexpr, KG: gl.constexpr, PAIR: gl.constexpr = False, SA_SMEM: gl.constexpr = False):
        """TMA loads: for each tile and stage of KG 128-wide K steps, A rows [BM, 128] (NA boxes of 64 rows) and
        B rows [BN_CTA, 128] (NB boxes of BN rows) per step into slot it % STAGES once both math warpgroups freed it.
        PAIR (NB = 2): box j is B rows j·N/2 + nt·BN .. (the gate and the up block of the same output columns).
        SA_SMEM (FP32 MN-major sa): also the step's A scales, NA boxes of 64 fp32 (p[-2], the tuple's last but one: a
        1-D descriptor over sa's storage, flat index e·sa_se + step·sa_sk + row), into p[-1] beside A: the math
        warpgroups read them from shared memory (DeepGEMM's way) instead of global loads."""
        a_desc, b_desc, a_bufs, b_bufs, ready, empty = p[0], p[1], p[2], p[3], p[4], p[5]
        counts_ptr, E, M, N, K = p[6], p[7], p[8], p[9], p[10]
        n_tiles = gl.cdiv(N, NB * BN)
        k_stages = gl.cdiv(K, BLOCK_K_C * KG)
        total, e, base, tiles_e = _first_tile(counts_ptr, E, n_tiles, BM)
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            e, base, tiles_e, mt, nt = _next_tile(t, e, base, tiles_e, counts_ptr, n_tiles, BM, M_FAST)
            row0 = e * M + mt * BM
            if PAIR:
                col0 = e * N + nt * BN
                box = N // 2
            else:
                col0 = e * N + nt * (NB * BN)
                box = BN
            for kb in range(k_stages):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                if SA_SMEM:
                    mbarrier.expect(ready.index(s), KG * (NA * (a_desc.block_type.nbytes + p[-2].block_type.nbytes)
                                                          + NB * b_desc.block_type.nbytes))
                else:
                    mbarrier.expect(ready.index(s), KG * (NA * a_desc.block_type.nbytes + NB * b_desc.block_type.nbytes))
                for g in gl.static_range(KG):
                    k0 = (kb * KG + g) * BLOCK_K_C
                    for i in gl.static_range(NA):
                        tma.async_copy_global_to_shared(a_desc, [row0 + i * WG_ROWS_C, k0], ready.index(s),
                                                        a_bufs.index((s * KG + g) * NA + i))
                        if SA_SMEM:
                            tma.async_copy_global_to_shared(
                                p[-2], [e * p[15] + (kb * KG + g) * p[17] + mt * BM + i * WG_ROWS_C], ready.index(s),
                                p[-1].index((s * KG + g) * NA + i))
                    for j in gl.static_range(NB):
                        tma.async_copy_global_to_shared(b_desc, [col0 + j * box, k0], ready.index(s),
                                                        b_bufs.index((s * KG + g) * NB + j))
                it += 1

    @gluon.jit
    def _scale_pointers(sa_ptr, sb_ptr, e, rows_c, col_c, sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk,
                        UE8M0: gl.constexpr):
        """Where the K step 0 scales of a sub-tile are, and how far one K step moves them: (sa pointers [64],
        sb pointer, sa step, sb step). FP32: sa logical [E, M, S] (any strides), sb [E, ceil(N/128), S].
        UE8M0: CUTLASS SF bytes read as int32 words (expert strides sa_se / sb_se words, sa_sk / sb_sk = KB // 4
        groups): group g of row r is word _sf_word_offset(r, g), i.e. a row part plus g · 128 words."""
        e64 = e.to(gl.int64)
        if UE8M0:
            sa_p = sa_ptr + e64 * sa_se + _sf_word_offset(rows_c, 0, sa_sk)
            sb_p = sb_ptr + e64 * sb_se + _sf_word_offset(col_c, 0, sb_sk)
            return sa_p, sb_p, SF_TILE_BYTES // SF_TILE_COLS, SF_TILE_BYTES // SF_TILE_COLS
        else:
            return sa_ptr + e64 * sa_se + rows_c * sa_sm, sb_ptr + e64 * sb_se + (col_c // 128) * sb_sn, sa_sk, sb_sk

    @gluon.jit
    def _load_scales(sa_p, sb_p, sa_step, sb_step, kb, like, DIAG: gl.constexpr, SA_SMEM: gl.constexpr = False):
        """The raw scales of K step kb: (sa [64], sb) as loaded (fp32 values or int32 SF words). Nothing is computed
        on them here: an instruction that used them at once would stall on the load (the SASS showed the FMUL
        sa·sb right after the loads), so _step_scale combines them where they are used, two steps later.
        SA_SMEM: sb only (sa comes from shared memory; `like` stands in)."""
        if DIAG == 1:
            return like, gl.load(sb_p)
        elif SA_SMEM:
            return like, gl.load(sb_p + kb * sb_step)
        else:
            return gl.load(sa_p + kb * sa_step), gl.load(sb_p + kb * sb_step)

    @gluon.jit
    def _step_scale(sa, sb, UE8M0: gl.constexpr):
        """sa [64] · sb of one K step as one float32 vector (a 64 x BN sub-tile lies in one 128x128 weight block).
        UE8M0: the first byte of each 128-group's 4 (the tl kernel's rule; unpack_and_convert_scale writes 4 equal)."""
        if UE8M0:
            sa = ((sa & 0xFF) << 23).to(gl.float32, bitcast=True)
            sb = ((sb & 0xFF) << 23).to(gl.float32, bitcast=True)
        return sa * sb

    @gluon.jit
    def _store_tile(final, c_desc, c_buf, out_ptr, bias_ptr, e, row0, rows, col0, cnt, M, N, BN: gl.constexpr,
                    mma: gl.constexpr, HAS_BIAS: gl.constexpr, TMA_STORE: gl.constexpr):
        """final [64, BN] fp32 (+ bias) -> bf16 out[e·M + rows, col0:col0+BN] (rows = row0 + 0..63), rows < cnt and
        columns < N only.

        A sub-tile whose 64 rows are all valid goes through shared memory and one TMA store, which runs on
        while the warpgroup goes on to its next tile (only the next epilogue waits for it; the TMA clips
        columns >= N). Stores straight from the wgmma register layout (4 bytes per thread and row, both
        warpgroups stalled at once) made the kernel 15-35 % slower (benchmarks/NOTES_gpu.md, issue 11 run 4).
        The one partial sub-tile per expert and n-tile (rows past the count must not be written) uses masked
        stores."""
        cols = col0 + gl.arange(0, BN, layout=gl.SliceLayout(0, mma))
        if HAS_BIAS:
            bias = gl.load(bias_ptr + e * N + gl.minimum(cols, N - 1)).to(gl.float32)
            final = final + gl.expand_dims(bias, 0)
        val = final.to(gl.bfloat16)
        if TMA_STORE and row0 + WG_ROWS_C <= cnt:
            tma.store_wait(pendings=0)              # the previous tile's store has read c_buf
            gl.thread_barrier()
            c_buf.store(val)
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(c_desc, [e * M + row0, col0], c_buf)
        else:
            offs = (e.to(gl.int64) * M + gl.expand_dims(rows, 1)) * N + gl.expand_dims(cols, 0)
            mask = gl.expand_dims(rows < cnt, 1) & gl.expand_dims(cols < N, 0)
            gl.store(out_ptr + offs, val, mask=mask)

    @gluon.jit
    def _math(p, WG: gl.constexpr, STAGES: gl.constexpr, BN: gl.constexpr, NA: gl.constexpr, NB: gl.constexpr,
              BM: gl.constexpr, UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr, DIAG: gl.constexpr,
              TMA_STORE: gl.constexpr, M_FAST: gl.constexpr, KG: gl.constexpr, PAIR: gl.constexpr = False,
              COUNT_BAD: gl.constexpr = False, SA_SMEM: gl.constexpr = False):
        """One math warpgroup: its 64 x BN sub-tile of every tile, promoted per 128 K, stored as bf16 (PAIR: the
        gate (WG 0) or up (WG 1) block of one quant group, finished by `_pair_epilogue`).

        Per K step: wait for the slot, wgmma (4 x m64nBNk32) into a fresh accumulator, wait for it, release
        the slot, promote `final += acc · (sa ⊗ sb)` on the CUDA cores; the other math warpgroup's wgmma
        runs meanwhile (DeepGEMM's scheme). One accumulator only: a second one in flight while this one is
        promoted needs 3 x 64 fp32 registers per thread, over the 168 that ptxas allows every partition
        of a 384-thread kernel (it spilled, with or without .maxnreg), and ptxas serializes every wgmma when
        an accumulator's registers are written while another wgmma runs (C7515; benchmarks/NOTES_gpu.md).
        A step's scales are loaded two steps ahead (global loads: L2 latency); with SA_SMEM the A scales come with
        the step's slot (the producer's TMA) and are read from shared memory while the wgmma runs, before the slot
        is released. DIAG (measurement only, wrong results): 1 = no per-step scale loads, 2 = no output store."""
        a_bufs, b_bufs, ready, empty = p[2], p[3], p[4], p[5]
        counts_ptr, E, M, N, K = p[6], p[7], p[8], p[9], p[10]
        sa_ptr, sb_ptr, out_ptr, bias_ptr = p[11], p[12], p[13], p[14]
        sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk = p[15], p[16], p[17], p[18], p[19], p[20]
        c_desc, c_bufs = p[21], p[22]
        A_SUB: gl.constexpr = WG * (NA - 1)          # M split (NA = 2): warpgroup WG takes A box WG
        B_SUB: gl.constexpr = WG * (NB - 1)          # N split (NB = 2): warpgroup WG takes B box WG
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, mma)
        zero = gl.zeros([WG_ROWS_C, BN], gl.float32, mma)
        n_tiles = gl.cdiv(N, NB * BN)
        k_steps = gl.cdiv(K, BLOCK_K_C)
        total, e, base, tiles_e = _first_tile(counts_ptr, E, n_tiles, BM)
        it = 0
        j = 0
        n_bad = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            e, base, tiles_e, mt, nt = _next_tile(t, e, base, tiles_e, counts_ptr, n_tiles, BM, M_FAST)
            cnt = gl.load(counts_ptr + e)
            row0 = mt * BM + A_SUB * WG_ROWS_C
            rows = row0 + gl.arange(0, WG_ROWS_C, layout=row_l)
            if PAIR:
                col0 = nt * BN + B_SUB * (N // 2)
            else:
                col0 = nt * (NB * BN) + B_SUB * BN
            # rows past the count, and a sub-tile past N (both masked at the store), read valid scales
            sa_p, sb_p, sa_step, sb_step = _scale_pointers(sa_ptr, sb_ptr, e, gl.minimum(rows, cnt - 1),
                                                           gl.minimum(col0, N - 1), sa_se, sa_sm, sa_sk,
                                                           sb_se, sb_sn, sb_sk, UE8M0)
            like = gl.full([WG_ROWS_C], 1, sa_ptr.dtype.element_ty, row_l)
            last = k_steps - 1
            sa0, sb0 = _load_scales(sa_p, sb_p, sa_step, sb_step, 0, like, DIAG, SA_SMEM)
            sa1, sb1 = _load_scales(sa_p, sb_p, sa_step, sb_step, gl.minimum(1, last), like, DIAG, SA_SMEM)
            final = zero
            for kb in range(gl.cdiv(k_steps, KG)):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                for g in gl.static_range(KG):
                    sa2, sb2 = _load_scales(sa_p, sb_p, sa_step, sb_step, gl.minimum(kb * KG + g + 2, last), like, DIAG,
                                            SA_SMEM)
                    acc = warpgroup_mma(a_bufs.index((s * KG + g) * NA + A_SUB),
                                        b_bufs.index((s * KG + g) * NB + B_SUB).permute((1, 0)), zero,
                                        use_acc=False, is_async=True)
                    if SA_SMEM:        # this step's A scales, from the slot (read before it is released)
                        sa0 = p[-1].index((s * KG + g) * NA + A_SUB).load(row_l)
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
                    if g == KG - 1:
                        mbarrier.arrive(empty.index(s), count=1)
                    final = final + acc * gl.expand_dims(_step_scale(sa0, sb0, UE8M0), 1)
                    sa0 = sa1
                    sb0 = sb1
                    sa1 = sa2
                    sb1 = sb2
                it += 1
            if PAIR:
                y, live = _pair_epilogue(final, p, WG, e, mt * BM, cnt, nt, j, UE8M0)
                if COUNT_BAD:
                    n_bad += tlk._count_nonfinite(y, gl.expand_dims(live, 1))
                j += 1
            elif DIAG != 2:
                _store_tile(final, c_desc, c_bufs.index(WG), out_ptr, bias_ptr, e, row0, rows, col0, cnt, M, N, BN, mma,
                            HAS_BIAS, TMA_STORE)
        tma.store_wait(pendings=0)
        if COUNT_BAD:
            gl.store(p[27] + gl.program_id(0) * 2 + WG, n_bad)

    @gluon.jit
    def _pair_epilogue(final, p, WG: gl.constexpr, e, row0, cnt, g, j, UE8M0: gl.constexpr):
        """PAIR mode's epilogue of one 64-row tile, quant group g: each warpgroup puts its bf16 block (the rounding
        point of the unfused GEMM's `up`) into shared memory, then takes 32 rows of both blocks: SwiGLU + 1x128
        quant (kernels._quantize_rows, the tl twin's epilogue) and the stores of the act bytes and scales where
        GEMM 2 reads them (kernels._store_act_scale), rows < cnt only. Barriers: `filled` (both blocks written,
        phase j) and `drained` (both read, so tile j + 1 may overwrite them). -> (y [32, 128], live rows)."""
        xbufs, filled, drained, q_ptr, s_ptr = p[22], p[23], p[24], p[25], p[26]
        M, N, S_GROUPS, SF_GROUPS, M_PAD, amax_floor = p[8], p[9], p[28], p[29], p[30], p[31]
        HALF: gl.constexpr = WG_ROWS_C // 2
        blk: gl.constexpr = gl.BlockedLayout([1, 16], [4, 8], [4, 1], [1, 0])
        mbarrier.wait(drained, (j & 1) ^ 1)
        xbufs.index(WG).store(final.to(gl.bfloat16))
        gl.thread_barrier()
        mbarrier.arrive(filled, count=1)
        mbarrier.wait(filled, j & 1)
        gate = xbufs.index(0).slice(WG * HALF, HALF).load(blk).to(gl.float32)
        lin = xbufs.index(1).slice(WG * HALF, HALF).load(blk).to(gl.float32)
        gl.thread_barrier()
        mbarrier.arrive(drained, count=1)
        y, q, s, ex = tlk._quantize_rows(gate, lin, amax_floor, UE8M0, False)
        rows = row0 + WG * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, blk))
        cols = g * 128 + gl.arange(0, 128, layout=gl.SliceLayout(0, blk))
        live = rows < cnt
        offs = gl.expand_dims((e.to(gl.int64) * M + rows) * (N // 2), 1) + gl.expand_dims(cols, 0)
        gl.store(q_ptr + offs, q, mask=gl.expand_dims(live, 1) & gl.expand_dims(cols < N // 2, 0))
        tlk._store_act_scale(s_ptr, e, rows, live, g, s, ex, S_GROUPS, SF_GROUPS, M_PAD, UE8M0)
        return y, live

    @gluon.jit
    def _pair_wg0(p, STAGES: gl.constexpr, UE8M0: gl.constexpr, M_FAST: gl.constexpr, KG: gl.constexpr,
                  COUNT_BAD: gl.constexpr, SA_SMEM: gl.constexpr):
        _math(p, 0, STAGES, 128, 1, 2, WG_ROWS_C, UE8M0, False, 0, False, M_FAST, KG, True, COUNT_BAD, SA_SMEM)

    @gluon.jit
    def _pair_wg1(p, STAGES: gl.constexpr, UE8M0: gl.constexpr, M_FAST: gl.constexpr, KG: gl.constexpr,
                  COUNT_BAD: gl.constexpr, SA_SMEM: gl.constexpr):
        _math(p, 1, STAGES, 128, 1, 2, WG_ROWS_C, UE8M0, False, 0, False, M_FAST, KG, True, COUNT_BAD, SA_SMEM)

    @gluon.jit
    def _pair_producer(p, STAGES: gl.constexpr, UE8M0: gl.constexpr, M_FAST: gl.constexpr, KG: gl.constexpr,
                       COUNT_BAD: gl.constexpr, SA_SMEM: gl.constexpr):
        _producer(p, STAGES, 128, 1, 2, WG_ROWS_C, UE8M0, False, 0, False, M_FAST, KG, True, SA_SMEM)

    @gluon.jit
    def masked_gemm_swiglu_ws_kernel(a_desc, b_desc, x_desc, counts_ptr, sa_ptr, sb_ptr, q_ptr, s_ptr, bad_ptr, E, M,
                                     N, K, sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, S_GROUPS, SF_GROUPS, M_PAD,
                                     amax_floor, sa_desc, STAGES: gl.constexpr, UE8M0: gl.constexpr,
                                     COUNT_BAD: gl.constexpr, M_FAST: gl.constexpr, KG: gl.constexpr,
                                     MATH_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                                     SA_SMEM: gl.constexpr = False):
        """GEMM 1 + SwiGLU + 1x128 quant (PAIR mode of masked_gemm_ws_kernel): 64 x (128 gate + 128 up) CTA tiles,
        warpgroup 0 the gate block (B = w_up [E·2I, K] rows e·2I + 128g..), warpgroup 1 the up block (rows
        e·2I + I + 128g..), sharing A; `_pair_epilogue` joins them. N = 2I. x_desc: any bf16 [64, 128] descriptor
        (its layout is the exchange buffers'). q [E·M, I] bytes, s: CUTLASS SF words (UE8M0) or fp32 MN-major
        [E, S, M_PAD]; bad [2 · grid] int32 (COUNT_BAD): NaN / inf y in valid rows per program and warpgroup;
        sa_desc, SA_SMEM: as masked_gemm_ws_kernel's."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * KG] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES * KG * 2] + b_desc.block_type.shape, b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        joins = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        for i in gl.static_range(2):
            mbarrier.init(joins.index(i), count=2)          # filled / drained: one arrive per math warpgroup
        fence_async_shared()
        xbufs = gl.allocate_shared_memory(gl.bfloat16, [2] + x_desc.block_type.shape, x_desc.layout)
        sa_bufs = _sa_buffers(sa_desc, STAGES * KG, xbufs, SA_SMEM)
        p = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, counts_ptr, E, M, N, K, sa_ptr, sb_ptr, q_ptr, q_ptr,
             sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, x_desc, xbufs, joins.index(0), joins.index(1), q_ptr, s_ptr,
             bad_ptr, S_GROUPS, SF_GROUPS, M_PAD, amax_floor, sa_desc, sa_bufs)
        gl.warp_specialize([(_pair_wg0, (p, STAGES, UE8M0, M_FAST, KG, COUNT_BAD, SA_SMEM)),
                            (_pair_wg1, (p, STAGES, UE8M0, M_FAST, KG, COUNT_BAD, SA_SMEM)),
                            (_pair_producer, (p, STAGES, UE8M0, M_FAST, KG, COUNT_BAD, SA_SMEM))],
                           [4, 1], [MATH_REGS, PRODUCER_REGS])

    @gluon.jit
    def _math_wg0(p, STAGES: gl.constexpr, BN: gl.constexpr, NA: gl.constexpr, NB: gl.constexpr, BM: gl.constexpr,
                  UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr, DIAG: gl.constexpr, TMA_STORE: gl.constexpr,
                  M_FAST: gl.constexpr, KG: gl.constexpr, SA_SMEM: gl.constexpr):
        _math(p, 0, STAGES, BN, NA, NB, BM, UE8M0, HAS_BIAS, DIAG, TMA_STORE, M_FAST, KG, SA_SMEM=SA_SMEM)

    @gluon.jit
    def _math_wg1(p, STAGES: gl.constexpr, BN: gl.constexpr, NA: gl.constexpr, NB: gl.constexpr, BM: gl.constexpr,
                  UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr, DIAG: gl.constexpr, TMA_STORE: gl.constexpr,
                  M_FAST: gl.constexpr, KG: gl.constexpr, SA_SMEM: gl.constexpr):
        _math(p, 1, STAGES, BN, NA, NB, BM, UE8M0, HAS_BIAS, DIAG, TMA_STORE, M_FAST, KG, SA_SMEM=SA_SMEM)

    @gluon.jit
    def _producer_sa(p, STAGES: gl.constexpr, BN: gl.constexpr, NA: gl.constexpr, NB: gl.constexpr,
                     BM: gl.constexpr, UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr, DIAG: gl.constexpr,
                     TMA_STORE: gl.constexpr, M_FAST: gl.constexpr, KG: gl.constexpr, SA_SMEM: gl.constexpr):
        _producer(p, STAGES, BN, NA, NB, BM, UE8M0, HAS_BIAS, DIAG, TMA_STORE, M_FAST, KG, SA_SMEM=SA_SMEM)

    @gluon.jit
    def masked_gemm_ws_kernel(a_desc, b_desc, c_desc, counts_ptr, sa_ptr, sb_ptr, out_ptr, bias_ptr, E, M, N, K,
                              sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, sa_desc,
                              STAGES: gl.constexpr, BN: gl.constexpr, NA: gl.constexpr, NB: gl.constexpr,
                              BM: gl.constexpr, UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr, DIAG: gl.constexpr,
                              TMA_STORE: gl.constexpr, M_FAST: gl.constexpr, KG: gl.constexpr, MATH_REGS: gl.constexpr,
                              PRODUCER_REGS: gl.constexpr, SA_SMEM: gl.constexpr = False):
        """a_desc: a [E·M, K] fp8, box [64, 128]; b_desc: b viewed [E·N, K] fp8, box [BN, 128]; c_desc: out [E·M, N]
        bf16, box [64, BN] (with TMA_STORE; else any descriptor, unused); sa_desc (SA_SMEM; else any descriptor,
        unused): sa's fp32 storage flat, box [64] (_sa_descriptor)."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * KG * NA] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES * KG * NB] + b_desc.block_type.shape, b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)          # both math warpgroups release a slot
        fence_async_shared()
        c_bufs = gl.allocate_shared_memory(gl.bfloat16, [2] + c_desc.block_type.shape, c_desc.layout)
        sa_bufs = _sa_buffers(sa_desc, STAGES * KG * NA, c_bufs, SA_SMEM)
        p = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, counts_ptr, E, M, N, K, sa_ptr, sb_ptr, out_ptr, bias_ptr,
             sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, c_desc, c_bufs, sa_desc, sa_bufs)
        gl.warp_specialize(
            [(_math_wg0, (p, STAGES, BN, NA, NB, BM, UE8M0, HAS_BIAS, DIAG, TMA_STORE, M_FAST, KG, SA_SMEM)),
             (_math_wg1, (p, STAGES, BN, NA, NB, BM, UE8M0, HAS_BIAS, DIAG, TMA_STORE, M_FAST, KG, SA_SMEM)),
             (_producer_sa, (p, STAGES, BN, NA, NB, BM, UE8M0, HAS_BIAS, DIAG, TMA_STORE, M_FAST, KG, SA_SMEM))],
            [4, 1], [MATH_REGS, PRODUCER_REGS])


    # ------------------------------------------------------------------------- the 128 x 192 tile (WIDE)
    # Each math warpgroup owns 64 x 192 output columns as two wgmmas, N = 128 and N = 64, each inside one
    # 128-column weight-scale block: a 192-wide n-tile starts at 192·nt, so for even nt its first 128 columns
    # are one block and the last 64 the next; for odd nt the first 64 end a block and the last 128 are the next.
    # 1.5x the MMA work per promotion, per barrier and per A byte of the 128 x 128 tile (DeepGEMM's SM90 tile);
    # the two accumulators and two promoted sums take 192 of the 232 registers a math warpgroup gets.

    @gluon.jit
    def _wide_offsets(nt):
        """n-tile nt -> (column offset of its 128-wide part, of its 64-wide part) inside the 192-wide tile."""
        odd = nt % 2
        return odd * 64, (1 - odd) * 128

    @gluon.jit
    def _producer_wide(p, STAGES: gl.constexpr, BM: gl.constexpr, M_FAST: gl.constexpr, SA_SMEM: gl.constexpr):
        """TMA loads per 128-wide K step: A [128, 128] (two 64-row boxes), B's 128-row and 64-row parts; SA_SMEM:
        the A scales too (as _producer)."""
        a_desc, b_desc, a_bufs, b_bufs, ready, empty = p[0], p[1], p[2], p[3], p[4], p[5]
        counts_ptr, E, M, N, K = p[6], p[7], p[8], p[9], p[10]
        b64_desc, b64_bufs = p[23], p[24]
        n_tiles = gl.cdiv(N, 192)
        k_steps = gl.cdiv(K, BLOCK_K_C)
        total, e, base, tiles_e = _first_tile(counts_ptr, E, n_tiles, BM)
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            e, base, tiles_e, mt, nt = _next_tile(t, e, base, tiles_e, counts_ptr, n_tiles, BM, M_FAST)
            off128, off64 = _wide_offsets(nt)
            row0 = e * M + mt * BM
            col0 = e * N + nt * 192
            for kb in range(k_steps):
                s = it % STAGES
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                if SA_SMEM:
                    mbarrier.expect(ready.index(s), 2 * (a_desc.block_type.nbytes + p[-2].block_type.nbytes)
                                    + b_desc.block_type.nbytes + b64_desc.block_type.nbytes)
                else:
                    mbarrier.expect(ready.index(s), 2 * a_desc.block_type.nbytes + b_desc.block_type.nbytes
                                    + b64_desc.block_type.nbytes)
                k0 = kb * BLOCK_K_C
                for i in gl.static_range(2):
                    tma.async_copy_global_to_shared(a_desc, [row0 + i * WG_ROWS_C, k0], ready.index(s),
                                                    a_bufs.index(s * 2 + i))
                    if SA_SMEM:
                        tma.async_copy_global_to_shared(p[-2], [e * p[15] + kb * p[17] + mt * BM + i * WG_ROWS_C],
                                                        ready.index(s), p[-1].index(s * 2 + i))
                tma.async_copy_global_to_shared(b_desc, [col0 + off128, k0], ready.index(s), b_bufs.index(s))
                tma.async_copy_global_to_shared(b64_desc, [col0 + off64, k0], ready.index(s), b64_bufs.index(s))
                it += 1

    @gluon.jit
    def _math_wide(p, WG: gl.constexpr, STAGES: gl.constexpr, BM: gl.constexpr, UE8M0: gl.constexpr,
                   HAS_BIAS: gl.constexpr, TMA_STORE: gl.constexpr, M_FAST: gl.constexpr, SA_SMEM: gl.constexpr):
        """One math warpgroup of the WIDE tile: rows WG·64.. of the CTA tile, both column parts; per K step two
        wgmmas into fresh accumulators, one wait, release the slot, promote both (as _math, SA_SMEM too)."""
        a_bufs, b_bufs, ready, empty = p[2], p[3], p[4], p[5]
        counts_ptr, E, M, N, K = p[6], p[7], p[8], p[9], p[10]
        sa_ptr, sb_ptr, out_ptr, bias_ptr = p[11], p[12], p[13], p[14]
        sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk = p[15], p[16], p[17], p[18], p[19], p[20]
        c_desc, c_bufs, b64_bufs, c64_desc, c64_bufs = p[21], p[22], p[24], p[25], p[26]
        mma1: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 128, 32])
        mma2: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, 64, 32])
        row_l: gl.constexpr = gl.SliceLayout(1, mma1)
        zero1 = gl.zeros([WG_ROWS_C, 128], gl.float32, mma1)
        zero2 = gl.zeros([WG_ROWS_C, 64], gl.float32, mma2)
        n_tiles = gl.cdiv(N, 192)
        k_steps = gl.cdiv(K, BLOCK_K_C)
        last = k_steps - 1
        total, e, base, tiles_e = _first_tile(counts_ptr, E, n_tiles, BM)
        it = 0
        for t in range(gl.program_id(0), total, gl.num_programs(0)):
            e, base, tiles_e, mt, nt = _next_tile(t, e, base, tiles_e, counts_ptr, n_tiles, BM, M_FAST)
            cnt = gl.load(counts_ptr + e)
            off128, off64 = _wide_offsets(nt)
            row0 = mt * BM + WG * WG_ROWS_C
            rows = row0 + gl.arange(0, WG_ROWS_C, layout=row_l)
            col1 = nt * 192 + off128
            col2 = nt * 192 + off64
            rows_c = gl.minimum(rows, cnt - 1)
            sa_p, sb1_p, sa_step, sb_step = _scale_pointers(sa_ptr, sb_ptr, e, rows_c, gl.minimum(col1, N - 1),
                                                            sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, UE8M0)
            _, sb2_p, _, _ = _scale_pointers(sa_ptr, sb_ptr, e, rows_c, gl.minimum(col2, N - 1),
                                             sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, UE8M0)
            like = gl.full([WG_ROWS_C], 1, sa_ptr.dtype.element_ty, row_l)
            sa0, sb0 = _load_scales(sa_p, sb1_p, sa_step, sb_step, 0, like, 0, SA_SMEM)
            tb0 = gl.load(sb2_p)
            sa1, sb1 = _load_scales(sa_p, sb1_p, sa_step, sb_step, gl.minimum(1, last), like, 0, SA_SMEM)
            tb1 = gl.load(sb2_p + gl.minimum(1, last) * sb_step)
            final1 = zero1
            final2 = zero2
            for kb in range(k_steps):
                s = it % STAGES
                mbarrier.wait(ready.index(s), (it // STAGES) & 1)
                nxt = gl.minimum(kb + 2, last)
                sa2, sb2 = _load_scales(sa_p, sb1_p, sa_step, sb_step, nxt, like, 0, SA_SMEM)
                tb2 = gl.load(sb2_p + nxt * sb_step)
                a = a_bufs.index(s * 2 + WG)
                acc1 = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), zero1, use_acc=False, is_async=True)
                acc2 = warpgroup_mma(a, b64_bufs.index(s).permute((1, 0)), zero2, use_acc=False, is_async=True)
                if SA_SMEM:
                    sa0 = p[-1].index(s * 2 + WG).load(row_l)
                acc1, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc1, acc2))
                mbarrier.arrive(empty.index(s), count=1)
                final1 = final1 + acc1 * gl.expand_dims(_step_scale(sa0, sb0, UE8M0), 1)
                sa_2 = gl.convert_layout(sa0, gl.SliceLayout(1, mma2))
                final2 = final2 + acc2 * gl.expand_dims(_step_scale(sa_2, tb0, UE8M0), 1)
                sa0, sb0, tb0 = sa1, sb1, tb1
                sa1, sb1, tb1 = sa2, sb2, tb2
                it += 1
            _store_tile(final1, c_desc, c_bufs.index(WG), out_ptr, bias_ptr, e, row0, rows, col1, cnt, M, N, 128,
                        mma1, HAS_BIAS, TMA_STORE)
            rows2 = gl.convert_layout(rows, gl.SliceLayout(1, mma2))
            _store_tile(final2, c64_desc, c64_bufs.index(WG), out_ptr, bias_ptr, e, row0, rows2, col2, cnt, M, N,
                        64, mma2, HAS_BIAS, TMA_STORE)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _math_wide_wg0(p, STAGES: gl.constexpr, BM: gl.constexpr, UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr,
                       TMA_STORE: gl.constexpr, M_FAST: gl.constexpr, SA_SMEM: gl.constexpr):
        _math_wide(p, 0, STAGES, BM, UE8M0, HAS_BIAS, TMA_STORE, M_FAST, SA_SMEM)

    @gluon.jit
    def _math_wide_wg1(p, STAGES: gl.constexpr, BM: gl.constexpr, UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr,
                       TMA_STORE: gl.constexpr, M_FAST: gl.constexpr, SA_SMEM: gl.constexpr):
        _math_wide(p, 1, STAGES, BM, UE8M0, HAS_BIAS, TMA_STORE, M_FAST, SA_SMEM)

    @gluon.jit
    def masked_gemm_ws_wide_kernel(a_desc, b_desc, b64_desc, c_desc, c64_desc, counts_ptr, sa_ptr, sb_ptr, out_ptr,
                                   bias_ptr, E, M, N, K, sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, sa_desc,
                                   STAGES: gl.constexpr, UE8M0: gl.constexpr, HAS_BIAS: gl.constexpr,
                                   TMA_STORE: gl.constexpr, M_FAST: gl.constexpr, MATH_REGS: gl.constexpr,
                                   PRODUCER_REGS: gl.constexpr, SA_SMEM: gl.constexpr = False):
        """masked_gemm_ws_kernel with 128 x 192 CTA tiles. a_desc box [64, 128]; b_desc box [128, 128]; b64_desc
        box [64, 128] (both over b viewed [E·N, K]); c_desc box [64, 128], c64_desc box [64, 64] over out; sa_desc
        as masked_gemm_ws_kernel's."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES * 2] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        b64_bufs = gl.allocate_shared_memory(b64_desc.dtype, [STAGES] + b64_desc.block_type.shape, b64_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)
        fence_async_shared()
        c_bufs = gl.allocate_shared_memory(gl.bfloat16, [2] + c_desc.block_type.shape, c_desc.layout)
        c64_bufs = gl.allocate_shared_memory(gl.bfloat16, [2] + c64_desc.block_type.shape, c64_desc.layout)
        sa_bufs = _sa_buffers(sa_desc, STAGES * 2, c_bufs, SA_SMEM)
        p = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, counts_ptr, E, M, N, K, sa_ptr, sb_ptr, out_ptr, bias_ptr,
             sa_se, sa_sm, sa_sk, sb_se, sb_sn, sb_sk, c_desc, c_bufs, b64_desc, b64_bufs, c64_desc, c64_bufs,
             sa_desc, sa_bufs)
        BM: gl.constexpr = 2 * WG_ROWS_C
        gl.warp_specialize([(_math_wide_wg0, (p, STAGES, BM, UE8M0, HAS_BIAS, TMA_STORE, M_FAST, SA_SMEM)),
                            (_math_wide_wg1, (p, STAGES, BM, UE8M0, HAS_BIAS, TMA_STORE, M_FAST, SA_SMEM)),
                            (_producer_wide, (p, STAGES, BM, M_FAST, SA_SMEM))],
                           [4, 1], [MATH_REGS, PRODUCER_REGS])


# ----------------------------------------------------------------------------- launchers (torch)

@functools.lru_cache(maxsize=None)
def _fast(kernel):
    """The kernel launched through fast_launch (its compiled launcher called directly after the first call: ~0.15 ms
    less host time per GEMM than Triton's JIT path, measured by benchmarks/profile_host.py)."""
    return fast_launch.FastKernel(kernel)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _grid(device: torch.device, sm_count: int) -> tuple:
    """The persistent grid: one CTA per SM the kernel may use (all, or sm_count when > 0)."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return (min(sms, sm_count) if sm_count > 0 else sms,)


# CUTLASS UE8M0 bytes from this many expected rows per expert on: the 128 x 192 tile (wide_config). Measured on an
# H200 (2026-11-30 16:15 UTC, bench_gemm_peers.py, ratios to DeepGEMM in one run) at 256 / 512 / 1024 / 2048 /
# uneven 0..1024 / 0..2048 rows, 128 x 192 vs 128 x 128 vs the tl kernel: N=4096 K=7168 0.75/0.71/0.70,
# 0.77/0.71/0.70, 0.75/0.67/0.63, 0.78/0.79/0.63, 0.77/0.73/0.67, 0.84/0.79/0.70; N=7168 K=2048 0.77/0.74/0.67,
# 0.85/0.77/0.73, 0.85/0.78/0.69, 0.89/0.77/0.71, 0.75/0.71/0.67, 0.82/0.71/0.68 (the byte decode of a promotion
# spread over 1.5x the MMA work). Below (64, 128 rows) the 128 x 192 tile lost (0.75-0.83 vs 0.82-0.96). With FP32
# scales it was no faster than 128 x 128 (-0.12..+0.03): the FP32 recipe keeps 128 x 128.
UE8M0_WIDE_FROM_ROWS = 256


def pick_config(expected_m: int, n: int, kg: int = 1, ue8m0: bool = False) -> dict:
    """Tile config for about expected_m valid rows per expert: 64 x 2BN CTA tiles (SPLIT_N) up to 64 rows,
    else 128 x BN; with CUTLASS UE8M0 bytes (ue8m0) from UE8M0_WIDE_FROM_ROWS rows on, 128 x 192 (wide_config).
    BN = 128 (one weight-scale block per sub-tile, one wgmma of N=128). KG 128-wide K steps
    per pipeline stage (one ready/empty handshake per KG steps). As many stages as shared memory holds."""
    if ue8m0 and kg == 1 and expected_m >= UE8M0_WIDE_FROM_ROWS:
        return wide_config()
    # SPLIT_N up to 64 rows, measured on an H200 (ratios to DeepGEMM, benchmarks/results/gpu_h200.json of the
    # 14:05 UTC run, `gluon_fp32` = this rule vs `gluon_fp32_alt` = the other tile): 64 rows, 64 x 2BN vs 128 x BN:
    # 0.99 vs 0.85 (N=4096 K=7168), 0.98 vs 0.90 (N=7168 K=2048); 128 rows, 128 x BN vs 64 x 2BN: 0.97 vs 0.92,
    # 0.99 vs 0.95. The 14:37 run disagrees at N=7168 K=2048 (64 rows 0.58 vs 0.56; 128 rows 0.64 vs 0.90), where
    # every Gluon call but one took 0.24-0.28 ms against 0.14-0.16 ms in the run before (the tl kernels 0.20-0.22 ms
    # in both; launch_fp32, the same call as gluon_fp32, also 0.216 vs 0.140 ms at 64 rows in the 14:05 run): a
    # spread of the Gluon kernel at this small shape, not explained; the rule stays until a run decides.
    # Without an expected_m hint the launchers assume M rows (128 x BN tiles whenever M > 64).
    split_n = expected_m <= WG_ROWS
    bn = 128 if n % 128 == 0 or n > 64 else 64
    na, nb = (1, 2) if split_n else (2, 1)
    stage_bytes = (na * WG_ROWS + nb * bn) * BLOCK_K * kg
    out_bytes = 2 * WG_ROWS * bn * 2                      # one bf16 [64, BN] store buffer per math warpgroup
    budget = SMEM_BYTES if kg == 1 else SMEM_LIMIT       # kg = 1: the measured default (5 stages at 128 x 128)
    return dict(BN=bn, SPLIT_N=split_n, KG=kg, STAGES=max(2, min(8, (budget - out_bytes) // stage_bytes)))


@functools.lru_cache(maxsize=None)
def _smem_layout(box: tuple, dtype_name: str):
    """NVMMASharedLayout.get_default_for(box, gl.<dtype_name>), kept: a value of (box, dtype) alone that costs
    ~15 us of Python to build (three per GEMM launch before)."""
    return gl.NVMMASharedLayout.get_default_for(list(box), getattr(gl, dtype_name))


def _desc(t: torch.Tensor, box: tuple, dtype_name: str):
    return TensorDescriptor.from_tensor(t, list(box), _smem_layout(box, dtype_name))


def _descriptors(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, cfg: dict):
    b2 = b.view(-1, b.shape[-1])
    return (_desc(a, (WG_ROWS, BLOCK_K), "float8e4nv"), _desc(b2, (cfg["BN"], BLOCK_K), "float8e4nv"),
            _desc(out, (WG_ROWS, cfg["BN"]), "bfloat16"))


def wide_config() -> dict:
    """The 128 x 192 tile (masked_gemm_ws_wide_kernel): per stage A 128x128 + B 192x128 fp8 (40 KB), two bf16
    store buffers per math warpgroup (64x128 + 64x64): 4 stages in the shared memory of an H100/H200."""
    stage_bytes = (2 * WG_ROWS + 192) * BLOCK_K
    out_bytes = 2 * WG_ROWS * 192 * 2
    return dict(WIDE=True, BN=192, SPLIT_N=False, KG=1, STAGES=(SMEM_BYTES - out_bytes) // stage_bytes)


def _wide_descriptors(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor):
    """TMA descriptors of the WIDE kernel: a box [64, 128]; b (viewed [E·N, K]) boxes [128, 128] and [64, 128];
    out boxes [64, 128] and [64, 64]."""
    f8, bf = "float8e4nv", "bfloat16"
    b2 = b.view(-1, b.shape[-1])
    return (_desc(a, (WG_ROWS, BLOCK_K), f8), _desc(b2, (128, BLOCK_K), f8), _desc(b2, (64, BLOCK_K), f8),
            _desc(out, (WG_ROWS, 128), bf), _desc(out, (WG_ROWS, 64), bf))


_SA_LAYOUT = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1) if _IMPORT_ERROR is None else None


def _sa_descriptor(sa: torch.Tensor, strides: tuple):
    """A 1-D TMA descriptor over the storage of FP32 A scales (box: one warpgroup's 64 rows) when they are MN-major
    (stride 1 over rows, as the permute writes them) and 16-byte aligned, else None (the kernel loads them from
    global memory). Flat index of (e, row, step): e·strides[0] + step·strides[2] + row; past the storage's end the
    TMA reads zeros, and rows past masked_m are never stored."""
    if sa.dtype != torch.float32 or strides[1] != 1 or sa.data_ptr() % 16 or min(strides) < 0:
        return None
    e_num, rows, steps = sa.shape
    size = (e_num - 1) * strides[0] + (steps - 1) * strides[2] + rows
    return TensorDescriptor(sa.as_strided((size,), (1,)), [size], [1], [WG_ROWS], _SA_LAYOUT)


def _sa_args(sa: torch.Tensor, strides: tuple, ue8m0: bool, cfg: dict, placeholder) -> tuple:
    """(descriptor argument, SA_SMEM) of a launch: the A scales' TMA descriptor when they can go through the TMA
    (FP32, _sa_descriptor's layout, config SA_SMEM not False), else (placeholder, False): any descriptor, unread."""
    desc = None if ue8m0 or not cfg.get("SA_SMEM", True) else _sa_descriptor(sa, strides)
    return (placeholder, False) if desc is None else (desc, True)


def _launchable(b: torch.Tensor) -> tuple:
    """b's (E, N, K) once this process can run the kernels on it: RuntimeError naming why not (no SM90 GPU, no
    Gluon), ValueError when K breaks TMA's 16-byte row stride."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"gluon_gemm: {reason}")
    e_num, n, k = b.shape
    if k % 16:
        raise ValueError(f"K: the TMA row stride must be 16-byte aligned, expected a multiple of 16, got {k}")
    return e_num, n, k


def _launch(a, b, sa, sb, strides, counts, out, bias, m, ue8m0: bool, expected_m, config, sm_count=-1):
    e_num, n, k = _launchable(b)
    counts = counts.reshape(-1)
    counts = counts if counts.dtype == torch.int32 and counts.is_contiguous() else counts.to(torch.int32).contiguous()
    cfg = config or pick_config(int(expected_m if expected_m is not None else m), n, ue8m0=ue8m0)
    kg = cfg.get("KG", 1) if -(-k // BLOCK_K) % cfg.get("KG", 1) == 0 else 1      # K steps per stage
    a, b = a.contiguous(), b.contiguous()
    tma_store = out.is_contiguous() and (out.shape[-1] * out.element_size()) % 16 == 0 and out.data_ptr() % 16 == 0
    has_bias = bias is not None
    grid = _grid(a.device, sm_count)
    if cfg.get("WIDE"):
        descs = _wide_descriptors(a, b, out if tma_store else out.new_empty(WG_ROWS, 128))
        sa_arg, sa_smem = _sa_args(sa, strides, ue8m0, cfg, descs[0])
        _fast(masked_gemm_ws_wide_kernel)[grid](
            *descs, counts, sa, sb, out, bias.contiguous() if has_bias else out, e_num, m, n, k, *strides,
            sa_arg, SA_SMEM=sa_smem,
            STAGES=cfg["STAGES"], UE8M0=ue8m0, HAS_BIAS=has_bias, TMA_STORE=tma_store,
            M_FAST=cfg.get("M_FAST", True), MATH_REGS=cfg.get("MATH_REGS", 232),
            PRODUCER_REGS=cfg.get("PRODUCER_REGS", 40), num_warps=4, maxnreg=cfg.get("MAXNREG", 168))
        return out
    a_desc, b_desc, c_desc = _descriptors(a, b, out if tma_store else out.new_empty(WG_ROWS, cfg["BN"]), cfg)
    sa_arg, sa_smem = _sa_args(sa, strides, ue8m0, cfg, a_desc)
    _fast(masked_gemm_ws_kernel)[grid](
        a_desc, b_desc, c_desc, counts, sa, sb, out, bias.contiguous() if has_bias else out, e_num, m, n, k, *strides,
        sa_arg, SA_SMEM=sa_smem,
        STAGES=cfg["STAGES"], BN=cfg["BN"], NA=1 if cfg["SPLIT_N"] else 2, NB=2 if cfg["SPLIT_N"] else 1,
        BM=WG_ROWS if cfg["SPLIT_N"] else 2 * WG_ROWS, UE8M0=ue8m0, HAS_BIAS=has_bias, DIAG=cfg.get("DIAG", 0),
        TMA_STORE=tma_store, M_FAST=cfg.get("M_FAST", True), KG=kg,
        MATH_REGS=cfg.get("MATH_REGS", 232), PRODUCER_REGS=cfg.get("PRODUCER_REGS", 40),
        num_warps=4, maxnreg=cfg.get("MAXNREG", 168))
    return out


def group_gemm_masked_fp32(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                           masked_m: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
                           max_m_per_expert: int | None = None, expected_m: int | None = None,
                           config: dict | None = None, sm_count: int = -1) -> torch.Tensor:
    """Masked grouped FP8 GEMM, FP32 scales (Hopper recipe), as launch.group_gemm_masked_fp32. Writes `out`.

    a [E·M, K] fp8 with a_scale fp32 logical [E, M, ceil(K/128)] (any strides; MN-major is what
    prefill_permute_to_masked_gemm returns); b [E, N, K] fp8 with b_scale fp32 [E, ceil(N/128), ceil(K/128)];
    masked_m [E] int32; out [E·M, N] bf16, rows < masked_m[e] only; bias [E, N] | None.
    expected_m: valid rows per expert to tune the tile for (default M); config: a pick_config() dict;
    sm_count: SMs the kernel may use (-1: all).
    """
    e_num = b.shape[0]
    m = int(max_m_per_expert) if max_m_per_expert is not None else a.shape[0] // e_num
    a_scale = a_scale.view(e_num, m, -1) if a_scale.dim() == 2 else a_scale
    strides = tuple(a_scale.stride()) + tuple(b_scale.stride())
    return _launch(a, b, a_scale, b_scale, strides, masked_m, out, bias, m, False, expected_m, config, sm_count)


def group_gemm_masked(a: torch.Tensor, b: torch.Tensor, sfa: torch.Tensor, sfb: torch.Tensor,
                      masked_m: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None,
                      max_m_per_expert: int | None = None, expected_m: int | None = None,
                      config: dict | None = None, sm_count: int = -1) -> torch.Tensor:
    """Masked grouped FP8 GEMM, CUTLASS UE8M0 scale bytes decoded in the kernel (SPEC §6). Writes `out`.

    As launch.group_gemm_masked(impl="explicit", sfb_per_block=True): sfa [E, align(M,128), KB] and
    sfb [E, align(N,128), KB'] uint8 (KB multiple of 4, one byte per 32 K, the first of each 4 used), and
    sfb must hold one byte per 128 rows x 128 K (weights quantized 128x128, as this method's; check with
    launch.sf_block_uniform): each 64 x 128 sub-tile reads one weight byte per K step.
    """
    e_num = b.shape[0]
    m = int(max_m_per_expert) if max_m_per_expert is not None else a.shape[0] // e_num
    sfa, sfb = sfa.contiguous(), sfb.contiguous()
    strides = (sfa.shape[1] * sfa.shape[2] // 4, 0, sfa.shape[2] // 4, sfb.shape[1] * sfb.shape[2] // 4, 0,
               sfb.shape[2] // 4)
    return _launch(a, b, sfa.view(torch.int32), sfb.view(torch.int32), strides, masked_m, out, bias, m, True,
                   expected_m, config, sm_count)


def group_gemm_masked_swiglu_quant(a: torch.Tensor, b: torch.Tensor, sa: torch.Tensor, sb: torch.Tensor,
                                   strides: tuple, counts: torch.Tensor, q: torch.Tensor, s_out: torch.Tensor, m: int,
                                   ue8m0: bool, s_groups: int, sf_groups: int, m_pad: int, amax_floor: float,
                                   check_finite: bool, config: dict | None = None,
                                   sm_count: int = -1) -> torch.Tensor:
    """GEMM 1 + SwiGLU + 1x128 FP8 quant (masked_gemm_swiglu_ws_kernel), as launch.group_gemm_masked[_fp32]_swiglu_
    fp8_quant, which checks the arguments and builds the outputs: a [E·M, H] fp8, b = w_up [E, 2I, H] fp8, sa / sb
    (CUTLASS SF int32 words, or fp32 scales) with their strides as group_gemm_masked[_fp32] pass them; q [E·M, I]
    uint8 and s_out (CUTLASS SF int32 words [E, MN_pad, sf_groups], or fp32 [E, s_groups, m_pad]) written for rows
    < counts[e]. Returns bad int32 [2 · grid] (NaN / inf SwiGLU outputs in valid rows with check_finite, else [1])."""
    e_num, n, k = _launchable(b)
    cfg = dict(pick_config(WG_ROWS, n), BN=BLOCK_K, SPLIT_N=True, **(config or {}))
    kg = cfg["KG"] if -(-k // BLOCK_K) % cfg["KG"] == 0 else 1
    a, b = a.contiguous(), b.contiguous()
    a_desc, b_desc, x_desc = _descriptors(a, b, a.new_empty(WG_ROWS, BLOCK_K, dtype=torch.bfloat16), cfg)
    grid = _grid(a.device, sm_count)
    bad = torch.zeros(2 * grid[0] if check_finite else 1, dtype=torch.int32, device=a.device)
    sa_arg, sa_smem = _sa_args(sa, strides, ue8m0, cfg, a_desc)
    _fast(masked_gemm_swiglu_ws_kernel)[grid](
        a_desc, b_desc, x_desc, counts, sa, sb, q, s_out, bad, e_num, m, n, k, *strides, s_groups, sf_groups, m_pad,
        float(amax_floor), sa_arg, SA_SMEM=sa_smem, STAGES=cfg["STAGES"], UE8M0=bool(ue8m0),
        COUNT_BAD=bool(check_finite),
        M_FAST=cfg.get("M_FAST", True), KG=kg, MATH_REGS=cfg.get("MATH_REGS", 232),
        PRODUCER_REGS=cfg.get("PRODUCER_REGS", 40), num_warps=4, maxnreg=cfg.get("MAXNREG", 168))
    return bad
