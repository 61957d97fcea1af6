"""Expert-parallel ht exchange on the device (SPEC §9, docs/design.md "Expert-parallel semantics, exact"), torch.

DeepEP-"normal" dispatch and combine where index building, packing and unpacking are kernels and the host reads
nothing back:

    route   ep_index_kernel (one program, token blocks in order): map [T, R] = r·CHUNK + slot where token t has
            >= 1 expert on rank r (slot = rank of t among the tokens sent to r, ascending), else -1; counts [R].
    pack    ep_pack_kernel: one row of int32 words per (token, destination rank) into the send buffer:
            [x fp8 (H/4 words) | packed UE8M0 scale (C) | ids int64 (2·K_top) | weights fp32 (K_top) | pad to 16 B];
            fixed chunks: padding rows get ids -1 (the receiver needs no counts).
    counts  exact layout only: all_gather of counts, cnt [R, R], cnt[s, r] = tokens s sends to r, read by the host.
    a2a     all_to_all_single of the rows.
    unpack  ep_unpack_kernel: received rows -> x [W, H] fp8, scale [W, C], local ids [W, K_top] int64 (-1: other
            rank or padding), weights [W, K_top] fp32; padding rows zero.
    combine the expert side's weighted partial rows [W, H] bf16 go back by the same route, reversed (one row per
            (token, rank), already summed over that rank's experts); the source sums them in rank order in float32
            and rounds once (launch.depermute_prefill_combine with weight 1 per rank: 1·x is exact).

Host time: every launch goes through fast_launch (the compiled launcher called directly), buffers come from a
Workspace per micro-batch slot (no allocation per call but the combine's output). `DeviceExchange(graphs=True)`
(fixed chunks, NCCL) goes further: dispatch and combine each replay a CUDA graph captured at their first call, so
an eager caller pays a graph replay and the input copies instead of the launches.

Two receive layouts:
- fixed chunks (`exact=False`, num_worst_tokens W = R·CHUNK, CHUNK >= T on every rank): rank r's rows go to chunk
  r of CHUNK rows; every all_to_all has equal splits, nothing is read back, the whole dispatch + combine can be
  captured in a CUDA graph. Rows of chunk s past cnt[s, me] are padding. Costs CHUNK - cnt rows of bytes per rank.
- exact (`exact=True`): one host read of cnt (the counts that size the buffers), then the rows back to back,
  exactly the bytes DeepEP sends.

`LowLatencyExchange` is DeepEP's low-latency ("ll") pair with moe_ref.ep.ll_dispatch / ll_combine semantics on top:
fixed chunks of N = num_max_dispatch_tokens_per_rank, then the permute to [E, R·N] slots; per-(token, k) rows back.

`overlapped_layer` runs a layer as micro-batches with the exchange on a communication stream, so the all_to_all
of one micro-batch runs while the expert GEMMs of the other do (two-batch overlap).
Imports torch and triton, not Paddle.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import triton

from . import launch as L

K = L.K             # the kernels module, launched through fast_launch (one cache with the launchers)

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


def route(topk_ids: torch.Tensor, num_local_experts: int, world: int, chunk: int, out=None, ll_rows: int = 0):
    """topk_ids [T, K_top] global ids (-1 allowed) -> (map [T, R] int32 = r·chunk + slot or -1, counts [R] int32,
    ret [T, K_top] int32 | None). Slots number the tokens sent to each rank in ascending token order. One launch
    (ep_index_kernel), no host read. ll_rows > 0 (the ll combine's rows per rank, N·K_top): also ret, the row of
    each (token, k) in the ll combine's receive buffer, -1 for ids on no rank. out: (map, counts, ret) to write."""
    t, k_top = topk_ids.shape
    if t > chunk:
        raise ValueError(f"topk_ids: {t} tokens, more than chunk = {chunk} rows per rank")
    ids = topk_ids if topk_ids.stride(-1) == 1 else topk_ids.contiguous()
    dev = ids.device
    index_map, counts, ret = out if out is not None else (
        torch.empty((t, world), dtype=torch.int32, device=dev), torch.empty((world,), dtype=torch.int32, device=dev),
        torch.empty((t, k_top), dtype=torch.int32, device=dev) if ll_rows else None)
    kp, r_pad = _pow2(k_top), _pow2(world)
    block_t = max(16, min(1024, 8192 // (kp * r_pad)))
    K.ep_index_kernel[(1,)](ids, index_map, counts, ret if ll_rows else counts, t, k_top, int(num_local_experts),
                            chunk, int(ll_rows), ids.stride(0), R=world, R_PAD=r_pad, KP=kp, BLOCK_T=block_t,
                            LL=bool(ll_rows), num_warps=4 if L.interpreting() else 8)
    return index_map, counts, ret


def _words(t: torch.Tensor, name: str) -> torch.Tensor:
    """[n, c] tensor of any dtype -> its bytes as int32 words [n, c·itemsize/4] (a view when it can be one)."""
    if t.dtype == torch.int32 and t.stride(-1) == 1:
        return t
    if t.numel() and t.stride(-1) == 1 and (t.shape[1] * t.element_size()) % 4 == 0:
        try:
            return t.view(torch.int32)
        except RuntimeError:            # row strides that the word view cannot express: copied below
            pass
    if t.numel() == 0:                  # torch calls any empty tensor contiguous, whatever its strides
        t = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    b = t.contiguous().view(torch.uint8)
    if b.shape[1] % 4:
        raise ValueError(f"{name}: {b.shape[1]} bytes per row, not a multiple of 4 (the exchange moves 32-bit words)")
    return b.view(torch.int32)


def pack_rows(x_q, x_scale, topk_ids, topk_weights, index_map, counts, rows: int, chunk: int, exact: bool,
              send=None, pos=None):
    """-> (send [rows, row_words] int32, pos [T, R] int32: send row of (token, rank) or -1). x_q [T, H] fp8,
    x_scale [T, C] int32|fp32, topk_ids [T, K_top] int64, topk_weights [T, K_top] fp32; map/counts from route.
    Fixed chunks (rows = R·chunk): pos is the map itself and padding rows get ids -1 (ep_pack_kernel).
    send / pos: buffers to write (else new)."""
    t, world = index_map.shape
    xw, sw = _words(x_q, "x_q"), _words(x_scale, "x_scale")
    ids = topk_ids if topk_ids.dtype == torch.int64 else topk_ids.to(torch.int64)
    wts = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.to(torch.float32)
    iw, ww = _words(ids, "topk_ids"), _words(wts, "topk_weights")
    lay = RowLayout(4 * xw.shape[1], sw.shape[1], topk_ids.shape[1])
    if send is None:
        send = torch.empty((rows, lay.row_words), dtype=torch.int32, device=x_q.device)
    if exact and pos is None:
        pos = torch.empty((t, world), dtype=torch.int32, device=x_q.device)
    block = min(1024, _pow2(lay.row_words))
    programs = t if exact else chunk
    if programs:
        K.ep_pack_kernel[(programs, triton.cdiv(lay.row_words, block))](
            xw, sw, iw, ww, index_map, counts, pos if exact else index_map, send, t, xw.shape[1], sw.shape[1],
            lay.top_k, lay.row_words, chunk, xw.stride(0), sw.stride(0), iw.stride(0), ww.stride(0), R=world,
            R_PAD=_pow2(world), KP2=_pow2(2 * lay.top_k), EXACT=bool(exact), BLOCK=block, num_warps=4)
    return send, pos if exact else index_map


def unpack_rows(recv: torch.Tensor, cnt: torch.Tensor | None, lay: RowLayout, num_local_experts: int, rank: int,
                exact: bool, scale_dtype=torch.int32, out=None):
    """recv [W, row_words] int32, cnt [R, R] int32 (exact layout only; fixed chunks: None) -> (x [W, H] fp8,
    scale [W, C], local ids [W, K_top] int64, weights [W, K_top] fp32); padding rows (see ep_unpack_kernel) zero,
    ids -1. out: the four buffers (x and scale as int32 words) to write, else new."""
    w, dev = recv.shape[0], recv.device
    xw, sw = lay.hidden // 4, lay.scale_words
    if exact and cnt is None:
        raise ValueError("cnt: the exact layout needs the counts matrix")
    x, s, ids, wts = out if out is not None else (
        torch.empty((w, xw), dtype=torch.int32, device=dev), torch.empty((w, sw), dtype=torch.int32, device=dev),
        torch.empty((w, lay.top_k), dtype=torch.int64, device=dev),
        torch.empty((w, lay.top_k), dtype=torch.float32, device=dev))
    block = min(1024, _pow2(xw + sw))
    world = cnt.shape[0] if exact else 1
    if w:
        K.ep_unpack_kernel[(w, triton.cdiv(xw + sw, block))](
            recv, cnt if exact else recv, x, s, ids, wts, xw, sw, lay.top_k, lay.row_words, int(num_local_experts),
            rank, world, EXACT=bool(exact), R_PAD=_pow2(world), KP=_pow2(lay.top_k), BLOCK=block, num_warps=4)
    return x.view(torch.float8_e4m3fn), s.view(scale_dtype), ids, wts


def reduce_over_ranks(back: torch.Tensor, pos: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """back [rows, H] bf16 (the partial rows returned by every rank), pos [T, R] -> [T, H] bf16 =
    bf16(Σ_{r ascending, pos >= 0} float32(back[pos[t, r]])), tokens sent nowhere zero. ones [T, R] fp32."""
    rows, h = back.shape
    return L.depermute_prefill_combine(back.view(1, rows, h), pos, ones, pos.shape[0])


@dataclasses.dataclass
class ExchangeHandle:
    """One dispatch on one rank. pos [T, R]: send row of (token, rank) = row of its partial in the combine's receive
    buffer; counts [R] int32 (tokens this rank sends to each rank); cnt [R, R] int32 on the device and cnt_host its
    host copy (exact layout only); rows_sent / rows_recv: buffer rows; ones [T, R] fp32 (combine weights); slot:
    the workspace (buffers reused by the next dispatch of the same slot and shape); ret [T, K_top] (ll only)."""
    tokens: int
    chunk: int
    pos: torch.Tensor
    cnt: torch.Tensor | None
    cnt_host: list | None
    rows_sent: int
    rows_recv: int
    ones: torch.Tensor
    send: torch.Tensor | None = None
    recv: torch.Tensor | None = None
    back: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    slot: int = 0
    ret: torch.Tensor | None = None


def _zero_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Zeros [rows, t.shape[1]] of t's dtype and device (contiguous; made as bytes: no fill kernel per dtype)."""
    return torch.zeros((rows, t.shape[1] * t.element_size()), dtype=torch.uint8, device=t.device).view(t.dtype)


class Workspace:
    """Device buffers kept per (slot, name) and reused while shape, dtype and device stay the same: no allocation
    per call. A buffer handed out is overwritten by the next call that asks for the same (slot, name)."""

    def __init__(self):
        self.bufs = {}

    def get(self, slot: int, name: str, shape: tuple, dtype, device) -> torch.Tensor:
        buf = self.bufs.get((slot, name))
        if buf is None or buf.shape != shape or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(shape, dtype=dtype, device=device)
            self.bufs[(slot, name)] = buf
        return buf


@dataclasses.dataclass
class _Replay:
    """A captured dispatch or combine: its graph, the static input buffers it reads, what the captured call
    returned (its static outputs), every buffer the graph touches (kept alive here, whatever the Workspace does
    later), the bytes to other ranks per call, and `dirty` (dispatch): rows of the static topk_ids that may hold
    a token's ids (the rows past it are -1: tokens sent nowhere)."""
    graph: object
    static: tuple
    out: object
    keep: list
    bytes_to_others: int
    dirty: int = 0

    def load(self, t: int, inputs: tuple) -> None:
        """Copy T rows of each input into its static buffer (device copies; dtype converted as .to() would) and
        mark the static rows T.. of the ids -1 (dispatch: static[2])."""
        for buf, v in zip(self.static, inputs):
            (buf if t == buf.shape[0] else buf[:t]).copy_(v)
        if self.dirty > t:
            self.static[2][t:self.dirty].fill_(-1)
        self.dirty = t


class DeviceExchange:
    """dispatch / combine over a torch.distributed group, index building and packing on the device.

    num_local_experts E (rank r holds global experts r·E .. r·E+E-1); chunk = rows reserved per (source, rank) in
    the fixed-chunk layout (>= T on every rank; num_worst_tokens W = R·chunk); exact: the exact layout (one host
    read of the counts per dispatch). Each step is public so a scheduler can put the collectives on another stream:
    dispatch = send_rows (compute) + exchange_rows (collectives) + received (compute); combine = return_rows
    (collective) + reduce (compute). `stats` holds the bytes this rank sent to other ranks in the last exchange.

    Per call (fixed chunks): dispatch = 3 launches (index, pack, unpack) + 1 all_to_all, combine = 1 all_to_all +
    1 launch; buffers come from a Workspace per `slot` (send_rows' argument): the dispatch outputs of a slot stay
    valid until the next dispatch of that slot (the combine's output is new every call).

    graphs=True (fixed chunks, an NCCL group, CUDA tensors; else ValueError): dispatch() and combine() replay CUDA
    graphs. The first dispatch of a (slot, x_q / x_scale dtype and columns, K_top, device) captures one (after a
    warm-up run on a side stream, as torch requires) on static inputs of `chunk` rows owned by the exchange; every
    call copies its inputs in (device copies, no host read; rows T.. of the static ids set to -1, so T may change
    without a new capture: every rank captures at the same call) and replays. combine() of such a handle captures
    (per partial dtype and H) and replays the same way; a handle from the step methods combines eagerly. Outputs
    are the static buffers: the dispatch outputs and the handle are overwritten by the next dispatch of the same
    slot and key, the combine output [T, H] (a row view of a [chunk, H] buffer) by the next combine of that handle.
    Bit-identical to graphs=False (same kernels on the same bytes; padding tokens go nowhere). The step methods
    (send_rows ... reduce) stay eager. capture(fn, device) -> (graph, fn's output): how a call is recorded
    (default graphs.capture_graph; a stand-in that reruns fn checks the bookkeeping on CPU).
    """

    def __init__(self, num_local_experts: int, chunk: int, exact: bool = False, group=None, graphs: bool = False,
                 capture=None):
        import torch.distributed as dist
        self.dist, self.group = dist, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.e, self.chunk, self.exact = int(num_local_experts), int(chunk), bool(exact)
        self.stats = {}
        self.ws = Workspace()
        self._ones_cache = {}
        self.graphs, self._capture, self._replays, self._of_handle = bool(graphs), capture, {}, {}
        self._cuda_graphs = False                   # the default capture: CUDA tensors only
        if self.graphs:
            self._check_graphs()

    def _check_graphs(self) -> None:
        if self.exact:
            raise ValueError("graphs: the exact layout reads the counts on the host at every dispatch; CUDA graphs "
                             "need the fixed-chunk layout (exact=False)")
        if self._capture is None:
            backend = self.dist.get_backend(self.group)
            if backend != "nccl":
                raise ValueError(f"graphs: CUDA graphs capture NCCL collectives only; this group's backend is "
                                 f"{backend!r} (on CPU / gloo use graphs=False)")
            from .graphs import capture_graph
            self._capture, self._cuda_graphs = capture_graph, True

    @property
    def num_worst_tokens(self) -> int:
        return self.world * self.chunk

    def send_rows(self, x_q, x_scale, topk_ids, topk_weights, slot: int = 0,
                  ll_rows: int = 0) -> tuple[ExchangeHandle, RowLayout]:
        """Route and pack on the current stream (no collective). The exact layout reads the counts here.
        ll_rows > 0: also the ll combine's row map (route)."""
        t, k_top = topk_ids.shape
        dev, ws, world = x_q.device, self.ws, self.world
        out = (ws.get(slot, "map", (t, world), torch.int32, dev), ws.get(slot, "counts", (world,), torch.int32, dev),
               ws.get(slot, "ret", (t, k_top), torch.int32, dev) if ll_rows else None)
        index_map, counts, ret = route(topk_ids, self.e, world, self.chunk, out, ll_rows)
        cnt, cnt_host = None, None
        if self.exact:                                                  # the buffers' sizes: one host read
            cnt = torch.empty((world, world), dtype=torch.int32, device=dev)
            self.dist.all_gather_into_tensor(cnt.view(-1), counts, group=self.group)
            cnt_host = cnt.tolist()
        rows_sent = sum(cnt_host[self.rank]) if self.exact else self.num_worst_tokens
        rows_recv = sum(c[self.rank] for c in cnt_host) if self.exact else self.num_worst_tokens
        lay = RowLayout(x_q.shape[1], x_scale.shape[1] * x_scale.element_size() // 4, k_top)
        send = ws.get(slot, "send", (rows_sent, lay.row_words), torch.int32, dev)
        send, pos = pack_rows(x_q, x_scale, topk_ids, topk_weights, index_map, counts, rows_sent, self.chunk,
                              self.exact, send, ws.get(slot, "pos", (t, world), torch.int32, dev) if self.exact
                              else None)
        return ExchangeHandle(t, self.chunk, pos, cnt, cnt_host, rows_sent, rows_recv, self.ones(t, dev),
                              send=send, counts=counts, slot=slot, ret=ret), lay

    def ones(self, t: int, device, cols: int | None = None) -> torch.Tensor:
        """Combine weights [T, cols (R)] fp32, all 1 (kept: one fill kernel fewer per call; never written)."""
        key = (t, cols or self.world, device)
        if key not in self._ones_cache:
            self._ones_cache[key] = torch.ones(key[:2], dtype=torch.float32, device=device)
        return self._ones_cache[key]

    def splits(self, h: ExchangeHandle, outgoing: bool):
        """(output split sizes, input split sizes) in rows of a dispatch (outgoing) or combine; None: equal."""
        if not self.exact:
            return None, None
        to_me = [c[self.rank] for c in h.cnt_host]
        return (to_me, h.cnt_host[self.rank]) if outgoing else (h.cnt_host[self.rank], to_me)

    def exchange_rows(self, h: ExchangeHandle, lay: RowLayout) -> None:
        """The dispatch all_to_all (current stream): h.send -> h.recv [W, row_words]. Fixed chunks need no counts
        exchange (the receiver tells padding rows by their ids)."""
        out_s, in_s = self.splits(h, True)
        h.recv = self.ws.get(h.slot, "recv", (self.num_worst_tokens, lay.row_words), torch.int32, h.send.device)
        self.dist.all_to_all_single(h.recv[:h.rows_recv] if self.exact else h.recv, h.send, out_s, in_s,
                                    group=self.group)
        self.stats["dispatch_bytes_to_others"] = self._to_others(h, lay.row_words * 4, True)

    def received(self, h: ExchangeHandle, lay: RowLayout, scale_dtype=torch.int32):
        """-> (x [W, H] fp8, scale [W, C], local ids [W, K_top] int64, weights [W, K_top] fp32): workspace buffers
        of h's slot."""
        w, dev, ws, sl = self.num_worst_tokens, h.recv.device, self.ws, h.slot
        out = (ws.get(sl, "x", (w, lay.hidden // 4), torch.int32, dev),
               ws.get(sl, "scale", (w, lay.scale_words), torch.int32, dev),
               ws.get(sl, "ids", (w, lay.top_k), torch.int64, dev), ws.get(sl, "wts", (w, lay.top_k), torch.float32,
                                                                           dev))
        return unpack_rows(h.recv, h.cnt, lay, self.e, self.rank, self.exact, scale_dtype, out)

    def return_rows(self, partial: torch.Tensor, h: ExchangeHandle) -> None:
        """The combine all_to_all (current stream): partial [W, H] rows back to their sources -> h.back."""
        hid = partial.shape[1]
        out_s, in_s = self.splits(h, False)
        h.back = self.ws.get(h.slot, "back", (h.rows_sent, hid), partial.dtype, partial.device)
        self.dist.all_to_all_single(h.back.view(torch.uint8), partial[:h.rows_recv].view(torch.uint8), out_s, in_s,
                                    group=self.group)
        self.stats["combine_bytes_to_others"] = self._to_others(h, hid * partial.element_size(), False)

    def reduce(self, h: ExchangeHandle) -> torch.Tensor:
        return reduce_over_ranks(h.back, h.pos, h.ones)

    def counts_matrix(self, h: ExchangeHandle) -> torch.Tensor:
        """cnt [R, R] int32 on the device (cnt[s, r] = tokens s sends to r): the exact layout's, else one
        all_gather of h.counts (a collective: call it on every rank; reports only, the exchange needs none)."""
        if h.cnt is not None:
            return h.cnt
        cnt = torch.empty((self.world, self.world), dtype=torch.int32, device=h.counts.device)
        self.dist.all_gather_into_tensor(cnt.view(-1), h.counts, group=self.group)
        return cnt

    def _to_others(self, h: ExchangeHandle, row_bytes: int, outgoing: bool) -> int | None:
        """Bytes this rank puts on the wire to other ranks (fixed chunks: all of them; exact: from the counts)."""
        if not self.exact:
            return (self.world - 1) * self.chunk * row_bytes
        me = self.rank
        rows = [h.cnt_host[me][r] if outgoing else h.cnt_host[r][me] for r in range(self.world) if r != me]
        return sum(rows) * row_bytes

    def dispatch(self, x_q, x_scale, topk_ids, topk_weights, slot: int = 0):
        """All on the current stream -> (x, scale, local ids, weights (W rows each), handle); graphs: replayed."""
        if self.graphs:
            return self._replayed_dispatch((x_q, x_scale, topk_ids, topk_weights), slot)
        return self._dispatch(x_q, x_scale, topk_ids, topk_weights, slot)

    def combine(self, partial: torch.Tensor, h: ExchangeHandle) -> torch.Tensor:
        """partial [W, H] (the experts' rows, W = num_worst_tokens) -> [T, H]; graphs (a handle of a replayed
        dispatch): replayed."""
        found = self._of_handle.get(id(h)) if self.graphs else None
        if found is not None and found[0] is h:
            return self._replayed_combine(partial, h, found[1])
        return self._combine(partial, h)

    def _dispatch(self, x_q, x_scale, topk_ids, topk_weights, slot):
        h, lay = self.send_rows(x_q, x_scale, topk_ids, topk_weights, slot)
        self.exchange_rows(h, lay)
        return (*self.received(h, lay, x_scale.dtype), h)

    def _combine(self, partial: torch.Tensor, h: ExchangeHandle) -> torch.Tensor:
        self.return_rows(partial, h)
        return self.reduce(h)

    def _replayed_dispatch(self, inputs: tuple, slot):
        x_q, x_scale, topk_ids, _ = inputs
        t = topk_ids.shape[0]
        if t > self.chunk:
            raise ValueError(f"topk_ids: {t} tokens, more than chunk = {self.chunk} rows per rank")
        for name, v in zip(("x_q", "x_scale", "topk_ids", "topk_weights"), inputs):
            if v.dim() != 2 or v.shape[0] != t or (name == "topk_weights" and v.shape != topk_ids.shape):
                raise ValueError(f"{name}: expected [T, ·] with T = {t} rows (topk_weights: the shape of topk_ids), "
                                 f"got {list(v.shape)}")
        key = ("dispatch", slot, x_q.dtype, x_q.shape[1], x_scale.dtype, x_scale.shape[1], topk_ids.shape[1],
               x_q.device)
        rep = self._replays.get(key) or self._capture_dispatch(key, inputs)
        rep.load(t, inputs)
        rep.graph.replay()
        rep.out[-1].tokens = t
        self.stats["dispatch_bytes_to_others"] = rep.bytes_to_others
        return rep.out

    def _capture_dispatch(self, key: tuple, inputs: tuple) -> _Replay:
        """Static inputs of `chunk` rows (ids -1: no token yet), the dispatch captured on them (Workspace slot
        ("graph", key): buffers no other call reshapes)."""
        x_q, x_scale, topk_ids, _ = inputs
        dev, c, k_top = x_q.device, self.chunk, topk_ids.shape[1]
        if self._cuda_graphs and dev.type != "cuda":
            raise ValueError(f"x_q: on {dev}; graphs=True replays CUDA graphs and needs CUDA tensors")
        static = (_zero_rows(x_q, c), _zero_rows(x_scale, c),
                  torch.full((c, k_top), -1, dtype=torch.int64, device=dev),
                  torch.zeros((c, k_top), dtype=torch.float32, device=dev))
        gslot = ("graph",) + key
        graph, out = self._capture(lambda: self._dispatch(*static, gslot), dev)
        rep = _Replay(graph, static, out, self._buffers_of(gslot) + list(static),
                      self.stats["dispatch_bytes_to_others"])
        self._replays[key] = rep
        self._of_handle[id(out[-1])] = (out[-1], key)
        return rep

    def _replayed_combine(self, partial: torch.Tensor, h: ExchangeHandle, dkey: tuple) -> torch.Tensor:
        w = self.num_worst_tokens
        if partial.dim() != 2 or partial.shape[0] < w:
            raise ValueError(f"partial: expected [W, H] with W = {w} rows, got {list(partial.shape)}")
        key = ("combine", dkey, partial.dtype, partial.shape[1])
        rep = self._replays.get(key) or self._capture_combine(key, partial, h, ("graph",) + dkey)
        rep.static[0].copy_(partial if partial.shape[0] == w else partial[:w])
        rep.graph.replay()
        self.stats["combine_bytes_to_others"] = rep.bytes_to_others
        return rep.out if h.tokens == rep.out.shape[0] else rep.out[:h.tokens]

    def _capture_combine(self, key: tuple, partial: torch.Tensor, h: ExchangeHandle, gslot: tuple) -> _Replay:
        static = (torch.zeros((self.num_worst_tokens, partial.shape[1]), dtype=partial.dtype, device=partial.device),)
        graph, out = self._capture(lambda: self._combine(static[0], h), partial.device)
        rep = _Replay(graph, static, out, self._buffers_of(gslot) + [static[0], out],
                      self.stats["combine_bytes_to_others"])
        self._replays[key] = rep
        return rep

    def _buffers_of(self, slot) -> list:
        return [buf for (s, _), buf in self.ws.bufs.items() if s == slot]


def ideal_bytes(cnt: torch.Tensor, rank: int, lay: RowLayout, hidden_bytes: int) -> tuple[int, int]:
    """(dispatch, combine) bytes that rank `rank` must send to other ranks, DeepEP's way: a token once per other
    rank hosting >= 1 of its experts (ideal_row_bytes), a reduced bf16 row once back per token received.
    cnt [R, R] (cnt[s, r] = tokens s sends to r)."""
    c = cnt.tolist() if isinstance(cnt, torch.Tensor) else cnt
    world = len(c)
    sent = sum(c[rank][r] for r in range(world) if r != rank)
    got = sum(c[s][rank] for s in range(world) if s != rank)
    return sent * lay.ideal_row_bytes, got * hidden_bytes


# ----------------------------------------------------------------------------- low latency (ll)

@dataclasses.dataclass
class LLHandle:
    """One ll dispatch: the ht handle (fixed chunks of N) and imap [R·N, K_top] int32, the slot e·(R·N) + j of each
    received (row, k) in this rank's expert buffers (-1: not here)."""
    h: ExchangeHandle
    imap: torch.Tensor


class LowLatencyExchange:
    """DeepEP low-latency dispatch / combine on the device, moe_ref.ep.ll_dispatch / ll_combine semantics:

    dispatch(x_q [T, H] fp8, x_scale [T, C] packed UE8M0, topk_ids [T, K_top] global, topk_weights) with T <= N =
    num_max_dispatch_tokens_per_rank -> (recv_x [E, R·N, H] fp8, recv_x_scale MN-major [E, R·N, C], recv_count [E]
    int32, handle): expert e's slots hold the (token, k) entries routed to it in (source rank, source token, k)
    order, rows past recv_count[e] zero. Transport: the ht exchange with fixed chunks of N rows (a token once per
    rank), then the permute (launch.prefill_permute_to_masked_gemm, M = R·N, bad routing recorded in `errors`,
    never raised: no host read).
    combine(expert_out [E, R·N, H] bf16, topk_weights [T, K_top] fp32, handle) -> [T, H] bf16 = bf16(Σ_{k ascending,
    id >= 0} w[t, k] · float32(expert_out of (t, k))): every (token, k) row goes back as it is (N·K_top rows per
    rank pair, fixed), the source sums in k order (launch.depermute_prefill_combine).
    Fixed sizes everywhere: both calls can be captured in a CUDA graph.
    """

    def __init__(self, num_local_experts: int, num_max_dispatch_tokens_per_rank: int, group=None):
        self.ex = DeviceExchange(num_local_experts, num_max_dispatch_tokens_per_rank, exact=False, group=group)
        self.e, self.n, self.world = self.ex.e, self.ex.chunk, self.ex.world
        self.errors = None
        self.stats = {}

    def dispatch(self, x_q, x_scale, topk_ids, topk_weights):
        k_top = topk_ids.shape[1]
        if self.errors is None or self.errors.device != x_q.device:
            self.errors = torch.zeros(L.DE.RECORD_LEN, dtype=torch.int64, device=x_q.device)
        h, lay = self.ex.send_rows(x_q, x_scale, topk_ids, topk_weights, ll_rows=self.n * k_top)
        self.ex.exchange_rows(h, lay)
        x, s, ids, _ = self.ex.received(h, lay, x_scale.dtype)
        px, ps, imap, counts = L.prefill_permute_to_masked_gemm(x, s, ids, self.e, self.world * self.n,
                                                                errors=self.errors)
        self.stats["dispatch_bytes_to_others"] = self.ex.stats["dispatch_bytes_to_others"]
        return px, ps, counts.view(-1), LLHandle(h, imap)

    def combine(self, expert_out: torch.Tensor, topk_weights: torch.Tensor, handle: LLHandle) -> torch.Tensor:
        e, rn, hid = expert_out.shape
        if (e, rn) != (self.e, self.world * self.n):
            raise ValueError(f"expert_out: expected [E, R·N, H] with E = {self.e}, R·N = {self.world * self.n}, "
                             f"got {list(expert_out.shape)}")
        h, imap = handle.h, handle.imap
        rows = imap.numel()                                  # R·N·K_top: row (s·N + t)·K_top + k back to source s
        ones = self.ex.ones(rows, expert_out.device, 1)
        send = L.depermute_prefill_combine(expert_out, imap.view(rows, 1), ones, rows)     # 1·x: an exact copy
        back = self.ex.ws.get(0, "ll_back", (rows, hid), send.dtype, send.device)
        self.ex.dist.all_to_all_single(back, send, group=self.ex.group)
        self.stats["combine_bytes_to_others"] = (self.world - 1) * (rows // self.world) * hid * send.element_size()
        return L.depermute_prefill_combine(back.view(1, rows, hid), h.ret, topk_weights, h.tokens)


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
    dispatch and i's combine overlap the expert GEMMs. -> out [T, H] bf16, equal bit for bit to one micro-batch.
    ex.graphs: each micro-batch's whole dispatch and combine (replayed graphs) on comm_stream (_replayed_layer);
    with one micro-batch the output is ex's static combine output (overwritten by the next call)."""
    tl_ = timeline or Timeline(False)
    cur = torch.cuda.current_stream() if comm_stream is not None else None
    t, step = x_q.shape[0], ex.chunk
    if t > parts * step:
        raise ValueError(f"x_q: {t} tokens, more than parts·chunk = {parts}·{step}")
    bounds = [(i * step, min(t, (i + 1) * step)) for i in range(parts)]
    if ex.graphs:
        return _replayed_layer(ex, experts, (x_q, x_scale, topk_ids, topk_weights), bounds, comm_stream, tl_)
    sent = []
    for a, b in bounds:                                                    # route + pack every micro-batch
        with tl_.span("compute", f"pack{len(sent)}", cur):
            sent.append(ex.send_rows(x_q[a:b], x_scale[a:b], topk_ids[a:b], topk_weights[a:b], slot=len(sent)))
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


def _replayed_layer(ex: DeviceExchange, experts, inputs: tuple, bounds: list, comm, tl_: Timeline):
    """overlapped_layer for ex.graphs: micro-batch i's dispatch (slot i: input copies, index, pack, all_to_all,
    unpack) and combine (all_to_all, sum over ranks) replayed on comm (None: the current stream), its experts on
    the current stream, ordered by events; the caller's stream waits for the last combine."""
    cur = torch.cuda.current_stream() if comm is not None else None
    ready, got = _event(cur), []
    for i, (a, b) in enumerate(bounds):
        _wait(comm, ready)
        with _on(comm), tl_.span("comm", f"dispatch{i}", comm):
            got.append((ex.dispatch(*(v[a:b] for v in inputs), slot=i), _event(comm)))
    outs, partials = [], []                   # partials stay referenced until the caller's stream waits below
    for i, (d, arrived) in enumerate(got):
        _wait(cur, arrived)
        with tl_.span("compute", f"experts{i}", cur):
            partials.append(experts(*d[:4], ex.num_worst_tokens))
        _wait(comm, _event(cur))
        with _on(comm), tl_.span("comm", f"combine{i}", comm):
            outs.append(ex.combine(partials[-1], d[4]))
    _wait(cur, _event(comm))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _event(stream):
    if stream is None:
        return None
    ev = torch.cuda.Event()
    ev.record(stream)
    return ev


def _wait(stream, ev) -> None:
    if stream is not None and ev is not None:
        stream.wait_event(ev)
