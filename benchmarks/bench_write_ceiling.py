"""How fast can a kernel write HBM on this card, and what does the permute's reading of x cost? In one run:

    python3 benchmarks/bench_write_ceiling.py --patterns --out OUT/write_ceiling.json

Per size (`--sizes`, default the 268 MB the permute writes at issue 12's shape, and 1 GiB): a device copy (constant
and random data), torch fill_ of int32 words, cudaMemsetAsync (CuPy, when importable), a tl store kernel (one block
per program and persistent, a few widths / warps, with and without the evict-first hint, constant and varying words)
and a Gluon kernel that writes from shared memory by TMA bulk stores; each: median ms (do_bench) and TB/s written.

`--patterns` (`permute_patterns`): the permute's token rows at issue 12's shape (W=4096, top-8 of 32, H=7168; no index
step, dead rows or scales), written in several orders and by several kernels, each from x and without reading x
(constants, or words computed from the indices), against a fill of the same bytes: what the order of the writes
costs, and what reading x costs (read first, read by TMA, prefetched into L2, read in per-program batches, read but
not waited for). Every path's output is checked where it has a defined value, so a path that wrote nothing cannot
look fast. `--only REGEX` / `--once` pick variants and call them once untimed (for ncu).
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import sys
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import repo_on_path, write_json  # noqa: E402

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:          # pragma: no cover - older Triton
    gluon = None

VALUE = 7


@triton.jit
def fill_blocks_kernel(out_ptr, n, BLOCK: tl.constexpr, EVICT: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, tl.full((BLOCK,), 7, tl.int32), mask=offs < n, eviction_policy=EVICT)


@triton.jit
def fill_hash_kernel(out_ptr, n, BLOCK: tl.constexpr):
    """As fill_blocks_kernel, the words varying (bits toggling as real data's), computed: nothing read."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = (offs * 1664525 + 1013904223).to(tl.int32) ^ (offs << 13).to(tl.int32)
    tl.store(out_ptr + offs, v, mask=offs < n)


@triton.jit
def fill_persistent_kernel(out_ptr, n, BLOCK: tl.constexpr, EVICT: tl.constexpr):
    for b in range(tl.program_id(0), tl.cdiv(n, BLOCK), tl.num_programs(0)):
        offs = b.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offs, tl.full((BLOCK,), 7, tl.int32), mask=offs < n, eviction_policy=EVICT)


if gluon is not None:
    @gluon.jit
    def tma_fill_kernel(desc, n_boxes, INFLIGHT: gl.constexpr, num_warps: gl.constexpr):
        BR: gl.constexpr = desc.block_type.shape[0]
        BC: gl.constexpr = desc.block_type.shape[1]
        buf = gl.allocate_shared_memory(gl.int32, [BR, BC], desc.layout)
        blk: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
        buf.store(gl.full([BR, BC], 7, gl.int32, blk))
        fence_async_shared()
        for i in range(gl.program_id(0), n_boxes, gl.num_programs(0)):
            tma.async_copy_shared_to_global(desc, [i * BR, 0], buf)
            tma.store_wait(pendings=INFLIGHT)
        tma.store_wait(pendings=0)


@triton.jit
def rows_kernel(x_ptr, src_ptr, dst_ptr, out_ptr, n, ROW, FROM_X: tl.constexpr, ROWS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Entries pid·ROWS ..: out row dst[i] (ROW int32 words) = x row src[i] (FROM_X), else VALUE words."""
    for j in range(ROWS):
        i = tl.program_id(0) * ROWS + j
        if i < n:
            src = tl.load(src_ptr + i).to(tl.int64)
            dst = tl.load(dst_ptr + i).to(tl.int64)
            for c0 in range(0, ROW, BLOCK):
                cols = c0 + tl.arange(0, BLOCK)
                if FROM_X:
                    v = tl.load(x_ptr + src * ROW + cols, mask=cols < ROW)
                else:
                    v = tl.full((BLOCK,), 7, tl.int32)
                tl.store(out_ptr + dst * ROW + cols, v, mask=cols < ROW)


@triton.jit
def scatter_kernel(x_ptr, map_ptr, out_ptr, W, ROW, K_TOP: tl.constexpr, KP: tl.constexpr, FROM_X: tl.constexpr,
                   SPLIT: tl.constexpr, BLOCK: tl.constexpr, EVICT: tl.constexpr = ""):
    """As the permute's token programs: token t's row (or part q of SPLIT) read once, stored to its K_TOP rows."""
    t = tl.program_id(0) // SPLIT
    part = ROW // SPLIT
    lo = (tl.program_id(0) % SPLIT) * part
    k = tl.arange(0, KP)
    d = tl.load(map_ptr + t * K_TOP + k, mask=k < K_TOP, other=-1)
    base = tl.where(d >= 0, d, 0).to(tl.int64) * ROW
    for c0 in range(lo, lo + part, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        if FROM_X == 1:
            v = tl.load(x_ptr + t.to(tl.int64) * ROW + cols, mask=cols < lo + part)
        elif FROM_X == 2:       # data that toggles the bus as x's does, computed: no load
            v = (t * 1664525 + cols * 1013904223) ^ (cols << 13)
        elif FROM_X == 3:       # x read as in 1, the stores not waiting for it: DRAM sees the same mix of traffic
            xr = tl.load(x_ptr + t.to(tl.int64) * ROW + cols, mask=cols < lo + part)
            tl.store(x_ptr + t.to(tl.int64) * ROW + lo, tl.sum(xr, axis=0), mask=t >= W)     # never: keeps the load
            v = tl.full((BLOCK,), 7, tl.int32)
        else:
            v = tl.full((BLOCK,), 7, tl.int32)
        tl.store(out_ptr + base[:, None] + cols[None, :], tl.broadcast_to(v[None, :], (KP, BLOCK)),
                 mask=(d >= 0)[:, None] & (cols < lo + part)[None, :], eviction_policy=EVICT)


@triton.jit
def scatter_tma_kernel(x_desc, map_ptr, out_ptr, W, ROW, K_TOP: tl.constexpr, KP: tl.constexpr, SUB: tl.constexpr,
                       PARTS: tl.constexpr):
    """As scatter_kernel, the x row read by a TMA load (x viewed [W·SUB, 256] words: a row is SUB sub-rows of 256),
    which does not queue behind the SM's stores as a load from registers does. PARTS programs per token, each
    loading a [SR, 256] box (SR = the power of two >= SUB / PARTS; sub-rows past the token's own masked)."""
    SR: tl.constexpr = x_desc.block_type.shape[0]
    t = tl.program_id(0) // PARTS
    r0 = (tl.program_id(0) % PARTS) * SR
    k = tl.arange(0, KP)
    d = tl.load(map_ptr + t * K_TOP + k, mask=k < K_TOP, other=-1)
    tile = x_desc.load([t * SUB + r0, 0])                                          # [SR, 256]
    r = r0 + tl.arange(0, SR)
    c = tl.arange(0, 256)
    base = tl.where(d >= 0, d, 0).to(tl.int64) * ROW
    off = base[:, None, None] + (r[:, None] * 256 + c[None, :])[None, :, :]
    tl.store(out_ptr + off, tl.broadcast_to(tile[None, :, :], (KP, SR, 256)),
             mask=(d >= 0)[:, None, None] & (r < SUB)[None, :, None])


@triton.jit
def scatter_batch_kernel(x_ptr, map_ptr, out_ptr, W, ROW, PER_PROG, K_TOP: tl.constexpr, KP: tl.constexpr,
                         TB: tl.constexpr, BLOCK: tl.constexpr):
    """Persistent, one program per SM, tokens [pid·PER_PROG, +PER_PROG) in batches of TB: the batch's TB rows loaded
    (one read burst), then stored to their k-th destinations for k = 0..K_TOP-1 (a write burst): reads and writes
    in phases, as every program starts its batches at about the same time."""
    cols = tl.arange(0, BLOCK)
    t_end = tl.minimum(W, (tl.program_id(0) + 1) * PER_PROG)
    for t0 in range(tl.program_id(0) * PER_PROG, t_end, TB):
        t = t0 + tl.arange(0, TB)
        ok = t < t_end
        v = tl.load(x_ptr + t[:, None].to(tl.int64) * ROW + cols[None, :], mask=ok[:, None] & (cols < ROW)[None, :])
        for k in tl.static_range(K_TOP):
            d = tl.load(map_ptr + t * K_TOP + k, mask=ok, other=-1)
            base = tl.where(d >= 0, d, 0).to(tl.int64) * ROW
            tl.store(out_ptr + base[:, None] + cols[None, :], v, mask=(d >= 0)[:, None] & (cols < ROW)[None, :])


@triton.jit
def _grid_wait(cnt_ptr, target, SPIN: tl.constexpr):
    """Arrive at a counter and wait until `target` programs have, or SPIN polls have passed (a hint, not a
    dependency: no program needs another's data, so a program that stops waiting is still correct)."""
    tl.atomic_add(cnt_ptr, 1, sem="release")
    n = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    polls = 0
    while (n < target) & (polls < SPIN):
        n = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        polls += 1


@triton.jit
def scatter_phased_kernel(x_ptr, map_ptr, out_ptr, sync_ptr, W, ROW, PER_PROG, K_TOP: tl.constexpr,
                          KP: tl.constexpr, TB: tl.constexpr, BLOCK: tl.constexpr, SPIN: tl.constexpr,
                          AFTER_WRITES: tl.constexpr):
    """scatter_batch_kernel with the grid in step: after loading its batch every program waits (bounded) until all
    have loaded theirs, so DRAM serves the reads of a round together and then only writes; AFTER_WRITES: also a wait
    after the stores, before the next round's reads. sync_ptr: zeroed int32 counters, two per round."""
    cols = tl.arange(0, BLOCK)
    g = tl.num_programs(0)
    t_end = tl.minimum(W, (tl.program_id(0) + 1) * PER_PROG)
    rounds = tl.cdiv(PER_PROG, TB)
    for r in range(rounds):
        t0 = tl.program_id(0) * PER_PROG + r * TB
        t = t0 + tl.arange(0, TB)
        ok = t < t_end
        v = tl.load(x_ptr + t[:, None].to(tl.int64) * ROW + cols[None, :], mask=ok[:, None] & (cols < ROW)[None, :])
        tl.debug_barrier()
        _grid_wait(sync_ptr + 2 * r, g, SPIN)
        for k in tl.static_range(K_TOP):
            d = tl.load(map_ptr + t * K_TOP + k, mask=ok, other=-1)
            base = tl.where(d >= 0, d, 0).to(tl.int64) * ROW
            tl.store(out_ptr + base[:, None] + cols[None, :], v, mask=(d >= 0)[:, None] & (cols < ROW)[None, :])
        if AFTER_WRITES:
            tl.debug_barrier()
            _grid_wait(sync_ptr + 2 * r + 1, g, SPIN)


@triton.jit
def scatter_multi_kernel(x_ptr, map_ptr, out_ptr, W, ROW, K_TOP: tl.constexpr, KP: tl.constexpr,
                         TOKENS: tl.constexpr, BLOCK: tl.constexpr):
    """TOKENS consecutive tokens per program, whole rows: every row and map loaded before the first store."""
    k = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK)
    t = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    ok = t < W
    v = tl.load(x_ptr + t[:, None].to(tl.int64) * ROW + cols[None, :], mask=ok[:, None] & (cols < ROW)[None, :])
    d = tl.load(map_ptr + t[:, None] * K_TOP + k[None, :], mask=ok[:, None] & (k < K_TOP)[None, :], other=-1)
    base = tl.where(d >= 0, d, 0).to(tl.int64) * ROW
    tl.store(out_ptr + base[:, :, None] + cols[None, None, :], tl.broadcast_to(v[:, None, :], (TOKENS, KP, BLOCK)),
             mask=(d >= 0)[:, :, None] & (cols < ROW)[None, None, :])


@triton.jit
def l2_prefetch_last_kernel(x_ptr, n_rows, ROW_BYTES: tl.constexpr, ROWS: tl.constexpr):
    """As l2_prefetch_kernel, with the evict-last L2 policy (the rows stay while a write stream passes)."""
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    addr = x_ptr.to(tl.pointer_type(tl.int8)) + t.to(tl.int64) * ROW_BYTES
    tl.inline_asm_elementwise(
        "{ .reg .pred p; .reg .b64 pol; setp.ne.b32 p, $2, 0; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
        "@p cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $3, pol; mov.u32 $0, 0; }",
        "=r,l,r,r", [addr, (t < n_rows).to(tl.int32), tl.full((ROWS,), ROW_BYTES, tl.int32)], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def scatter_prefetch_kernel(x_ptr, map_ptr, out_ptr, W, ROW, K_TOP: tl.constexpr, KP: tl.constexpr,
                            BLOCK: tl.constexpr):
    """Persistent: tokens pid, pid + grid, ...; the next token's row and map are loaded before this one's stores."""
    k = tl.arange(0, KP)
    cols = tl.arange(0, BLOCK)
    t = tl.program_id(0)
    step = tl.num_programs(0)
    v = tl.load(x_ptr + t.to(tl.int64) * ROW + cols, mask=(cols < ROW) & (t < W))
    d = tl.load(map_ptr + t * K_TOP + k, mask=(k < K_TOP) & (t < W), other=-1)
    for _ in range(tl.program_id(0), W, step):
        nt = t + step
        nv = tl.load(x_ptr + nt.to(tl.int64) * ROW + cols, mask=(cols < ROW) & (nt < W))
        nd = tl.load(map_ptr + nt * K_TOP + k, mask=(k < K_TOP) & (nt < W), other=-1)
        base = tl.where(d >= 0, d, 0).to(tl.int64) * ROW
        tl.store(out_ptr + base[:, None] + cols[None, :], tl.broadcast_to(v[None, :], (KP, BLOCK)),
                 mask=(d >= 0)[:, None] & (cols < ROW)[None, :])
        t, v, d = nt, nv, nd


@triton.jit
def l2_prefetch_kernel(x_ptr, n_rows, ROW_BYTES: tl.constexpr, ROWS: tl.constexpr):
    """One bulk L2 prefetch (cp.async.bulk.prefetch.L2, SM90) per row of x: rows pid·ROWS .. into L2, nothing read
    into registers."""
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    addr = x_ptr.to(tl.pointer_type(tl.int8)) + t.to(tl.int64) * ROW_BYTES
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
        "=r,l,r,r", [addr, (t < n_rows).to(tl.int32), tl.full((ROWS,), ROW_BYTES, tl.int32)], dtype=tl.int32,
        is_pure=False, pack=1)


@triton.jit
def l2_touch_kernel(x_ptr, sink_ptr, n, BLOCK: tl.constexpr):
    """x read with the evict-last hint (into L2), a word of the sum stored so the loads stay."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(x_ptr + offs, mask=offs < n, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + tl.program_id(0), tl.sum(v, axis=0))


def ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=10, rep=80, return_mode="median"))


def written_ok(buf: torch.Tensor, word: int) -> bool:
    words = buf.view(torch.int32)
    idx = torch.randint(0, words.numel(), (4096,), device=buf.device)
    return bool((words[idx] == word).all()) and int(words[-1]) == word


def paths(nbytes: int) -> dict:
    """name -> (callable writing over an nbytes buffer, the buffer, the int32 word it leaves everywhere)."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    words = buf.view(torch.int32)
    n = words.numel()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    out = {"torch_fill": (lambda: words.fill_(VALUE), buf, VALUE)}
    try:
        import cupy
        stream = torch.cuda.current_stream().cuda_stream
        mbuf = torch.empty_like(buf)        # memset writes bytes: each word 0x07070707
        out["cuda_memset"] = (lambda: cupy.cuda.runtime.memsetAsync(mbuf.data_ptr(), VALUE, nbytes, stream), mbuf,
                              0x07070707)
    except ImportError:
        pass
    for block, warps in ((1024, 4), (4096, 4), (4096, 8), (8192, 8)):
        for evict in ("", "evict_first"):
            out[f"tl_blocks_{block}_w{warps}{'_' + evict if evict else ''}"] = (
                lambda b=block, w=warps, e=evict: fill_blocks_kernel[(triton.cdiv(n, b),)](
                    words, n, BLOCK=b, EVICT=e, num_warps=w), buf, VALUE)
    out["tl_hash_blocks_1024_w4"] = (lambda: fill_hash_kernel[(triton.cdiv(n, 1024),)](words, n, BLOCK=1024,
                                                                                    num_warps=4), buf, None)
    for per_sm in (2, 4, 8):
        out[f"tl_persistent_4096_w8_x{per_sm}"] = (
            lambda p=per_sm: fill_persistent_kernel[(sms * p,)](words, n, BLOCK=4096, EVICT="", num_warps=8),
            buf, VALUE)
    if gluon is not None:
        for br, inflight, per_sm in ((32, 2, 1), (32, 4, 2), (64, 2, 1), (64, 4, 2), (16, 8, 4)):
            layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=2)
            rows = n // 256
            desc = TensorDescriptor(words[:rows * 256].view(rows, 256), [rows, 256], [256, 1], [br, 256], layout)
            out[f"tma_store_{br}x256w_in{inflight}_x{per_sm}"] = (
                lambda d=desc, b=br, i=inflight, p=per_sm: tma_fill_kernel[(sms * p,)](
                    d, triton.cdiv(rows, b), INFLIGHT=i, num_warps=4), buf, VALUE)
    return out


def copy_times(nbytes: int) -> dict:
    """A device copy of nbytes: of one repeated word, and of random words (whether the data's bits matter)."""
    src = torch.full((nbytes // 4,), VALUE, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    t = ms(lambda: dst.copy_(src))
    src.random_()
    return {"copy_ms": t, "copy_tb_s_read_plus_written": 2 * nbytes / t / 1e9,
            "copy_random_data_ms": ms(lambda: dst.copy_(src))}


def measure(nbytes: int) -> dict:
    rec = dict(copy_times(nbytes), writes={})
    print(nbytes, {k: v for k, v in rec.items() if k != "writes"}, flush=True)
    for name, (fn, buf, word) in paths(nbytes).items():
        try:
            buf.zero_()
            fn()
            torch.cuda.synchronize()
            ok = None if word is None else written_ok(buf, word)
            t = ms(fn)
            rec["writes"][name] = dict(ms=t, tb_s=nbytes / t / 1e9,
                                       vs_copy_rate=(nbytes / t) / (2 * nbytes / rec["copy_ms"]), output_checked=ok)
        except Exception as exc:     # one path failing (an old Triton, no CuPy) leaves the others measured
            rec["writes"][name] = dict(error=repr(exc)[:500])
        print(nbytes, name, rec["writes"][name], flush=True)
    return rec


def _pattern_inputs(w: int, h: int, e: int, k_top: int) -> SimpleNamespace:
    """x [W, H/4] int32 words, the permute's map and counts for random top-k ids (launch._permute_index_step), the
    output rows [E·M, H/4], the valid (token, slot) pairs in token order, and the expected output."""
    repo_on_path()
    from backend.ops.triton import launch as L
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.argsort(torch.rand(w, e, device="cuda", generator=gen), dim=1)[:, :k_top].to(torch.int64)
    m = int(torch.bincount(ids.flatten(), minlength=e).max()) + 64
    imap, counts, _, _ = L._permute_index_step(ids, e, m, None, False)
    row = h // 4
    x = torch.randint(0, 1 << 30, (w, row), dtype=torch.int32, device="cuda", generator=gen)
    flat = imap.flatten().long()
    tok = (torch.arange(w * k_top, device="cuda") // k_top)[flat >= 0]
    dst = flat[flat >= 0]
    out = torch.empty((e * m, row), dtype=torch.int32, device="cuda")
    want = torch.zeros_like(out)
    want[dst] = x[tok]
    return SimpleNamespace(L=L, gen=gen, w=w, h=h, e=e, k_top=k_top, m=m, row=row, x=x, imap=imap.contiguous(),
                           counts=counts, tok=tok, dst=dst, n=dst.numel(), out=out, want=want,
                           sms=torch.cuda.get_device_properties(0).multi_processor_count)


def _order_variants(P) -> dict:
    """rows_kernel over the valid pairs in token order, slot order, random order, and to sequential rows; from x and
    as constants; a few program shapes. name -> (callable, output check or None)."""
    order = torch.argsort(P.dst)
    perm = torch.randperm(P.n, device="cuda", generator=P.gen)
    orders = dict(token_order=(P.tok, P.dst), slot_order=(P.tok[order], P.dst[order]),
                  random=(P.tok[perm], P.dst[perm]), sequential=(P.tok, torch.arange(P.n, device="cuda")))
    out = {}
    for name, (src, d) in orders.items():
        src, d = src.to(torch.int32).contiguous(), d.to(torch.int32).contiguous()
        for from_x in (True, False):
            for rows, block, warps in ((1, 2048, 4), (1, 256, 2), (4, 2048, 4), (4, 1024, 8)):
                fn = lambda src=src, d=d, fx=from_x, r=rows, b=block, nw=warps: rows_kernel[(triton.cdiv(P.n, r),)](
                    P.x, src, d, P.out, P.n, P.row, FROM_X=fx, ROWS=r, BLOCK=b, num_warps=nw)
                check = (lambda src=src, d=d: bool(torch.equal(P.out[d[:4096].long()], P.x[src[:4096].long()]))
                         ) if from_x else None
                out[f"{name}_{'x' if from_x else 'const'}_r{rows}_b{block}_w{warps}"] = (fn, check)
    return out


def _scatter(P, split=2, warps=2, from_x=1, evict=""):
    return lambda: scatter_kernel[(P.w * split,)](P.x, P.imap, P.out, P.w, P.row, K_TOP=P.k_top, KP=P.k_top,
                                                  FROM_X=from_x, SPLIT=split, BLOCK=2048 // split, EVICT=evict,
                                                  num_warps=warps)


def _scatter_variants(P) -> dict:
    """The permute's token programs (scatter_kernel) from x, as constants, as computed words, with x read but not
    waited for, evict-first stores; several tokens per program; a persistent prefetching loop; the launcher's move
    kernel itself (with its dead rows)."""
    full = lambda: bool(torch.equal(P.out, P.want))  # noqa: E731
    v = {f"scatter_{'x' if fx else 'const'}_s{sp}_w{nw}": (_scatter(P, sp, nw, int(fx)), full if fx else None)
         for fx in (True, False) for sp in (1, 2) for nw in (2, 4, 8)}
    v.update(scatter_hash_s2_w2=(_scatter(P, from_x=2), None), scatter_xindep_s2_w2=(_scatter(P, from_x=3), None),
             scatter_x_s2_w2_evict_first=(_scatter(P, evict="evict_first"), full))
    for tk, nw in ((2, 4), (2, 8), (4, 4), (4, 8)):
        v[f"scatter_multi_t{tk}_w{nw}"] = (lambda tk=tk, nw=nw: scatter_multi_kernel[(triton.cdiv(P.w, tk),)](
            P.x, P.imap, P.out, P.w, P.row, K_TOP=P.k_top, KP=P.k_top, TOKENS=tk, BLOCK=2048, num_warps=nw), full)
    for per_sm, nw in ((2, 4), (2, 8), (4, 4), (4, 8), (8, 4), (8, 8)):
        v[f"scatter_prefetch_x{per_sm}_w{nw}"] = (lambda p=per_sm, nw=nw: scatter_prefetch_kernel[(
            min(P.w, P.sms * p),)](P.x, P.imap, P.out, P.w, P.row, K_TOP=P.k_top, KP=P.k_top, BLOCK=2048,
                                   num_warps=nw), full)
    v["permute_move_kernel"] = (lambda: P.L._move_rows(P.x, None, P.imap, P.counts, P.imap.view(-1), P.e, P.m, None),
                                None)
    return v


def _read_first_variants(P) -> dict:
    """Ways to have x read apart from the write stream: an L2 bulk prefetch (plain / evict-last) or an evict-last
    read before the scatter, TMA loads of the rows, per-SM batches loaded then stored, and the same with the grid
    held in step between its read and write phases."""
    full = lambda: bool(torch.equal(P.out, P.want))  # noqa: E731
    sink = torch.empty(triton.cdiv(P.x.numel(), 4096), dtype=torch.int32, device="cuda")
    grid32 = (triton.cdiv(P.w, 32),)
    prefetch = lambda: l2_prefetch_kernel[grid32](P.x, P.w, ROW_BYTES=P.h, ROWS=32, num_warps=1)  # noqa: E731
    last = lambda: l2_prefetch_last_kernel[grid32](P.x, P.w, ROW_BYTES=P.h, ROWS=32, num_warps=1)  # noqa: E731
    touch = lambda: l2_touch_kernel[(sink.numel(),)](P.x, sink, P.x.numel(), BLOCK=4096)  # noqa: E731
    base, first = _scatter(P), _scatter(P, evict="evict_first")
    v = {"l2_prefetch_only": (prefetch, None), "l2_touch_only": (touch, None),
         "l2_prefetch_then_scatter_x_s2_w2": (lambda: (prefetch(), base()), full),
         "l2_touch_then_scatter_x_s2_w2": (lambda: (touch(), base()), full),
         "l2_prefetch_last_then_scatter_x_s2_w2": (lambda: (last(), base()), full),
         "l2_prefetch_last_then_scatter_x_s2_w2_evict_first": (lambda: (last(), first()), full)}
    from triton.tools.tensor_descriptor import TensorDescriptor as TmaDescriptor     # tl's host descriptor
    sub = P.row // 256
    for parts, nw in ((1, 8), (2, 4), (2, 8), (4, 2), (4, 4)):
        xd = TmaDescriptor.from_tensor(P.x.view(P.w * sub, 256), [triton.next_power_of_2(-(-sub // parts)), 256])
        v[f"scatter_tma_p{parts}_w{nw}"] = (lambda xd=xd, parts=parts, nw=nw: scatter_tma_kernel[(P.w * parts,)](
            xd, P.imap, P.out, P.w, P.row, K_TOP=P.k_top, KP=P.k_top, SUB=sub, PARTS=parts, num_warps=nw), full)
    for tb, nw, per_sm in ((8, 8, 1), (16, 16, 1), (16, 8, 1), (8, 8, 2), (32, 16, 1)):
        grid = P.sms * per_sm
        v[f"scatter_batch_tb{tb}_w{nw}_x{per_sm}"] = (lambda tb=tb, nw=nw, grid=grid: scatter_batch_kernel[(grid,)](
            P.x, P.imap, P.out, P.w, P.row, triton.cdiv(P.w, grid), K_TOP=P.k_top, KP=P.k_top, TB=tb, BLOCK=2048,
            num_warps=nw), full)
    sync = torch.zeros(64, dtype=torch.int32, device="cuda")
    for tb, nw, after in ((16, 16, False), (16, 16, True), (8, 8, False), (8, 8, True)):
        v[f"scatter_phased_tb{tb}_w{nw}{'_both' if after else ''}"] = (
            lambda tb=tb, nw=nw, after=after: (sync.zero_(), scatter_phased_kernel[(P.sms,)](
                P.x, P.imap, P.out, sync, P.w, P.row, triton.cdiv(P.w, P.sms), K_TOP=P.k_top, KP=P.k_top, TB=tb,
                BLOCK=2048, SPIN=100000, AFTER_WRITES=after, num_warps=nw)), full)
    return v


def permute_patterns(only: str = "", once: bool = False, w: int = 4096, h: int = 7168, e: int = 32,
                     k_top: int = 8) -> dict:
    """The permute's row writes at issue 12's shape without its index step, dead rows or scales (every valid (token,
    slot) pair's 7 KB row), by the variants of `_order_variants`, `_scatter_variants` and `_read_first_variants`,
    each against a fill of the same bytes: what the order of the writes costs, and what reading x costs. only: a
    regular expression, the variants to run; once: each called once, nothing timed (for a profiler)."""
    P = _pattern_inputs(w, h, e, k_top)
    res = dict(W=w, M=P.m, pairs=P.n, bytes_written=P.n * h,
               fill_ms=None if once else ms(lambda: P.out.view(-1)[:P.n * P.row].fill_(VALUE)))
    variants = {**_order_variants(P), **_scatter_variants(P), **_read_first_variants(P)}
    for key, (fn, check) in variants.items():
        if not re.search(only, key):
            continue
        P.out.zero_()
        fn()
        if once:
            continue
        ok = check() if check is not None else None
        torch.cuda.synchronize()
        t = ms(fn)
        res[key] = dict(ms=t, vs_fill=res["fill_ms"] / t, output_checked=ok)
        print(key, res[key], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="268435456,1073741824", help="bytes written per path, comma list")
    ap.add_argument("--patterns", action="store_true", help="also the permute's write orders (permute_patterns)")
    ap.add_argument("--only", default="", help="with --patterns: a regular expression, the variants to run")
    ap.add_argument("--once", action="store_true", help="with --patterns: each variant called once, nothing timed")
    args = ap.parse_args()
    res = dict(card=torch.cuda.get_device_name(0), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), triton=triton.__version__, torch=torch.__version__, sizes={})
    if args.patterns:
        res["permute_patterns"] = permute_patterns(args.only, args.once)
        write_json(pathlib.Path(args.out), res)
    for size in (int(s) for s in args.sizes.split(",") if s):
        res["sizes"][str(size)] = measure(size)
        write_json(pathlib.Path(args.out), res)


if __name__ == "__main__":
    main()
