"""The `triton` provider (backend/ops/triton) under the Triton interpreter on CPU (SPEC §3-8).

Every kernel runs with TRITON_INTERPRET=1 at small shapes and is compared with the Paddle
provider and `moe_ref`: integer outputs (ids, maps, counts, packed scales, CUTLASS bytes, FP8
bits) exactly, floats within the bound stated at each assert. The variable is set only while
this module runs (a module fixture); tests/conftest.py has already decorated triton and the
kernels in interpreter mode (that must happen before triton is first imported), so other
test modules keep selecting providers as usual. The same checks run on a GPU at full shapes in
benchmarks/bench_gpu.py.
"""
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import paddle
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

import backend.ops as ops  # noqa: E402
from moe_ref import cutlass_sf  # noqa: E402
from moe_ref import fp8 as ref_fp8  # noqa: E402
from moe_ref import layout as ref_layout  # noqa: E402
from moe_ref.metrics import calc_diff  # noqa: E402
from moe_ref.quant import per_block_quant, per_token_group_quant  # noqa: E402

# The Triton 3.6 interpreter converts 1-element arrays to scalars, which NumPy 2.3 deprecates.
pytestmark = [pytest.mark.triton,
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")]

BF16_ULP = 2.0 ** -7          # bf16 spacing relative to a value's leading power of two


@pytest.fixture(scope="module", autouse=True)
def interpreter(triton_launch):
    """TRITON_INTERPRET=1 while this module runs (conftest.triton_launch); the provider cache cleared around it."""
    ops.reset_provider_cache()
    yield
    ops.reset_provider_cache()


@pytest.fixture(scope="module")
def T():
    return ops.get_provider("triton")


@pytest.fixture(scope="module")
def P():
    return ops.get_provider("paddle")


def bits(q):
    return q.view(paddle.uint8).numpy()


def rng_tensor(shape, seed, scale=1.0, dtype=paddle.float32):
    rng = np.random.default_rng(seed)
    return paddle.to_tensor((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)


def f32(x):
    return x.astype(paddle.float32).numpy()


def mn_major_values(view):
    """Logical [E, M, C] values and strides of an MN-major paddle view."""
    return view.numpy(), list(view.strides)


def test_kernels_import_without_paddle():
    """The kernels and launchers run on a GPU machine with torch and no Paddle: importing them (and the
    format constants they import from moe_ref.constants and moe_ref.cutlass_sf) never imports Paddle."""
    code = ("import sys; import backend.ops.triton.kernels, backend.ops.triton.launch; "
            "assert 'paddle' not in sys.modules, sorted(m for m in sys.modules if m.startswith('paddle'))[:5]")
    root = pathlib.Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_provider_is_available():
    from backend.ops.triton import provider
    assert provider.NAME == "triton"
    assert provider.is_available() == (True, "")


# ----------------------------------------------------------------------------- §1, §3

def test_e4m3_cast_is_exact_at_every_rounding_boundary(T):
    """Values at, just below and just above every e4m3 midpoint, subnormals and ±448: bits equal ml_dtypes.

    amax 448 in each row makes the FP32 scale exactly 1, so q = e4m3(x) (the interpreter's own
    fp8 cast is wrong near powers of two; the kernel's integer cast must not be).
    """
    codes = np.arange(0, 0x7F, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    mids = (codes[:-1] + codes[1:]) / 2
    vals = np.concatenate([codes, mids, np.nextafter(mids, 0), np.nextafter(mids, 1000), [447.9, 448.0, 2.0 ** -10]])
    vals = np.concatenate([vals, -vals]).astype(np.float32)
    pad = (-vals.size) % 127
    vals = np.concatenate([vals, np.zeros(pad, np.float32)]).reshape(-1, 127)
    x = np.concatenate([vals, np.full((vals.shape[0], 1), 448.0, np.float32)], axis=1)
    q, s = T.per_token_quant(paddle.to_tensor(x), 128, False)
    assert np.all(s.numpy() == 1.0)
    expected = x.astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    np.testing.assert_array_equal(bits(q), expected)


@pytest.mark.parametrize("h,dtype", [(640, paddle.bfloat16), (200, paddle.float32)])
@pytest.mark.parametrize("use_ue8m0", [False, True])
def test_per_token_quant_matches_reference(T, P, h, dtype, use_ue8m0):
    x = rng_tensor([37, h], seed=h, scale=3.0, dtype=dtype)
    x[3] = 0.0                                          # amax floor
    x[5, :7] = 1e4                                      # a large group
    q, s = T.per_token_quant(x, 128, use_ue8m0)
    q_ref, s_ref = per_token_group_quant(x, 128, use_ue8m0=use_ue8m0)
    np.testing.assert_array_equal(bits(q), bits(q_ref))
    if use_ue8m0:
        s_ref = ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(s_ref))
        assert s.dtype == paddle.int32
    np.testing.assert_array_equal(s.numpy(), s_ref.numpy())
    q_p, s_p = P.per_token_quant(x, 128, use_ue8m0)
    np.testing.assert_array_equal(bits(q), bits(q_p))
    np.testing.assert_array_equal(s.numpy(), s_p.numpy())


# ----------------------------------------------------------------------------- §5

def _routing(w, k_top, e, seed, pad_rows=()):
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.permutation(e)[:k_top] for _ in range(w)]).astype(np.int64)
    ids[rng.random(ids.shape) < 0.2] = -1               # some -1 inside rows
    for r in pad_rows:
        ids[r] = -1                                     # all -1 rows anywhere, not only at the end
    return paddle.to_tensor(ids)


@pytest.mark.parametrize("kind", ["fp8_fp32", "fp8_ue8m0", "bf16"])
def test_prefill_permute_matches_reference(T, P, kind):
    w, h, e, k_top, m = 45, 384, 6, 4, 40
    ids = _routing(w, k_top, e, seed=7, pad_rows=(0, 17, 44))
    x_f = rng_tensor([w, h], seed=1)
    if kind == "bf16":
        x, scale = x_f.astype(paddle.bfloat16), None
    else:
        x, scale = per_token_group_quant(x_f, 128, use_ue8m0=kind == "fp8_ue8m0")
        if kind == "fp8_ue8m0":
            scale = ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(scale))
    px, ps, imap, counts = T.prefill_permute_to_masked_gemm(x, scale, ids, e, m)
    ref = ref_layout.prefill_permute_to_masked_gemm(x, scale, ids, e, m)
    np.testing.assert_array_equal(imap.numpy(), ref.permuted_indice_map.numpy())
    np.testing.assert_array_equal(counts.numpy(), ref.token_nums_per_expert.numpy())
    assert counts.dtype == paddle.int32 and list(counts.shape) == [e, 1] and imap.dtype == paddle.int32
    raw = (lambda t: bits(t)) if x.dtype == paddle.float8_e4m3fn else (lambda t: t.view(paddle.uint16).numpy())
    np.testing.assert_array_equal(raw(px), raw(ref.permute_x))       # rows past the counts are zero in both
    if scale is None:
        assert ps is None
    else:
        vals, strides = mn_major_values(ps)
        np.testing.assert_array_equal(vals, ref.permute_scale.logical_view().numpy())
        assert strides == list(ref.permute_scale.strides)
        _, ps_p, _, _ = P.prefill_permute_to_masked_gemm(x, scale, ids, e, m)
        np.testing.assert_array_equal(vals, ps_p.numpy())


def test_prefill_permute_errors():
    from backend.ops.triton import launch as L
    x = torch.zeros(4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="outside"):
        L.prefill_permute_to_masked_gemm(x, None, torch.tensor([[0, 3]] * 4), 3, 8)
    with pytest.raises(ValueError, match="expert 1 receives 4 rows"):
        L.prefill_permute_to_masked_gemm(x, None, torch.tensor([[1, -1]] * 4), 3, 3)


# ----------------------------------------------------------------------------- §4

@pytest.mark.parametrize("mn,c,masked,mn_major", [(200, 2, True, True), (128, 1, False, False), (70, 3, True, False)])
def test_unpack_and_convert_scale_matches_paddle(T, P, mn, c, masked, mn_major):
    e = 3
    rng = np.random.default_rng(mn + c)
    b = rng.integers(100, 150, size=(e, mn, 4 * c)).astype(np.uint8)
    words = paddle.to_tensor(np.ascontiguousarray(b).view(np.int32).reshape(e, mn, c))
    scale = ref_fp8.to_mn_major_tma_aligned(words).logical_view() if mn_major else words
    masked_m = paddle.to_tensor(np.array([mn, mn // 3, 0], np.int32)) if masked else None
    sf = T.unpack_and_convert_scale(scale, masked_m)
    sf_p = P.unpack_and_convert_scale(scale, masked_m)
    assert sf.dtype == paddle.uint8 and list(sf.shape) == [e, -(-mn // 128) * 128, 16 * c]
    np.testing.assert_array_equal(sf.numpy(), sf_p.numpy())
    back = T.cutlass_scale_to_fp32(sf, mn)
    np.testing.assert_array_equal(back.numpy(), P.cutlass_scale_to_fp32(sf_p, mn).numpy())
    if not masked:
        np.testing.assert_array_equal(back.numpy(), np.ldexp(1.0, b.astype(np.int32) - 127).astype(np.float32))


def test_cutlass_scale_to_fp32_rejects_unequal_bytes(T):
    sf = np.full((1, 128, 4), 127, np.uint8)
    sf[0, 5, 1] = 128
    with pytest.raises(ValueError, match="differ"):
        T.cutlass_scale_to_fp32(paddle.to_tensor(sf))


# ----------------------------------------------------------------------------- §6

def _gemm_case(e, m, n, k, counts, seed, use_ue8m0=True):
    a_f = rng_tensor([e * m, k], seed, scale=2.0)
    b_f = rng_tensor([e, n, k], seed + 1, scale=0.5)
    a, sa = per_token_group_quant(a_f, 128, use_ue8m0=use_ue8m0)                 # [E·M, K], [E·M, S]
    b, sb = per_block_quant(b_f, use_ue8m0=use_ue8m0)                            # [E, N, K], [E, N/128, S]
    return a, sa, b, sb, paddle.to_tensor(np.array(counts, np.int32))


def _sf_bytes(T, sa, sb, e, m, n):
    """FP32 power-of-two scales -> CUTLASS SF bytes through the provider's own unpack_and_convert_scale."""
    wa = ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(sa)).reshape([e, m, -1])
    rows_b = paddle.repeat_interleave(sb, 128, axis=1)[:, :n]                     # per-row weight scales (§3)
    wb = ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(rows_b))
    return T.unpack_and_convert_scale(wa, None), T.unpack_and_convert_scale(wb, None)


def _dequant_ref(a, sa, b, sb, e, m, n, k, bias=None):
    a_d = f32(a).reshape(e, m, k) * np.repeat(sa.numpy().reshape(e, m, -1), 128, axis=2)[:, :, :k]
    s_b = np.repeat(np.repeat(sb.numpy(), 128, axis=1)[:, :n], 128, axis=2)[:, :, :k]
    out = np.einsum("emk,enk->emn", a_d.astype(np.float64), (f32(b) * s_b).astype(np.float64))
    if bias is not None:
        out = out + f32(bias)[:, None, :]
    return out


def _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb, masked_m, counts, **options):
    """group_gemm_masked of the triton and the paddle provider (no bias) on out poisoned with 7.0: valid rows
    within one bf16 step, rows past counts[e] untouched."""
    e, n, _ = (int(d) for d in b.shape)
    m = int(a.shape[0]) // e
    poison = paddle.full([e * m, n], 7.0, dtype=paddle.bfloat16)
    got = f32(T.group_gemm_masked(a, b, sfa, sfb, masked_m, poison.clone(), None, m, **options)).reshape(e, m, n)
    want = f32(P.group_gemm_masked(a, b, sfa, sfb, masked_m, poison.clone(), None, m, **options)).reshape(e, m, n)
    for ex, c in enumerate(counts):
        np.testing.assert_allclose(got[ex, :c], want[ex, :c], rtol=BF16_ULP, atol=1e-2)
        assert np.all(got[ex, c:] == 7.0)


@pytest.mark.parametrize("k,bias", [(384, False), (320, True)])
def test_group_gemm_masked_matches_paddle(T, P, k, bias):
    e, m, n = 3, 80, 192
    counts = [0, 57, 80]
    a, sa, b, sb, masked_m = _gemm_case(e, m, n, k, counts, seed=k)
    sfa, sfb = _sf_bytes(T, sa, sb, e, m, n)
    bias_t = rng_tensor([e, n], seed=3) if bias else None
    poison = paddle.full([e * m, n], 7.0, dtype=paddle.bfloat16)
    out = T.group_gemm_masked(a, b, sfa, sfb, masked_m, poison.clone(), bias_t, m)
    out_p = P.group_gemm_masked(a, b, sfa, sfb, masked_m, poison.clone(), bias_t, m)
    got, want = f32(out).reshape(e, m, n), f32(out_p).reshape(e, m, n)
    ref = _dequant_ref(a, sa, b, sb, e, m, n, k, bias_t)
    for ex, c in enumerate(counts):
        assert np.all(got[ex, c:] == 7.0), "rows past masked_m must stay untouched"
        if c:
            # Same FP8 math, float32 sums in another order: after the bf16 rounding at most one bf16 step apart.
            np.testing.assert_allclose(got[ex, :c], want[ex, :c], rtol=BF16_ULP, atol=1e-2)
            assert calc_diff(got[ex, :c], ref[ex, :c]) < 1e-5
    assert not np.isnan(got).any()


@pytest.mark.parametrize("variant", [dict(USE_TMA=True, SCALE_PREFETCH=True), dict(LOOP_STAGES=2),
                                     dict(USE_TMA=True, GRID_MODE=0)])
def test_group_gemm_masked_kernel_variants(T, P, variant, monkeypatch):
    """The tuning candidates of the explicit kernel (TMA descriptors, scale prefetch, one program per tile)."""
    from backend.ops.triton import launch as L
    monkeypatch.setattr(L, "INTERPRETER_CONFIG", dict(L.INTERPRETER_CONFIG, **variant))
    e, m, n, k = 2, 64, 128, 320
    counts = [64, 23]
    a, sa, b, sb, masked_m = _gemm_case(e, m, n, k, counts, seed=4)
    sfa, sfb = _sf_bytes(T, sa, sb, e, m, n)
    _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb, masked_m, counts)


def test_group_gemm_masked_per_row_weight_bytes(T, P):
    """Per-row weight scale bytes that differ inside a tile (SPEC §6 allows them): the kernel's two-FMA branch."""
    e, m, n, k = 2, 64, 128, 256
    counts = [50, 64]
    a, sa, b, _, masked_m = _gemm_case(e, m, n, k, counts, seed=8)
    sfa = T.unpack_and_convert_scale(ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(sa)).reshape([e, m, -1]), None)
    rng = np.random.default_rng(8)
    rows_b = paddle.to_tensor(np.ldexp(1.0, rng.integers(-9, -3, size=(e, n, k // 128))).astype(np.float32))
    sfb = T.unpack_and_convert_scale(ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(rows_b)), None)
    _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb, masked_m, counts)


@pytest.fixture
def gemm_paths(monkeypatch):
    """Names under which group_gemm_masked launched its explicit kernel: 'explicit_ue8m0' (one weight byte per
    128-row block, one-FMA promotion) or 'explicit_ue8m0_per_row' (per-row weight bytes)."""
    from backend.ops.triton import launch as L
    seen = []
    run = L._run_tuned

    def spy(name, *args, **kwargs):
        seen.append(name)
        return run(name, *args, **kwargs)
    monkeypatch.setattr(L, "_run_tuned", spy)
    return seen


def _rows_sf(T, per_row_scales):
    """[E, N, S] fp32 powers of two (one per row and 128-group) -> CUTLASS SF bytes [E, align(N,128), 4S]."""
    return T.unpack_and_convert_scale(ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(per_row_scales)), None)


def test_sf_block_uniform_detects_rows_that_differ():
    """sf_block_uniform: True for per-row copies of 128x128 block scales (also with N not a multiple of 128,
    whose zero padding rows are ignored), False when one row of a block, or one byte of a group of 4, differs;
    groups past ceil(K/128) are not read by the GEMM and not checked."""
    from backend.ops.triton import launch as L
    e, n, k = 2, 200, 384
    rng = np.random.default_rng(21)
    blocks = np.ldexp(1.0, rng.integers(-9, -3, size=(e, 2, k // 128))).astype(np.float32)
    rows = np.repeat(blocks, 128, axis=1)[:, :n]
    sf = lambda r: torch.from_numpy(_rows_sf(ops.get_provider("triton"), paddle.to_tensor(r)).numpy())
    assert L.sf_block_uniform(sf(rows), n, k)
    assert not L.sf_block_uniform(sf(rows), n + 1, k)               # a padding row (zero bytes) counted as valid
    for r, g in [(127, 0), (1, 2), (128 + 33, 1), (n - 1, 2)]:        # last / first row of a block, row groups
        bad = rows.copy()
        bad[1, r, g] *= 2.0
        assert not L.sf_block_uniform(sf(bad), n, k), (r, g)
        if g:
            assert L.sf_block_uniform(sf(bad), n, 128 * g)                # group g is past K: not read
    raw = sf(rows).clone()
    raw.view(torch.int32).view(e, 2, -1, 128)[0, 1, 1, 5] ^= 0x0100    # one byte of a group of 4
    assert not L.sf_block_uniform(raw, n, k)
    assert L.sf_block_uniform(raw, n, 128)                           # only group 0 is read when K = 128


def to_torch(x):
    if x.dtype == paddle.float8_e4m3fn:
        return torch.from_numpy(x.view(paddle.uint8).numpy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(x.numpy())


def test_group_gemm_masked_weight_byte_dispatch(T, P, gemm_paths):
    """sfb_per_block=True (block-constant weight bytes, stated by the caller) takes the one-FMA kernel; the
    default, False, the per-row kernel, right for any bytes (a single row that differs inside a 128-row
    block). Each equals the Paddle provider (which decodes every row) and the dequantized product, through
    the provider and the launcher; nothing is guessed, one kernel is launched per call. A false promise
    (True on rows that differ) reads the block's first row: wrong exactly where a row differs."""
    from backend.ops.triton import launch as L
    e, m, n, k = 2, 64, 192, 256
    counts = [50, 64]
    a, sa, b, sb, masked_m = _gemm_case(e, m, n, k, counts, seed=31)
    sfa, sfb = _sf_bytes(T, sa, sb, e, m, n)
    _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb, masked_m, counts, sfb_per_block=True)
    assert gemm_paths == ["explicit_ue8m0"]
    _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb, masked_m, counts)
    assert gemm_paths[1:] == ["explicit_ue8m0_per_row"]
    rows_b = np.repeat(sb.numpy(), 128, axis=1)[:, :n].copy()
    rows_b[1, 130, 1] *= 4.0                                          # row 2 of block 1, K group 1
    sfb_rows = _rows_sf(T, paddle.to_tensor(rows_b))
    _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb_rows, masked_m, counts)
    assert gemm_paths[2:] == ["explicit_ue8m0_per_row"]
    a_d = (f32(a).reshape(e, m, k) * np.repeat(sa.numpy().reshape(e, m, -1), 128, axis=2)).astype(np.float64)
    ref = np.einsum("emk,enk->emn", a_d, (f32(b) * np.repeat(rows_b, 128, axis=2)).astype(np.float64))
    rows_blk = np.repeat(sb.numpy(), 128, axis=1)[:, :n]
    ref_blk = np.einsum("emk,enk->emn", a_d, (f32(b) * np.repeat(rows_blk, 128, axis=2)).astype(np.float64))
    ta, tb, tsfa, tm = (to_torch(x) for x in (a, b, sfa, masked_m))

    def run(sf_b, **kw):
        del gemm_paths[:]
        out = torch.full((e * m, n), 7.0, dtype=torch.bfloat16)
        L.group_gemm_masked(ta, tb, tsfa, to_torch(sf_b), tm, out, None, m, **kw)
        return out.float().view(e, m, n).numpy(), list(gemm_paths)

    for sf_b, want, kw, paths in [(sfb, ref_blk, {}, ["explicit_ue8m0_per_row"]),
                                  (sfb_rows, ref, {}, ["explicit_ue8m0_per_row"]),
                                  (sfb, ref_blk, dict(sfb_per_block=True), ["explicit_ue8m0"]),
                                  (sfb_rows, ref, dict(sfb_per_block=False), ["explicit_ue8m0_per_row"])]:
        got, seen = run(sf_b, **kw)
        assert seen == paths
        for ex, c in enumerate(counts):
            assert np.all(got[ex, c:] == 7.0)
            assert calc_diff(got[ex, :c], want[ex, :c]) < 1e-5
    got, _ = run(sfb_rows, sfb_per_block=True)           # row 130's byte replaced by row 128's: wrong
    assert calc_diff(got[1, :, 130], ref[1, :, 130]) > 1e-3
    assert calc_diff(got[1, :, 129], ref[1, :, 129]) < 1e-5


def test_group_gemm_masked_keeps_no_state_per_weight_tensor(T, P, gemm_paths):
    """Nothing is remembered about an sfb object: the same tensor rewritten in place (block-constant bytes,
    then rows that differ) gives the right product at every call, with the kernel its call asks for."""
    from backend.ops.triton import launch as L
    e, m, n, k = 2, 64, 192, 256
    counts = [40, 64]
    a, sa, b, sb, masked_m = _gemm_case(e, m, n, k, counts, seed=37)
    sfa, sfb = _sf_bytes(T, sa, sb, e, m, n)
    rows_b = np.repeat(sb.numpy(), 128, axis=1)[:, :n].copy()
    rows_b[0, 5, 0] *= 2.0
    sfb_rows = _rows_sf(T, paddle.to_tensor(rows_b))
    a_d = (f32(a).reshape(e, m, k) * np.repeat(sa.numpy().reshape(e, m, -1), 128, axis=2)).astype(np.float64)
    want_blk = np.einsum("emk,enk->emn", a_d, (f32(b) * np.repeat(np.repeat(sb.numpy(), 128, axis=1)[:, :n],
                                                                 128, axis=2)).astype(np.float64))
    want_rows = np.einsum("emk,enk->emn", a_d, (f32(b) * np.repeat(rows_b, 128, axis=2)).astype(np.float64))
    ta, tb, tsfa, tm = (to_torch(x) for x in (a, b, sfa, masked_m))
    tsfb = to_torch(sfb).clone()
    for want, kw, paths in [(want_blk, dict(sfb_per_block=True), ["explicit_ue8m0"]),
                            (want_blk, {}, ["explicit_ue8m0_per_row"]), ("rewrite", None, None),
                            (want_rows, {}, ["explicit_ue8m0_per_row"]),
                            (want_rows, {}, ["explicit_ue8m0_per_row"])]:
        if isinstance(want, str):
            tsfb.copy_(to_torch(sfb_rows))                          # in place: same object, new bytes
            continue
        del gemm_paths[:]
        out = torch.full((e * m, n), 7.0, dtype=torch.bfloat16)
        L.group_gemm_masked(ta, tb, tsfa, tsfb, tm, out, None, m, **kw)
        assert gemm_paths == paths
        got = out.float().view(e, m, n).numpy()
        for ex, c in enumerate(counts):
            assert np.all(got[ex, c:] == 7.0)
            assert calc_diff(got[ex, :c], want[ex, :c]) < 1e-5


def _one_byte_differs(sf, at):
    """CUTLASS SF bytes with the byte of (expert, row, 32-K chunk) `at` raised by one: its 128-K group then holds two
    values (the chunk is not a group's first)."""
    raw = cutlass_sf.unswizzle(sf).numpy().copy()
    raw[at] += 1
    return cutlass_sf.swizzle(paddle.to_tensor(raw))


def test_group_gemm_masked_sfa_per_group_skips_the_byte_check(T, P, gemm_paths, monkeypatch):
    """sfa_per_group=True (1x128 activation bytes, stated by the caller as the method states them): with
    sfb_per_block=True the provider launches the per-128 kernel with no look at the bytes (no pass, no
    synchronization) and the same output as without the promise, which checks sfa once. A false promise (one
    32-K chunk of one row's 128-K group differs) reads the group's first byte: that row is wrong, as if the byte
    had not changed, every other row right; without the promise the call goes to dot_scaled and is right."""
    from backend.ops.triton import launch as L
    e, m, n, k = 2, 64, 192, 256
    counts = [50, 64]
    a, sa, b, sb, masked_m = _gemm_case(e, m, n, k, counts, seed=43)
    sfa, sfb = _sf_bytes(T, sa, sb, e, m, n)
    looks, hints = [], []
    real_look, real_launch = L._repeats_per_128, L.group_gemm_masked
    monkeypatch.setattr(L, "_repeats_per_128", lambda w: looks.append(w.shape) or real_look(w))
    monkeypatch.setattr(L, "group_gemm_masked", lambda *args, **kw: hints.append(kw.get("expected_m"))
                        or real_launch(*args, **kw))

    def run(sf_a, **options):
        del gemm_paths[:], looks[:]
        out = paddle.full([e * m, n], 7.0, dtype=paddle.bfloat16)
        got = f32(T.group_gemm_masked(a, b, sf_a, sfb, masked_m, out, None, m, **options)).reshape(e, m, n)
        return got, list(gemm_paths), len(looks)

    promised, paths, n_looks = run(sfa, sfb_per_block=True, sfa_per_group=True, expected_m=40)
    assert (paths, n_looks, hints[-1]) == (["explicit_ue8m0"], 0, 40)       # the hint reaches the launcher
    checked, paths, n_looks = run(sfa, sfb_per_block=True)
    assert (paths, n_looks, hints[-1]) == (["explicit_ue8m0"], 1, None)
    np.testing.assert_array_equal(promised, checked)
    _, paths, n_looks = run(sfa, sfa_per_group=True)                          # weight bytes still looked at
    assert (paths, n_looks) == (["explicit_ue8m0_per_row"], 1)
    _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb, masked_m, counts, sfb_per_block=True, sfa_per_group=True)
    bad = _one_byte_differs(sfa, (1, 10, 5))                                   # expert 1, row 10, K 160..191
    want = f32(P.group_gemm_masked(a, b, bad, sfb, masked_m, paddle.full([e * m, n], 7.0, dtype=paddle.bfloat16),
                                   None, m)).reshape(e, m, n)
    got, paths, _ = run(bad, sfb_per_block=True)
    assert paths == ["dot_scaled"]
    for ex, c in enumerate(counts):
        np.testing.assert_allclose(got[ex, :c], want[ex, :c], rtol=BF16_ULP, atol=1e-2)
    got, paths, n_looks = run(bad, sfb_per_block=True, sfa_per_group=True)
    assert (paths, n_looks) == (["explicit_ue8m0"], 0)
    np.testing.assert_array_equal(got[1, 10], checked[1, 10])                 # the group's first byte, as before
    assert calc_diff(got[1, 10], want[1, 10]) > 1e-3
    keep = np.ones((e, m), bool)
    keep[1, 10] = False
    np.testing.assert_array_equal(got[keep], checked[keep])


def test_layer_states_block_weight_bytes_and_triton_uses_them(monkeypatch, gemm_paths):
    """process_weights_after_loading decides sfb_per_block once: its CUTLASS weight bytes are block-constant
    (sf_block_uniform agrees, N = 2I = 144 not a multiple of 128), and the triton provider's forward then
    runs the one-FMA kernel for both GEMMs, equal to the paddle provider's forward."""
    from backend.moe.layer import FusedMoE
    from backend.ops.triton import launch as L
    from backend.quantization import BlockWiseFP8Config
    from moe_ref import moe
    e, h, i, k_top = 4, 256, 72, 2
    w = moe.make_moe_weights(e, h, i, seed=3)
    x, tw, ti = moe.make_moe_inputs(12, h, e, k_top, seed=4)
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")
    outs = []
    for name in ("paddle", "triton"):
        monkeypatch.setenv("FD_MOE_OPS_PROVIDER", name)
        ops.reset_provider_cache()
        layer = FusedMoE(e, k_top, h, i, BlockWiseFP8Config(is_checkpoint_bf16=True))
        layer.load_weights(w.w_up, w.w_down)
        assert layer.weight_scale_bw_per_block is True
        for sf, n, k in ((layer.up_gate_proj_weight_scale_inv, 2 * i, h), (layer.down_proj_weight_scale_inv, h, i)):
            assert L.sf_block_uniform(to_torch(sf), n, k)
        del gemm_paths[:]
        outs.append(f32(layer(x, topk=(tw, ti))))
    ops.reset_provider_cache()
    assert gemm_paths == ["explicit_ue8m0"] * 2
    np.testing.assert_allclose(outs[1], outs[0], rtol=BF16_ULP, atol=1e-3)   # same FP8 math, sums reordered


def _uniform_sf(P, byte, e, rows, c=1):
    """CUTLASS SF bytes of packed words whose every byte is `byte` ([E, align(rows, 128), 16·c])."""
    words = np.full([e, rows, c], byte * 0x01010101, dtype=np.uint32).view(np.int32)
    return P.unpack_and_convert_scale(paddle.to_tensor(words), None)


@pytest.mark.parametrize("options", [{}, dict(sfb_per_block=True)])
def test_group_gemm_masked_decodes_scale_bytes_alike(T, P, options):
    """SPEC §2: UE8M0 byte 0 is 2^-127, not 0 (a plain `byte << 23` made it 0 in the triton kernels), on both
    providers, for sfa and for sfb; with byte 254 (2^127) on the other operand the product is bf16(a·b)
    (operands in quarters up to 0.5, so that 2^127 times them stays finite and every float32 sum is exact)."""
    e, m, n, k = 2, 8, 64, 256
    rng = np.random.default_rng(41)
    a = paddle.to_tensor(rng.integers(-2, 3, (e * m, k)).astype(np.float32) / 4).astype(paddle.float8_e4m3fn)
    b = paddle.to_tensor(rng.integers(-2, 3, (e, n, k)).astype(np.float32) / 4).astype(paddle.float8_e4m3fn)
    want = np.einsum("emk,enk->emn", f32(a).reshape(e, m, k), f32(b)).astype(ml_dtypes.bfloat16).astype(np.float32)
    counts = [8, 5]
    masked_m = paddle.to_tensor(np.array(counts, np.int32))
    for sfa, sfb in [(_uniform_sf(P, 0, e, m, 2), _uniform_sf(P, 254, e, n, 2)),
                     (_uniform_sf(P, 254, e, m, 2), _uniform_sf(P, 0, e, n, 2))]:
        for prov in (T, P):
            out = paddle.full([e * m, n], 7.0, dtype=paddle.bfloat16)
            got = f32(prov.group_gemm_masked(a, b, sfa, sfb, masked_m, out, None, m, **options)).reshape(e, m, n)
            for ex, c in enumerate(counts):
                np.testing.assert_array_equal(got[ex, :c], want[ex, :c])
                assert np.all(got[ex, c:] == 7.0)


@pytest.mark.parametrize("nan_byte", [0x7F, 0xFF])
def test_group_gemm_masked_e4m3_nan_propagates_alike(T, P, nan_byte):
    """An e4m3 NaN byte in a (or b) makes NaN exactly the outputs whose sums read it, on both providers and
    both triton kernels (the interpreter's own fp8 conversion read 0x7F as 480: 608 came out, not NaN)."""
    from backend.ops.triton import launch as L
    e, m, n, k = 2, 8, 64, 256
    a_bytes = np.full((e * m, k), 0x38, np.uint8)                   # e4m3 1.0
    b_bytes = np.full((e, n, k), 0x38, np.uint8)
    a_bytes[3, 17] = a_bytes[9, 200] = nan_byte
    b_bytes[1, 40, 5] = nan_byte
    a = paddle.to_tensor(a_bytes).view(paddle.float8_e4m3fn)
    b = paddle.to_tensor(b_bytes).view(paddle.float8_e4m3fn)
    sfa, sfb = _uniform_sf(P, 127, e, m, 2), _uniform_sf(P, 127, e, n, 2)
    masked_m = paddle.to_tensor(np.array([8, 8], np.int32))
    want_nan = np.zeros((e, m, n), bool)
    want_nan[0, 3, :] = want_nan[1, 1, :] = True                    # rows 3 and 9 of a
    want_nan[1, :, 40] = True                                       # column 40 of expert 1's b
    runs = [prov.group_gemm_masked(a, b, sfa, sfb, masked_m, paddle.zeros([e * m, n], dtype=paddle.bfloat16),
                                   None, m) for prov in (T, P)]
    got = [f32(r).reshape(e, m, n) for r in runs]
    out = torch.zeros((e * m, n), dtype=torch.bfloat16)
    L.group_gemm_masked(to_torch(a), to_torch(b), to_torch(sfa), to_torch(sfb), to_torch(masked_m), out,
                        None, m, impl="dot_scaled")
    got.append(out.float().view(e, m, n).numpy())
    for g in got:
        np.testing.assert_array_equal(np.isnan(g), want_nan)
        assert np.all(g[~want_nan] == k)


def test_prefill_permute_with_no_tokens(T, P):
    """W = 0 rows (a rank that received no token): empty map, zero counts, all-zero layout, like paddle and
    moe_ref (a raw torch stride error before), for bf16 x and for fp8 x with FP32 or packed scales."""
    e, m, h = 3, 4, 256
    ids = paddle.zeros([0, 2], dtype=paddle.int64)
    cases = [(paddle.zeros([0, h], dtype=paddle.bfloat16), None),
             (paddle.zeros([0, h], dtype=paddle.float8_e4m3fn), paddle.zeros([0, 2])),
             (paddle.zeros([0, h], dtype=paddle.float8_e4m3fn), paddle.zeros([0, 1], dtype=paddle.int32))]
    for x, scale in cases:
        px, ps, imap, counts = T.prefill_permute_to_masked_gemm(x, scale, ids, e, m)
        ref = ref_layout.prefill_permute_to_masked_gemm(x, scale, ids, e, m)
        _, ps_p, _, _ = P.prefill_permute_to_masked_gemm(x, scale, ids, e, m)
        assert px.dtype == x.dtype and list(px.shape) == [e, m, h] and not bits(px).any()
        assert list(imap.shape) == [0, 2] and counts.numpy().tolist() == [[0]] * e
        np.testing.assert_array_equal(bits(px), bits(ref.permute_x))
        if scale is None:
            assert ps is None and ps_p is None
        else:
            assert list(ps.strides) == list(ps_p.strides) and not ps.numpy().any()


def test_group_gemm_masked_per_32_bytes_through_the_provider(T, P):
    """SF bytes that differ inside a 128-group reach the dot_scaled kernel (impl='auto'), never silently the
    per-128 one: the result equals the Paddle provider's, which decodes every byte."""
    e, m, n, k = 2, 64, 128, 256
    rng = np.random.default_rng(12)
    a = paddle.to_tensor(rng.standard_normal((e * m, k)).astype(np.float32)).astype(paddle.float8_e4m3fn)
    b = paddle.to_tensor(rng.standard_normal((e, n, k)).astype(np.float32)).astype(paddle.float8_e4m3fn)
    sfa = cutlass_sf.swizzle(paddle.to_tensor(rng.integers(120, 134, (e, 128, k // 32)).astype(np.uint8)))
    sfb = cutlass_sf.swizzle(paddle.to_tensor(rng.integers(120, 134, (e, n, k // 32)).astype(np.uint8)))
    masked_m = paddle.to_tensor(np.array([64, 17], np.int32))
    _assert_gemm_matches_paddle(T, P, a, b, sfa, sfb, masked_m, [64, 17])


def test_group_gemm_masked_dot_scaled_per_32_bytes(T):
    """impl='dot_scaled' honours one UE8M0 byte per 32 K-elements (bytes that differ inside a group)."""
    from backend.ops.triton import launch as L
    e, m, n, k = 2, 64, 128, 256
    g = torch.Generator().manual_seed(5)
    a = (torch.randn(e * m, k, generator=g) * 2).clamp(-448, 448).to(torch.float8_e4m3fn)
    b = torch.randn(e, n, k, generator=g).to(torch.float8_e4m3fn)
    rm_a = torch.randint(120, 134, (e, 128, k // 32), generator=g, dtype=torch.uint8)
    rm_b = torch.randint(120, 134, (e, n, k // 32), generator=g, dtype=torch.uint8)
    sfa = cutlass_sf.swizzle(paddle.to_tensor(rm_a.numpy()))
    sfb = cutlass_sf.swizzle(paddle.to_tensor(rm_b.numpy()))
    sfa, sfb = (torch.from_numpy(t.numpy()) for t in (sfa, sfb))
    counts = torch.tensor([40, 64], dtype=torch.int32)
    out = torch.full((e * m, n), 7.0, dtype=torch.bfloat16)
    L.group_gemm_masked(a, b, sfa, sfb, counts, out, None, m, impl="dot_scaled")
    da = a.float().view(e, m, k) * torch.exp2(rm_a[:, :m].float() - 127).repeat_interleave(32, 2)
    db = b.float() * torch.exp2(rm_b.float() - 127).repeat_interleave(32, 2)
    ref = torch.einsum("emk,enk->emn", da.double(), db.double())
    got = out.float().view(e, m, n)
    for ex, c in enumerate(counts.tolist()):
        assert calc_diff(got[ex, :c].numpy(), ref[ex, :c].numpy()) < 1e-5
        assert torch.all(got[ex, c:] == 7.0)


def test_group_gemm_masked_fp32_recipe(T):
    """Hopper recipe: FP32 1x128 activation scales (MN-major from the permute) and 128x128 weight scales."""
    from backend.ops.triton import launch as L
    e, m, n, k = 2, 48, 128, 256
    counts = [33, 48]
    a, sa, b, sb, _ = _gemm_case(e, m, n, k, counts, seed=11, use_ue8m0=False)
    sa_mn = ref_fp8.to_mn_major_tma_aligned(sa.reshape([e, m, -1]))
    sa_t = torch.from_numpy(sa_mn.physical.numpy())
    sa_t = sa_t.as_strided((e, m, sa_t.shape[1]), (sa_t.shape[1] * sa_t.shape[2], 1, sa_t.shape[2]))
    to_fp8 = lambda t: torch.from_numpy(bits(t)).view(torch.float8_e4m3fn)  # noqa: E731
    out = torch.full((e * m, n), 7.0, dtype=torch.bfloat16)
    L.group_gemm_masked_fp32(to_fp8(a), to_fp8(b), sa_t, torch.from_numpy(sb.numpy()),
                             torch.tensor(counts, dtype=torch.int32), out, None, m)
    ref = _dequant_ref(a, sa, b, sb, e, m, n, k)
    got = out.float().view(e, m, n).numpy()
    for ex, c in enumerate(counts):
        np.testing.assert_allclose(got[ex, :c], ref[ex, :c], rtol=2 * BF16_ULP, atol=1e-2)
        assert np.all(got[ex, c:] == 7.0)


# ----------------------------------------------------------------------------- §7

@pytest.mark.parametrize("use_ue8m0,i", [(True, 256), (False, 384)])
def test_fused_mask_swiglu_fp8_quant_matches_paddle(T, P, use_ue8m0, i):
    e, m = 3, 24
    up = rng_tensor([e, m, 2 * i], seed=i, scale=2.0, dtype=paddle.bfloat16)
    counts = paddle.to_tensor(np.array([24, 0, 9], np.int32))
    act, s = T.fused_mask_swiglu_fp8_quant(up, counts, 128, use_ue8m0)
    act_p, s_p = P.fused_mask_swiglu_fp8_quant(up, counts, 128, use_ue8m0)
    assert list(s.strides) == list(s_p.strides) and list(s.shape) == list(s_p.shape)
    # Same float32 formula and order as the Paddle provider; the interpreter's exp is NumPy's, as
    # Paddle's CPU exp, so bits agree exactly here. (On a GPU, tl.exp is an approximation: the bound
    # there is "one bf16 step of y", see benchmarks/bench_gpu.py.)
    np.testing.assert_array_equal(bits(act), bits(act_p))
    vals, vals_p = s.numpy(), s_p.numpy()
    np.testing.assert_array_equal(vals, vals_p)
    for ex, c in enumerate([24, 0, 9]):
        assert np.all(bits(act)[ex, c:] == 0) and np.all(vals[ex, c:] == 0)


# The interpreter computes the overflow these tests plant in numpy, which warns about it: expected here.
ignore_overflow = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
ignore_invalid = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@ignore_overflow
@ignore_invalid
@pytest.mark.parametrize("value, half", [(float("nan"), "gate"), (float("inf"), "lin"), (-float("inf"), "gate"),
                                         (1e30, "both")])
@pytest.mark.parametrize("use_ue8m0, i", [(True, 128), (False, 200)])
def test_fused_swiglu_non_finite_is_an_error_everywhere(T, P, value, half, use_ue8m0, i):
    """SPEC §1 for the fused SwiGLU + quant (issue 15 item 1): a NaN / inf of up in a valid row raises naming
    "up" and its index; a finite up whose lin · gate overflows (1e30 · 1e30) raises naming "SwiGLU(up)", on
    both providers and in moe_ref (which said "x" before, and the providers quantized silently, disagreeing).
    The same values in rows past the counts are never read: no error, outputs equal."""
    e, m = 2, 5
    counts = paddle.to_tensor(np.array([5, 2], np.int32))
    base = (np.random.default_rng(7).standard_normal((e, m, 2 * i)) * 2).astype(np.float32)
    cols = {"gate": [3], "lin": [i + 3], "both": [3, i + 3]}[half]
    bad, ignored = base.copy(), base.copy()
    bad[1, 1, cols] = value                                          # row 1 < counts[1] = 2: read
    ignored[1, 3, cols] = value                                      # row 3 >= 2: never read
    up_bad, up_ignored = (paddle.to_tensor(u).astype(paddle.bfloat16) for u in (bad, ignored))
    name = r"SwiGLU\(up\)" if np.isfinite(value) else "up"
    for prov in (T, P):
        with pytest.raises(ValueError, match=rf"^{name}: .*non-finite"):
            prov.fused_mask_swiglu_fp8_quant(up_bad, counts, 128, use_ue8m0)
    with pytest.raises(ValueError, match=rf"^{name}: non-finite value"):
        moe_ref_swiglu(up_bad, counts, use_ue8m0)
    if np.isfinite(value):
        return
    got = [prov.fused_mask_swiglu_fp8_quant(up_ignored, counts, 128, use_ue8m0) for prov in (T, P)]
    ref_act, ref_scale = moe_ref_swiglu(up_ignored, counts, use_ue8m0)
    for act, scale in got:
        np.testing.assert_array_equal(bits(act), bits(ref_act))
        np.testing.assert_array_equal(scale.numpy(), ref_scale.logical_view().numpy())


def moe_ref_swiglu(up, counts, use_ue8m0):
    from moe_ref.moe import fused_mask_swiglu_fp8_quant_ref
    return fused_mask_swiglu_fp8_quant_ref(up, counts, use_ue8m0=use_ue8m0)


@ignore_overflow
@ignore_invalid
def test_layer_gemm1_overflow_raises_on_triton(monkeypatch, gemm1_overflow_case):
    """The issue's layer case on the triton provider: finite x, GEMM 1 overflows -> an error naming GEMM 1's
    output (it returned -3.2e37 before)."""
    from backend.moe.layer import FusedMoE
    from backend.quantization import BlockWiseFP8Config
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", "triton")
    ops.reset_provider_cache()
    x, w_up, w_down, tw, ti = gemm1_overflow_case
    layer = FusedMoE(2, 1, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=True))
    layer.load_weights(w_up.astype(paddle.bfloat16), w_down.astype(paddle.bfloat16))
    try:
        with pytest.raises(ValueError, match=r"^GEMM 1 output .*: up: non-finite value -?inf at index"):
            layer(x, topk=(tw, ti))
    finally:
        ops.reset_provider_cache()


# ----------------------------------------------------------------------------- §8

def test_depermute_prefill_combine_matches_reference(T, P):
    w, h, e, k_top, m = 30, 320, 4, 3, 40
    ids = _routing(w, k_top, e, seed=2, pad_rows=(4,))
    x = rng_tensor([w, h], seed=2).astype(paddle.bfloat16)
    _, _, imap, _ = P.prefill_permute_to_masked_gemm(x, None, ids, e, m)
    ffn = rng_tensor([e, m, h], seed=9).astype(paddle.bfloat16)
    wts = paddle.to_tensor(np.random.default_rng(3).random((w, k_top)).astype(np.float32))
    out = T.depermute_prefill_combine(ffn, imap, wts, w)
    ref = ref_layout.depermute_prefill_combine(ffn, imap, wts, w)
    assert out.dtype == paddle.bfloat16 and list(out.shape) == [w, h]
    np.testing.assert_allclose(f32(out), f32(ref), rtol=BF16_ULP, atol=1e-6)   # FMA vs mul+add: <= 1 bf16 step
    assert np.all(f32(out)[4] == 0)


# ----------------------------------------------------------------------------- the chain

@pytest.mark.slow
def test_ht_prefill_chain_matches_paddle_provider(T, P):
    """quant -> permute -> unpack -> GEMM1 -> SwiGLU+quant -> unpack -> GEMM2 -> combine, both providers."""
    w, h, inter, e, k_top, m = 24, 256, 128, 4, 2, 16
    x = rng_tensor([w, h], seed=21).astype(paddle.bfloat16)
    ids = _routing(w, k_top, e, seed=21, pad_rows=(5,))
    wts = paddle.to_tensor(np.random.default_rng(4).random((w, k_top)).astype(np.float32))
    w_up, s_up = per_block_quant(rng_tensor([e, 2 * inter, h], seed=22, scale=0.1), use_ue8m0=True)
    w_dn, s_dn = per_block_quant(rng_tensor([e, h, inter], seed=23, scale=0.1), use_ue8m0=True)

    def weights_sf(prov, s, n):
        rows = paddle.repeat_interleave(s, 128, axis=1)[:, :n]
        return prov.unpack_and_convert_scale(ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(rows)), None)

    outs = []
    for prov in (T, P):
        q, s = prov.per_token_quant(x, 128, True)
        px, ps, imap, counts = prov.prefill_permute_to_masked_gemm(q, s, ids, e, m)
        sfa = prov.unpack_and_convert_scale(ps, counts)
        up = paddle.zeros([e * m, 2 * inter], dtype=paddle.bfloat16)
        prov.group_gemm_masked(px.reshape([e * m, h]), w_up, sfa, weights_sf(prov, s_up, 2 * inter), counts, up,
                               None, m)
        act, act_s = prov.fused_mask_swiglu_fp8_quant(up.reshape([e, m, 2 * inter]), counts, 128, True)
        sfa2 = prov.unpack_and_convert_scale(act_s, counts)
        down = paddle.zeros([e * m, h], dtype=paddle.bfloat16)
        prov.group_gemm_masked(act.reshape([e * m, inter]), w_dn, sfa2, weights_sf(prov, s_dn, h), counts, down,
                               None, m)
        outs.append(prov.depermute_prefill_combine(down.reshape([e, m, h]), imap, wts, w))
    assert calc_diff(outs[0], outs[1]) < 1e-4
    assert not np.isnan(f32(outs[0])).any()


# ----------------------------------------------------------------------------- develop's fused ops, #7666's 1x32

def _same_bytes(got, want):
    for g, r in zip(got, want):
        assert g.dtype == r.dtype and list(g.shape) == list(r.shape)
        np.testing.assert_array_equal(bits(g) if g.dtype == paddle.float8_e4m3fn else g.numpy(),
                                      bits(r) if r.dtype == paddle.float8_e4m3fn else r.numpy())


@pytest.mark.parametrize("scales", ["1x128", "1x32"])
def test_blackwell_permute_matches_reference_and_old_path(T, P, scales):
    from moe_ref import blackwell_layout as BL
    w, h, e, m = 12, 352 if scales == "1x32" else 384, 3, 16
    x = rng_tensor([w, h], seed=31)
    rng = np.random.default_rng(32)
    ids = np.stack([rng.choice(e, size=2, replace=False) for _ in range(w)]).astype(np.int64)
    ids[rng.random(ids.shape) < 0.3] = -1
    ids = paddle.to_tensor(ids)
    if scales == "1x128":
        q, s = per_token_group_quant(x, use_ue8m0=True)
        scale = ref_fp8.pack_scale_ue8m0(s)
    else:
        q, scale = BL.group_wise_quant(x)
    got = T.prefill_permute_to_blackwell_masked_gemm(q, scale, ids.astype(paddle.int32), e, m)
    _same_bytes(got, BL.prefill_permute_to_blackwell_masked_gemm(q, scale, ids, e, m))
    _same_bytes(got, P.prefill_permute_to_blackwell_masked_gemm(q, scale, ids, e, m))
    if scales == "1x128":
        px, ps, imap, counts = T.prefill_permute_to_masked_gemm(q, scale, ids, e, m)
        _same_bytes(got, (px.reshape([e * m, h]), T.unpack_and_convert_scale(ps, counts), imap, counts))


@pytest.mark.parametrize("i,group", [(256, 128), (96, 32)])
def test_blackwell_swiglu_matches_reference_and_old_path(T, P, i, group):
    """Rows past the counts hold NaN: never read (upstream's GEMM output is paddle.empty since #7374)."""
    from moe_ref import blackwell_layout as BL
    e, m = 3, 8
    counts = paddle.to_tensor([8, 0, 5], dtype=paddle.int32)
    up = (np.random.default_rng(i).standard_normal((e, m, 2 * i)) * 3).astype(np.float32)
    up[2, 5:] = np.nan
    up = paddle.to_tensor(up).astype(paddle.bfloat16).reshape([e * m, 2 * i])
    got = T.fused_mask_swiglu_fp8_quant_blackwell(up, counts, group_size=group)
    _same_bytes(got, BL.fused_mask_swiglu_fp8_quant_blackwell(up, counts, group_size=group))
    if group == 128:
        act, s = T.fused_mask_swiglu_fp8_quant(up.reshape([e, m, 2 * i]), counts)
        _same_bytes(got, (act.reshape([e * m, i]), T.unpack_and_convert_scale(s, counts)))


@pytest.mark.parametrize("shape,swizzle", [([5, 200], False), ([2, 128, 256], True)])
def test_group_wise_quant_matches_reference(T, shape, swizzle):
    from moe_ref import blackwell_layout as BL
    x = rng_tensor(shape, seed=41, scale=5.0, dtype=paddle.bfloat16)
    _same_bytes(T.group_wise_quant(x, False, swizzle), BL.group_wise_quant(x, use_swizzle=swizzle))


def test_group_gemm_masked_honours_1x32_bytes_end_to_end(T, P):
    """#7666's recipe: activations and weights in 1x32 UE8M0 groups (group_wise_quant), activations permuted by the
    fused Blackwell permute. The triton GEMM (impl auto -> tl.dot_scaled, bytes differ inside 128-groups) equals the
    paddle provider's and the float64 product of the dequantized operands."""
    from moe_ref import blackwell_layout as BL
    e, m, n, k, w = 2, 16, 128, 256, 10
    x = rng_tensor([w, k], seed=51, scale=4.0) * paddle.to_tensor(
        np.exp2(np.random.default_rng(52).integers(-6, 6, (1, k))).astype(np.float32))     # scales vary per 32
    xq, xs = T.group_wise_quant(x, False, False)
    wq, wsf = T.group_wise_quant(rng_tensor([e, n, k], seed=53), False, True)
    ids = paddle.to_tensor(np.array([[i % e, -1] for i in range(w)], np.int64))
    a, sfa, _, counts = T.prefill_permute_to_blackwell_masked_gemm(xq, xs, ids, e, m)
    from backend.ops.triton import launch as L
    assert not L.sf_repeats_per_128(torch.from_numpy(sfa.numpy()))       # the per-32 bytes differ inside a group
    poison = paddle.full([e * m, n], 7.0, dtype=paddle.bfloat16)
    got = f32(T.group_gemm_masked(a, wq, sfa, wsf, counts, poison.clone(), None, m, -1, "w8a8")).reshape(e, m, n)
    want = f32(P.group_gemm_masked(a, wq, sfa, wsf, counts, poison.clone(), None, m, -1, "w8a8")).reshape(e, m, n)
    a_deq = BL.dequant_group_wise(xq, xs).numpy().astype(np.float64)
    w_deq = BL.dequant_group_wise(wq, wsf, swizzled=True).numpy().astype(np.float64)
    for ex, c in enumerate(counts.numpy().reshape(-1)):
        ref = a_deq[[t for t in range(w) if t % e == ex]] @ w_deq[ex].T
        np.testing.assert_allclose(got[ex, :c], want[ex, :c], rtol=BF16_ULP, atol=1e-2)   # fp32 sums in another order
        np.testing.assert_allclose(got[ex, :c], ref, rtol=2 * BF16_ULP, atol=1e-2)        # + the bf16 rounding of out
        assert np.all(got[ex, c:] == 7.0)


def test_group_gemm_masked_writes_a_strided_out_through_to_its_base(T, P):
    """issue 15 item 5: `out` may be a strided view (columns of a wider buffer); the provider computes into a
    contiguous copy and writes it back through the view, so the base buffer holds the result and its other
    columns are untouched (on a GPU the copy is `contiguous_copy`, never Paddle's in-place contiguous())."""
    e, m, n, k = 2, 64, 128, 256
    counts = [40, 64]
    a, sa, b, sb, masked_m = _gemm_case(e, m, n, k, counts, seed=11)
    sfa, sfb = _sf_bytes(T, sa, sb, e, m, n)
    base = paddle.full([e * m, n + 32], 7.0, dtype=paddle.bfloat16)
    out = base[:, 16:16 + n]
    assert not out.is_contiguous()
    T.group_gemm_masked(a, b, sfa, sfb, masked_m, out, None, m)
    want = f32(P.group_gemm_masked(a, b, sfa, sfb, masked_m, paddle.full([e * m, n], 7.0, dtype=paddle.bfloat16),
                                   None, m))
    got = f32(base)
    np.testing.assert_allclose(got[:, 16:16 + n], want, rtol=BF16_ULP, atol=1e-2)
    assert np.all(got[:, :16] == 7.0) and np.all(got[:, 16 + n:] == 7.0)
