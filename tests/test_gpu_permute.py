"""The permute (backend/ops/triton/launch.prefill_permute_to_masked_gemm) on a GPU at issue 12's shape (W=4096,
top-8 of 32 experts, H=7168), deferred checks: map, counts, rows, zero tail and scales against a torch reference
(slots from a cumulative one-hot sum over the flat ids), bit for bit; the CUTLASS bytes written by the permute
(sf_group=128) equal unpack_and_convert_scale of its MN-major output (that conversion is checked against moe_ref
on CPU in tests/test_triton_provider.py). The interpreter counterpart at small shapes: tests/test_triton_permute.py.
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

W_TOK, H, E_NUM, K_TOP = 4096, 7168, 32, 8


def _reference(x, scale, ids, e_num, m):
    """(map [W, K], counts [E], rows [E·M, H] bytes, scale rows [E·M, S']) in torch, slots token-major then k."""
    flat = ids.flatten()
    onehot = torch.nn.functional.one_hot(flat.clamp(min=0), e_num) * (flat >= 0)[:, None]
    slot = (torch.cumsum(onehot, 0) - onehot).gather(1, flat.clamp(min=0)[:, None]).squeeze(1)
    dest = torch.where(flat >= 0, flat * m + slot, -1)
    valid = dest >= 0
    src = torch.arange(flat.numel(), device=ids.device)[valid] // ids.shape[1]
    rows = torch.zeros(e_num * m, H, dtype=torch.uint8, device=ids.device)
    rows[dest[valid]] = x.view(torch.uint8)[src]
    srows = torch.zeros(e_num * m, scale.shape[1], dtype=scale.dtype, device=ids.device)
    srows[dest[valid]] = scale[src]
    return dest.view(ids.shape).to(torch.int32), onehot.sum(0).to(torch.int32), rows, srows


def test_permute_full_shape_matches_torch():
    from backend.ops.triton import launch as L
    gen = torch.Generator(device="cuda").manual_seed(4)
    ids = torch.argsort(torch.rand(W_TOK, E_NUM, device="cuda", generator=gen), 1)[:, :K_TOP].contiguous()
    ids[torch.rand(W_TOK, K_TOP, device="cuda", generator=gen) < 0.05] = -1
    x = torch.randint(0, 255, (W_TOK, H), dtype=torch.uint8, device="cuda", generator=gen).view(torch.float8_e4m3fn)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (W_TOK, H // 512), dtype=torch.int32, device="cuda", generator=gen)
    fp32 = torch.rand(W_TOK, H // 128, device="cuda", generator=gen) + 0.5
    m = int(torch.bincount(ids[ids >= 0], minlength=E_NUM).max()) + 37            # M not a multiple of 4
    err = torch.zeros(5, dtype=torch.int64, device="cuda")
    for scale in (fp32, words):
        px, ps, imap, counts = L.prefill_permute_to_masked_gemm(x, scale, ids, E_NUM, m, errors=err)
        want_map, want_counts, want_rows, want_s = _reference(x, scale, ids, E_NUM, m)
        assert torch.equal(imap, want_map) and torch.equal(counts.flatten(), want_counts)
        assert torch.equal(px.view(torch.uint8).view(E_NUM * m, H), want_rows)
        assert torch.equal(ps.reshape(E_NUM * m, -1), want_s)
        assert ps.stride() == (scale.shape[1] * -(-m // 4) * 4, 1, -(-m // 4) * 4)
    _, sf, _, _ = L.prefill_permute_to_masked_gemm(x, words, ids, E_NUM, m, errors=err, sf_group=128)
    assert torch.equal(sf, L.unpack_and_convert_scale(ps, counts))
    assert not any(err.tolist())


def test_permute_with_programmatic_dependent_launch_writes_the_same_bytes(monkeypatch):
    """launch.PERMUTE_PDL (the slot and move kernels launched as programmatic dependents, the move kernel reading its
    first x block before waiting for the index step) gives the bytes of the plain launches, eager and replayed from
    a CUDA graph, with the outputs poisoned before each replay; every output is compared (rows, CUTLASS scale bytes,
    map, counts, error record)."""
    from backend.ops.triton import launch as L
    from backend.ops.triton.graphs import capture_graph
    gen = torch.Generator(device="cuda").manual_seed(9)
    ids = torch.argsort(torch.rand(W_TOK, E_NUM, device="cuda", generator=gen), 1)[:, :K_TOP].contiguous()
    x = torch.randint(0, 255, (W_TOK, H), dtype=torch.uint8, device="cuda", generator=gen).view(torch.float8_e4m3fn)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (W_TOK, H // 512), dtype=torch.int32, device="cuda", generator=gen)
    m = int(torch.bincount(ids.flatten(), minlength=E_NUM).max()) + 64
    err = torch.zeros(5, dtype=torch.int64, device="cuda")
    op = lambda: L.prefill_permute_to_masked_gemm(x, words, ids, E_NUM, m, errors=err, sf_group=128)  # noqa: E731
    monkeypatch.setattr(L, "PERMUTE_PDL", False)
    want = [t.clone() for t in op()]
    monkeypatch.setattr(L, "PERMUTE_PDL", True)
    eager = op()
    graph, out = capture_graph(op)
    for t in out:
        t.view(torch.uint8).fill_(0xA5)                                  # poison: the replay must rewrite all
    graph.replay()
    torch.cuda.synchronize()
    for got in (eager, out):
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(got, want))
    assert not any(err.tolist())
