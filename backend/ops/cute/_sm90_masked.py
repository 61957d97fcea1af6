"""The CuTe DSL kernel of cute_gemm.masked_gemm (imports cutlass at module level: load it lazily).

Masked grouped FP8 GEMM for SM90, FP32 scales (the Hopper recipe). One CTA per SM (persistent), clusters of
CLUSTER_M CTAs. Per CTA: warpgroup 0 (warp 0) issues the TMA loads into a STAGES-deep ring (A [128, 128] of
its own m-tile, B [BN, 128]: with CLUSTER_M = 2, when the two CTAs work on two m-tiles of one (expert, n-tile),
each loads half of B and multicasts it to both; when they work on two n-tiles of one m-tile, each loads its own
B whole); warpgroups 1 and 2 each
run the wgmma of 64 rows x BN per 128-wide K step into a fresh accumulator, wait for it, release the slot
and promote `final = fma(partial, sa[row] * sb[col block], final)` in fp32 (as DeepGEMM and the Gluon
kernel); each math warpgroup copies its tile's weight scales of every K step into its own shared-memory
buffer at the tile's start (one LDS per step, no global loads in the K loop, which is unrolled by 2). The tile
walk is built on the device from masked_m: cluster tile t of cluster c for t = c, c + clusters, ..., the
tiles of expert 0 first; inside an expert, walk.cluster_block gives each CTA its block (DeepGEMM's
walk: pairs of m-tiles on one n-tile first, an odd last m-tile paired along N), so a CTA idles only on the
one block past N of an expert whose n-tile count is odd.

Switches (compile time, so one GPU run compares them): sa_tma - the stage's 128 A scales (MN-major fp32) come by
TMA with its A / B tiles (one mbarrier transaction) and the math threads read their rows from shared memory
(else per-thread global loads one step ahead); tma_store - a 64-row sub-tile whose rows are all < masked_m goes
registers -> swizzled shared memory -> TMA store (64 x 64 boxes, asynchronous: the warpgroup goes on to its
next tile, only its next store waits for the read), the one partial sub-tile per (expert, n-tile) is stored
from registers (else every sub-tile through a padded shared tile and 16-byte stores).
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait

from .walk import cluster_block, expert_units

BM = 128                # CTA tile rows: 2 math warpgroups x 64
BK = 128                # one K step = one scale block
WG_ROWS = 64
EPI_N = 64                # columns of one TMA store box (the 128-byte swizzle of bf16)
THREADS_PER_WG = 128
MATH_WGS = 2
LOAD_REGS = 40
MATH_REGS = 232
SMEM_LIMIT = 227 * 1024   # opt-in shared memory per CTA (H100 / H200)


def _select(cond, if_value, else_value):
    """cluster_block's select on device values (an int32 select instruction)."""
    return cutlass.Int32(cutlass.select_(cond, if_value, else_value))


class MaskedGemmSm90:
    """Compile-time configuration: bn (128 | 192), cluster_m (1 | 2), stages, num_ctas (the persistent grid,
    a multiple of cluster_m), sa_tma, tma_store (module docstring), sb_tiles (the most K steps: each math
    warpgroup keeps the weight scales of every K step of its tile in shared memory, bn / 128 rounded up per
    step). __call__ takes pointers and int32 sizes
    (see masked_gemm._args)."""

    def __init__(self, bn: int, cluster_m: int, stages: int, num_ctas: int, sa_tma: bool = True,
                 tma_store: bool = True, sb_tiles: int = 256, partial_smem: bool = True):
        self.bn, self.cluster_m, self.stages, self.num_ctas = bn, cluster_m, stages, num_ctas
        self.sb_tiles = sb_tiles        # K steps whose weight scales the per-warpgroup buffers hold (K / 128 max)
        self.sb_blocks = -(-bn // 128)  # weight-scale blocks (128 columns each) a tile's columns touch per K step
        self.sa_tma, self.tma_store = sa_tma, tma_store
        self.partial_smem = partial_smem   # tma_store: partial sub-tiles staged in shared memory (else from registers)
        self.tile_mnk = (BM, bn, BK)
        self.threads = (1 + MATH_WGS) * THREADS_PER_WG

    def _c_pitch(self) -> int:
        """Row pitch (elements) of a warpgroup's bf16 output tile in shared memory (tma_store=False): BN + 8, so
        that the 8 rows one warp writes at once start 4 banks apart (no conflicts), every row 16-byte aligned."""
        return self.bn + 8

    def _layouts(self):
        """Tiled MMA (2 warpgroups along M, fp8 k-major, fp32 acc), the swizzled staged smem layouts of A and B,
        the A scales' ring (BM fp32 per stage) and the output staging: tma_store - BN / 64 swizzled 64 x 64 bf16
        boxes per math warpgroup (the TMA store's 128-byte swizzle: a warp's 8 rows hit 8 different 16-byte
        columns, no bank conflicts); else one padded 64 x BN tile per warpgroup."""
        f8 = cutlass.Float8E4M3FN
        kmaj = warpgroup.OperandMajorMode.K
        self.tiled_mma = sm90_utils.make_trivial_tiled_mma(f8, f8, kmaj, kmaj, cutlass.Float32, (MATH_WGS, 1, 1),
                                                           tiler_mn=(WG_ROWS, self.bn))
        row_major = utils.LayoutEnum.ROW_MAJOR
        layouts = []
        for rows in (BM, self.bn):
            atom = warpgroup.make_smem_layout_atom(sm90_utils.get_smem_layout_atom(row_major, f8, BK), f8)
            layouts.append(cute.tile_to_shape(atom, (rows, BK, self.stages), order=(0, 1, 2)))
        self.a_smem_staged, self.b_smem_staged = layouts
        self.sa_smem_staged = cute.make_layout((BM, 1, self.stages), stride=(1, BM, BM))
        self.sb_per_wg = self.sb_blocks * self.sb_tiles
        self.boxes = self.bn // EPI_N                        # TMA store boxes per warpgroup sub-tile
        if cutlass.const_expr(self.tma_store):
            self.c_smem = sm90_utils.make_smem_layout_epi(cutlass.BFloat16, row_major, (WG_ROWS, EPI_N),
                                                          MATH_WGS * self.boxes)
        else:
            pitch = self._c_pitch()
            self.c_smem = cute.make_layout((WG_ROWS, self.bn, MATH_WGS), stride=(pitch, 1, WG_ROWS * pitch))

    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, b_ptr: cute.Pointer, sa_ptr: cute.Pointer, sb_ptr: cute.Pointer,
                 cnt_ptr: cute.Pointer, out_ptr: cute.Pointer, e_num: cutlass.Int32, m: cutlass.Int32,
                 n: cutlass.Int32, k: cutlass.Int32, sa_strides: tuple, sb_strides: tuple, stream):
        """a [E·M, K] fp8 viewed (M, K, E); b [E, N, K] viewed (N, K, E); sa fp32 logical (M, K/128, E) with
        sa_strides (m, k, e) in elements (sa_tma: m's stride 1, the others multiples of 4, not read);
        sb fp32 (ceil(N/128), K/128, E) with sb_strides (n, k, e); cnt [E] int32; out bf16 [E·M, N] viewed
        (M, N, E)."""
        self._layouts()
        kb = k // BK
        nb = (n + 127) // 128
        mA = cute.make_tensor(a_ptr, cute.make_ordered_layout((m, cute.assume(k, BK), e_num), order=(1, 0, 2)))
        mB = cute.make_tensor(b_ptr, cute.make_ordered_layout((n, cute.assume(k, BK), e_num), order=(1, 0, 2)))
        mC = cute.make_tensor(out_ptr, cute.make_ordered_layout((m, cute.assume(n, 8), e_num), order=(1, 0, 2)))
        if cutlass.const_expr(self.sa_tma):
            mSA = cute.make_tensor(sa_ptr, cute.make_layout((cute.assume(m, 4), kb, e_num), stride=(
                1, cute.assume(sa_strides[1], 4), cute.assume(sa_strides[2], 4))))
        else:
            mSA = cute.make_tensor(sa_ptr, cute.make_layout((m, kb, e_num), stride=sa_strides))
        mSB = cute.make_tensor(sb_ptr, cute.make_layout((nb, kb, e_num), stride=sb_strides))
        mCnt = cute.make_tensor(cnt_ptr, cute.make_layout(e_num))
        a_op = cpasync.CopyBulkTensorTileG2SOp()
        b_op = cpasync.CopyBulkTensorTileG2SMulticastOp() if self.cluster_m > 1 else a_op
        tma_a, tA = cpasync.make_tiled_tma_atom(a_op, mA, cute.slice_(self.a_smem_staged, (None, None, 0)),
                                                (BM, BK))
        tma_b, tB = cpasync.make_tiled_tma_atom(b_op, mB, cute.slice_(self.b_smem_staged, (None, None, 0)),
                                                (self.bn, BK), num_multicast=self.cluster_m)
        tma_b1, tB1 = None, mB          # cluster_m = 2: B loaded whole by one CTA (tiles without multicast)
        if cutlass.const_expr(self.cluster_m > 1):
            tma_b1, tB1 = cpasync.make_tiled_tma_atom(a_op, mB, cute.slice_(self.b_smem_staged, (None, None, 0)),
                                                      (self.bn, BK))
        tma_sa, tSA = None, mSA
        if cutlass.const_expr(self.sa_tma):
            tma_sa, tSA = cpasync.make_tiled_tma_atom(a_op, mSA, cute.slice_(self.sa_smem_staged, (None, None, 0)),
                                                      (BM, 1))
        tma_c, tC = None, mC
        if cutlass.const_expr(self.tma_store):
            tma_c, tC = cpasync.make_tiled_tma_atom(cpasync.CopyBulkTensorTileS2GOp(), mC,
                                                    cute.slice_(self.c_smem, (None, None, 0)), (WG_ROWS, EPI_N))
        @cute.struct
        class Storage:
            bars: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            sA: cute.struct.Align[cute.struct.MemRange[cutlass.Float8E4M3FN, cute.cosize(self.a_smem_staged)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[cutlass.Float8E4M3FN, cute.cosize(self.b_smem_staged)], 1024]
            sC: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, cute.cosize(self.c_smem)], 1024]
            sSA: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, cute.cosize(self.sa_smem_staged)], 128]
            sSB: cute.struct.Align[cute.struct.MemRange[cutlass.Float32, MATH_WGS * self.sb_per_wg], 16]

        self.storage = Storage
        if cutlass.const_expr(Storage.size_in_bytes() > SMEM_LIMIT):
            raise ValueError(f"shared memory: {Storage.size_in_bytes()} bytes over the {SMEM_LIMIT} of an SM90 CTA "
                             f"(stages={self.stages}, sb_tiles={self.sb_tiles})")
        self.kernel(tma_a, tA, tma_b, tB, tma_b1, tB1, tma_sa, tSA, mSB, mCnt, tma_c, tC, mC, self.tiled_mma, self.a_smem_staged,
                    self.b_smem_staged, self.sa_smem_staged, self.c_smem).launch(
            grid=[self.num_ctas, 1, 1], block=[self.threads, 1, 1], cluster=[self.cluster_m, 1, 1],
            min_blocks_per_mp=1, stream=stream)

    # ------------------------------------------------------------------------------------------ tile walk

    @cute.jit
    def _units(self, cnt: cutlass.Int32, n_tiles: cutlass.Int32) -> cutlass.Int32:
        """Cluster tiles of an expert with cnt valid rows (walk.expert_units)."""
        return expert_units((cnt + BM - 1) // BM, n_tiles, self.cluster_m)

    @cute.jit
    def _total(self, mCnt: cute.Tensor, n_tiles: cutlass.Int32) -> cutlass.Int32:
        total = cutlass.Int32(0)
        for e in range(cute.size(mCnt)):
            total += self._units(mCnt[e], n_tiles)
        return total

    @cute.jit
    def _locate(self, t, e, base, tiles_e, mCnt: cute.Tensor, n_tiles, rank):
        """Cluster tile t -> (e, base, tiles_e) moved on to its expert (base: its first tile, tiles_e: its
        count), and this CTA's (m-tile, n-tile, multicast) in it (walk.cluster_block)."""
        while t >= base + tiles_e:
            base += tiles_e
            e += 1
            tiles_e = self._units(mCnt[e], n_tiles)
        mt, nt, mc = cluster_block(t - base, (mCnt[e] + BM - 1) // BM, n_tiles, rank, self.cluster_m,
                                   _select, cutlass.max)
        return e, base, tiles_e, mt, nt, mc

    # ------------------------------------------------------------------------------------------ kernel

    @cute.kernel
    def kernel(self, tma_a: cute.CopyAtom, tA: cute.Tensor, tma_b: cute.CopyAtom, tB: cute.Tensor, tma_b1,
               tB1: cute.Tensor, tma_sa,
               tSA: cute.Tensor, mSB: cute.Tensor, mCnt: cute.Tensor, tma_c, tC: cute.Tensor, mC: cute.Tensor,
               tiled_mma: cute.TiledMma, a_smem_staged: cute.ComposedLayout, b_smem_staged: cute.ComposedLayout,
               sa_smem_staged: cute.Layout, c_smem):
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // THREADS_PER_WG)
        if warp == 0:
            for atom in (tma_a, tma_b, tma_b1, tma_sa, tma_c):
                if cutlass.const_expr(atom is not None):
                    cpasync.prefetch_descriptor(atom)
        rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        smem = cutlass.utils.SmemAllocator()
        st = smem.allocate(self.storage)
        tx = (cute.size_in_bytes(cutlass.Float8E4M3FN, cute.slice_(a_smem_staged, (None, None, 0)))
              + cute.size_in_bytes(cutlass.Float8E4M3FN, cute.slice_(b_smem_staged, (None, None, 0))))
        if cutlass.const_expr(self.sa_tma):
            tx += BM * 4
        pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=st.bars.data_ptr(), num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.cluster_m * MATH_WGS * 4),
            tx_count=tx, cta_layout_vmnk=cute.make_layout((1, self.cluster_m, 1, 1)), defer_sync=True)
        pipeline_init_arrive(cluster_shape_mn=(self.cluster_m, 1), is_relaxed=True)
        sA = st.sA.get_tensor(a_smem_staged.outer, swizzle=a_smem_staged.inner)
        sB = st.sB.get_tensor(b_smem_staged.outer, swizzle=b_smem_staged.inner)
        sSA = st.sSA.get_tensor(sa_smem_staged)
        n_tiles = (cute.size(mC, mode=[1]) + self.bn - 1) // self.bn
        k_tiles = cute.size(tA, mode=[1]) // BK
        pipeline_init_wait(cluster_shape_mn=(self.cluster_m, 1))
        if wg == 0:
            cute.arch.setmaxregister_decrease(LOAD_REGS)
            if warp == 0:
                self._producer(tma_a, tA, tma_b, tB, tma_b1, tB1, tma_sa, tSA, sA, sB, sSA, pipe, mCnt, rank, n_tiles, k_tiles)
        else:
            cute.arch.setmaxregister_increase(MATH_REGS)
            sCf = st.sC.get_tensor(cute.make_layout(cute.cosize(c_smem)))     # flat view (_store_tma's writes)
            if cutlass.const_expr(self.tma_store):
                sC = st.sC.get_tensor(c_smem.outer, swizzle=c_smem.inner)
            else:
                sC = st.sC.get_tensor(c_smem)[(None, None, wg - 1)]
            sSB = cute.make_tensor(st.sSB.data_ptr() + (wg - 1) * self.sb_per_wg, cute.make_layout(self.sb_per_wg))
            self._consumer(tiled_mma, sA, sB, sSA, sSB, sC, sCf, pipe, tSA, mSB, mCnt, tma_c, tC, mC, wg - 1, rank,
                           n_tiles, k_tiles)

    @cute.jit
    def _producer(self, tma_a, tA, tma_b, tB, tma_b1, tB1, tma_sa, tSA, sA, sB, sSA, pipe, mCnt, rank, n_tiles, k_tiles):
        """Warp 0: TMA loads of every K step of every tile of this CTA (A and, sa_tma, its 128 scales: its own
        m-tile; B: on a multicast tile its half of the n-tile, multicast to the cluster, else the whole of its
        own n-tile; a block past N loads the last n-tile, its math warpgroups skip it)."""
        gA = cute.local_tile(tA, (BM, BK), (None, None, None))            # (BM, BK, m-tiles, k-tiles, E)
        gB = cute.local_tile(tB, (self.bn, BK), (None, None, None))       # (BN, BK, n-tiles, k-tiles, E)
        one = cute.make_layout(1)
        tAsA, tAgA = cpasync.tma_partition(tma_a, 0, one, cute.group_modes(sA, 0, 2), cute.group_modes(gA, 0, 2))
        tBsB, tBgB = cpasync.tma_partition(tma_b, rank, cute.make_layout(self.cluster_m),
                                           cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
        tB1sB, tB1gB = tBsB, tBgB
        if cutlass.const_expr(self.cluster_m > 1):
            tB1sB, tB1gB = cpasync.tma_partition(tma_b1, 0, one, cute.group_modes(sB, 0, 2),
                                                 cute.group_modes(cute.local_tile(tB1, (self.bn, BK),
                                                                                  (None, None, None)), 0, 2))
        tSsS, tSgS = tAsA, tAgA
        if cutlass.const_expr(self.sa_tma):
            gS = cute.local_tile(tSA, (BM, 1), (None, None, None))         # (BM, 1, m-tiles, k-tiles, E)
            tSsS, tSgS = cpasync.tma_partition(tma_sa, 0, one, cute.group_modes(sSA, 0, 2),
                                               cute.group_modes(gS, 0, 2))
        mask = cutlass.Int16((1 << self.cluster_m) - 1)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        clusters = self.num_ctas // self.cluster_m
        total = self._total(mCnt, n_tiles)
        t = cute.arch.block_idx()[0] // self.cluster_m
        e, base, tiles_e = cutlass.Int32(0), cutlass.Int32(0), self._units(mCnt[0], n_tiles)
        while t < total:
            e, base, tiles_e, mt, nt, mc = self._locate(t, e, base, tiles_e, mCnt, n_tiles, rank)
            nt = cutlass.min(nt, n_tiles - 1)
            for kt in range(k_tiles):
                pipe.producer_acquire(state)
                bar = pipe.producer_get_barrier(state)
                cute.copy(tma_a, tAgA[(None, mt, kt, e)], tAsA[(None, state.index)], tma_bar_ptr=bar)
                if cutlass.const_expr(self.sa_tma):
                    cute.copy(tma_sa, tSgS[(None, mt, kt, e)], tSsS[(None, state.index)], tma_bar_ptr=bar)
                if cutlass.const_expr(self.cluster_m > 1):
                    if mc:
                        cute.copy(tma_b, tBgB[(None, nt, kt, e)], tBsB[(None, state.index)], tma_bar_ptr=bar,
                                  mcast_mask=mask)
                    else:
                        cute.copy(tma_b1, tB1gB[(None, nt, kt, e)], tB1sB[(None, state.index)], tma_bar_ptr=bar)
                else:
                    cute.copy(tma_b, tBgB[(None, nt, kt, e)], tBsB[(None, state.index)], tma_bar_ptr=bar)
                pipe.producer_commit(state)
                state.advance()
            t += clusters
        pipe.producer_tail(state)

    @cute.jit
    def _consumer(self, tiled_mma, sA, sB, sSA, sSB, sC, sCf, pipe, mSA, mSB, mCnt, tma_c, tC, mC, mwg, rank,
                  n_tiles, k_tiles):
        """Math warpgroup mwg (0 | 1): rows mwg·64.. of each CTA tile (_mainloop), then the bf16 stores of the
        rows < masked_m[e]."""
        tidx, _, _ = cute.arch.thread_idx()
        thr_mma = tiled_mma.get_slice(tidx - THREADS_PER_WG)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        acc_shape = thr_mma.partition_C(cute.make_identity_tensor((BM, self.bn))).shape
        acc = cute.make_rmem_tensor(acc_shape, cutlass.Float32)
        final = cute.make_rmem_tensor(acc_shape, cutlass.Float32)
        lane = cute.arch.lane_idx()
        # wgmma D fragment (PTX m64nNk32): value i = c + 2·h + 4·j is row (warp % 4)·16 + lane / 4 + 8h,
        # column 2·(lane % 4) + c + 8j of the warpgroup's 64 x BN sub-tile
        row_in = (cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4) * 16 + lane // 4
        col_in = 2 * (lane % 4)
        rel = (lane < self.cluster_m, lane % self.cluster_m)     # _release's signalling lanes and their CTA
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        clusters = self.num_ctas // self.cluster_m
        total = self._total(mCnt, n_tiles)
        t = cute.arch.block_idx()[0] // self.cluster_m
        e, base, tiles_e = cutlass.Int32(0), cutlass.Int32(0), self._units(mCnt[0], n_tiles)
        n = cute.size(mC, mode=[1])
        while t < total:
            e, base, tiles_e, mt, nt, _ = self._locate(t, e, base, tiles_e, mCnt, n_tiles, rank)
            cnt = _select(nt < n_tiles, mCnt[e], 0)          # a block past N (odd n-tile count): skipped
            row0 = mt * BM + mwg * WG_ROWS
            col0 = nt * self.bn
            final.fill(0.0)
            state = self._mainloop(tiled_mma, tCrA, tCrB, acc, final, sSA, sSB, pipe, state, mSA, mSB, e, cnt,
                                   row0, col0, row_in, mwg, k_tiles, rel)
            if row0 < cnt:
                if cutlass.const_expr(self.tma_store):
                    if row0 + WG_ROWS <= cnt:
                        self._store_tma(final, sC, sCf, tma_c, tC, e, row0, col0, row_in, col_in, n, mwg)
                    elif cutlass.const_expr(self.partial_smem):
                        self._store_partial(final, sCf, mC, e, row0, col0, row_in, col_in, cnt, n, mwg)
                    else:
                        self._store_regs(final, mC, e, row0 + row_in, col0 + col_in, cnt, n)
                else:
                    self._store(final, sC, mC, e, row0, col0, row_in, col_in, cnt, n, mwg)
            t += clusters
        if cutlass.const_expr(self.tma_store):
            if tidx % THREADS_PER_WG == 0:
                cute.arch.cp_async_bulk_wait_group(0, read=True)     # shared memory outlives the last store

    @cute.jit
    def _mainloop(self, tiled_mma, tCrA, tCrB, acc, final, sSA, sSB, pipe, state, mSA, mSB, e, cnt, row0, col0,
                  row_in, mwg, k_tiles, rel):
        """The tile's K loop (two loops: a warpgroup whose rows are all past cnt only waits and releases each
        slot). Returns the pipeline state."""
        if row0 < cnt:
            state = self._k_loop(tiled_mma, tCrA, tCrB, acc, final, sSA, sSB, pipe, state, mSA, mSB, e, cnt,
                                 row0, col0, row_in, mwg, k_tiles, rel)
        else:
            state = self._k_skip(pipe, state, k_tiles, rel)
        return state

    @cute.jit
    def _k_skip(self, pipe, state, k_tiles, rel):
        for kt in range(k_tiles):
            pipe.consumer_wait(state)
            self._release(pipe, state, rel)
            state.advance()
        return state

    @cute.jit
    def _k_loop(self, tiled_mma, tCrA, tCrB, acc, final, sSA, sSB, pipe, state, mSA, mSB, e, cnt, row0, col0,
                row_in, mwg, k_tiles, rel):
        """Per 128-K step a fresh wgmma accumulator, wait, release the slot, promote into `final`. The weight
        scales of every step come from the warpgroup's shared-memory copy (_load_sb); the row scales from the
        stage's TMA'd 128 (sa_tma), else global loads one step ahead."""
        sb_t = self._load_sb(sSB, mSB, col0, e, k_tiles, mwg)
        mid_lo = col0 % 128 == 0               # bn = 192: columns 64..127 of the tile lie in block blk_lo
        r0 = cutlass.min(row0 + row_in, cnt - 1)          # (global scales) rows past the count read a valid scale
        r1 = cutlass.min(row0 + row_in + 8, cnt - 1)
        # (sa_tma) the thread's two rows in the stage's 128 scales: (row pair, stage)
        sa_t = cute.make_tensor(sSA.iterator + (mwg * WG_ROWS + row_in), cute.make_layout(
            (2, self.stages), stride=(8, BM)))
        sa0, sa1 = self._row_scales(mSA, r0, r1, 0, e)
        for kt in cutlass.range(k_tiles, unroll=2):
            pipe.consumer_wait(state)
            # (global scales) the next step's, loaded while this step's wgmma runs (L2 latency)
            na0, na1 = self._row_scales(mSA, r0, r1, cutlass.min(kt + 1, k_tiles - 1), e)
            if cutlass.const_expr(self.sa_tma):
                sa0, sa1 = sa_t[(0, state.index)], sa_t[(1, state.index)]
            sb = sb_t[(None, kt)].load()
            warpgroup.fence()
            for kb in cutlass.range_constexpr(cute.size(tCrA, mode=[2])):
                tiled_mma.set(warpgroup.Field.ACCUMULATE, kb != 0)
                cute.gemm(tiled_mma, acc, tCrA[(None, None, kb, state.index)], tCrB[(None, None, kb, state.index)],
                          acc)
            warpgroup.commit_group()
            warpgroup.wait_group(0)
            self._release(pipe, state, rel)
            sb_hi = sb[1] if cutlass.const_expr(self.bn == 192) else sb[0]
            self._promote(acc, final, sa0 * sb[0], sa1 * sb[0], sa0 * sb_hi, sa1 * sb_hi, mid_lo)
            sa0, sa1 = na0, na1
            state.advance()
        return state

    @cute.jit
    def _release(self, pipe, state, rel):
        """The consumer release of the slot: lanes 0..cluster_m-1 of each warp arrive on the slot's empty barrier
        of CTA `lane` (rel: the lane's precomputed (signals, peer), outside the loops)."""
        signals, peer = rel
        if signals:
            bar = pipe.sync_object_empty.get_barrier(state.index)
            if cutlass.const_expr(self.cluster_m > 1):
                cute.arch.mbarrier_arrive(bar, peer)
            else:
                cute.arch.mbarrier_arrive(bar)

    @cute.jit
    def _load_sb(self, sSB, mSB, col0, e, k_tiles, mwg):
        """The tile's weight scales of every K step (block of columns 0.. and, bn = 192, the next block: the
        last block where N ends inside) into the warpgroup's shared-memory buffer, between two named barriers of
        the warpgroup (the previous tile's reads are done before the writes, the writes before the reads).
        Returns the (blocks, K step) view."""
        nsb = self.sb_blocks
        bar = 1 + mwg                                       # named barrier of this warpgroup (0: __syncthreads)
        nb_last = cute.size(mSB, mode=[0]) - 1
        blk_lo = cutlass.min(col0 // 128, nb_last)
        t = cute.arch.thread_idx()[0] % THREADS_PER_WG
        cute.arch.barrier(barrier_id=bar, number_of_threads=THREADS_PER_WG)
        for i in cutlass.range(t, nsb * k_tiles, THREADS_PER_WG):
            sSB[i] = mSB[(cutlass.min(blk_lo + i % nsb, nb_last), i // nsb, e)]
        cute.arch.barrier(barrier_id=bar, number_of_threads=THREADS_PER_WG)
        return cute.make_tensor(sSB.iterator, cute.make_layout((nsb, self.sb_tiles), stride=(1, nsb)))

    @cute.jit
    def _row_scales(self, mSA, r0, r1, kt, e):
        """(not sa_tma) K step kt's scales of the thread's two rows (global loads); sa_tma: placeholders."""
        sa0, sa1 = cutlass.Float32(1.0), cutlass.Float32(1.0)
        if cutlass.const_expr(not self.sa_tma):
            sa0, sa1 = mSA[(r0, kt, e)], mSA[(r1, kt, e)]
        return sa0, sa1

    @cute.jit
    def _promote(self, acc, final, s0_lo, s1_lo, s0_hi, s1_hi, mid_lo):
        """final[i] = fma(acc[i], scale of i's row and column block, final[i]). BN = 128: one weight block. BN = 192:
        the tile starts on a block boundary (columns 0..127 low, 128.. high) or half-way (0..63 low, 64.. high),
        so columns 0..63 are always low, 128..191 always high and only 64..127 depend on mid_lo: 2 selects per
        step, none per value."""
        s0_mid, s1_mid = s0_lo, s1_lo
        if cutlass.const_expr(self.bn == 192):
            s0_mid = s0_lo if mid_lo else s0_hi
            s1_mid = s1_lo if mid_lo else s1_hi
        for i in cutlass.range_constexpr(cute.size(acc)):
            h = (i // 2) % 2
            col = (i // 4) * 8
            s = s1_lo if h else s0_lo
            if cutlass.const_expr(self.bn == 192 and col >= 64):
                s = (s1_hi if h else s0_hi) if col >= 128 else (s1_mid if h else s0_mid)
            final[i] = cute.math.fma(acc[i], s, final[i])

    @cute.jit
    def _store_tma(self, final, sC, sCf, tma_c, tC, e, row0, col0, row_in, col_in, n, mwg):
        """A sub-tile whose 64 rows are all valid: registers -> the warpgroup's BN / 64 swizzled boxes (once its
        previous TMA store has read them) -> one TMA store per box inside N (the TMA clips columns >= N); the
        stores run on while the warpgroup starts its next tile."""
        bar = 1 + mwg                                       # named barrier of this warpgroup (0: __syncthreads)
        first = cute.arch.thread_idx()[0] % THREADS_PER_WG == 0
        self._stage_swizzled(final, sCf, row_in, col_in, mwg)
        cute.arch.fence_proxy("async.shared", space="cta")          # generic-proxy writes -> the TMA's reads
        cute.arch.barrier(barrier_id=bar, number_of_threads=THREADS_PER_WG)
        if first:
            gC = cute.local_tile(tC, (WG_ROWS, EPI_N), (None, None, None))     # (64, 64, m-blocks, n-blocks, E)
            tCsC, tCgC = cpasync.tma_partition(tma_c, 0, cute.make_layout(1), cute.group_modes(sC, 0, 2),
                                               cute.group_modes(gC, 0, 2))
            for j in cutlass.range_constexpr(self.boxes):
                if col0 + j * EPI_N < n:
                    cute.copy(tma_c, tCsC[(None, mwg * self.boxes + j)],
                              tCgC[(None, row0 // WG_ROWS, col0 // EPI_N + j, e)])
            cute.arch.cp_async_bulk_commit_group()

    @cute.jit
    def _stage_swizzled(self, final, sCf, row_in, col_in, mwg):
        """The warpgroup's 64 x BN sub-tile as bf16 into its BN / 64 swizzled 64 x 64 boxes (the TMA store's
        layout), once its previous TMA store has read them (the warpgroup's named barrier after the wait)."""
        if cute.arch.thread_idx()[0] % THREADS_PER_WG == 0:
            cute.arch.cp_async_bulk_wait_group(0, read=True)
        cute.arch.barrier(barrier_id=1 + mwg, number_of_threads=THREADS_PER_WG)
        # the 128-byte swizzle by hand on a flat view (16-byte column chunk ^= row % 8, row % 8 = lane / 4 for
        # every value of the thread): one runtime XOR per chunk, the rest immediate offsets (the swizzled
        # view's per-value address math was hoisted out of the tile loop and spilled)
        r8 = row_in % 8
        for i in cutlass.range_constexpr(cute.size(final)):
            c = i % 2 + 8 * (i // 4)
            box = mwg * self.boxes + c // EPI_N
            row = row_in + 8 * ((i // 2) % 2)
            chunk = ((c % EPI_N) // 8) ^ r8
            sCf[box * WG_ROWS * EPI_N + row * EPI_N + chunk * 8 + col_in + i % 2] = final[i].to(cutlass.BFloat16)

    @cute.jit
    def _store_partial(self, final, sCf, mC, e, row0, col0, row_in, col_in, cnt, n, mwg):
        """The partial sub-tile (rows past cnt inside it) through the warpgroup's swizzled boxes: staged as for
        the TMA store, then 16-byte stores of the rows < cnt and columns < n (n a multiple of 8), 8 threads per
        128-byte row segment (coalesced; 4-byte stores from registers took a tile's worth of time at K = 2048)."""
        bar = 1 + mwg
        self._stage_swizzled(final, sCf, row_in, col_in, mwg)
        cute.arch.barrier(barrier_id=bar, number_of_threads=THREADS_PER_WG)
        t = cute.arch.thread_idx()[0] % THREADS_PER_WG
        vecs = self.bn // 8                                 # 16-byte vectors per row
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), cutlass.BFloat16, num_bits_per_copy=128)
        sCv = cute.zipped_divide(sCf, (8,))                  # ((8), flat 16-byte chunks)
        gCv = cute.zipped_divide(mC[(None, None, e)], (1, 8))
        for v in cutlass.range_constexpr(WG_ROWS * vecs // THREADS_PER_WG):
            r = (v * THREADS_PER_WG + t) // vecs
            c = (v * THREADS_PER_WG + t) % vecs
            if row0 + r < cnt and col0 + 8 * c < n:
                chunk = (mwg * self.boxes + c // 8) * (WG_ROWS * EPI_N // 8) + r * (EPI_N // 8) + ((c % 8) ^ (r % 8))
                cute.copy(atom, sCv[(None, chunk)], gCv[(None, (row0 + r, col0 // 8 + c))])

    @cute.jit
    def _store_regs(self, final, mC, e, row, col, cnt, n):
        """The partial sub-tile (rows past cnt inside it): bf16 stores from registers of rows < cnt, columns < n
        (n a multiple of 8: a thread's column pair is all in or all out)."""
        for i in cutlass.range_constexpr(cute.size(final)):
            r = row + 8 * ((i // 2) % 2)
            c = col + i % 2 + 8 * (i // 4)
            if r < cnt and c < n:
                mC[(r, c, e)] = final[i].to(cutlass.BFloat16)

    @cute.jit
    def _store(self, final, sC, mC, e, row0, col0, row_in, col_in, cnt, n, mwg):
        """The warpgroup's 64 x BN tile as bf16: registers -> its shared-memory tile (padded rows), then 16-byte
        stores of the rows < cnt and columns < n (n is a multiple of 8: a vector is all in or all out), 8
        threads per 128-byte row segment (coalesced)."""
        bar = 1 + mwg                                       # named barrier of this warpgroup (0: __syncthreads)
        cute.arch.barrier(barrier_id=bar, number_of_threads=THREADS_PER_WG)    # last tile's reads are done
        for i in cutlass.range_constexpr(cute.size(final)):
            sC[(row_in + 8 * ((i // 2) % 2), col_in + i % 2 + 8 * (i // 4))] = final[i].to(cutlass.BFloat16)
        cute.arch.barrier(barrier_id=bar, number_of_threads=THREADS_PER_WG)
        t = cute.arch.thread_idx()[0] % THREADS_PER_WG
        vecs = self.bn // 8                                 # 16-byte vectors per row
        atom = cute.make_copy_atom(cute.nvgpu.CopyUniversalOp(), cutlass.BFloat16, num_bits_per_copy=128)
        sCv = cute.zipped_divide(sC, (1, 8))                 # ((1, 8), (64, BN / 8))
        gCv = cute.zipped_divide(mC[(None, None, e)], (1, 8))
        for v in cutlass.range_constexpr(WG_ROWS * vecs // THREADS_PER_WG):
            r = (v * THREADS_PER_WG + t) // vecs
            c = (v * THREADS_PER_WG + t) % vecs
            if row0 + r < cnt and col0 + 8 * c < n:
                cute.copy(atom, sCv[(None, (r, c))], gCv[(None, (row0 + r, col0 // 8 + c))])
