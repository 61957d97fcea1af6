"""The CuTe DSL kernel of backend.ops.cute.masked_gemm (imports cutlass at module level: load it lazily).

Masked grouped FP8 GEMM for SM90, FP32 scales (the Hopper recipe). One CTA per SM (persistent), clusters of
CLUSTER_M CTAs along M. Per CTA: warpgroup 0 (warp 0) issues the TMA loads into a STAGES-deep ring (A
[128, 128] of its own m-tile, B [BN, 128]: with CLUSTER_M = 2 each CTA loads half of B and multicasts it
to both CTAs of the cluster, which work on two m-tiles of one (expert, n-tile)); warpgroups 1 and 2 each
run the wgmma of 64 rows x BN per 128-wide K step into a fresh accumulator, wait for it, release the slot
and promote `final = fma(partial, sa[row] * sb[col block], final)` in fp32 (as DeepGEMM and the Gluon
kernel). The tile walk is built on the device from masked_m: cluster tiles (expert, CLUSTER_M m-tiles,
n-tile), m fastest, tile t of cluster c for t = c, c + clusters, ...; the m-tiles of a cluster tile past
masked_m[e] (odd m-tile counts) are walked too, so both CTAs stay in step, but skip their wgmma and stores.
"""
from __future__ import annotations

import cutlass
import cutlass.cute as cute
import cutlass.pipeline as pipeline
import cutlass.utils as utils
import cutlass.utils.hopper_helpers as sm90_utils
from cutlass.cute.nvgpu import cpasync, warpgroup
from cutlass.pipeline import pipeline_init_arrive, pipeline_init_wait

BM = 128                # CTA tile rows: 2 math warpgroups x 64
BK = 128                # one K step = one scale block
WG_ROWS = 64
THREADS_PER_WG = 128
MATH_WGS = 2
LOAD_REGS = 40
MATH_REGS = 232


class MaskedGemmSm90:
    """Compile-time configuration: bn (128 | 192), cluster_m (1 | 2), stages, num_ctas (the persistent grid,
    a multiple of cluster_m). __call__ takes pointers and int32 sizes (see masked_gemm._args)."""

    def __init__(self, bn: int, cluster_m: int, stages: int, num_ctas: int):
        self.bn, self.cluster_m, self.stages, self.num_ctas = bn, cluster_m, stages, num_ctas
        self.tile_mnk = (BM, bn, BK)
        self.threads = (1 + MATH_WGS) * THREADS_PER_WG

    def _c_pitch(self) -> int:
        """Row pitch (elements) of a warpgroup's bf16 output tile in shared memory: BN + 8, so that the 8 rows one
        warp writes at once start 4 banks apart (no conflicts) and every row stays 16-byte aligned."""
        return self.bn + 8

    def _layouts(self):
        """Tiled MMA (2 warpgroups along M, fp8 k-major, fp32 acc) and the swizzled staged smem layouts."""
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

    @cute.jit
    def __call__(self, a_ptr: cute.Pointer, b_ptr: cute.Pointer, sa_ptr: cute.Pointer, sb_ptr: cute.Pointer,
                 cnt_ptr: cute.Pointer, out_ptr: cute.Pointer, e_num: cutlass.Int32, m: cutlass.Int32,
                 n: cutlass.Int32, k: cutlass.Int32, sa_strides: tuple, sb_strides: tuple, stream):
        """a [E·M, K] fp8 viewed (M, K, E); b [E, N, K] viewed (N, K, E); sa fp32 logical (M, K/128, E) with
        sa_strides (m, k, e) in elements; sb fp32 (ceil(N/128), K/128, E) with sb_strides (n, k, e);
        cnt [E] int32; out bf16 [E·M, N] viewed (M, N, E)."""
        self._layouts()
        kb = k // BK
        nb = (n + 127) // 128
        mA = cute.make_tensor(a_ptr, cute.make_ordered_layout((m, cute.assume(k, BK), e_num), order=(1, 0, 2)))
        mB = cute.make_tensor(b_ptr, cute.make_ordered_layout((n, cute.assume(k, BK), e_num), order=(1, 0, 2)))
        mC = cute.make_tensor(out_ptr, cute.make_ordered_layout((m, cute.assume(n, 8), e_num), order=(1, 0, 2)))
        mSA = cute.make_tensor(sa_ptr, cute.make_layout((m, kb, e_num), stride=sa_strides))
        mSB = cute.make_tensor(sb_ptr, cute.make_layout((nb, kb, e_num), stride=sb_strides))
        mCnt = cute.make_tensor(cnt_ptr, cute.make_layout(e_num))
        a_op = cpasync.CopyBulkTensorTileG2SOp()
        b_op = cpasync.CopyBulkTensorTileG2SMulticastOp() if self.cluster_m > 1 else a_op
        tma_a, tA = cpasync.make_tiled_tma_atom(a_op, mA, cute.slice_(self.a_smem_staged, (None, None, 0)),
                                                (BM, BK))
        tma_b, tB = cpasync.make_tiled_tma_atom(b_op, mB, cute.slice_(self.b_smem_staged, (None, None, 0)),
                                                (self.bn, BK), num_multicast=self.cluster_m)

        @cute.struct
        class Storage:
            bars: cute.struct.MemRange[cutlass.Int64, self.stages * 2]
            sA: cute.struct.Align[cute.struct.MemRange[cutlass.Float8E4M3FN, cute.cosize(self.a_smem_staged)], 1024]
            sB: cute.struct.Align[cute.struct.MemRange[cutlass.Float8E4M3FN, cute.cosize(self.b_smem_staged)], 1024]
            sC: cute.struct.Align[cute.struct.MemRange[cutlass.BFloat16, MATH_WGS * WG_ROWS * self._c_pitch()], 128]

        self.storage = Storage
        self.kernel(tma_a, tA, tma_b, tB, mSA, mSB, mCnt, mC, self.tiled_mma, self.a_smem_staged,
                    self.b_smem_staged).launch(grid=[self.num_ctas, 1, 1], block=[self.threads, 1, 1],
                                               cluster=[self.cluster_m, 1, 1], min_blocks_per_mp=1, stream=stream)

    # ------------------------------------------------------------------------------------------ tile walk

    @cute.jit
    def _units(self, cnt: cutlass.Int32, n_tiles: cutlass.Int32) -> cutlass.Int32:
        """Cluster tiles of an expert with cnt valid rows: ceil(cnt / (128 · cluster_m)) x n_tiles."""
        rows = BM * self.cluster_m
        return (cnt + rows - 1) // rows * n_tiles

    @cute.jit
    def _total(self, mCnt: cute.Tensor, n_tiles: cutlass.Int32) -> cutlass.Int32:
        total = cutlass.Int32(0)
        for e in range(cute.size(mCnt)):
            total += self._units(mCnt[e], n_tiles)
        return total

    @cute.jit
    def _locate(self, t, e, base, tiles_e, mCnt: cute.Tensor, n_tiles):
        """Cluster tile t -> (e, base, tiles_e) moved on to its expert (base: its first tile, tiles_e: its
        count), and (m-unit, n-tile) inside it, m-units of one n-tile consecutive."""
        while t >= base + tiles_e:
            base += tiles_e
            e += 1
            tiles_e = self._units(mCnt[e], n_tiles)
        units = tiles_e // n_tiles
        return e, base, tiles_e, (t - base) % units, (t - base) // units

    # ------------------------------------------------------------------------------------------ kernel

    @cute.kernel
    def kernel(self, tma_a: cute.CopyAtom, tA: cute.Tensor, tma_b: cute.CopyAtom, tB: cute.Tensor,
               mSA: cute.Tensor, mSB: cute.Tensor, mCnt: cute.Tensor, mC: cute.Tensor, tiled_mma: cute.TiledMma,
               a_smem_staged: cute.ComposedLayout, b_smem_staged: cute.ComposedLayout):
        tidx, _, _ = cute.arch.thread_idx()
        warp = cute.arch.make_warp_uniform(cute.arch.warp_idx())
        wg = cute.arch.make_warp_uniform(tidx // THREADS_PER_WG)
        if warp == 0:
            cpasync.prefetch_descriptor(tma_a)
            cpasync.prefetch_descriptor(tma_b)
        rank = cute.arch.make_warp_uniform(cute.arch.block_idx_in_cluster())
        smem = cutlass.utils.SmemAllocator()
        st = smem.allocate(self.storage)
        a_bytes = cute.size_in_bytes(cutlass.Float8E4M3FN, cute.slice_(a_smem_staged, (None, None, 0)))
        b_bytes = cute.size_in_bytes(cutlass.Float8E4M3FN, cute.slice_(b_smem_staged, (None, None, 0)))
        cta_vmnk = cute.make_layout((1, self.cluster_m, 1, 1))
        pipe = pipeline.PipelineTmaAsync.create(
            barrier_storage=st.bars.data_ptr(), num_stages=self.stages,
            producer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread),
            consumer_group=pipeline.CooperativeGroup(pipeline.Agent.Thread, self.cluster_m * MATH_WGS * 4),
            tx_count=a_bytes + b_bytes, cta_layout_vmnk=cta_vmnk, defer_sync=True)
        pipeline_init_arrive(cluster_shape_mn=(self.cluster_m, 1), is_relaxed=True)
        sA = st.sA.get_tensor(a_smem_staged.outer, swizzle=a_smem_staged.inner)
        sB = st.sB.get_tensor(b_smem_staged.outer, swizzle=b_smem_staged.inner)
        n = cute.size(mC, mode=[1])
        n_tiles = (n + self.bn - 1) // self.bn
        k_tiles = cute.size(tA, mode=[1]) // BK
        pipeline_init_wait(cluster_shape_mn=(self.cluster_m, 1))
        if wg == 0:
            cute.arch.setmaxregister_decrease(LOAD_REGS)
            if warp == 0:
                self._producer(tma_a, tA, tma_b, tB, sA, sB, pipe, mCnt, rank, n_tiles, k_tiles)
        else:
            cute.arch.setmaxregister_increase(MATH_REGS)
            pitch = self._c_pitch()
            sC = st.sC.get_tensor(cute.make_layout((WG_ROWS, self.bn, MATH_WGS), stride=(pitch, 1, WG_ROWS * pitch)))
            sC = sC[(None, None, wg - 1)]
            self._consumer(tiled_mma, sA, sB, sC, pipe, mSA, mSB, mCnt, mC, wg - 1, rank, n_tiles, k_tiles)

    @cute.jit
    def _producer(self, tma_a, tA, tma_b, tB, sA, sB, pipe, mCnt, rank, n_tiles, k_tiles):
        """Warp 0: TMA loads of every K step of every tile of this CTA (A: its own m-tile; B: its part of the
        n-tile, multicast to the cluster)."""
        gA = cute.local_tile(tA, (BM, BK), (None, None, None))            # (BM, BK, m-tiles, k-tiles, E)
        gB = cute.local_tile(tB, (self.bn, BK), (None, None, None))       # (BN, BK, n-tiles, k-tiles, E)
        tAsA, tAgA = cpasync.tma_partition(tma_a, 0, cute.make_layout(1), cute.group_modes(sA, 0, 2),
                                           cute.group_modes(gA, 0, 2))
        tBsB, tBgB = cpasync.tma_partition(tma_b, rank, cute.make_layout(self.cluster_m),
                                           cute.group_modes(sB, 0, 2), cute.group_modes(gB, 0, 2))
        mask = cutlass.Int16((1 << self.cluster_m) - 1)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Producer, self.stages)
        clusters = self.num_ctas // self.cluster_m
        total = self._total(mCnt, n_tiles)
        t = cute.arch.block_idx()[0] // self.cluster_m
        e, base, tiles_e = cutlass.Int32(0), cutlass.Int32(0), self._units(mCnt[0], n_tiles)
        while t < total:
            e, base, tiles_e, mu, nt = self._locate(t, e, base, tiles_e, mCnt, n_tiles)
            mt = mu * self.cluster_m + rank
            for kt in range(k_tiles):
                pipe.producer_acquire(state)
                bar = pipe.producer_get_barrier(state)
                cute.copy(tma_a, tAgA[(None, mt, kt, e)], tAsA[(None, state.index)], tma_bar_ptr=bar)
                if cutlass.const_expr(self.cluster_m > 1):
                    cute.copy(tma_b, tBgB[(None, nt, kt, e)], tBsB[(None, state.index)], tma_bar_ptr=bar,
                              mcast_mask=mask)
                else:
                    cute.copy(tma_b, tBgB[(None, nt, kt, e)], tBsB[(None, state.index)], tma_bar_ptr=bar)
                pipe.producer_commit(state)
                state.advance()
            t += clusters
        pipe.producer_tail(state)

    @cute.jit
    def _consumer(self, tiled_mma, sA, sB, sC, pipe, mSA, mSB, mCnt, mC, mwg, rank, n_tiles, k_tiles):
        """Math warpgroup mwg (0 | 1): rows mwg·64.. of each CTA tile; per K step a fresh wgmma accumulator,
        wait, release the slot, promote into `final`; then the bf16 stores of rows < masked_m[e]."""
        tidx, _, _ = cute.arch.thread_idx()
        thr_mma = tiled_mma.get_slice(tidx - THREADS_PER_WG)
        tCrA = tiled_mma.make_fragment_A(thr_mma.partition_A(sA))
        tCrB = tiled_mma.make_fragment_B(thr_mma.partition_B(sB))
        acc_shape = thr_mma.partition_C(cute.make_identity_tensor((BM, self.bn))).shape
        acc = cute.make_rmem_tensor(acc_shape, cutlass.Float32)
        final = cute.make_rmem_tensor(acc_shape, cutlass.Float32)
        k_blocks = cute.size(tCrA, mode=[2])
        lane = cute.arch.lane_idx()
        # wgmma D fragment (PTX m64nNk32): value i = c + 2·h + 4·j is row (warp % 4)·16 + lane / 4 + 8h,
        # column 2·(lane % 4) + c + 8j of the warpgroup's 64 x BN sub-tile
        row_in = (cute.arch.make_warp_uniform(cute.arch.warp_idx()) % 4) * 16 + lane // 4
        col_in = 2 * (lane % 4)
        state = pipeline.make_pipeline_state(pipeline.PipelineUserType.Consumer, self.stages)
        clusters = self.num_ctas // self.cluster_m
        total = self._total(mCnt, n_tiles)
        t = cute.arch.block_idx()[0] // self.cluster_m
        e, base, tiles_e = cutlass.Int32(0), cutlass.Int32(0), self._units(mCnt[0], n_tiles)
        n = cute.size(mC, mode=[1])
        nb_last = cute.size(mSB, mode=[0]) - 1
        while t < total:
            e, base, tiles_e, mu, nt = self._locate(t, e, base, tiles_e, mCnt, n_tiles)
            cnt = mCnt[e]
            row0 = (mu * self.cluster_m + rank) * BM + mwg * WG_ROWS
            live = row0 < cnt
            r0 = cutlass.min(row0 + row_in, cnt - 1)          # rows past the count read a valid scale
            r1 = cutlass.min(row0 + row_in + 8, cnt - 1)
            col0 = nt * self.bn
            blk_lo = cutlass.min(col0 // 128, nb_last)
            blk_hi = cutlass.min(blk_lo + 1, nb_last)
            split = (blk_lo + 1) * 128 - col0                  # columns of the tile in block blk_lo
            final.fill(0.0)
            sa0, sa1, sb_lo, sb_hi = self._scales(mSA, mSB, r0, r1, blk_lo, blk_hi, 0, e)
            for kt in range(k_tiles):
                pipe.consumer_wait(state)
                # the next step's scales, loaded while this step's wgmma runs (global loads: L2 latency)
                na0, na1, nb_lo, nb_hi = self._scales(mSA, mSB, r0, r1, blk_lo, blk_hi,
                                                      cutlass.min(kt + 1, k_tiles - 1), e)
                if live:
                    warpgroup.fence()
                    for kb in cutlass.range_constexpr(k_blocks):
                        tiled_mma.set(warpgroup.Field.ACCUMULATE, kb != 0)
                        cute.gemm(tiled_mma, acc, tCrA[(None, None, kb, state.index)],
                                  tCrB[(None, None, kb, state.index)], acc)
                    warpgroup.commit_group()
                    warpgroup.wait_group(0)
                pipe.consumer_release(state)
                if live:
                    self._promote(acc, final, sa0 * sb_lo, sa1 * sb_lo, sa0 * sb_hi, sa1 * sb_hi, split)
                sa0, sa1, sb_lo, sb_hi = na0, na1, nb_lo, nb_hi
                state.advance()
            if live:
                self._store(final, sC, mC, e, row0, col0, row_in, col_in, cnt, n, mwg)
            t += clusters

    @cute.jit
    def _scales(self, mSA, mSB, r0, r1, blk_lo, blk_hi, kt, e):
        """K step kt's scales of the thread's two rows and the tile's (up to) two weight blocks."""
        return mSA[(r0, kt, e)], mSA[(r1, kt, e)], mSB[(blk_lo, kt, e)], mSB[(blk_hi, kt, e)]

    @cute.jit
    def _promote(self, acc, final, s0_lo, s1_lo, s0_hi, s1_hi, split):
        """final[i] = fma(acc[i], scale of i's row and column block, final[i]); columns 8j.. of the tile lie in
        the low weight block while 8j < split (128 or 64 for BN = 192; always for BN = 128)."""
        for i in cutlass.range_constexpr(cute.size(acc)):
            h = (i // 2) % 2
            j = i // 4
            if cutlass.const_expr(self.bn == 128):
                s = s1_lo if h else s0_lo
            else:
                lo = j * 8 < split
                s = (s1_lo if lo else s1_hi) if h else (s0_lo if lo else s0_hi)
            final[i] = cute.math.fma(acc[i], s, final[i])

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
