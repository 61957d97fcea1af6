"""The permute's launch path (backend/ops/triton/launch.py) under the Triton interpreter: the move kernel that
writes the scales in the next GEMM's layout, the map-only entry point, multi-tile prefix sums.

Expectations come from elsewhere than the code under test: the MN-major scales and rows from moe_ref.layout (the
reference permute), the CUTLASS bytes from the two-step path (MN-major permute, then unpack_and_convert_scale,
itself checked against moe_ref.cutlass_sf in tests/test_triton_provider.py). Integers and bits compare exactly.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]


@pytest.fixture(scope="module", autouse=True)
def L(triton_launch):
    return triton_launch


def _inputs(w, h, e, k_top, seed, words_per_row):
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(e, generator=g)[:k_top] for _ in range(w)]).to(torch.int64)
    ids[torch.rand(w, k_top, generator=g) < 0.2] = -1
    ids[w // 3] = -1                                                   # an all -1 row
    x = torch.randint(-128, 127, (w, h), dtype=torch.int8, generator=g).view(torch.float8_e4m3fn)
    words = torch.randint(-2 ** 31, 2 ** 31 - 1, (w, words_per_row), dtype=torch.int32, generator=g)
    return x, words, ids


@pytest.mark.parametrize("group,m,w,e,k_top", [(128, 37, 29, 5, 3), (32, 130, 29, 5, 3), (128, 300, 330, 2, 2),
                                               (32, 300, 330, 2, 2)])
def test_cutlass_scale_output_equals_permute_then_unpack(L, group, m, w, e, k_top):
    """sf_group: the permute writes the bytes unpack_and_convert_scale would make of its MN-major output (rows past
    the counts and the padding to 128 rows zero), every other output unchanged; M not a multiple of 4 or 128.
    The last two: counts above 128 (live rows in two SF tiles of 128, a third one partly padding)."""
    h = 256
    x, words, ids = _inputs(w, h, e, k_top, seed=3, words_per_row=3)
    px, ps, imap, counts = L.prefill_permute_to_masked_gemm(x, words, ids, e, m)
    px2, sf, imap2, counts2 = L.prefill_permute_to_masked_gemm(x, words, ids, e, m, sf_group=group)
    want = L.unpack_and_convert_scale(ps, counts, group_size=group)
    assert sf.dtype == torch.uint8 and sf.shape == want.shape == (e, -(-m // 128) * 128, (16 if group == 128 else 4) * 3)
    assert torch.equal(sf, want)
    assert torch.equal(px.view(torch.uint8), px2.view(torch.uint8))
    assert torch.equal(imap, imap2) and torch.equal(counts, counts2)
    assert int(counts.sum()) > 0 and bool((sf != 0).any())        # not an all-zero comparison
    assert int(counts.max()) > 128 or m < 200                       # the two-tile cases do cross a tile


def test_map_only_entry_equals_the_fused_path(L):
    """permute_indices + permute_rows (the token of each slot rebuilt from the map by its own kernel) = the one-call
    permute (the slot kernel writes it; checked against moe_ref in tests/test_triton_provider.py), bits, FP32 scales."""
    w, h, e, k_top, m = 23, 128, 4, 2, 16
    x, words, ids = _inputs(w, h, e, k_top, seed=5, words_per_row=2)
    scale = torch.rand(w, 2) + 0.5
    px, ps, imap, counts = L.prefill_permute_to_masked_gemm(x, scale, ids, e, m)
    imap2, counts2 = L.permute_indices(ids, e, m)
    px2, ps2 = L.permute_rows(x, scale, imap2, counts2, e, m)
    assert torch.equal(imap, imap2) and torch.equal(counts.flatten(), counts2)
    assert torch.equal(px.view(torch.uint8), px2.view(torch.uint8))
    assert ps.stride() == ps2.stride() and torch.equal(ps, ps2)
    live = torch.arange(m)[None, :] < counts2[:, None]
    assert bool((ps[live] > 0).all()) and bool((ps[~live] == 0).all())       # every live row got its scales


def test_prefix_over_several_tiles(L, monkeypatch):
    """The slot kernel's prefix sum over earlier chunks in tiles of PREFIX_ROWS rows: 2 rows a tile, 4 chunks (the
    GPU default covers 128 chunks a tile, which no interpreter-sized input reaches). Slots = a host count."""
    monkeypatch.setattr(L, "PREFIX_ROWS", 2)
    w, e, k_top, m = 200, 3, 2, 200                                  # chunks of 64 tokens (small E, K_top): 4 chunks
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(-1, e, (w, k_top), generator=g)
    imap, counts = L.permute_indices(ids, e, m)
    seen = [0] * e
    want = np.full((w, k_top), -1, np.int32)
    for t in range(w):
        for k in range(k_top):
            ex = int(ids[t, k])
            if ex >= 0:
                want[t, k] = ex * m + seen[ex]
                seen[ex] += 1
    np.testing.assert_array_equal(imap.numpy(), want)
    assert counts.tolist() == seen


@pytest.mark.parametrize("scale_kind,sf_group", [("none", None), ("fp32", None), ("words", None), ("words", 128),
                                                 ("words", 32)])
@pytest.mark.parametrize("other", ["gather", "split"])
def test_gather_move_equals_scatter_move(L, monkeypatch, scale_kind, sf_group, other):
    """launch.PERMUTE_MOVE="gather" (slot-block programs read the rows of their slots' tokens), and the scatter with
    each row in 4 programs, 2 warps, narrower zero stores and 8-slot zeroing / scale programs (launch.PERMUTE_SCATTER,
    16 of them per SF tile), write the bytes of the
    default scatter (one program per token; checked against moe_ref in tests/test_triton_provider.py): rows,
    zero tail, scales in each layout, map, counts; with an expert over M and a bad id (deferred: dropped, recorded),
    M not a multiple of 16 (partly dead slot blocks) and counts above 128 (two SF tiles)."""
    w, h, e, k_top, m = 300, 256, 3, 2, 150
    x, words, ids = _inputs(w, h, e, k_top, seed=11, words_per_row=3)
    ids[5, 0] = e + 2                                                  # a bad id
    ids[10:250, 1] = 0                                                 # expert 0 over M
    scale = {"none": None, "fp32": torch.rand(w, 5) + 0.5, "words": words}[scale_kind]
    outs = {}
    for mode in ("scatter", other):
        monkeypatch.setattr(L, "PERMUTE_MOVE", "gather" if mode == "gather" else "scatter")
        split = dict(split=4, num_warps=2, zblock=16, store_cache=".cs", block_s=8)
        monkeypatch.setattr(L, "PERMUTE_SCATTER", split if mode == "split" else dict(L.PERMUTE_SCATTER, split=1))
        err = torch.zeros(5, dtype=torch.int64)
        outs[mode] = L.prefill_permute_to_masked_gemm(x, scale, ids, e, m, errors=err, sf_group=sf_group) + (err,)
    (px, ps, imap, counts, err), (px2, ps2, imap2, counts2, err2) = outs["scatter"], outs[other]
    assert torch.equal(px.view(torch.uint8), px2.view(torch.uint8))
    assert (ps is None) == (ps2 is None) and (ps is None or (ps.stride() == ps2.stride() and torch.equal(ps, ps2)))
    assert torch.equal(imap, imap2) and torch.equal(counts, counts2) and torch.equal(err, err2)
    assert int(counts[0]) == m and int(err[0]) != 0                   # the overflow and the bad id did happen
    assert bool((px.view(torch.uint8) != 0).any())


def test_programmatic_dependent_launch_is_never_asked_of_the_interpreter(L, monkeypatch):
    """launch.PERMUTE_PDL on: the launch options stay plain for CPU tensors under the interpreter (no launch_pdl,
    the kernels' PDL branches not traced), and the permute's output is unchanged."""
    x, words, ids = _inputs(40, 128, 3, 2, seed=3, words_per_row=1)
    want = L.prefill_permute_to_masked_gemm(x, words, ids, 3, 40)
    monkeypatch.setattr(L, "PERMUTE_PDL", True)
    assert L._permute_pdl(torch.device("cpu")) == {"PDL": False}
    got = L.prefill_permute_to_masked_gemm(x, words, ids, 3, 40)
    assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
    assert all(torch.equal(a, b) for a, b in zip(got[1:], want[1:]))
