"""The device-side EP exchange kernels (backend/ops/triton/ep_exchange.py) under the Triton interpreter.

R ranks are simulated in one process: every rank routes and packs with the kernels, an in-process all_to_all moves
the rows (fixed chunks or exact splits), every rank unpacks; the result must equal moe_ref.ep's dispatch (Paddle)
bit for bit, row for row (after dropping the padding rows of the fixed-chunk layout), and the combine (partials
returned by the same route, summed on the source) must equal moe_ref.ep's combine bit for bit. Routings: random,
-1 ids, a token sent nowhere, every token to one rank (the others receive nothing), a rank with no tokens.
"""
import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from moe_ref.ep import ep_combine, ep_dispatch  # noqa: E402

pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


@pytest.fixture(scope="module", autouse=True)
def interpreter(triton_launch):
    return triton_launch


def _inputs(rng, t_of, h, e_total, k_top, kind):
    per_rank = []
    for s, t in enumerate(t_of):
        x = rng.integers(0, 256, size=(t, h), dtype=np.uint8)
        x[x & 0x7F == 0x7F] = 0                                       # no NaN patterns
        scale = rng.integers(-2 ** 31, 2 ** 31 - 1, size=(t, 2), dtype=np.int64).astype(np.int32)
        ids = np.array([rng.permutation(e_total)[:k_top] for _ in range(t)], dtype=np.int64).reshape(t, k_top)
        if kind == "sparse" and t:
            ids[rng.random(size=ids.shape) < 0.3] = -1
            ids[0] = -1                                               # a token sent nowhere
        if kind == "one_rank":
            ids = np.tile(np.arange(k_top, dtype=np.int64) % (e_total // len(t_of)), (t, 1))
            ids[:, 1:] = -1
        wts = rng.random(size=(t, k_top), dtype=np.float32)
        per_rank.append((x, scale, ids, wts))
    return per_rank


def _dispatch_in_process(per_rank, e_local, chunk, exact):
    """Every rank's (x, scale, ids, weights, pos, cnt) after route, pack, an in-process all_to_all and unpack."""
    from backend.ops.triton import ep_exchange as X
    world = len(per_rank)
    packed, counts = [], []
    for x, sc, ids, wts in per_rank:
        imap, cnt, _ = X.route(torch.from_numpy(ids), e_local, world, chunk)
        counts.append(cnt)
        packed.append((imap, cnt))
    cnt = torch.stack(counts).to(torch.int32)                        # cnt[s, r]
    c = cnt.tolist()
    sends, poss = [], []
    for s, (x, sc, ids, wts) in enumerate(per_rank):
        rows = sum(c[s]) if exact else world * chunk
        send, pos = X.pack_rows(torch.from_numpy(x).view(torch.float8_e4m3fn), torch.from_numpy(sc),
                                torch.from_numpy(ids), torch.from_numpy(wts), *packed[s], rows, chunk, exact)
        sends.append(send)
        poss.append(pos)
    lay = X.RowLayout(per_rank[0][0].shape[1], 2, per_rank[0][2].shape[1])
    outs = []
    for r in range(world):
        if exact:
            parts = [sends[s][sum(c[s][:r]): sum(c[s][:r]) + c[s][r]] for s in range(world)]
        else:
            parts = [sends[s][r * chunk: (r + 1) * chunk] for s in range(world)]
        recv = torch.cat(parts)
        recv = torch.cat([recv, torch.full((world * chunk - recv.shape[0], lay.row_words), 0x7F7F7F7F,
                                           dtype=torch.int32)])       # garbage past the real rows
        outs.append(X.unpack_rows(recv, cnt if exact else None, lay, e_local, r, exact))
    return outs, poss, cnt, sends


def _real_rows(cnt, r, chunk, exact):
    """Rows of rank r's receive buffer that hold tokens, in (source, token) order."""
    world = cnt.shape[0]
    if exact:
        return list(range(int(cnt[:, r].sum())))
    return [s * chunk + j for s in range(world) for j in range(int(cnt[s, r]))]


CASES = [("random", [6, 5], 2, 2, 3), ("sparse", [7, 4], 2, 3, 3), ("one_rank", [5, 5], 2, 2, 2),
         ("random", [4, 0, 5], 3, 2, 2), ("sparse", [3, 6, 2, 5], 4, 1, 3)]


@pytest.mark.parametrize("exact", [False, True], ids=["fixed_chunks", "exact"])
@pytest.mark.parametrize("kind,t_of,world,e_local,k_top", CASES)
def test_device_dispatch_and_combine_match_moe_ref_ep(kind, t_of, world, e_local, k_top, exact):
    from backend.ops.triton import ep_exchange as X
    rng = np.random.default_rng(len(t_of) * 31 + sum(t_of))
    h, chunk = 256, max(t_of) + 1
    per_rank = _inputs(rng, t_of, h, e_local * world, k_top, kind)
    w = world * chunk
    fp8 = paddle.float8_e4m3fn
    ref = ep_dispatch([paddle.to_tensor(x).view(fp8) for x, *_ in per_rank],
                      [paddle.to_tensor(sc) for _, sc, _, _ in per_rank],
                      [paddle.to_tensor(ids) for _, _, ids, _ in per_rank],
                      [paddle.to_tensor(wts) for *_, wts in per_rank], e_local, w)
    outs, poss, cnt, _ = _dispatch_in_process(per_rank, e_local, chunk, exact)
    partials = []
    for r, ((x, sc, ids, wts), o) in enumerate(zip(outs, ref)):
        real = _real_rows(cnt, r, chunk, exact)
        n = o.num_recv_tokens
        assert len(real) == n
        pad = sorted(set(range(w)) - set(real))
        assert np.array_equal(x.view(torch.uint8)[real].numpy(), o.recv_x.view(paddle.uint8).numpy()[:n])
        assert np.array_equal(sc[real].numpy(), o.recv_x_scale.numpy()[:n])
        assert np.array_equal(ids[real].numpy(), o.recv_topk_ids.numpy()[:n])
        assert np.array_equal(wts[real].numpy().view(np.uint32), o.recv_topk_weights.numpy()[:n].view(np.uint32))
        assert not x.view(torch.uint8)[pad].any() and not sc[pad].any() and not wts[pad].any()
        assert bool((ids[pad] == -1).all())
        partials.append((x.float() * ((r + 1) / 8.0)).to(torch.bfloat16))          # zero on padding rows
    ref_partial = [paddle.to_tensor(p[_real_rows(cnt, r, chunk, exact)].float().numpy()).astype(paddle.bfloat16)
                   for r, p in enumerate(partials)]
    ref_partial = [paddle.concat([p, paddle.zeros([w - p.shape[0], h], dtype=paddle.bfloat16)]) for p in ref_partial]
    combined = ep_combine(ref_partial, ref[0].handle)
    c = cnt.tolist()
    for s in range(world):
        if exact:                      # rank r's rows from source s start after the rows of sources < s
            first = [sum(c[q][r] for q in range(s)) for r in range(world)]
            back = torch.cat([partials[r][first[r]: first[r] + c[s][r]] for r in range(world)])
        else:
            back = torch.cat([partials[r][s * chunk: (s + 1) * chunk] for r in range(world)])
        out = X.reduce_over_ranks(back, poss[s], torch.ones(t_of[s], world))
        assert np.array_equal(out.view(torch.int16).numpy(), combined[s].numpy().view(np.int16))


def test_route_numbers_tokens_per_rank_in_token_order():
    """map[t, r] = r·chunk + (tokens before t that go to r), counts = tokens per rank; a plain loop as reference."""
    from backend.ops.triton import ep_exchange as X
    rng = np.random.default_rng(3)
    world, e_local, k_top, t, chunk = 3, 4, 4, 37, 40
    ids = rng.integers(-1, world * e_local, size=(t, k_top)).astype(np.int64)
    imap, counts, _ = X.route(torch.from_numpy(ids), e_local, world, chunk)
    seen = [0] * world
    want = np.full((t, world), -1)
    for i in range(t):
        for r in range(world):
            if any(g >= 0 and g // e_local == r for g in ids[i]):
                want[i, r] = r * chunk + seen[r]
                seen[r] += 1
    assert np.array_equal(imap.numpy(), want)
    assert counts.tolist() == seen
    nk = chunk * k_top                     # the ll combine's rows per rank: entry (t, k) at q·NK + slot·K + k
    imap2, counts2, ret = X.route(torch.from_numpy(ids), e_local, world, chunk, ll_rows=nk)
    want_ret = np.full((t, k_top), -1)
    for i in range(t):
        for k in range(k_top):
            if ids[i, k] >= 0:
                q = ids[i, k] // e_local
                want_ret[i, k] = q * nk + (want[i, q] - q * chunk) * k_top + k
    assert np.array_equal(ret.numpy(), want_ret) and np.array_equal(imap2.numpy(), want)
    assert counts2.tolist() == seen
    with pytest.raises(ValueError, match="chunk"):
        X.route(torch.from_numpy(ids), e_local, world, t - 1)


def test_ideal_bytes_count_one_row_per_token_and_rank():
    from backend.ops.triton import ep_exchange as X
    lay = X.RowLayout(7168, 14, 8)
    assert lay.ideal_row_bytes == 7168 + 56 + 64 + 32 and lay.row_words * 4 == 7328
    assert X.ideal_bytes([[5, 3], [2, 7]], 0, lay, 2 * 7168) == (3 * 7320, 2 * 14336)


def test_exchange_kernels_compile_for_sm90():
    """The compiled path (not the interpreter) accepts the kernels: PTX and a cubin for sm_90 with every layout."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(root / "tests" / "_ep_kernels_sm90_compile.py")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("no ptxas here")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count(" ok ") == 6


def test_device_route_equals_the_host_runners_index_formulas():
    """ep_exchange.route (kernels) and backend.moe.ep_index (numpy, what the Paddle runners use) agree."""
    from backend.moe import ep_index
    from backend.ops.triton import ep_exchange as X
    rng = np.random.default_rng(11)
    for world, e_local, k_top, t in ((2, 32, 8, 50), (4, 2, 3, 17), (3, 1, 1, 9)):
        ids = rng.integers(-1, world * e_local, size=(t, k_top)).astype(np.int64)
        ids[t // 2] = -1
        imap, counts, _ = X.route(torch.from_numpy(ids), e_local, world, t)
        want_map, want_counts = ep_index.send_map(ids, e_local, world, t)
        assert np.array_equal(imap.numpy(), want_map) and np.array_equal(counts.numpy(), want_counts)
        sent = ep_index.sent_tokens(ids, e_local, world)
        for r in range(world):
            assert np.array_equal(np.nonzero(want_map[:, r] >= 0)[0], sent[r])


LL_CASES = [("random", [5, 3], 2, 2, 2, 6), ("sparse", [4, 6, 2], 3, 2, 3, 6), ("one_rank", [3, 4], 2, 2, 2, 4)]


@pytest.mark.parametrize("kind,t_of,world,e_local,k_top,n", LL_CASES)
def test_device_ll_path_matches_moe_ref_ll(kind, t_of, world, e_local, k_top, n):
    """LowLatencyExchange's steps in one process (route with the ll row map, pack, an in-process all_to_all,
    unpack, the permute to [E, R·N]; back: the gather of expert rows per (row, k), an in-process all_to_all, the
    weighted sum over k) equal moe_ref.ep.ll_dispatch (bf16, no quantization: rows compared as bytes) and
    ll_combine bit for bit."""
    from moe_ref.ep import ll_combine, ll_dispatch
    from backend.ops.triton import ep_exchange as X
    from backend.ops.triton import launch as L
    rng = np.random.default_rng(7 * world + n)
    h = 64
    per_rank = _inputs(rng, t_of, 2 * h, e_local * world, k_top, kind)       # x bytes: bf16 [T, h]
    xs = [torch.from_numpy(x.copy()).view(torch.bfloat16) for x, *_ in per_rank]
    ids_t = [torch.from_numpy(ids) for _, _, ids, _ in per_rank]
    w_t = [torch.from_numpy(w) for *_, w in per_rank]
    ref = ll_dispatch([paddle.to_tensor(x.view(torch.int16).numpy()).view(paddle.bfloat16) for x in xs],
                      [paddle.to_tensor(i.numpy()) for i in ids_t], n, e_local, use_fp8=False)
    nk, sends, rets, imaps = n * k_top, [], [], []
    for s in range(world):
        imap, counts, ret = X.route(ids_t[s], e_local, world, n, ll_rows=nk)
        send, _ = X.pack_rows(xs[s], torch.zeros(t_of[s], 1, dtype=torch.int32), ids_t[s], w_t[s], imap, counts,
                              world * n, n, False)
        sends.append(send)
        rets.append(ret)
    lay = X.RowLayout(2 * h, 1, k_top)
    outs = []
    for r in range(world):
        recv = torch.cat([sends[s][r * n: (r + 1) * n] for s in range(world)])
        x, _, lids, _ = X.unpack_rows(recv, None, lay, e_local, r, False)
        px, _, imap, cnt = L.prefill_permute_to_masked_gemm(x, None, lids, e_local, world * n)
        imaps.append(imap)
        assert np.array_equal(px.view(torch.uint8).numpy(), ref[r][0].view(paddle.uint8).numpy())
        assert cnt.view(-1).tolist() == ref[r][2].numpy().tolist()
        outs.append(torch.from_numpy(rng.standard_normal((e_local, world * n, h)).astype(np.float32)).to(
            torch.bfloat16))
    gathered = [L.depermute_prefill_combine(outs[r], imaps[r].reshape(-1, 1), torch.ones(world * nk, 1), world * nk)
                for r in range(world)]
    want = ll_combine([paddle.to_tensor(o.float().numpy()).astype(paddle.bfloat16) for o in outs],
                      [paddle.to_tensor(i.numpy()) for i in ids_t], [paddle.to_tensor(w.numpy()) for w in w_t],
                      ref[0][3])
    for s in range(world):
        back = torch.cat([gathered[r][s * nk: (s + 1) * nk] for r in range(world)])
        got = L.depermute_prefill_combine(back.view(1, world * nk, h), rets[s], w_t[s], t_of[s])
        assert np.array_equal(got.view(torch.int16).numpy(), want[s].numpy().view(np.int16))


# ---------------------------------------------------------------------- DeviceExchange(graphs=True) (issue 13)

@pytest.fixture
def gloo_world_of_one(tmp_path):
    """A one-process gloo group in this process (the exchange's collectives on CPU)."""
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield dist
    dist.destroy_process_group()


def _rerun_capture(log):
    """graphs.rerun_capture (the eager stand-in for a CUDA graph) with its captures and replays logged."""
    from backend.ops.triton.graphs import rerun_capture

    def capture(fn, device):
        log.append("capture")
        graph, out = rerun_capture(fn, device)
        replay = graph.replay
        graph.replay = lambda: (log.append("replay"), replay())
        return graph, out
    return capture


def _exchange_inputs(rng, t, h, e_total, k_top, ids_dtype=torch.int64):
    x = rng.integers(0, 256, size=(t, h), dtype=np.uint8)
    x[x & 0x7F == 0x7F] = 0                                       # no NaN patterns
    ids = np.array([rng.permutation(e_total)[:k_top] for _ in range(t)], dtype=np.int64).reshape(t, k_top)
    if t:
        ids[-1] = -1                                              # a token sent nowhere
    return (torch.from_numpy(x).view(torch.float8_e4m3fn),
            torch.from_numpy(rng.integers(0, 2 ** 31 - 1, size=(t, 2), dtype=np.int64).astype(np.int32)),
            torch.from_numpy(ids).to(ids_dtype), torch.from_numpy(rng.random(size=(t, k_top), dtype=np.float32)))


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def test_exchange_graphs_on_a_gloo_group_is_a_clear_error(gloo_world_of_one):
    from backend.ops.triton import ep_exchange as X
    with pytest.raises(ValueError, match=r"graphs: .*NCCL.*'gloo'"):
        X.DeviceExchange(4, 6, graphs=True)
    with pytest.raises(ValueError, match="graphs: the exact layout"):
        X.DeviceExchange(4, 6, exact=True, graphs=True, capture=_rerun_capture([]))
    assert not X.DeviceExchange(4, 6).graphs                    # the default stays eager


def test_replayed_exchange_keeps_static_buffers_and_equals_eager(gloo_world_of_one):
    """graphs=True with an eager stand-in for the capture (CPU): one capture per (kind, slot) whatever T and the
    ids' dtype, the outputs are the same tensors call after call (overwritten), a second slot has its own, and
    every result equals the plain eager exchange bit for bit (rows T.. of the static ids reset: T 6 -> 3 -> 5)."""
    from backend.ops.triton import ep_exchange as X
    h, e_local, k_top, chunk = 256, 4, 2, 6
    log = []
    plain, rep = X.DeviceExchange(e_local, chunk), X.DeviceExchange(e_local, chunk, graphs=True,
                                                                     capture=_rerun_capture(log))
    rng = np.random.default_rng(3)
    first = None
    for t, ids_dtype in ((6, torch.int64), (3, torch.int64), (5, torch.int32)):
        ins = _exchange_inputs(rng, t, h, e_local, k_top, ids_dtype)
        want, got = plain.dispatch(*ins), rep.dispatch(*ins)
        assert all(_same(a, b) for a, b in zip(want[:4], got[:4])), t
        partial = (got[0].float() * 0.5).to(torch.bfloat16)
        w_out, g_out = plain.combine(partial, want[4]), rep.combine(partial, got[4])
        assert _same(w_out, g_out) and g_out.shape == (t, h)
        routed = (ins[2] >= 0).any(1)       # world 1: out[t] = the partial row of t's slot (0 + -0 = +0: by value)
        assert not g_out[~routed].any() and torch.equal(g_out[routed], partial[want[4].pos[:t, 0][routed].long()])
        assert got[4].tokens == t and rep.stats == plain.stats
        if first is None:
            first = (got, g_out)
        assert all(a is b for a, b in zip(first[0], got)) and g_out.data_ptr() == first[1].data_ptr()
    assert _same(first[1][:5], g_out)                           # the first call's output now holds the last one's
    assert log.count("capture") == 2 and log.count("replay") == 6
    other = rep.dispatch(*ins, slot=1)
    assert log.count("capture") == 3 and other[0].data_ptr() != got[0].data_ptr() and _same(other[0], got[0])
    with pytest.raises(ValueError, match="topk_weights"):
        rep.dispatch(*ins[:3], ins[3][:, :1])
    with pytest.raises(ValueError, match="chunk"):
        rep.dispatch(*_exchange_inputs(rng, chunk + 1, h, e_local, k_top))


def test_replayed_layer_equals_the_overlapped_layer(gloo_world_of_one):
    """overlapped_layer with a graphs exchange (dispatch and combine replayed per micro-batch) equals the eager
    step-by-step layer bit for bit, 1 and 2 micro-batches."""
    from backend.ops.triton import ep_exchange as X
    h, e_local, k_top = 256, 4, 2
    rng = np.random.default_rng(5)
    ins = _exchange_inputs(rng, 8, h, e_local, k_top)

    def experts(x, s, ids, w, m):
        return (x.float() * (w[:, :1] + ids[:, :1].clamp(min=0).float())).to(torch.bfloat16)

    for parts in (1, 2):
        chunk = 8 // parts
        want = X.overlapped_layer(X.DeviceExchange(e_local, chunk), experts, *ins, parts)
        rep = X.DeviceExchange(e_local, chunk, graphs=True, capture=_rerun_capture([]))
        for _ in range(2):
            assert _same(X.overlapped_layer(rep, experts, *ins, parts), want), parts
