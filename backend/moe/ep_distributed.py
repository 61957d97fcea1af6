"""Expert-parallel runners over a real collective engine (SPEC §9, docs/design.md "Expert-parallel
semantics, exact"): `PaddleDistributedEPRunner` over a `paddle.distributed` process group, and
`DeepEPRunner`, an adapter to DeepEP's `Buffer`.

Both implement the interface of `backend.moe.ep_runner.EPRunner` (ep_size, ep_rank, num_experts,
num_local_experts, dispatch / combine for "ht", low_latency_dispatch / low_latency_combine for "ll").
`PaddleDistributedEPRunner` agrees bit for bit with `InProcessEPGroup` and `moe_ref.ep`: it moves
bytes, and every sum is formed in the order the design fixes (ranks ascending for ht combine, k
ascending for ll combine, float32, one rounding to bf16).

How one exchange runs (every rank calls the same collectives in the same order):

1. header: all_gather of a fixed int64 [16] vector per rank: a status flag (0 ok, 1 this rank
   failed), the op, a sequence number and the values every rank must agree on (W, H, K_top,
   dtypes, N). A rank that failed outside the runner (its expert computation raised) joins this
   gather through `report_failure(exc)`/`guard()` with status 1; then all ranks gather a
   fixed-size message buffer and every rank raises `EPRemoteError` naming the failed rank and its
   error. Nothing is exchanged after a failure, so no rank blocks on a peer that is gone.
2. counts (dispatch only): all_gather of the per-destination token counts (and, for "ll", the
   per-expert (token, k) counts). Every rank then knows the whole count matrix, so a rank whose
   receive count exceeds num_worst_tokens W is a ValueError raised identically on every rank,
   before any payload moves.
3. payload: one uint8 row per token, [x bytes | scale bytes | ids int64 | weights float32 | pad to
   16 bytes], sent only to the ranks that need it. fp8 cannot take part in arithmetic collectives (and gloo has no
   fp8 or int16 type), so everything travels as uint8 views and is viewed back on arrival.
   - NCCL (and any backend with all_to_all): `alltoall_single` with per-rank split sizes.
   - gloo (Paddle's CPU backend): all_to_all raises NotImplementedError and its isend/irecv time
     out (Paddle 3.3.1), so the exchange is R `scatter` calls, one per source rank, each
     destination's rows padded to that source's largest chunk. The counts are known to every
     rank, so an empty scatter is skipped by all ranks alike (gloo divides by zero on an empty
     buffer: SIGFPE in all_gather, observed on Paddle 3.3.1).
   Combine sends each partial row back to its source rank by the same route (sizes known from
   the dispatch, only the header precedes it).

Time bounds: `timeout_s` arms a watchdog thread per collective; a collective still blocked after
timeout_s (a peer died without reporting, e.g. killed) prints the op to stderr and ends the
process with exit code 124 (NCCL's watchdog takes the same approach: a rank stuck in a collective
cannot be unblocked from Python). Launchers (tests/ep_harness.py) add a wall-clock bound and
kill stragglers.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import sys
import threading
import time

import numpy as np
import paddle

from moe_ref.checks import check_positive_int
from moe_ref.ep import DispatchOutput
from moe_ref.fp8 import dtype_view, gather_rows_zero_fill, to_mn_major_view

from .. import envs, ops
from . import ep_index
from .ep_runner import FP8, EPRunner, RunnerHandle, weighted_sum_over_k
from .quantize import quantize_tokens

HEADER_LEN = 16
MESSAGE_BYTES = 1024
ROW_ALIGN = 16
WATCHDOG_EXIT_CODE = 124
EXCHANGES = ("auto", "alltoall", "scatter")

_OP_FAILED, _OP_DISPATCH, _OP_COMBINE, _OP_LL_DISPATCH, _OP_LL_COMBINE, _OP_BARRIER = range(6)
_OP_NAMES = {_OP_FAILED: "failure report", _OP_DISPATCH: "dispatch", _OP_COMBINE: "combine",
             _OP_LL_DISPATCH: "low_latency_dispatch", _OP_LL_COMBINE: "low_latency_combine",
             _OP_BARRIER: "barrier"}
_DTYPE_CODES = {None: 0, FP8: 1, paddle.bfloat16: 2, paddle.float32: 3, paddle.int32: 4, paddle.uint8: 5}
_DTYPE_NAMES = {0: "None", 1: "float8_e4m3fn", 2: "bfloat16", 3: "float32", 4: "int32", 5: "uint8"}


class EPRemoteError(RuntimeError):
    """Another rank of the EP group failed; raised on every rank that took part in the exchange."""


@dataclasses.dataclass
class DistHTHandle(RunnerHandle):
    """Bookkeeping of one ht dispatch on one rank.

    counts [R, R] int64: tokens source s sent to rank r (every rank holds the same matrix);
    sent_tokens[r]: int64 [n] this rank's tokens sent to rank r, ascending (the order in which r
    returns their partial rows); num_tokens T, hidden_size H, num_worst_tokens W of the dispatch.
    """
    num_worst_tokens: int
    counts: np.ndarray
    sent_tokens: list


@dataclasses.dataclass
class DistLLHandle(RunnerHandle):
    """Bookkeeping of one ll dispatch on one rank.

    entries[r]: (t, k) int64 arrays, this rank's (token, k) pairs whose expert lives on rank r, in
    row-major order (the order r returns their rows); return_slots[s]: int64 flat slot indices
    e·(R·N) + j into this rank's expert_out of source s's entries, in s's row-major order.
    """
    rows_per_expert: int
    top_k: int
    entries: list
    return_slots: list


# ---------------------------------------------------------------------- byte packing

def _as_bytes(t: paddle.Tensor) -> paddle.Tensor:
    """[n, c] any dtype -> [n, c·itemsize] uint8 (the same bytes, row-major; a strided view is copied,
    never made contiguous in place: see `moe_ref.fp8.dtype_view`)."""
    n = int(t.shape[0])
    width = int(t.shape[1]) * _itemsize(t.dtype)
    if n == 0:
        return paddle.zeros([0, width], dtype=paddle.uint8)
    return dtype_view(t, paddle.uint8)


def _from_bytes(b: paddle.Tensor, dtype) -> paddle.Tensor:
    """[n, c·itemsize] uint8 -> [n, c] dtype."""
    n, width = int(b.shape[0]), int(b.shape[1])
    if n == 0:
        return paddle.zeros([0, width // _itemsize(dtype)], dtype=dtype)
    return dtype_view(b, dtype)


def _itemsize(dtype) -> int:
    return {FP8: 1, paddle.uint8: 1, paddle.bfloat16: 2, paddle.float32: 4, paddle.int32: 4,
            paddle.int64: 8}[dtype]


def _rows(t: paddle.Tensor, index: np.ndarray) -> paddle.Tensor:
    """Rows `index` of a uint8 [n, B] tensor (an empty index gives [0, B])."""
    if index.size == 0:
        return paddle.zeros([0, int(t.shape[1])], dtype=t.dtype)
    return paddle.gather(t, paddle.to_tensor(index.astype(np.int64)), axis=0)


def _pack_columns(parts: list) -> paddle.Tensor:
    """Column-concatenate [n, *] tensors (None skipped) as bytes: one uint8 row per token, padded to a
    multiple of ROW_ALIGN bytes (NCCL moves 16-byte-aligned chunks faster; the pad is never read)."""
    cols = [_as_bytes(p) for p in parts if p is not None]
    width = sum(int(c.shape[1]) for c in cols)
    if width % ROW_ALIGN:
        cols.append(paddle.zeros([int(cols[0].shape[0]), ROW_ALIGN - width % ROW_ALIGN], dtype=paddle.uint8))
    return paddle.concat(cols, axis=1)


def _unpack_columns(rows: paddle.Tensor, layout: list) -> list:
    """Inverse of _pack_columns: layout = [(dtype, columns) | None, ...]."""
    out, at = [], 0
    for item in layout:
        if item is None:
            out.append(None)
            continue
        dtype, cols = item
        width = cols * _itemsize(dtype)
        out.append(_from_bytes(rows[:, at: at + width], dtype))
        at += width
    return out


# ---------------------------------------------------------------------- the runner

class PaddleDistributedEPRunner(EPRunner):
    """EP runner over a `paddle.distributed` process group (module docstring).

    group: a `paddle.distributed` Group, or None for the global group (init_parallel_env first).
    num_experts: global experts E·R (rank r holds r·E .. r·E+E-1).
    exchange: "auto" (alltoall_single where the backend has all_to_all, e.g. NCCL; R scatters on
    gloo), "alltoall" or "scatter".
    timeout_s: watchdog bound per collective (None: no watchdog; the backend's own timeout holds).
    `stats` accumulates per-rank traffic: payload bytes to other ranks, wire bytes (with padding),
    time spent in collectives, and the last dispatch's send/receive counts.
    """

    def __init__(self, group=None, *, num_experts: int, exchange: str = "auto", timeout_s: float | None = None):
        import paddle.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("PaddleDistributedEPRunner: call paddle.distributed.init_parallel_env() first")
        if group is None:
            size, rank, ranks = dist.get_world_size(), dist.get_rank(), list(range(dist.get_world_size()))
        else:
            size, rank, ranks = group.nranks, group.rank, list(group.ranks)
            if rank < 0:
                raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of "
                                 f"group ranks {ranks}")
        super().__init__(size, rank, num_experts)
        self._dist = dist
        self.group = group
        self.global_ranks = ranks
        self.backend = str(dist.get_backend(group)).lower()
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange: expected one of {', '.join(EXCHANGES)}, got {exchange!r}")
        if exchange == "auto":
            exchange = "scatter" if self.backend == "gloo" else "alltoall"
        if exchange == "alltoall" and self.backend == "gloo":
            raise ValueError("exchange: 'alltoall' is not available on the gloo backend "
                             "(ProcessGroupGloo raises NotImplementedError), use 'scatter' or 'auto'")
        self.exchange = exchange
        if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float))
                                      or not timeout_s > 0):
            raise ValueError(f"timeout_s: expected a number > 0 or None, got {timeout_s!r}")
        self.timeout_s = None if timeout_s is None else float(timeout_s)
        self._seq = 0
        self.stats = {"payload_bytes_sent": 0, "payload_bytes_received": 0, "wire_bytes_sent": 0,
                      "collectives": 0, "comm_s": 0.0, "last_send_counts": None, "last_recv_count": None}

    def __repr__(self) -> str:
        return (f"PaddleDistributedEPRunner(ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"num_experts={self.num_experts}, backend={self.backend!r}, exchange={self.exchange!r})")

    def _exchange(self, op, payload):  # the all-gather hook of EPRunner is not used here
        raise NotImplementedError("PaddleDistributedEPRunner moves only what each rank needs; see dispatch/combine")

    # ------------------------------------------------------------------ watchdog and collectives

    @contextlib.contextmanager
    def _bounded(self, what: str):
        """Arm the watchdog around one blocking collective."""
        start = time.perf_counter()
        if self.timeout_s is None:
            try:
                yield
            finally:
                self.stats["comm_s"] += time.perf_counter() - start
                self.stats["collectives"] += 1
            return
        done = threading.Event()
        rank, limit = self.ep_rank, self.timeout_s

        def watch():
            if not done.wait(limit):
                sys.stderr.write(f"[ep rank {rank}] {what} did not finish within timeout_s = {limit} s "
                                 f"(a peer died or stopped calling collectives); exiting with code "
                                 f"{WATCHDOG_EXIT_CODE}\n")
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT_CODE)

        th = threading.Thread(target=watch, name=f"ep-watchdog-{rank}", daemon=True)
        th.start()
        try:
            yield
        finally:
            done.set()
            self.stats["comm_s"] += time.perf_counter() - start
            self.stats["collectives"] += 1

    def _all_gather(self, t: paddle.Tensor, what: str) -> list:
        out = []
        with self._bounded(what):
            self._dist.all_gather(out, t, group=self.group)
        return out

    def _header(self, op: int, values: list[int]) -> np.ndarray:
        """all_gather of [status, op, seq, *values] (padded to HEADER_LEN) -> [R, HEADER_LEN] int64.
        Raises EPRemoteError on every rank when some rank reported a failure."""
        vec = np.zeros([HEADER_LEN], dtype=np.int64)
        vec[:3] = (0, op, self._seq)
        vec[3: 3 + len(values)] = values
        self._seq += 1
        rows = self._all_gather(paddle.to_tensor(vec), f"{_OP_NAMES[op]} header (collective #{self._seq - 1})")
        table = np.stack([r.numpy() for r in rows])
        failed = [r for r in range(self.ep_size) if table[r, 0] != 0]
        if failed:
            msgs = self._all_gather(paddle.zeros([MESSAGE_BYTES], dtype=paddle.uint8), "failure message")
            text = "; ".join(f"rank {r} failed: {_decode(msgs[r])}" for r in failed)
            raise EPRemoteError(f"rank {self.ep_rank}: {_OP_NAMES[op]} aborted: {text}")
        ops = table[:, 1]
        if (ops != op).any() or (table[:, 2] != table[0, 2]).any():
            raise RuntimeError(f"rank {self.ep_rank}: collective mismatch, ranks called "
                               + ", ".join(f"{r}: {_OP_NAMES.get(int(ops[r]), ops[r])} #{table[r, 2]}"
                                           for r in range(self.ep_size)))
        return table

    def _agree(self, table: np.ndarray, names: list[str]) -> None:
        """The header values (columns 3..) must be equal on every rank; same error on every rank."""
        for j, name in enumerate(names):
            col = table[:, 3 + j]
            if (col != col[0]).any():
                shown = [_DTYPE_NAMES.get(int(v), v) if "dtype" in name else int(v) for v in col]
                raise ValueError(f"{name}: every rank must pass the same value, got "
                                 + ", ".join(f"rank {r}: {v}" for r, v in enumerate(shown)))

    def report_failure(self, exc: BaseException) -> None:
        """Tell the other ranks that this rank failed with `exc` (call it from an except block,
        or use `guard()`); they raise EPRemoteError at their next runner call. A no-op for errors
        every rank raised together (EPRemoteError, the runner's own cross-rank checks)."""
        if getattr(exc, "_ep_collective", False) or isinstance(exc, EPRemoteError):
            return
        data = f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")[:MESSAGE_BYTES]
        msg = np.zeros([MESSAGE_BYTES], dtype=np.uint8)
        msg[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        vec = np.zeros([HEADER_LEN], dtype=np.int64)
        vec[:3] = (1, _OP_FAILED, self._seq)
        self._seq += 1
        self._all_gather(paddle.to_tensor(vec), "failure report")
        self._all_gather(paddle.to_tensor(msg), "failure message")

    @contextlib.contextmanager
    def guard(self):
        """`with runner.guard(): out = method.apply(...)`: an exception inside is reported to the
        other ranks (report_failure) and re-raised here."""
        try:
            yield self
        except BaseException as exc:
            self.report_failure(exc)
            raise

    def barrier(self) -> None:
        """A header-only exchange: ends in EPRemoteError if a peer reported a failure (call it at the
        end of a run, so a rank failing after its last exchange is noticed by every rank)."""
        self._collective_errors(lambda: self._header(_OP_BARRIER, []))

    def _collective_errors(self, fn):
        """Run fn; errors it raises were raised by every rank alike: mark them so that
        report_failure does not report them again."""
        try:
            return fn()
        except (ValueError, RuntimeError) as exc:
            exc._ep_collective = True
            raise

    # ------------------------------------------------------------------ the payload exchange

    def _alltoallv(self, chunks: list, counts: np.ndarray, row_bytes: int) -> list:
        """chunks[r]: uint8 [counts[me, r], B] for rank r; counts [R, R] rows s sends to r (known
        to every rank) -> received uint8 [counts[s, me], B] from every source s, in rank order."""
        me, size = self.ep_rank, self.ep_size
        self.stats["payload_bytes_sent"] += int(sum(counts[me, r] for r in range(size) if r != me)) * row_bytes
        self.stats["payload_bytes_received"] += int(sum(counts[s, me] for s in range(size) if s != me)) * row_bytes
        if self.exchange == "alltoall":
            send = paddle.concat(chunks, axis=0) if chunks else paddle.zeros([0, row_bytes], dtype=paddle.uint8)
            total = int(counts[:, me].sum())
            recv = paddle.empty([total, row_bytes], dtype=paddle.uint8)
            self.stats["wire_bytes_sent"] += int(counts[me].sum() - counts[me, me]) * row_bytes
            with self._bounded("alltoall_single"):
                self._dist.alltoall_single(recv, send, [int(c) for c in counts[me]], [int(c) for c in counts[:, me]],
                                           group=self.group)
            offsets = np.concatenate([[0], np.cumsum(counts[:, me])])
            return [recv[int(offsets[s]): int(offsets[s + 1])] for s in range(size)]
        received = []
        for s in range(size):
            width = int(counts[s].max())
            if width == 0:
                received.append(paddle.zeros([0, row_bytes], dtype=paddle.uint8))
                continue
            buf = paddle.zeros([width, row_bytes], dtype=paddle.uint8)
            lst = None
            if s == me:
                lst = [paddle.concat([c, paddle.zeros([width - int(c.shape[0]), row_bytes], dtype=paddle.uint8)])
                       if int(c.shape[0]) < width else c for c in chunks]
                self.stats["wire_bytes_sent"] += (size - 1) * width * row_bytes
            with self._bounded(f"scatter from rank {s}"):
                self._dist.scatter(buf, lst, src=self.global_ranks[s], group=self.group)
            received.append(buf[: int(counts[s, me])])
        return received

    # ------------------------------------------------------------------ ht (DeepEP normal)

    def dispatch(self, x, x_scale, topk_ids, topk_weights, num_worst_tokens) -> DispatchOutput:
        """x [T, H] fp8 | bf16; x_scale [T, S'] fp32 | packed int32 or None (required for fp8 x);
        topk_ids [T, K_top] int32 | int64 global ids or -1; topk_weights [T, K_top] float32;
        num_worst_tokens W -> this rank's DispatchOutput (recv_* with W rows, padding last)."""
        t, h, ids, w = self._check_dispatch(x, x_scale, topk_ids, topk_weights, num_worst_tokens)
        e, me, size = self.num_local_experts, self.ep_rank, self.ep_size
        k_top = int(ids.shape[1])
        sent_tokens = ep_index.sent_tokens(ids, e, size)
        s_cols = 0 if x_scale is None else int(x_scale.shape[1])
        s_dtype = None if x_scale is None else x_scale.dtype

        def exchange():
            table = self._header(_OP_DISPATCH, [w, h, k_top, _DTYPE_CODES[x.dtype], _DTYPE_CODES[s_dtype], s_cols])
            self._agree(table, ["W", "H", "K_top", "x dtype", "x_scale dtype", "x_scale columns"])
            counts = np.stack([c.numpy() for c in self._all_gather(
                paddle.to_tensor(np.array([len(tk) for tk in sent_tokens], dtype=np.int64)), "dispatch counts")])
            recv_counts = counts.sum(axis=0)
            self.stats["last_send_counts"] = [int(c) for c in counts[me]]
            self.stats["last_recv_count"] = int(recv_counts[me])
            for r in range(size):
                if recv_counts[r] > w:
                    raise ValueError(f"num_worst_tokens: rank {r} receives {int(recv_counts[r])} tokens, more than "
                                     f"num_worst_tokens W = {w}")
            return counts

        counts = self._collective_errors(exchange)
        rows = _pack_columns([x, x_scale, paddle.to_tensor(ids), topk_weights])
        row_bytes = int(rows.shape[1])
        recv = self._alltoallv([_rows(rows, tk) for tk in sent_tokens], counts, row_bytes)
        recv = paddle.concat(recv, axis=0)
        n_recv = int(recv.shape[0])
        layout = [(x.dtype, h), None if x_scale is None else (x_scale.dtype, s_cols),
                  (paddle.int64, k_top), (paddle.float32, k_top)]
        r_x, r_scale, r_ids, r_w = _unpack_columns(recv, layout)

        pad = np.full([w], n_recv, dtype=np.int64)          # index n_recv: gather_rows_zero_fill's zero row
        pad[:n_recv] = np.arange(n_recv)
        recv_x = gather_rows_zero_fill(r_x, paddle.to_tensor(pad))
        recv_scale = None if x_scale is None else gather_rows_zero_fill(r_scale, paddle.to_tensor(pad))
        g = r_ids.numpy()
        ids_out = np.full([w, k_top], -1, dtype=np.int64)
        ids_out[:n_recv] = ep_index.local_ids(g, me, e)
        w_out = np.zeros([w, k_top], dtype=np.float32)
        w_out[:n_recv] = r_w.numpy()
        handle = DistHTHandle(id(self), me, t, h, w, counts, sent_tokens)
        return DispatchOutput(recv_x, recv_scale, paddle.to_tensor(ids_out), paddle.to_tensor(w_out), n_recv, handle)

    def combine(self, partial, handle) -> paddle.Tensor:
        """partial [W, H] bf16 (this rank's weighted expert output per received row), handle from
        this rank's dispatch -> [T, H] bf16 = bf16(Σ_{r ascending} float32(row of r)), zeros for
        tokens sent nowhere."""
        self._check_combine(partial, handle, DistHTHandle)
        me, size, counts = self.ep_rank, self.ep_size, handle.counts
        self._collective_errors(lambda: self._header(_OP_COMBINE, []))
        raw = _as_bytes(partial)
        starts = np.concatenate([[0], np.cumsum(counts[:, me])])
        chunks = [raw[int(starts[s]): int(starts[s + 1])] for s in range(size)]
        back = self._alltoallv(chunks, counts.T.copy(), int(raw.shape[1]))
        t, hdim = handle.num_tokens, handle.hidden_size
        acc = paddle.zeros([t, hdim], dtype=paddle.float32)
        for r in range(size):                                # rank order is part of the contract
            tokens = handle.sent_tokens[r]
            if t == 0 or tokens.size == 0:
                continue
            index = np.full([t], tokens.size, dtype=np.int64)
            index[tokens] = np.arange(tokens.size)
            vals = gather_rows_zero_fill(_from_bytes(back[r], paddle.bfloat16), paddle.to_tensor(index))
            mask = np.zeros([t, 1], dtype=bool)
            mask[tokens] = True
            acc = paddle.where(paddle.to_tensor(mask), acc + vals.astype(paddle.float32), acc)
        return acc.astype(paddle.bfloat16)

    # ------------------------------------------------------------------ ll (DeepEP low latency)

    def low_latency_dispatch(self, x, topk_ids, num_max_dispatch_tokens_per_rank, use_fp8=True, use_ue8m0=True):
        """x [T, H] bf16 (T <= N), topk_ids [T, K_top] global ids or -1, N, use_fp8, use_ue8m0 ->
        (recv_x [E, R·N, H] fp8 (bf16 without use_fp8), recv_x_scale logical [E, R·N, C] MN-major
        (C = ceil(S/4) int32 with use_ue8m0, else S fp32) | None, recv_count [E] int32, handle).
        Slots of expert e are filled in (source rank, source token, k) order; rows past
        recv_count[e] are zero. Each token travels once per destination rank."""
        t, h, ids, n = self._check_low_latency_dispatch(x, topk_ids, num_max_dispatch_tokens_per_rank,
                                                        use_fp8, use_ue8m0)
        e, me, size = self.num_local_experts, self.ep_rank, self.ep_size
        k_top, rn = int(ids.shape[1]), self.ep_size * n
        q, scale = x, None
        if use_fp8 and t <= n:
            q, scale = quantize_tokens(ops.get_provider(), x, use_ue8m0)
        dest = np.where(ids >= 0, ids // e, -1)
        sent_tokens = ep_index.sent_tokens(ids, e, size)
        per_expert = np.bincount(ids[ids >= 0], minlength=self.num_experts).astype(np.int64)

        counts = self._collective_errors(lambda: self._ll_dispatch_counts(n, h, k_top, use_fp8, use_ue8m0, t,
                                                                          sent_tokens, per_expert))
        s_cols = 0 if scale is None else int(scale.shape[1])
        rows = _pack_columns([q, scale, paddle.to_tensor(ids)])
        recv = paddle.concat(self._alltoallv([_rows(rows, tk) for tk in sent_tokens], counts, int(rows.shape[1])),
                             axis=0)
        r_x, r_scale, r_ids = _unpack_columns(recv, [(q.dtype, h), None if scale is None else (scale.dtype, s_cols),
                                                     (paddle.int64, k_top)])
        index, recv_count, return_slots = self._ll_slots(r_ids.numpy(), counts, rn)
        recv_x = gather_rows_zero_fill(r_x, paddle.to_tensor(index.reshape([-1]))).reshape([e, rn, h])
        recv_scale = None
        if use_fp8:
            flat = gather_rows_zero_fill(r_scale, paddle.to_tensor(index.reshape([-1])))
            recv_scale = to_mn_major_view(flat.reshape([e, rn, s_cols]))
        entries = []
        for r in range(size):
            tt, kk = np.nonzero(dest == r)
            entries.append((tt.astype(np.int64), kk.astype(np.int64)))
        handle = DistLLHandle(id(self), me, t, h, rn, k_top, entries, return_slots)
        return recv_x, recv_scale, paddle.to_tensor(recv_count), handle

    def _ll_dispatch_counts(self, n, h, k_top, use_fp8, use_ue8m0, t, sent_tokens, per_expert) -> np.ndarray:
        """Header and counts of an ll dispatch (every rank raises the same errors) -> [R, R] tokens s sends to r."""
        size, e, rn = self.ep_size, self.num_local_experts, self.ep_size * n
        table = self._header(_OP_LL_DISPATCH, [n, h, k_top, int(use_fp8), int(use_ue8m0), t])
        self._agree(table, ["num_max_dispatch_tokens_per_rank", "H", "K_top", "use_fp8", "use_ue8m0"])
        for r in range(size):
            if table[r, 8] > n:
                raise ValueError(f"x: rank {r} has T = {int(table[r, 8])} tokens, more than "
                                 f"num_max_dispatch_tokens_per_rank N = {n}")
        vec = np.concatenate([[len(tk) for tk in sent_tokens], per_expert]).astype(np.int64)
        gathered = np.stack([c.numpy() for c in self._all_gather(paddle.to_tensor(vec), "ll dispatch counts")])
        fills = gathered[:, size:].sum(axis=0)
        self.stats["last_send_counts"] = [int(c) for c in gathered[self.ep_rank, :size]]
        self.stats["last_recv_count"] = int(gathered[:, self.ep_rank].sum())
        for g in range(self.num_experts):
            if fills[g] > rn:
                raise ValueError(f"topk_ids: expert {g % e} of rank {g // e} receives {int(fills[g])} (token, k) "
                                 f"pairs, more than R·N = {rn} slots")
        return gathered[:, :size]

    def _ll_slots(self, g: np.ndarray, counts: np.ndarray, rn: int):
        """g [n_recv, K_top] global ids of the received rows (source rank, token order), counts [R, R]
        -> (index [E, R·N] received row of each slot, n_recv for an empty one; recv_count [E] int32;
        return_slots[s]: flat slots e·(R·N) + j of source s's entries, in its row-major (token, k) order)."""
        e, me, size = self.num_local_experts, self.ep_rank, self.ep_size
        local = np.where((g >= 0) & (g // e == me), g % e, -1)
        index = np.full([e, rn], int(g.shape[0]), dtype=np.int64)   # n_recv: the zero row of gather_rows_zero_fill
        slot = np.full(local.shape, -1, dtype=np.int64)
        recv_count = np.zeros([e], dtype=np.int32)
        for le in range(e):
            rr, kk = np.nonzero(local == le)                  # row-major: (source rank, token), then k
            index[le, : rr.size] = rr
            slot[rr, kk] = le * rn + np.arange(rr.size)
            recv_count[le] = rr.size
        src_of_row = np.repeat(np.arange(size), counts[:, me])
        return_slots = []
        for s in range(size):
            mine = slot[src_of_row == s]
            return_slots.append(mine[mine >= 0])
        return index, recv_count, return_slots

    def low_latency_combine(self, expert_out, topk_ids, topk_weights, handle) -> paddle.Tensor:
        """expert_out [E, R·N, H] bf16, topk_ids / topk_weights [T, K_top] of this rank's tokens (as
        given to low_latency_dispatch), handle -> [T, H] bf16 = bf16(Σ_k w[t, k] · float32(row of
        (t, k))), float32 in k order; tokens with no valid id get zeros."""
        ids = self._check_low_latency_combine(expert_out, topk_ids, topk_weights, handle, DistLLHandle)
        valid = ids >= 0
        n_valid = sum(int(tt.size) for tt, _ in handle.entries)
        if int(valid.sum()) != n_valid:
            raise ValueError("topk_ids: differ from the ids given to low_latency_dispatch")
        size = self.ep_size
        self._collective_errors(lambda: self._header(_OP_LL_COMBINE, []))
        hdim = handle.hidden_size
        flat = _as_bytes(expert_out.reshape([-1, hdim]))
        chunks = [_rows(flat, sl) for sl in handle.return_slots]
        counts = self._ll_return_counts(np.array([sl.size for sl in handle.return_slots], dtype=np.int64))
        back = self._alltoallv(chunks, counts, int(flat.shape[1]))
        t, k_top = handle.num_tokens, handle.top_k
        if t == 0 or n_valid == 0:
            return paddle.zeros([t, hdim], dtype=paddle.bfloat16)
        index = np.full([t * k_top], n_valid, dtype=np.int64)
        at = 0
        for r in range(size):
            tt, kk = handle.entries[r]
            index[tt * k_top + kk] = at + np.arange(tt.size)
            at += tt.size
        rows = paddle.concat([_from_bytes(b, paddle.bfloat16) for b in back], axis=0)
        vals = gather_rows_zero_fill(rows, paddle.to_tensor(index)).astype(paddle.float32).reshape([t, k_top, hdim])
        return weighted_sum_over_k(vals, topk_weights, valid)

    def _ll_return_counts(self, mine: np.ndarray) -> np.ndarray:
        """[R] rows this rank sends back to each source -> the [R, R] matrix of every rank's
        (each rank knows only its own row and column; the scatter path needs all of it)."""
        rows = self._all_gather(paddle.to_tensor(mine), "ll combine counts")
        return np.stack([r.numpy() for r in rows])


def _decode(msg: paddle.Tensor) -> str:
    data = bytes(msg.numpy().astype(np.uint8).tobytes()).rstrip(b"\0")
    return data.decode("utf-8", "replace")


# ---------------------------------------------------------------------- DeepEP adapter

def import_deep_ep():
    """The DeepEP module, as upstream's `load_deep_ep` picks it (ep.py:33-65 at develop dad5a432), or RuntimeError.
    Returns (module, tensor_kind) with tensor_kind "paddle" | "torch".

    FD_USE_PFCC_DEEP_EP=1: `paddle.enable_compat(scope={"deep_ep"})` first (PFCC's DeepEP is written against torch's
    API, which compat mode maps onto Paddle, so it takes Paddle tensors), then `paddlefleet.ops.deep_ep`, else the
    PFCCLab `deep_ep` package. Otherwise Paddle's port (`paddle.distributed.communication.deep_ep`, upstream's
    default), then the upstream `deep_ep` package (torch tensors, converted through DLPack; not an upstream option).
    """
    if envs.use_pfcc_deep_ep():
        return _import_pfcc_deep_ep(), "paddle"
    try:
        from paddle.distributed.communication import deep_ep as mod   # GPU builds of Paddle >= 3.0
        return mod, "paddle"
    except ImportError:
        pass
    try:
        import deep_ep as mod
        return mod, "torch"
    except ImportError as err:
        raise RuntimeError("DeepEPRunner: DeepEP is not installed: neither "
                           "paddle.distributed.communication.deep_ep (Paddle GPU build) nor the deep_ep package "
                           f"(github.com/deepseek-ai/DeepEP) can be imported ({err}); use "
                           "PaddleDistributedEPRunner instead") from None


def _import_pfcc_deep_ep():
    paddle.enable_compat(scope={"deep_ep"})
    try:
        import paddlefleet.ops.deep_ep as mod
        return mod
    except ModuleNotFoundError:
        pass
    try:
        import deep_ep as mod
        return mod
    except ImportError as err:
        raise RuntimeError(f"DeepEPRunner: FD_USE_PFCC_DEEP_EP=1 but neither paddlefleet.ops.deep_ep (PaddleFleet) nor "
                           f"deep_ep (PFCCLab/DeepEP) can be imported ({err}); unset it to use Paddle's DeepEP") from None


@dataclasses.dataclass
class DeepEPHandle:
    """What DeepEPRunner.combine needs of a dispatch: DeepEP's own handle, T, the received tokens n_recv, the rows
    DeepEP's handle holds (W when the dispatch took num_worst_tokens, else n_recv: its combine asserts
    src_idx.size(0) == x.size(0)) and DeepEP's recv_topk_weights (passed back as upstream does, ep.py:684-692)."""
    deep_handle: object
    num_tokens: int
    n_recv: int
    rows: int
    recv_topk_weights: object


class DeepEPRunner(EPRunner):
    """The EP runner interface on DeepEP's `Buffer` (GPU, NVLink/RDMA kernels).

    Argument names follow deepseek-ai/DeepEP `deep_ep/buffer.py` as of v1.2 (main, 2025):
    `Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=..., num_qps_per_rank=...)`,
    `get_dispatch_layout(topk_idx, num_experts)`,
    `dispatch(x | (x, x_scales), num_tokens_per_rank=, num_tokens_per_rdma_rank=, is_token_in_rank=,
    num_tokens_per_expert=, topk_idx=, topk_weights=, num_worst_tokens=)`,
    `combine(x, handle)`, `low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank,
    num_experts, use_fp8=, round_scale=, use_ue8m0=)`, `low_latency_combine(x, topk_idx,
    topk_weights, handle)`. Paddle's port (`paddle.distributed.communication.deep_ep`, used by
    FastDeploy) keeps these names; older releases of either lack `num_worst_tokens` and
    `use_ue8m0`: then this adapter pads to W itself, and use_ue8m0 is a clear error. With num_worst_tokens the
    combine gets all W rows back (DeepEP asserts src_idx.size(0) == x.size(0)), as upstream develop's does.
    Which DeepEP: `import_deep_ep` (FD_USE_PFCC_DEEP_EP, as upstream's load_deep_ep).

    buffer: an existing `Buffer` (preferred: FastDeploy builds one per EP group), or None to build
    one on `group` with num_nvl_bytes / num_rdma_bytes.
    Semantics differ from PaddleDistributedEPRunner in one way: DeepEP's combine reduces in its
    own (channel) order, so results match the simulation to float32 rounding, not bit for bit.
    The upstream torch package takes torch tensors: this adapter converts through DLPack.
    """

    def __init__(self, group=None, *, num_experts: int, buffer=None, num_nvl_bytes: int = 1 << 30,
                 num_rdma_bytes: int = 0, low_latency_mode: bool = False, num_qps_per_rank: int = 1):
        self._mod, self._kind = import_deep_ep()
        if buffer is None:
            if group is None:
                raise ValueError("group: DeepEPRunner needs the EP process group (or a ready buffer=)")
            buffer = self._mod.Buffer(group, num_nvl_bytes, num_rdma_bytes, low_latency_mode=low_latency_mode,
                                      num_qps_per_rank=num_qps_per_rank)
        self.buffer = buffer
        super().__init__(int(buffer.group_size), int(buffer.rank), num_experts)
        self._dispatch_args = set(inspect.signature(buffer.dispatch).parameters)
        self._combine_args = set(inspect.signature(buffer.combine).parameters)
        self._ll_args = set(inspect.signature(buffer.low_latency_dispatch).parameters)

    def _exchange(self, op, payload):
        raise NotImplementedError("DeepEPRunner exchanges through DeepEP's kernels")

    def _to(self, t):
        if t is None or self._kind == "paddle":
            return t
        import torch.utils.dlpack as tdl
        return tdl.from_dlpack(paddle.utils.dlpack.to_dlpack(t))

    def _from(self, t):
        if t is None or self._kind == "paddle":
            return t
        import torch.utils.dlpack as tdl
        return paddle.utils.dlpack.from_dlpack(tdl.to_dlpack(t.contiguous()))

    def dispatch(self, x, x_scale, topk_ids, topk_weights, num_worst_tokens) -> DispatchOutput:
        """As EPRunner.dispatch, through Buffer.get_dispatch_layout + Buffer.dispatch (upstream's arguments, ep.py:
        630-668: num_worst_tokens and skip_x_record_stream where the Buffer takes them)."""
        w = check_positive_int(num_worst_tokens, "num_worst_tokens")
        self._check_routing(topk_ids, topk_weights, int(x.shape[0]))
        idx = self._to(topk_ids.astype(paddle.int64))
        per_rank, per_rdma, per_expert, in_rank, _ = self.buffer.get_dispatch_layout(idx, self.num_experts)
        kwargs = dict(num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank,
                      num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=self._to(topk_weights))
        worst = "num_worst_tokens" in self._dispatch_args
        if worst:
            kwargs["num_worst_tokens"] = w
        if "skip_x_record_stream" in self._dispatch_args:
            kwargs["skip_x_record_stream"] = worst
        payload = self._to(x) if x_scale is None else (self._to(x), self._to(x_scale))
        recv_x, recv_ids, recv_w, _, handle, _ = self.buffer.dispatch(payload, **kwargs)
        deep_w = recv_w
        recv_x, recv_scale = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
        recv_x, recv_scale, recv_ids, recv_w = (self._from(v) for v in (recv_x, recv_scale, recv_ids, recv_w))
        rows = n_recv = int(recv_x.shape[0])
        if worst:
            n_recv = int((recv_ids >= 0).any(axis=1).astype(paddle.int32).sum())
        elif n_recv > w:
            raise ValueError(f"num_worst_tokens: rank {self.ep_rank} receives {n_recv} tokens, more than "
                             f"num_worst_tokens W = {w}")
        else:
            index = np.concatenate([np.arange(n_recv), np.full([w - n_recv], n_recv)]).astype(np.int64)
            recv_x = gather_rows_zero_fill(recv_x, paddle.to_tensor(index))
            recv_scale = None if recv_scale is None else gather_rows_zero_fill(recv_scale, paddle.to_tensor(index))
            recv_w = gather_rows_zero_fill(recv_w, paddle.to_tensor(index))
            recv_ids = paddle.concat([recv_ids.astype(paddle.int64),
                                      paddle.full([w - n_recv, int(recv_ids.shape[1])], -1, dtype=paddle.int64)])
        return DispatchOutput(recv_x, recv_scale, recv_ids.astype(paddle.int64), recv_w, n_recv,
                              DeepEPHandle(handle, int(x.shape[0]), n_recv, rows, deep_w))

    def combine(self, partial, handle) -> paddle.Tensor:
        """As EPRunner.combine, through Buffer.combine (unweighted sum; the weights were applied before). partial
        [W, H] bf16: every row DeepEP's handle holds goes back (all W when the dispatch took num_worst_tokens,
        padding rows included, as upstream's combine passes them: develop BW:799-804, 939), else the n_recv
        received ones. recv_topk_weights is passed as upstream does (ep.py:684-692)."""
        if not isinstance(handle, DeepEPHandle):
            raise TypeError(f"handle: expected the DeepEPHandle of this runner's dispatch, got {type(handle).__name__}")
        x = partial if handle.rows == int(partial.shape[0]) else partial[:handle.rows]
        kwargs = {"topk_weights": handle.recv_topk_weights}
        if "skip_x_record_stream" in self._combine_args:
            kwargs["skip_x_record_stream"] = "num_worst_tokens" in self._dispatch_args    # as the dispatch (ep.py:694)
        combined, _, _ = self.buffer.combine(self._to(x), handle.deep_handle, **kwargs)
        return self._from(combined)

    def low_latency_dispatch(self, x, topk_ids, num_max_dispatch_tokens_per_rank, use_fp8=True, use_ue8m0=True):
        """As EPRunner.low_latency_dispatch, through Buffer.low_latency_dispatch."""
        kwargs = {"use_fp8": use_fp8}
        if use_ue8m0:
            if "use_ue8m0" not in self._ll_args:
                raise RuntimeError("DeepEPRunner: this DeepEP's low_latency_dispatch has no use_ue8m0 "
                                   "(needs DeepEP >= v1.2 or a Paddle port with UE8M0 support)")
            kwargs.update(round_scale=True, use_ue8m0=True)
        idx = self._to(topk_ids.astype(paddle.int64))
        recv, count, handle, _, _ = self.buffer.low_latency_dispatch(
            self._to(x), idx, num_max_dispatch_tokens_per_rank, self.num_experts, **kwargs)
        recv_x, recv_scale = recv if isinstance(recv, tuple) else (recv, None)
        return self._from(recv_x), self._from(recv_scale), self._from(count), handle

    def low_latency_combine(self, expert_out, topk_ids, topk_weights, handle) -> paddle.Tensor:
        """As EPRunner.low_latency_combine, through Buffer.low_latency_combine (weighted sum)."""
        out, _, _ = self.buffer.low_latency_combine(self._to(expert_out), self._to(topk_ids.astype(paddle.int64)),
                                                    self._to(topk_weights), handle)
        return self._from(out)
