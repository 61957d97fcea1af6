"""Expert-parallel ht exchange on the device (SPEC §9, docs/design.md "Expert-parallel semantics, exact"), torch.

DeepEP-"normal" dispatch and combine where index building, packing and unpacking are kernels and the host reads
nothing back:

    route   ep_route_kernel: dest [T, R] = r where token t has >= 1 expert on rank r, else -1; then the permute's
            count and slot kernels (launch.permute_indices with R "experts" of CHUNK rows): map [T, R] =
            r·CHUNK + slot (slot = rank of t among the tokens sent to r, ascending) and counts [R].
    pack    ep_pack_kernel: one row of int32 words per (token, destination rank) into the send buffer:
            [x fp8 (H/4 words) | packed UE8M0 scale (C) | ids int64 (2·K_top) | weights fp32 (K_top) | pad to 16 B].
    counts  all_gather of counts (device to device): cnt [R, R], cnt[s, r] = tokens s sends to r.
    a2a     all_to_all_single of the rows.
    unpack  ep_unpack_kernel: received rows -> x [W, H] fp8, scale [W, C], local ids [W, K_top] int64 (-1: other
            rank or padding), weights [W, K_top] fp32; padding rows zero.
    combine the expert side's weighted partial rows [W, H] bf16 go back by the same route, reversed (one row per
            (token, rank), already summed over that rank's experts); the source sums them in rank order in float32
            and rounds once (launch.depermute_prefill_combine with weight 1 per rank: 1·x is exact).

Two receive layouts:
- fixed chunks (`exact=False`, num_worst_tokens W = R·CHUNK, CHUNK >= T on every rank): rank r's rows go to chunk
  r of CHUNK rows; every all_to_all has equal splits, nothing is read back, the whole dispatch + combine can be
  captured in a CUDA graph. Rows of chunk s past cnt[s, me] are padding. Costs CHUNK - cnt rows of bytes per rank.
- exact (`exact=True`): one host read of cnt (the counts that size the buffers), then the rows back to back,
  exactly the bytes DeepEP sends.

`overlapped_layer` runs a layer as micro-batches with the exchange on a communication stream, so the all_to_all
of one micro-batch runs while the expert GEMMs of the other do (two-batch overlap).
Imports torch and triton, not Paddle.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton

from . import kernels as K
from . import launch as L

ROW_ALIGN = 16        # bytes: NCCL moves 16-byte-aligned rows faster (DeepEP aligns its rows the same way)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """Words of one dispatch row: x H/4, scale C, ids 2·K_top, weights K_top, padded to ROW_ALIGN bytes."""
    hidden: int
    scale_words: int
    top_k: int

    @property
    def payload_words(self) -> int:
        return self.hidden // 4 + self.scale_words + 3 * self.top_k

    @property
    def row_words(self) -> int:
        return -(-self.payload_words // (ROW_ALIGN // 4)) * (ROW_ALIGN // 4)

    @property
    def ideal_row_bytes(self) -> int:
        """What DeepEP's normal dispatch carries per (token, rank): fp8 x, packed scales, ids int64, weights fp32."""
        return 4 * self.payload_words


def route(topk_ids: torch.Tensor, num_local_experts: int, world: int, chunk: int):
    """topk_ids [T, K_top] global ids (-1 allowed) -> (map [T, R] int32 = r·chunk + slot or -1, counts [R] int32).
    Slots number the tokens sent to each rank in ascending token order. Three launches, no host read."""
    t, k_top = topk_ids.shape
    if t > chunk:
        raise ValueError(f"topk_ids: {t} tokens, more than chunk = {chunk} rows per rank")
    ids = topk_ids if topk_ids.stride(-1) == 1 else topk_ids.contiguous()
    dest = torch.empty((t, world), dtype=torch.int32, device=ids.device)
    kp, r_pad = _pow2(k_top), _pow2(world)
    block_t = max(1, min(64, 2048 // (kp * r_pad)))
    if t:
        K.ep_route_kernel[(triton.cdiv(t, block_t),)](ids, dest, t, k_top, int(num_local_experts), world,
                                                      ids.stride(0), BLOCK_T=block_t, KP=kp, R_PAD=r_pad)
    index_map, counts, _ = L.permute_indices(dest, world, chunk, check=False)
    return index_map, counts


def _words(t: torch.Tensor, name: str) -> torch.Tensor:
    """[n, c] tensor of any dtype -> its bytes as int32 words [n, c·itemsize/4] (a view when it can be one)."""
    if t.numel() == 0:                  # torch calls any empty tensor contiguous, whatever its strides
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    b = t.contiguous().view(torch.uint8)
    if b.shape[1] % 4:
        raise ValueError(f"{name}: {b.shape[1]} bytes per row, not a multiple of 4 (the exchange moves 32-bit words)")
    return b.view(torch.int32)


def pack_rows(x_q, x_scale, topk_ids, topk_weights, index_map, counts, rows: int, chunk: int, exact: bool):
    """-> (send [rows, row_words] int32, pos [T, R] int32: send row of (token, rank) or -1). x_q [T, H] fp8,
    x_scale [T, C] int32|fp32, topk_ids [T, K_top] int64, topk_weights [T, K_top] fp32; map/counts from route."""
    t, world = index_map.shape
    xw, sw = _words(x_q, "x_q"), _words(x_scale, "x_scale")
    iw, ww = _words(topk_ids.to(torch.int64), "topk_ids"), _words(topk_weights.to(torch.float32), "topk_weights")
    lay = RowLayout(4 * xw.shape[1], sw.shape[1], topk_ids.shape[1])
    send = torch.empty((rows, lay.row_words), dtype=torch.int32, device=x_q.device)
    pos = torch.empty((t, world), dtype=torch.int32, device=x_q.device)
    block = min(1024, _pow2(lay.row_words))
    if t:
        K.ep_pack_kernel[(t, triton.cdiv(lay.row_words, block))](
            xw, sw, iw, ww, index_map, counts, pos, send, xw.shape[1], sw.shape[1], lay.top_k, lay.row_words, chunk,
            xw.stride(0), sw.stride(0), iw.stride(0), ww.stride(0), R=world, R_PAD=_pow2(world), EXACT=bool(exact),
            BLOCK=block, num_warps=4)
    return send, pos


def unpack_rows(recv: torch.Tensor, cnt: torch.Tensor, lay: RowLayout, num_local_experts: int, rank: int,
                chunk: int, exact: bool, scale_dtype=torch.int32):
    """recv [W, row_words] int32, cnt [R, R] int32 -> (x [W, H] fp8, scale [W, C], local ids [W, K_top] int64,
    weights [W, K_top] fp32); padding rows (see ep_unpack_kernel) zero, ids -1."""
    w, dev = recv.shape[0], recv.device
    xw, sw = lay.hidden // 4, lay.scale_words
    x = torch.empty((w, xw), dtype=torch.int32, device=dev)
    s = torch.empty((w, sw), dtype=torch.int32, device=dev)
    ids = torch.empty((w, lay.top_k), dtype=torch.int64, device=dev)
    wts = torch.empty((w, lay.top_k), dtype=torch.float32, device=dev)
    block = min(1024, _pow2(xw + sw))
    if w:
        K.ep_unpack_kernel[(w, triton.cdiv(xw + sw, block))](
            recv, cnt, x, s, ids, wts, xw, sw, lay.top_k, lay.row_words, chunk, int(num_local_experts), rank,
            cnt.shape[0], EXACT=bool(exact), R_PAD=_pow2(cnt.shape[0]), KP=_pow2(lay.top_k), BLOCK=block,
            num_warps=4)
    return x.view(torch.float8_e4m3fn), s.view(scale_dtype), ids, wts


def reduce_over_ranks(back: torch.Tensor, pos: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """back [rows, H] bf16 (the partial rows returned by every rank), pos [T, R] -> [T, H] bf16 =
    bf16(Σ_{r ascending, pos >= 0} float32(back[pos[t, r]])), tokens sent nowhere zero. ones [T, R] fp32."""
    rows, h = back.shape
    return L.depermute_prefill_combine(back.view(1, rows, h), pos, ones, pos.shape[0])


@dataclasses.dataclass
class ExchangeHandle:
    """One dispatch on one rank. pos [T, R]: send row of (token, rank) = row of its partial in the combine's receive
    buffer; cnt [R, R] int32 on the device; cnt_host (exact layout only) its host copy; rows_sent / rows_recv:
    buffer rows; ones [T, R] fp32 (combine weights)."""
    tokens: int
    chunk: int
    pos: torch.Tensor
    cnt: torch.Tensor
    cnt_host: list | None
    rows_sent: int
    rows_recv: int
    ones: torch.Tensor
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None
    back: torch.Tensor | None = None
    counts: torch.Tensor | None = None


class DeviceExchange:
    """dispatch / combine over a torch.distributed group, index building and packing on the device.

    num_local_experts E (rank r holds global experts r·E .. r·E+E-1); chunk = rows reserved per (source, rank) in
    the fixed-chunk layout (>= T on every rank; num_worst_tokens W = R·chunk); exact: the exact layout (one host
    read of the counts per dispatch). Each step is public so a scheduler can put the collectives on another stream:
    dispatch = send_rows (compute) + exchange_rows (collectives) + received (compute); combine = return_rows
    (collective) + reduce (compute). `stats` holds the bytes this rank sent to other ranks in the last exchange.
    """

    def __init__(self, num_local_experts: int, chunk: int, exact: bool = False, group=None):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.e, self.chunk, self.exact = int(num_local_experts), int(chunk), bool(exact)
        self.stats = {}
        self._ones_cache = {}

    @property
    def num_worst_tokens(self) -> int:
        return self.world * self.chunk

    def send_rows(self, x_q, x_scale, topk_ids, topk_weights) -> tuple[ExchangeHandle, RowLayout]:
        """Route and pack on the current stream (no collective). The exact layout reads the counts here."""
        t = x_q.shape[0]
        index_map, counts = route(topk_ids, self.e, self.world, self.chunk)
        cnt = torch.empty((self.world, self.world), dtype=torch.int32, device=x_q.device)
        cnt_host = None
        if self.exact:                                                  # the buffers' sizes: one host read
            self.dist.all_gather_into_tensor(cnt.view(-1), counts, group=self.group)
            cnt_host = cnt.tolist()
        rows_sent = sum(cnt_host[self.rank]) if self.exact else self.num_worst_tokens
        rows_recv = sum(c[self.rank] for c in cnt_host) if self.exact else self.num_worst_tokens
        send, pos = pack_rows(x_q, x_scale, topk_ids, topk_weights, index_map, counts, rows_sent, self.chunk,
                              self.exact)
        lay = RowLayout(x_q.shape[1], x_scale.shape[1] * x_scale.element_size() // 4, topk_ids.shape[1])
        ones = self._ones(t, x_q.device)
        return ExchangeHandle(t, self.chunk, pos, cnt, cnt_host, rows_sent, rows_recv, ones, send=send,
                              counts=counts), lay

    def _ones(self, t: int, device) -> torch.Tensor:
        """The combine's weights [T, R] fp32, all 1 (kept: one fill kernel fewer per dispatch; never written)."""
        key = (t, str(device))
        if key not in self._ones_cache:
            self._ones_cache[key] = torch.ones((t, self.world), dtype=torch.float32, device=device)
        return self._ones_cache[key]

    def splits(self, h: ExchangeHandle, outgoing: bool):
        """(output split sizes, input split sizes) in rows of a dispatch (outgoing) or combine; None: equal."""
        if not self.exact:
            return None, None
        to_me = [c[self.rank] for c in h.cnt_host]
        return (to_me, h.cnt_host[self.rank]) if outgoing else (h.cnt_host[self.rank], to_me)

    def exchange_rows(self, h: ExchangeHandle, lay: RowLayout) -> None:
        """The counts all_gather (fixed chunks) and the dispatch all_to_all (current stream): h.send -> h.recv
        [W, row_words], h.cnt."""
        if not self.exact:
            self.dist.all_gather_into_tensor(h.cnt.view(-1), h.counts, group=self.group)
        out_s, in_s = self.splits(h, True)
        h.recv = torch.empty((self.num_worst_tokens, lay.row_words), dtype=torch.int32, device=h.send.device)
        self.dist.all_to_all_single(h.recv[:h.rows_recv], h.send, out_s, in_s, group=self.group)
        self.stats["dispatch_bytes_to_others"] = self._to_others(h, lay.row_words * 4, True)

    def received(self, h: ExchangeHandle, lay: RowLayout, scale_dtype=torch.int32):
        """-> (x [W, H] fp8, scale [W, C], local ids [W, K_top] int64, weights [W, K_top] fp32)."""
        return unpack_rows(h.recv, h.cnt, lay, self.e, self.rank, self.chunk, self.exact, scale_dtype)

    def return_rows(self, partial: torch.Tensor, h: ExchangeHandle) -> None:
        """The combine all_to_all (current stream): partial [W, H] bf16 rows back to their sources -> h.back."""
        hid = partial.shape[1]
        out_s, in_s = self.splits(h, False)
        h.back = torch.empty((h.rows_sent, hid), dtype=partial.dtype, device=partial.device)
        self.dist.all_to_all_single(h.back.view(torch.uint8), partial[:h.rows_recv].view(torch.uint8), out_s, in_s,
                                    group=self.group)
        self.stats["combine_bytes_to_others"] = self._to_others(h, hid * partial.element_size(), False)

    def reduce(self, h: ExchangeHandle) -> torch.Tensor:
        return reduce_over_ranks(h.back, h.pos, h.ones)

    def _to_others(self, h: ExchangeHandle, row_bytes: int, outgoing: bool) -> int | None:
        """Bytes this rank puts on the wire to other ranks (fixed chunks: all of them; exact: from the counts)."""
        if not self.exact:
            return (self.world - 1) * self.chunk * row_bytes
        me = self.rank
        rows = [h.cnt_host[me][r] if outgoing else h.cnt_host[r][me] for r in range(self.world) if r != me]
        return sum(rows) * row_bytes

    def dispatch(self, x_q, x_scale, topk_ids, topk_weights):
        """All on the current stream -> (x, scale, local ids, weights (W rows each), handle)."""
        h, lay = self.send_rows(x_q, x_scale, topk_ids, topk_weights)
        self.exchange_rows(h, lay)
        return (*self.received(h, lay, x_scale.dtype), h)

    def combine(self, partial: torch.Tensor, h: ExchangeHandle) -> torch.Tensor:
        self.return_rows(partial, h)
        return self.reduce(h)


def ideal_bytes(cnt: torch.Tensor, rank: int, lay: RowLayout, hidden_bytes: int) -> tuple[int, int]:
    """(dispatch, combine) bytes that rank `rank` must send to other ranks, DeepEP's way: a token once per other
    rank hosting >= 1 of its experts (ideal_row_bytes), a reduced bf16 row once back per token received.
    cnt [R, R] (cnt[s, r] = tokens s sends to r)."""
    c = cnt.tolist() if isinstance(cnt, torch.Tensor) else cnt
    world = len(c)
    sent = sum(c[rank][r] for r in range(world) if r != rank)
    got = sum(c[s][rank] for s in range(world) if s != rank)
    return sent * lay.ideal_row_bytes, got * hidden_bytes


# ----------------------------------------------------------------------------- two-batch overlap

class Timeline:
    """CUDA-event spans per stream (enabled on CUDA only): span(stream_name, op, stream) brackets the work queued
    inside it; spans() after a synchronization -> [{stream, op, start_ms, end_ms}] relative to the first event."""

    def __init__(self, enabled: bool):
        self.enabled, self.items = enabled, []

    @contextlib.contextmanager
    def span(self, stream_name: str, op: str, stream=None):
        if not self.enabled:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        self.items.append((stream_name, op, start, end))

    def spans(self) -> list:
        if not self.items:
            return []
        first = self.items[0][2]
        return [{"stream": n, "op": op, "start_ms": first.elapsed_time(s), "end_ms": first.elapsed_time(e)}
                for n, op, s, e in self.items]


def _on(stream):
    return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()


def overlapped_layer(ex: DeviceExchange, experts, x_q, x_scale, topk_ids, topk_weights, parts: int,
                     comm_stream=None, timeline: Timeline | None = None) -> torch.Tensor:
    """The ht layer as `parts` micro-batches of ex.chunk tokens (x_q [T, H] with T <= parts·ex.chunk):
    experts(x, scale, local ids, weights, m) -> partial [W, H] bf16 runs on the current stream, the collectives of
    every micro-batch on comm_stream (None: the current stream, no overlap), ordered by events: micro-batch i+1's
    dispatch and i's combine overlap the expert GEMMs. -> out [T, H] bf16, equal bit for bit to one micro-batch."""
    tl_ = timeline or Timeline(False)
    cur = torch.cuda.current_stream() if comm_stream is not None else None
    t, step = x_q.shape[0], ex.chunk
    if t > parts * step:
        raise ValueError(f"x_q: {t} tokens, more than parts·chunk = {parts}·{step}")
    bounds = [(i * step, min(t, (i + 1) * step)) for i in range(parts)]
    sent = []
    for a, b in bounds:                                                    # route + pack every micro-batch
        with tl_.span("compute", f"pack{len(sent)}", cur):
            sent.append(ex.send_rows(x_q[a:b], x_scale[a:b], topk_ids[a:b], topk_weights[a:b]))
        sent[-1] += (_event(cur),)
    arrived = []
    for i, (h, lay, ev) in enumerate(sent):                                # dispatch collectives
        _wait(comm_stream, ev)
        with _on(comm_stream), tl_.span("comm", f"dispatch{i}", comm_stream):
            ex.exchange_rows(h, lay)
        arrived.append(_event(comm_stream))
    done, partials = [], []                     # partials stay referenced until the combines are waited for
    for i, (h, lay, _) in enumerate(sent):                                 # experts, then combine collectives
        _wait(cur, arrived[i])
        with tl_.span("compute", f"experts{i}", cur):
            x, s, ids, w = ex.received(h, lay, x_scale.dtype)
            partials.append(experts(x, s, ids, w, ex.num_worst_tokens))
        ev = _event(cur)
        _wait(comm_stream, ev)
        with _on(comm_stream), tl_.span("comm", f"combine{i}", comm_stream):
            ex.return_rows(partials[-1], h)
        done.append(_event(comm_stream))
    outs = []
    for i, (h, _, _) in enumerate(sent):
        _wait(cur, done[i])
        with tl_.span("compute", f"reduce{i}", cur):
            outs.append(ex.reduce(h))
    return outs[0] if parts == 1 else torch.cat(outs)


def _event(stream):
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _wait(stream, ev) -> None:
    if stream is not None and ev is not None:
        stream.wait_event(ev)
