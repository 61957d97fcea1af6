"""Expert-parallel runners: the interface `BlackwellGemmFusedMoeMethod.apply` calls, and two
implementations with DeepEP semantics (SPEC §9, docs/design.md "Expert-parallel semantics").

Interface (`EPRunner`), called by each rank's `apply`:

    runner.ep_size, runner.ep_rank, runner.num_experts (global), runner.num_local_experts (E)
    runner.dispatch(x, x_scale, topk_ids, topk_weights, num_worst_tokens) -> DispatchOutput
    runner.combine(partial, handle) -> [T, H] bf16
    runner.low_latency_dispatch(x, topk_ids, num_max_dispatch_tokens_per_rank, use_fp8, use_ue8m0)
        -> (recv_x [E, R·N, H], recv_x_scale, recv_count [E] int32, handle)
    runner.low_latency_combine(expert_out, topk_ids, topk_weights, handle) -> [T, H] bf16

Semantics, exact (every runner agrees bit for bit with `moe_ref.ep`): docs/design.md
"Expert-parallel semantics (SPEC §9), exact", their one statement (owner of each global expert,
receive order, padding rows, the W overflow error, the summation order of both combines).
On the "ll" path the sender quantizes with `backend.moe.quantize.quantize_tokens` (the ops
contract's per_token_quant, 1x128, UE8M0 packed when use_ue8m0) when use_fp8; recv_x_scale is
MN-major as the contract's permute returns it.

Every collective is called by all R ranks in the same order (as with NCCL/DeepEP). Inputs are
checked before the exchange; values that only make sense across ranks (H, K_top, dtypes, W)
are checked after it, identically on every rank, so every rank raises the same error.

Implementations:
- `SingleRankEPRunner(num_experts)`: R = 1, no threads (TP-sized deployments, tests).
- `InProcessEPGroup(world_size, num_experts)`: R runners in one process that exchange through a
  shared mailbox and a `threading.Barrier`; run one thread per rank with `run_ranks`.
The paddle.distributed runner (`backend.moe.ep_distributed`) implements the same interface;
the bookkeeping below is written from the design, independently of `moe_ref.ep` (only the output
class `moe_ref.ep.DispatchOutput` is shared: one class for what a rank receives, whoever dispatched;
its `handle` is this module's HTHandle).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import numpy as np
import paddle

from moe_ref.checks import check_dim, check_ids_in_range, check_positive_int, check_same_shape, check_tensor
from moe_ref.ep import DispatchOutput
from moe_ref.fp8 import concat_rows, gather_rows_zero_fill, to_mn_major_view

from .. import ops
from . import ep_index
from .quantize import quantize_tokens

FP8 = paddle.float8_e4m3fn
_ID_DTYPES = (paddle.int32, paddle.int64)
DEFAULT_TIMEOUT_S = 60.0


@dataclasses.dataclass
class RunnerHandle:
    """What every runner's handle records: the runner and rank that dispatched (combine checks them),
    T = num_tokens and H = hidden_size of that dispatch."""
    runner_id: int
    ep_rank: int
    num_tokens: int
    hidden_size: int


@dataclasses.dataclass
class HTHandle(RunnerHandle):
    """Bookkeeping of one ht dispatch, kept by the source rank for `combine`.

    rows_on_rank[r]: int64 [T] row of each of this rank's tokens in rank r's received
    tensors, -1 where the token was not sent to r. num_worst_tokens: W of that dispatch.
    """
    num_worst_tokens: int
    rows_on_rank: list


@dataclasses.dataclass
class LLHandle(RunnerHandle):
    """Bookkeeping of one ll dispatch: slot_on_rank[t, k] = r · E · R·N + e · R·N + slot of
    (t, k) over the concatenated expert outputs of all ranks, -1 for ids of -1."""
    rows_per_expert: int
    slot: np.ndarray


class _Barrier:
    """A reusable barrier whose abort never reaches a rank that was already released.

    `threading.Barrier.abort()` also breaks the wait of a thread that the last arrival has
    released but that has not been scheduled yet, so a rank that raises right after a collective
    could turn its peers' completed collective into a BrokenBarrierError. Here a wait returns once
    its generation has passed, whatever happens later.
    """

    def __init__(self, parties: int, timeout: float):
        self._cond = threading.Condition()
        self._parties, self._timeout = parties, timeout
        self._count, self._generation, self._broken = 0, 0, False

    def wait(self) -> None:
        with self._cond:
            if self._broken:
                raise threading.BrokenBarrierError
            generation = self._generation
            self._count += 1
            if self._count == self._parties:
                self._count, self._generation = 0, generation + 1
                self._cond.notify_all()
                return
            self._cond.wait_for(lambda: self._generation != generation or self._broken, self._timeout)
            if self._generation != generation:
                return
            self._broken = True                       # timed out or aborted: nobody passes any more
            self._cond.notify_all()
            raise threading.BrokenBarrierError

    def abort(self) -> None:
        with self._cond:
            self._broken = True
            self._cond.notify_all()

    @property
    def broken(self) -> bool:
        return self._broken


class EPGroupAborted(RuntimeError):
    """A collective could not finish because another rank failed, the group was aborted, or the
    barrier timed out."""


class EPRunner:
    """The interface (see the module docstring). Subclasses implement `_exchange`:
    `payloads = self._exchange(op, payload)` returns every rank's payload of the same collective,
    in rank order (an all-gather), and raises EPGroupAborted when a peer cannot take part."""

    def __init__(self, ep_size: int, ep_rank: int, num_experts: int):
        self.ep_size = check_positive_int(ep_size, "ep_size")
        if isinstance(ep_rank, bool) or not isinstance(ep_rank, int) or not 0 <= ep_rank < self.ep_size:
            raise ValueError(f"ep_rank: expected 0 <= ep_rank < ep_size = {self.ep_size}, got {ep_rank!r}")
        self.ep_rank = ep_rank
        self.num_experts = check_positive_int(num_experts, "num_experts")
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts: expected a multiple of ep_size = {self.ep_size}, got {num_experts}")
        self.num_local_experts = self.num_experts // self.ep_size

    def _exchange(self, op: str, payload: dict) -> list[dict]:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ep_size={self.ep_size}, ep_rank={self.ep_rank}, "
                f"num_experts={self.num_experts})")

    # ------------------------------------------------------------------ checks

    def _check_routing(self, topk_ids, topk_weights, t: int | None):
        check_tensor(topk_ids, "topk_ids", dtypes=_ID_DTYPES, ndim=2)
        if t is not None:
            check_dim(topk_ids, 0, t, "topk_ids", "T (rows of x)")
        ids = check_ids_in_range(topk_ids, "topk_ids", self.num_experts, "global expert ids").numpy()
        if topk_weights is not None:
            check_tensor(topk_weights, "topk_weights", dtypes=(paddle.float32,), ndim=2)
            check_same_shape(topk_weights, "topk_weights", topk_ids, "topk_ids")
        return ids

    def _check_same_across_ranks(self, payloads: list[dict], keys: tuple[str, ...]) -> None:
        for key in keys:
            seen = [p[key] for p in payloads]
            if any(v != seen[0] for v in seen):
                raise ValueError(f"{key}: every rank must pass the same value, got "
                                 + ", ".join(f"rank {r}: {v}" for r, v in enumerate(seen)))

    def _check_handle(self, handle, cls):
        if not isinstance(handle, cls):
            raise TypeError(f"handle: expected the {cls.__name__} returned by this runner's dispatch, "
                            f"got {type(handle).__name__}")
        if handle.runner_id != id(self) or handle.ep_rank != self.ep_rank:
            raise ValueError(f"handle: belongs to another runner (rank {handle.ep_rank}), "
                             f"this is rank {self.ep_rank}")

    # argument checks of the four runner calls, shared by every runner (handle_cls: its handle type)

    def _check_dispatch(self, x, x_scale, topk_ids, topk_weights, num_worst_tokens):
        """-> (T, H, ids int64 numpy [T, K_top], W)."""
        check_tensor(x, "x", dtypes=(FP8, paddle.bfloat16), ndim=2)
        t, h = (int(d) for d in x.shape)
        if x_scale is None:
            if x.dtype == FP8:
                raise ValueError("x_scale: expected the [T, S'] scales of fp8 x, got None")
        else:
            # float32 / packed int32 1x128 scales, or #7666's raw 1x32 UE8M0 bytes (uint8)
            check_tensor(x_scale, "x_scale", dtypes=(paddle.float32, paddle.int32, paddle.uint8), ndim=2)
            check_dim(x_scale, 0, t, "x_scale", "T (rows of x)")
        if topk_weights is None:
            raise ValueError("topk_weights: expected the [T, K_top] float32 routing weights, got None")
        ids = self._check_routing(topk_ids, topk_weights, t)
        w = check_positive_int(num_worst_tokens, "num_worst_tokens")
        return t, h, ids, w

    def _check_combine(self, partial, handle, handle_cls) -> None:
        self._check_handle(handle, handle_cls)
        check_tensor(partial, "partial", dtypes=(paddle.bfloat16,), ndim=2)
        check_dim(partial, 0, handle.num_worst_tokens, "partial", "W (num_worst_tokens of the dispatch)")
        check_dim(partial, 1, handle.hidden_size, "partial", "H")

    def _check_low_latency_dispatch(self, x, topk_ids, num_max_dispatch_tokens_per_rank, use_fp8, use_ue8m0):
        """-> (T, H, ids int64 numpy [T, K_top], N). T <= N is left to the runner (where it is checked)."""
        check_tensor(x, "x", dtypes=(paddle.bfloat16,), ndim=2)
        t, h = (int(d) for d in x.shape)
        ids = self._check_routing(topk_ids, None, t)
        n = check_positive_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank")
        for name, flag in (("use_fp8", use_fp8), ("use_ue8m0", use_ue8m0)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}: expected a bool, got {flag!r}")
        if use_ue8m0 and not use_fp8:
            raise ValueError("use_ue8m0: needs use_fp8=True (UE8M0 scales belong to FP8 data)")
        return t, h, ids, n

    def _check_low_latency_combine(self, expert_out, topk_ids, topk_weights, handle, handle_cls):
        """-> ids int64 numpy [T, K_top]."""
        self._check_handle(handle, handle_cls)
        check_tensor(expert_out, "expert_out", dtypes=(paddle.bfloat16,), ndim=3)
        expected = [self.num_local_experts, handle.rows_per_expert, handle.hidden_size]
        if list(expert_out.shape) != expected:
            raise ValueError(f"expert_out: expected shape [E, R·N, H] = {expected}, got {list(expert_out.shape)}")
        ids = self._check_routing(topk_ids, topk_weights, handle.num_tokens)
        return ids

    # ------------------------------------------------------------------ ht (DeepEP normal)

    def dispatch(self, x, x_scale, topk_ids, topk_weights, num_worst_tokens) -> DispatchOutput:
        """x [T, H] fp8 | bf16; x_scale [T, S'] fp32 | int32 | uint8 or None (required for fp8 x);
        topk_ids [T, K_top] int32 | int64 global ids or -1; topk_weights [T, K_top] float32;
        num_worst_tokens W. Returns this rank's DispatchOutput (module docstring)."""
        t, h, ids, w = self._check_dispatch(x, x_scale, topk_ids, topk_weights, num_worst_tokens)
        payloads = self._exchange("dispatch", {
            "x": x, "x_scale": x_scale, "ids": ids, "weights": topk_weights, "W": w, "H": h,
            "K_top": int(ids.shape[1]), "x dtype": str(x.dtype),
            "x_scale shape[1]": None if x_scale is None else (str(x_scale.dtype), int(x_scale.shape[1])),
        })
        self._check_same_across_ranks(payloads, ("W", "H", "K_top", "x dtype", "x_scale shape[1]"))
        e, r_me = self.num_local_experts, self.ep_rank
        # sent[s][r]: bool [T_s] tokens of source s that have an expert on rank r
        sent = [ep_index.goes_to(p["ids"], e, self.ep_size) for p in payloads]
        counts = [sum(int(sent[s][r].sum()) for s in range(self.ep_size)) for r in range(self.ep_size)]
        for r, c in enumerate(counts):
            if c > w:
                raise ValueError(f"num_worst_tokens: rank {r} receives {c} tokens, more than "
                                 f"num_worst_tokens W = {w}")

        # rows this rank receives: (source rank, source token) ascending, then padding
        src_rows, recv_ids, recv_w = [], [], []
        offset = 0
        for s, p in enumerate(payloads):
            tok = np.nonzero(sent[s][r_me])[0]
            src_rows.append(tok + offset)
            offset += int(p["ids"].shape[0])
            recv_ids.append(ep_index.local_ids(p["ids"][tok], r_me, e))
            recv_w.append(p["weights"].numpy()[tok] if p["weights"] is not None else None)
        n_recv = counts[r_me]
        k_top = payloads[0]["K_top"]
        pad_row = offset                                   # index of the appended zero row
        index = np.full([w], pad_row, dtype=np.int64)
        index[:n_recv] = np.concatenate(src_rows)
        ids_out = np.full([w, k_top], -1, dtype=np.int64)
        ids_out[:n_recv] = np.concatenate(recv_ids).reshape([-1, k_top])
        w_out = np.zeros([w, k_top], dtype=np.float32)
        w_out[:n_recv] = np.concatenate(recv_w).reshape([-1, k_top])
        recv_x = _gather_rows([p["x"] for p in payloads], index)
        recv_scale = None if x_scale is None else _gather_rows([p["x_scale"] for p in payloads], index)

        # where each of *my* tokens sits on every rank (for combine)
        rows_on_rank = []
        for r in range(self.ep_size):
            before = sum(int(sent[s][r].sum()) for s in range(r_me))
            mine = sent[r_me][r]
            rows = np.full([t], -1, dtype=np.int64)
            rows[mine] = before + np.arange(int(mine.sum()), dtype=np.int64)
            rows_on_rank.append(rows)
        handle = HTHandle(id(self), r_me, t, h, w, rows_on_rank)
        return DispatchOutput(recv_x, recv_scale, paddle.to_tensor(ids_out), paddle.to_tensor(w_out), n_recv, handle)

    def combine(self, partial, handle) -> paddle.Tensor:
        """partial [W, H] bf16 (this rank's weighted expert output per received row), handle from
        this rank's dispatch -> [T, H] bf16 summed over ranks in rank order (float32, one rounding)."""
        self._check_combine(partial, handle, HTHandle)
        payloads = self._exchange("combine", {"partial": partial})
        acc = paddle.zeros([handle.num_tokens, handle.hidden_size], dtype=paddle.float32)
        for r, p in enumerate(payloads):
            rows = handle.rows_on_rank[r]
            if handle.num_tokens == 0 or not (rows >= 0).any():
                continue
            vals = _gather_rows([p["partial"]], np.where(rows >= 0, rows, handle.num_worst_tokens))
            mask = paddle.to_tensor(rows >= 0).unsqueeze(1)
            acc = paddle.where(mask, acc + vals.astype(paddle.float32), acc)
        return acc.astype(paddle.bfloat16)

    # ------------------------------------------------------------------ ll (DeepEP low latency)

    def low_latency_dispatch(self, x, topk_ids, num_max_dispatch_tokens_per_rank, use_fp8=True, use_ue8m0=True):
        """x [T, H] bf16 (T <= N), topk_ids [T, K_top] global ids or -1, N, use_fp8, use_ue8m0 ->
        (recv_x [E, R·N, H] fp8 (bf16 without use_fp8), recv_x_scale (module docstring) | None,
        recv_count [E] int32, handle)."""
        t, h, ids, n = self._check_low_latency_dispatch(x, topk_ids, num_max_dispatch_tokens_per_rank,
                                                        use_fp8, use_ue8m0)
        if t > n:
            raise ValueError(f"x: rank {self.ep_rank} has T = {t} tokens, more than "
                             f"num_max_dispatch_tokens_per_rank N = {n}")
        q, scale = x, None
        if use_fp8:
            q, scale = quantize_tokens(ops.get_provider(), x, use_ue8m0)
        payloads = self._exchange("low_latency_dispatch", {
            "x": q, "x_scale": scale, "ids": ids, "N": n, "H": h, "K_top": int(ids.shape[1]),
            "use_fp8": use_fp8, "use_ue8m0": use_ue8m0})
        self._check_same_across_ranks(payloads, ("N", "H", "K_top", "use_fp8", "use_ue8m0"))
        e, r_me, rn = self.num_local_experts, self.ep_rank, self.ep_size * n
        offsets = np.cumsum([0] + [int(p["ids"].shape[0]) for p in payloads])
        slot_of = [np.full(p["ids"].shape, -1, dtype=np.int64) for p in payloads]
        my_rows, counts = [], np.zeros([e], dtype=np.int64)
        for r in range(self.ep_size):
            for le in range(e):
                g = r * e + le
                fill = 0
                for s, p in enumerate(payloads):
                    tt, kk = np.nonzero(p["ids"] == g)        # row-major: token ascending, then k
                    slot_of[s][tt, kk] = (r * e + le) * rn + fill + np.arange(tt.size)
                    if r == r_me:
                        my_rows.append(tt + offsets[s])
                    fill += tt.size
                if fill > rn:
                    raise ValueError(f"topk_ids: expert {le} of rank {r} receives {fill} (token, k) pairs, more "
                                     f"than R·N = {rn} slots")
                if r == r_me:
                    counts[le] = fill
        index = np.full([e, rn], offsets[-1], dtype=np.int64)            # pad -> appended zero row
        start = 0
        for le in range(e):
            rows = np.concatenate(my_rows[start: start + self.ep_size])
            start += self.ep_size
            index[le, : rows.size] = rows
        recv_x = _gather_rows([p["x"] for p in payloads], index.reshape([-1])).reshape([e, rn, h])
        recv_scale = None
        if use_fp8:
            flat = _gather_rows([p["x_scale"] for p in payloads], index.reshape([-1]))
            recv_scale = to_mn_major_view(flat.reshape([e, rn, int(flat.shape[1])]))
        handle = LLHandle(id(self), r_me, t, h, rn, slot_of[r_me])
        return recv_x, recv_scale, paddle.to_tensor(counts.astype(np.int32)), handle

    def low_latency_combine(self, expert_out, topk_ids, topk_weights, handle) -> paddle.Tensor:
        """expert_out [E, R·N, H] bf16 (this rank's expert outputs per slot), topk_ids and
        topk_weights [T, K_top] of this rank's tokens, handle from low_latency_dispatch ->
        [T, H] bf16 = bf16(Σ_k w[t, k] · expert_out[slot(t, k)]), float32 in k order."""
        ids = self._check_low_latency_combine(expert_out, topk_ids, topk_weights, handle, LLHandle)
        if not np.array_equal(ids >= 0, handle.slot >= 0):
            raise ValueError("topk_ids: differ from the ids given to low_latency_dispatch")
        payloads = self._exchange("low_latency_combine", {"expert_out": expert_out})
        t, k_top = handle.slot.shape
        if t == 0 or not (handle.slot >= 0).any():
            return paddle.zeros([t, handle.hidden_size], dtype=paddle.bfloat16)
        outs = [p["expert_out"].reshape([-1, handle.hidden_size]) for p in payloads]
        pad = sum(int(o.shape[0]) for o in outs)
        vals = _gather_rows(outs, np.where(handle.slot >= 0, handle.slot, pad).reshape([-1]))
        return weighted_sum_over_k(vals.astype(paddle.float32).reshape([t, k_top, handle.hidden_size]),
                                   topk_weights, handle.slot >= 0)


# ---------------------------------------------------------------------- tensor helpers

def weighted_sum_over_k(vals: paddle.Tensor, topk_weights: paddle.Tensor, valid: np.ndarray) -> paddle.Tensor:
    """The ll combine's sum: vals [T, K_top, H] float32 (the expert row of each (t, k)), topk_weights
    [T, K_top] float32, valid [T, K_top] bool -> [T, H] bf16 = bf16(Σ_{k ascending, valid} w[t, k] · vals[t, k]),
    float32 accumulation in k order, one rounding; rows with no valid k are zero."""
    t, k_top, h = (int(d) for d in vals.shape)
    acc = paddle.zeros([t, h], dtype=paddle.float32)
    mask = paddle.to_tensor(valid)
    for k in range(k_top):
        term = topk_weights[:, k:k + 1] * vals[:, k]
        acc = paddle.where(mask[:, k:k + 1], acc + term, acc)
    return acc.astype(paddle.bfloat16)


def _gather_rows(sources: list, index: np.ndarray) -> paddle.Tensor:
    """Rows `index` of the row-wise concatenation of `sources` [T_s, C], where the index
    sum(T_s) (one past the last row) selects a zero row. Returns [len(index), C], dtype of sources."""
    rows = concat_rows(list(sources))
    return gather_rows_zero_fill(rows, paddle.to_tensor(np.asarray(index, dtype=np.int64)))


# ---------------------------------------------------------------------- runners

class SingleRankEPRunner(EPRunner):
    """R = 1: every collective is local (no threads, no barrier)."""

    def __init__(self, num_experts: int):
        super().__init__(1, 0, num_experts)

    def _exchange(self, op: str, payload: dict) -> list[dict]:
        return [payload]


class InProcessEPGroup:
    """R simulated ranks in one process: `group.runner(rank)` gives rank's runner.

    Each collective posts the rank's payload to a shared mailbox, waits on a
    `threading.Barrier`, reads every rank's payload, and waits again before the slot is freed.
    A barrier wait longer than timeout_s, or `abort()`, makes every waiting rank raise
    EPGroupAborted; an aborted group stays broken (make a new one). Run the ranks with
    `run_ranks(world_size, fn, group=group)` or `group.run(fn)`.
    """

    def __init__(self, world_size: int, num_experts: int, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.world_size = check_positive_int(world_size, "world_size")
        if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not timeout_s > 0:
            raise ValueError(f"timeout_s: expected a number > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._barrier = _Barrier(self.world_size, self.timeout_s)
        self._lock = threading.Lock()
        self._mailbox: dict[tuple[int, int], tuple[str, dict]] = {}
        self._runners = [InProcessEPRunner(self, r, num_experts) for r in range(self.world_size)]
        self.num_experts = self._runners[0].num_experts

    def runner(self, rank: int) -> "InProcessEPRunner":
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size = {self.world_size}, got {rank!r}")
        return self._runners[rank]

    def abort(self) -> None:
        """Break the barrier: every rank waiting now or later raises EPGroupAborted."""
        self._barrier.abort()

    @property
    def broken(self) -> bool:
        return self._barrier.broken

    def run(self, fn: Callable[[int], Any], timeout_s: float | None = None) -> list:
        """run_ranks(world_size, fn, group=self, timeout_s=...)."""
        return run_ranks(self.world_size, fn, group=self,
                         timeout_s=2 * self.timeout_s if timeout_s is None else timeout_s)

    def _wait(self, rank: int, op: str) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            raise EPGroupAborted(f"rank {rank}: {op} could not complete: the EP group was aborted "
                                 f"(another rank failed, or a barrier wait exceeded {self.timeout_s} s)") from None

    def _exchange(self, rank: int, seq: int, op: str, payload: dict) -> list[dict]:
        with self._lock:
            self._mailbox[(seq, rank)] = (op, payload)
        self._wait(rank, op)
        with self._lock:
            posted = [self._mailbox[(seq, r)] for r in range(self.world_size)]
        self._wait(rank, op)
        if rank == 0:
            with self._lock:
                for r in range(self.world_size):
                    del self._mailbox[(seq, r)]
        ops = [o for o, _ in posted]
        if any(o != op for o in ops):
            raise RuntimeError(f"rank {rank}: collective #{seq} mismatch, ranks called "
                               + ", ".join(f"{r}: {o}" for r, o in enumerate(ops)))
        return [p for _, p in posted]


class InProcessEPRunner(EPRunner):
    """One rank of an InProcessEPGroup (make it with `group.runner(rank)`)."""

    def __init__(self, group: InProcessEPGroup, rank: int, num_experts: int):
        super().__init__(group.world_size, rank, num_experts)
        self._group = group
        self._seq = 0

    def _exchange(self, op: str, payload: dict) -> list[dict]:
        seq = self._seq
        self._seq += 1
        return self._group._exchange(self.ep_rank, seq, op, payload)


def _with_rank(err: BaseException, rank: int) -> BaseException:
    msg = f"rank {rank}: {err}"
    try:
        new = type(err)(msg)
    except Exception:
        new = RuntimeError(f"rank {rank}: {type(err).__name__}: {err}")
    return new


def run_ranks(world_size: int, fn: Callable[[int], Any], *, group: InProcessEPGroup | None = None,
              timeout_s: float = 2 * DEFAULT_TIMEOUT_S) -> list:
    """Run fn(rank) for rank 0..R-1 in R threads; return [fn(0), ..., fn(R-1)].

    If a rank raises, `group` (when given) is aborted so the ranks blocked in a collective stop
    at once; then the first rank's own error (not the EPGroupAborted of its peers) is re-raised
    with the same type and "rank r: " in front of its message (the original chained as __cause__).
    If not every rank finishes within timeout_s, the group is aborted and TimeoutError names
    the ranks still running. Threads are daemons: nothing can keep the process alive.
    """
    world_size = check_positive_int(world_size, "world_size")
    if group is not None and group.world_size != world_size:
        raise ValueError(f"group: has world_size {group.world_size}, expected world_size = {world_size}")
    results: list = [None] * world_size
    errors: list = [None] * world_size

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            errors[rank] = e
            if group is not None:
                group.abort()

    threads = [threading.Thread(target=target, args=(r,), name=f"ep-rank-{r}", daemon=True)
               for r in range(world_size)]
    for th in threads:
        th.start()
    deadline = time.monotonic() + timeout_s
    for th in threads:
        th.join(max(0.0, deadline - time.monotonic()))
    alive = [r for r, th in enumerate(threads) if th.is_alive()]
    if alive:
        if group is not None:
            group.abort()
            for r in alive:
                threads[r].join(1.0)
        raise TimeoutError(f"run_ranks: ranks {alive} did not finish within {timeout_s} s"
                           + ("" if group is not None else " (pass group= so a failing rank aborts the others)"))
    failed = [r for r in range(world_size) if errors[r] is not None]
    if failed:
        primary = next((r for r in failed if not isinstance(errors[r], EPGroupAborted)), failed[0])
        raise _with_rank(errors[primary], primary) from errors[primary]
    return results
