"""BlackwellGemmFusedMoeMethod on its three paths (tp, ht, ll), R = 1, 2, 4 simulated ranks, BF16 and
FP8 checkpoints, against the reference (moe_ref.moe, UE8M0 scales) and the float oracle.

Bounds (SPEC §12), measured at the reference's test shape (T=96, H=384, I=256, E_total=8, K_top=4):

- vs the reference FP8 layer (`moe_forward_fp8`, `moe_forward_ep`, use_ue8m0=True): the same FP8
  math, so only float32 summation order may differ between providers. A GEMM with another
  accumulation order moves a float32 result by about K·2^-24 relative (1e-5 at K = 384) before
  the bf16 rounding, which then flips the last bf16 bit of about 1e-5 / 2^-8 = 0.3 % of the
  elements (each flip adds ~(2^-8)^2 / 2 to calc_diff, weighted by its share): calc_diff < 1e-6
  (REF_BOUND), far below the FP8 error (2e-3). Measured with the paddle provider: 0.0 (bit for
  bit) on every path, which the tests also check when that provider runs.
- ht with R > 1 against the single-rank reference adds one bf16 rounding per rank partial
  (SPEC §9 combine), so at most two bf16 roundings, relative error <= 2 · 2^-8 per element, and
  calc_diff ~ rel_l2^2 / 2 <= (2 · 2^-8)^2 / 2 = 3e-5 (EP_BOUND); measured 3.7e-6 .. 4.0e-6.
  Against `moe_forward_ep` (which rounds the same partials) it is exact again.
- vs the float64 oracle: BF16 checkpoint measured 2.14e-3 .. 2.22e-3 over seeds 0..3, the
  reference's own range for UE8M0 at this shape (2.13e-3 .. 2.22e-3), so its bound 3e-3 applies.
  FP8 checkpoint (FP32-scale 128x128 blocks, requantized to UE8M0 at load), against the oracle of
  the checkpoint's own (dequantized) weights: measured 2.16e-3 .. 2.23e-3, the same range: the
  requantization is one more rounding of the block scale, invisible at this size; same bound.
"""
import re

import numpy as np
import paddle
import pytest

from backend import ops
from backend.moe import blackwell_method as bm
from backend.moe.blackwell_method import BlackwellGemmFusedMoeMethod
from backend.moe.ep_runner import InProcessEPGroup, SingleRankEPRunner
from backend.moe.layer import FusedMoE
from backend.quantization import BlockWiseFP8Config
from fakes.gemm_spy import gemm_options_spy
from moe_ref import fp8 as ref_fp8
from moe_ref import moe, quant
from moe_ref.metrics import calc_diff, max_abs_diff

T, H, I, E, K_TOP = 96, 384, 256, 8, 4
REF_BOUND = 1e-6
EP_BOUND = 3e-5
ORACLE_BOUNDS = {"bf16": 3e-3, "fp8": 3e-3}
FP8_LOWER_BOUND = 5e-4          # an FP8 path that secretly ran in float would pass any upper bound


@pytest.fixture(autouse=True)
def _blackwell(monkeypatch):
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")


def f32(t):
    return t.astype(paddle.float32).numpy()


class Model:
    """Global weights in both checkpoint forms, plus the weights the reference must see."""

    def __init__(self, e=E, h=H, i=I, seed=0):
        self.e, self.h, self.i = e, h, i
        w = moe.make_moe_weights(e, h, i, seed=seed)
        self.bf16 = (w.w_up, w.w_down)
        (qu, su), (qd, sd) = quant.per_block_quant(w.w_up), quant.per_block_quant(w.w_down)
        self.fp8 = (qu, qd, su, sd)
        self.fp8_dequant = (quant.dequant_per_block(qu, su), quant.dequant_per_block(qd, sd))

    def ref_weights(self, ckpt):
        return self.bf16 if ckpt == "bf16" else self.fp8_dequant

    def layer(self, ckpt, k=K_TOP, ep_size=1, ep_rank=0, **kw):
        layer = FusedMoE(self.e, k, self.h, self.i, BlockWiseFP8Config(is_checkpoint_bf16=ckpt == "bf16"),
                         ep_size=ep_size, ep_rank=ep_rank, **kw)
        layer.load_global_weights(*(self.bf16 if ckpt == "bf16" else self.fp8))
        return layer


@pytest.fixture(scope="module")
def model():
    return Model()


def inputs(t=T, seed=100, h=H, e=E, k=K_TOP):
    return moe.make_moe_inputs(t, h, e, k, seed=seed)


def is_paddle_provider():
    return ops.get_provider().name == "paddle"


def split(t, parts):
    n = int(t.shape[0])
    bounds = [n * r // parts for r in range(parts + 1)]
    return [t[bounds[r]:bounds[r + 1]] for r in range(parts)]


def run_ep(model, ckpt, x, tw, ti, num_ranks, phase, max_tokens_per_rank=None, **kw):
    xs, tws, tis = split(x, num_ranks), split(tw, num_ranks), split(ti, num_ranks)
    mtpr = max_tokens_per_rank or max(1, max(int(t.shape[0]) for t in xs))
    group = InProcessEPGroup(num_ranks, model.e, timeout_s=30)
    layers = [model.layer(ckpt, k=int(tw.shape[1]), ep_size=num_ranks, ep_rank=r, moe_phase=phase,
                          max_tokens_per_rank=mtpr, num_max_dispatch_tokens_per_rank=mtpr, **kw)
              for r in range(num_ranks)]
    outs = group.run(lambda r: layers[r](xs[r], topk=(tws[r], tis[r]), runner=group.runner(r)))
    return outs, layers, (xs, tws, tis)


# ---------------------------------------------------------------------- all paths vs reference and oracle

@pytest.mark.parametrize("ckpt", ["bf16", "fp8"])
def test_tp_path_vs_reference_and_oracle(model, ckpt):
    x, tw, ti = inputs()
    layer = model.layer(ckpt)
    out = layer(x, topk=(tw, ti))
    assert out.dtype == paddle.bfloat16 and list(out.shape) == [T, H]
    assert layer.quant_method.last_path == "tp"
    assert layer.quant_method.last_provider_name == ops.get_provider().name
    ref = moe.moe_forward_fp8(x, *model.ref_weights(ckpt), tw, ti, use_ue8m0=True)
    diff = calc_diff(out, ref)
    print(f"tp {ckpt}: calc_diff vs reference {diff:.2e}, max_abs {max_abs_diff(out, ref):.2e}")
    assert diff < REF_BOUND
    if is_paddle_provider():
        assert max_abs_diff(out, ref) == 0.0
    oracle = moe.moe_forward_oracle(x, *model.ref_weights(ckpt), tw, ti, dtype=paddle.float64)
    d_oracle = calc_diff(out, oracle)
    print(f"tp {ckpt}: calc_diff vs oracle {d_oracle:.2e}")
    assert FP8_LOWER_BOUND < d_oracle < ORACLE_BOUNDS[ckpt]


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
@pytest.mark.parametrize("ckpt", ["bf16", "fp8"])
def test_ht_path_vs_reference(model, ckpt, num_ranks):
    x, tw, ti = inputs()
    outs, layers, (xs, tws, tis) = run_ep(model, ckpt, x, tw, ti, num_ranks, "prefill")
    assert all(lay.quant_method.last_path == "ht" for lay in layers)
    m, w = layers[0].ht_rows_per_expert(), layers[0].num_worst_tokens
    ref_ep = moe.moe_forward_ep(xs, *model.ref_weights(ckpt), tws, tis, use_ue8m0=True, num_worst_tokens=w,
                                max_token_num=m)
    out = paddle.concat(outs)
    diff_ep = calc_diff(out, paddle.concat(ref_ep))
    assert diff_ep < REF_BOUND
    if is_paddle_provider():
        for r in range(num_ranks):
            assert max_abs_diff(outs[r], ref_ep[r]) == 0.0
    single = moe.moe_forward_fp8(x, *model.ref_weights(ckpt), tw, ti, use_ue8m0=True)
    diff = calc_diff(out, single)
    print(f"ht R={num_ranks} {ckpt}: calc_diff vs moe_forward_ep {diff_ep:.2e}, vs single-rank {diff:.2e}")
    assert diff < (REF_BOUND if num_ranks == 1 else EP_BOUND)
    oracle = moe.moe_forward_oracle(x, *model.ref_weights(ckpt), tw, ti, dtype=paddle.float64)
    assert FP8_LOWER_BOUND < calc_diff(out, oracle) < ORACLE_BOUNDS[ckpt]


@pytest.mark.parametrize("num_ranks", [1, 2, 4])
@pytest.mark.parametrize("ckpt", ["bf16", "fp8"])
def test_ll_path_vs_reference(model, ckpt, num_ranks):
    """ll sums a token's K_top expert outputs in float32, k ascending, one rounding (as §8 does), and
    each expert sees the same rows: the single-rank reference is the exact target for any R."""
    x, tw, ti = inputs(t=48, seed=101)
    outs, layers, _ = run_ep(model, ckpt, x, tw, ti, num_ranks, "decode")
    assert all(lay.quant_method.last_path == "ll" for lay in layers)
    out = paddle.concat(outs)
    single = moe.moe_forward_fp8(x, *model.ref_weights(ckpt), tw, ti, use_ue8m0=True)
    diff = calc_diff(out, single)
    print(f"ll R={num_ranks} {ckpt}: calc_diff vs reference {diff:.2e}")
    assert diff < REF_BOUND
    if is_paddle_provider():
        assert max_abs_diff(out, single) == 0.0


def test_forward_with_gate_logits_equals_given_topk(model):
    rng = np.random.default_rng(3)
    x = paddle.to_tensor(rng.normal(size=(20, H)).astype(np.float32)).astype(paddle.bfloat16)
    logits = paddle.to_tensor(rng.normal(size=(20, E)).astype(np.float32))
    layer = model.layer("bf16")
    np.testing.assert_array_equal(f32(layer(x, logits)), f32(layer(x, topk=layer.route(logits))))
    ht = model.layer("bf16", max_tokens_per_rank=20)
    np.testing.assert_array_equal(f32(ht(x, logits, runner=SingleRankEPRunner(E))), f32(layer(x, logits)))


# ---------------------------------------------------------------------- edge cases

def test_zero_tokens(model):
    layer = model.layer("bf16")
    empty = paddle.zeros([0, H], dtype=paddle.bfloat16)
    none = (paddle.zeros([0, K_TOP]), paddle.zeros([0, K_TOP], dtype=paddle.int64))
    out = layer(empty, topk=none)
    assert list(out.shape) == [0, H] and out.dtype == paddle.bfloat16
    x, tw, ti = inputs(t=6, seed=102)
    for phase in ("prefill", "decode"):       # rank 1 has no tokens, but still takes part in the collectives
        xs, tws, tis = [x, empty], [tw, none[0]], [ti, none[1]]
        group = InProcessEPGroup(2, E, timeout_s=30)
        layers = [model.layer("bf16", ep_size=2, ep_rank=r, moe_phase=phase, max_tokens_per_rank=6,
                              num_max_dispatch_tokens_per_rank=6) for r in range(2)]
        outs = group.run(lambda r: layers[r](xs[r], topk=(tws[r], tis[r]), runner=group.runner(r)))
        assert list(outs[1].shape) == [0, H]
        ref = moe.moe_forward_fp8(x, *model.bf16, tw, ti, use_ue8m0=True)
        assert calc_diff(outs[0], ref) < EP_BOUND


def test_expert_without_tokens_and_all_tokens_on_one_expert(model, monkeypatch):
    """masked_m holds a 0 (expert 7 never chosen) and masked_m == M (every token on expert 0)."""
    counts_seen = []
    real = ops.get_provider()

    class Spy:
        name = real.name

        def __getattr__(self, op):
            fn = getattr(real, op)

            def call(*args, **options):
                if op == "group_gemm_masked":
                    counts_seen.append((args[4].reshape([-1]).tolist(), args[7]))
                return fn(*args, **options)
            return call

    monkeypatch.setattr(ops, "get_provider", lambda name=None: Spy())
    x, tw, _ = inputs(t=16, seed=103)
    ids = np.array([[0] + list(np.random.default_rng(t).permutation(np.arange(1, 7))[:K_TOP - 1])
                    for t in range(16)], dtype=np.int64)
    ti = paddle.to_tensor(ids)
    out = model.layer("bf16")(x, topk=(tw, ti))
    counts, m = counts_seen[-1]
    assert counts[7] == 0 and counts[0] == m == 16
    assert calc_diff(out, moe.moe_forward_fp8(x, *model.bf16, tw, ti, use_ue8m0=True)) < REF_BOUND
    # ht, 2 ranks, every rank full: expert 0 of rank 0 receives R·max_tokens_per_rank = M rows
    counts_seen.clear()
    outs, layers, _ = run_ep(model, "bf16", x, tw, ti, 2, "prefill", max_tokens_per_rank=8)
    m = layers[0].ht_rows_per_expert()
    assert m == 16 and [c for c, mm in counts_seen if c[0] == m]
    assert calc_diff(paddle.concat(outs), moe.moe_forward_fp8(x, *model.bf16, tw, ti, use_ue8m0=True)) < EP_BOUND


@pytest.mark.parametrize("h, i", [(320, 192), (200, 72)])
def test_sizes_not_multiples_of_512(h, i):
    """H, I not multiples of 512 (one packed word holds 4 groups) nor, in the second case, of 128:
    ragged blocks, padded CUTLASS rows (2I = 144), K not a multiple of the 32-wide scale either."""
    small = Model(e=4, h=h, i=i, seed=5)
    x, tw, ti = moe.make_moe_inputs(20, h, 4, 2, seed=104)
    for ckpt in ("bf16", "fp8"):
        ref = moe.moe_forward_fp8(x, *small.ref_weights(ckpt), tw, ti, use_ue8m0=True)
        out = small.layer(ckpt, k=2)(x, topk=(tw, ti))
        assert calc_diff(out, ref) < REF_BOUND
        for phase in ("prefill", "decode"):
            outs, _, _ = run_ep(small, ckpt, x, tw, ti, 2, phase)
            assert calc_diff(paddle.concat(outs), ref) < EP_BOUND


def test_tokens_routed_nowhere_are_zero(model):
    x, tw, ti = inputs(t=8, seed=105)
    ti[2] = -1
    ti[5, 1:] = -1
    out = model.layer("bf16")(x, topk=(tw, ti))
    assert not f32(out)[2].any()
    assert calc_diff(out, moe.moe_forward_fp8(x, *model.bf16, tw, ti, use_ue8m0=True)) < REF_BOUND


def test_unwritten_buffer_rows_never_leak(model, monkeypatch):
    """The GEMM outputs come from paddle.empty (no zero fill): poison them with NaN; the result is unchanged."""
    x, tw, ti = inputs(t=24, seed=106)
    clean = model.layer("bf16")(x, topk=(tw, ti))
    real_empty = paddle.empty
    calls = []

    def poisoned(shape, dtype=None, name=None):
        calls.append(list(shape))
        return paddle.full(shape, float("nan"), dtype=dtype or paddle.float32)

    monkeypatch.setattr(paddle, "empty", poisoned)
    out = model.layer("bf16")(x, topk=(tw, ti))
    monkeypatch.setattr(paddle, "empty", real_empty)
    assert [E * 24, 2 * I] in calls and [E * 24, H] in calls
    np.testing.assert_array_equal(f32(out), f32(clean))


def test_op_sequence_per_path(model, monkeypatch):
    real = ops.get_provider()
    log = []

    class Spy:
        name = real.name

        def __getattr__(self, op):
            if op in ops.OP_NAMES:                 # the ops, not `module` (read by ops.ops_generation)
                log.append(op)
            return getattr(real, op)

    monkeypatch.setattr(ops, "get_provider", lambda name=None: Spy())
    # the portable providers run develop's chain (#7374): the fused Blackwell permute and SwiGLU hand the GEMMs
    # their CUTLASS bytes; #7053's chain is tested with the strict fakes (tests/test_upstream_method.py)
    experts = ["group_gemm_masked", "fused_mask_swiglu_fp8_quant_blackwell", "group_gemm_masked"]
    permute = ["per_token_quant", "prefill_permute_to_blackwell_masked_gemm"]
    x, tw, ti = inputs(t=8, seed=107)
    layer = model.layer("bf16")
    assert log == ["unpack_and_convert_scale"] * 2          # load time: the two weights' CUTLASS bytes
    log.clear()
    layer(x, topk=(tw, ti))
    assert log == permute + experts + ["depermute_prefill_combine"]
    for phase, expected in (("prefill", permute + experts + ["depermute_prefill_combine"]),
                            # ll: the runner quantizes, DeepEP-style MN-major words are converted
                            ("decode", ["per_token_quant", "unpack_and_convert_scale"] + experts)):
        layer = model.layer("bf16", moe_phase=phase, max_tokens_per_rank=8, num_max_dispatch_tokens_per_rank=8)
        log.clear()
        layer(x, topk=(tw, ti), runner=SingleRankEPRunner(E))
        assert log == expected


# ---------------------------------------------------------------------- weights

@pytest.mark.parametrize("ckpt", ["bf16", "fp8"])
def test_weight_formats_after_loading(model, ckpt):
    layer = model.layer(ckpt)
    provider = ops.get_provider()
    ref_w = model.ref_weights(ckpt)
    for name, w, (n, k) in (("up_gate_proj", ref_w[0], (2 * I, H)), ("down_proj", ref_w[1], (H, I))):
        q_ref, s_ref = quant.per_block_quant(w, use_ue8m0=True)
        q, s = getattr(layer, f"{name}_weight"), getattr(layer, f"{name}_weight_scale_fp32")
        packed, bw = getattr(layer, f"{name}_weight_scale_ue8m0"), getattr(layer, f"{name}_weight_scale_inv")
        for attr in (q, s, packed, bw):
            assert attr is not None
        assert q.dtype == paddle.float8_e4m3fn and list(q.shape) == [E, n, k]
        np.testing.assert_array_equal(q.view(paddle.uint8).numpy(), q_ref.view(paddle.uint8).numpy())
        assert s.dtype == paddle.float32 and list(s.shape) == [E, -(-n // 128), -(-k // 128)]
        np.testing.assert_array_equal(s.numpy(), s_ref.numpy())
        rows = quant.expand_block_scale_to_rows(s_ref, n)
        np.testing.assert_array_equal(packed.numpy(), ref_fp8.pack_ue8m0(ref_fp8.ue8m0_encode(rows)).numpy())
        assert bw.dtype == paddle.uint8 and list(bw.shape) == [E, -(-n // 128) * 128, 16 * -(-k // 512)]
        np.testing.assert_array_equal(bw.numpy(), provider.unpack_and_convert_scale(packed, None).numpy())
        back = provider.cutlass_scale_to_fp32(bw, n)[:, :, : -(-k // 128)]
        np.testing.assert_array_equal(back.numpy(), rows.numpy())


def test_fp8_checkpoint_with_power_of_two_scales_keeps_values():
    """Requantizing a checkpoint whose scales are already UE8M0 changes no weight value (q · s)."""
    w = moe.make_moe_weights(2, 256, 128, seed=7)
    (qu, su), (qd, sd) = (quant.per_block_quant(t, use_ue8m0=True) for t in (w.w_up, w.w_down))
    layer = FusedMoE(2, 1, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=False))
    layer.load_weights(qu, qd, su, sd)
    for q, s, got_q, got_s in ((qu, su, layer.up_gate_proj_weight, layer.up_gate_proj_weight_scale_fp32),
                               (qd, sd, layer.down_proj_weight, layer.down_proj_weight_scale_fp32)):
        np.testing.assert_array_equal(quant.dequant_per_block(got_q, got_s).numpy(),
                                      quant.dequant_per_block(q, s).numpy())


def test_weight_processing_errors(model):
    layer = FusedMoE(2, 1, 128, 128, BlockWiseFP8Config(is_checkpoint_bf16=True))
    x = paddle.zeros([1, 128], dtype=paddle.bfloat16)
    with pytest.raises(RuntimeError, match="process_weights_after_loading"):
        layer(x, topk=(paddle.ones([1, 1]), paddle.zeros([1, 1], dtype=paddle.int64)))
    up = paddle.zeros([2, 256, 128], dtype=paddle.bfloat16)
    down = paddle.zeros([2, 128, 128], dtype=paddle.bfloat16)
    bad = up.astype(paddle.float32).numpy()
    bad[1, 3, 4] = np.inf
    with pytest.raises(ValueError, match=r"up_gate_proj_weight: expert 1: w: non-finite value at index \(3, 4\)"):
        layer.load_weights(paddle.to_tensor(bad).astype(paddle.bfloat16), down)
    layer = FusedMoE(2, 1, 128, 128, BlockWiseFP8Config(is_checkpoint_bf16=True))
    layer.load_weights(up, down)                      # all-zero weights: amax floor, no NaN
    assert np.isfinite(layer.up_gate_proj_weight_scale_fp32.numpy()).all()
    # upstream calls the hook once per loaded weight and once more at the end: a call with nothing new to convert
    # changes nothing (before issue 16 a second call raised "already called")
    before = {a: getattr(layer, a).view(paddle.uint8).numpy().copy() for a in ("up_gate_proj_weight", "down_proj_weight")}
    layer.quant_method.process_weights_after_loading(layer)
    for a, value in before.items():
        np.testing.assert_array_equal(getattr(layer, a).view(paddle.uint8).numpy(), value)
    fp8 = FusedMoE(2, 1, 128, 128, BlockWiseFP8Config(is_checkpoint_bf16=False))
    scale = paddle.ones([2, 2, 1])
    scale[1, 0, 0] = 0.0
    with pytest.raises(ValueError, match=r"up_gate_proj_weight_scale: expected finite scales > 0, got 0.0 at index \(1, 0, 0\)"):
        fp8.load_weights(up.astype(paddle.float8_e4m3fn), down.astype(paddle.float8_e4m3fn), scale,
                         paddle.ones([2, 1, 1]))


# ---------------------------------------------------------------------- failed loads change nothing (issue 15 item 2)

WEIGHT_ATTRS = [f"{w}_weight{suffix}" for w in ("up_gate_proj", "down_proj")
                for suffix in ("", "_scale_fp32", "_scale_ue8m0", "_scale_inv")]


def _small_checkpoints(seed):
    """A 4-expert H = 256, I = 128 model in both checkpoint forms: bf16 (up, down) and fp8 (qu, qd, su, sd)."""
    w = moe.make_moe_weights(4, 256, 128, seed=seed)
    (qu, su), (qd, sd) = quant.per_block_quant(w.w_up), quant.per_block_quant(w.w_down)
    return {"bf16": [w.w_up, w.w_down], "fp8": [qu, qd, su, sd]}


def _weight_bytes(layer):
    return {a: getattr(layer, a).view(paddle.uint8).numpy().copy() if getattr(layer, a).dtype == paddle.float8_e4m3fn
            else getattr(layer, a).numpy().copy() for a in WEIGHT_ATTRS}


def _bad_load(kind, ckpt, tensors):
    """A checkpoint `kind` of wrong that load_weights must refuse; tensors: a valid checkpoint. The
    wrong value sits in down_proj, so that up_gate_proj would be copied and converted first."""
    t = list(tensors)
    if kind == "wrong shape":                       # the last tensor: every other one would be copied first
        t[-1] = t[-1][:, :1]
    elif kind == "wrong dtype":
        t[1] = t[1].astype(paddle.float32)
    elif kind == "non-finite weight" and ckpt == "fp8":
        raw = t[1].view(paddle.uint8).numpy().copy()
        raw[1, 0, 0] = 0x7F                         # an e4m3 NaN byte
        t[1] = paddle.to_tensor(raw).view(paddle.float8_e4m3fn)
    elif kind in ("non-finite weight", "non-finite scale", "overflowing scale"):
        j = 1 if kind == "non-finite weight" else 3
        bad = t[j].astype(paddle.float32).numpy()
        bad[1, 0, 0] = {"non-finite weight": np.nan, "non-finite scale": np.inf, "overflowing scale": 1e37}[kind]
        t[j] = paddle.to_tensor(bad).astype(t[j].dtype)
    return t


BAD_LOADS = {"bf16": ["another checkpoint", "the same checkpoint", "wrong shape", "wrong dtype",
                      "non-finite weight"],
             "fp8": ["another checkpoint", "the same checkpoint", "wrong shape", "wrong dtype", "non-finite weight",
                     "non-finite scale", "overflowing scale"]}


@pytest.mark.parametrize("ckpt, kind", [(c, k) for c, kinds in BAD_LOADS.items() for k in kinds])
def test_failed_second_load_changes_nothing(ckpt, kind):
    """A loaded layer refuses any second load before copying anything: every weight attribute and the
    forward output stay bit-identical (today's main copied FP8 weights and FP32 scales in first)."""
    first, other = _small_checkpoints(0)[ckpt], _small_checkpoints(1)[ckpt]
    layer = FusedMoE(4, 2, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=ckpt == "bf16"))
    layer.load_weights(*first)
    x, tw, ti = inputs(t=16, seed=5, h=256, e=4, k=2)
    out, weights = layer(x, topk=(tw, ti)).numpy(), _weight_bytes(layer)
    tensors = first if kind == "the same checkpoint" else other if kind == "another checkpoint" \
        else _bad_load(kind, ckpt, other)
    with pytest.raises(RuntimeError, match="load_weights: already called for this layer"):
        layer.load_weights(*tensors)
    after = _weight_bytes(layer)
    for a in WEIGHT_ATTRS:
        np.testing.assert_array_equal(after[a], weights[a], err_msg=a)
    np.testing.assert_array_equal(layer(x, topk=(tw, ti)).numpy(), out)


@pytest.mark.parametrize("ckpt, kind", [(c, k) for c, kinds in BAD_LOADS.items() for k in kinds
                                         if k not in ("another checkpoint", "the same checkpoint", "wrong dtype")])
def test_failed_first_load_leaves_the_layer_loadable(ckpt, kind):
    """A first load that fails (here in down_proj, after up_gate_proj converted fine) replaces no
    attribute: the layer stays unprocessed with its checkpoint dtypes, and a good load afterwards
    computes bit for bit what a fresh layer computes (main left up_gate_proj converted to FP8, so a
    BF16 retry was refused)."""
    good = _small_checkpoints(0)[ckpt]
    config = BlockWiseFP8Config(is_checkpoint_bf16=ckpt == "bf16")
    layer, fresh = FusedMoE(4, 2, 256, 128, config), FusedMoE(4, 2, 256, 128, config)
    with pytest.raises(ValueError, match="down_proj_weight" if kind != "wrong shape" else "expected shape"):
        layer.load_weights(*_bad_load(kind, ckpt, good))
    for w in ("up_gate_proj", "down_proj"):
        assert getattr(layer, f"{w}_weight").dtype == (paddle.bfloat16 if ckpt == "bf16" else paddle.float8_e4m3fn)
        assert not hasattr(layer, f"{w}_weight_scale_fp32")        # nothing converted
    x, tw, ti = inputs(t=16, seed=5, h=256, e=4, k=2)
    with pytest.raises(RuntimeError, match="process_weights_after_loading"):
        layer(x, topk=(tw, ti))
    layer.load_weights(*good)
    fresh.load_weights(*good)
    np.testing.assert_array_equal(layer(x, topk=(tw, ti)).numpy(), fresh(x, topk=(tw, ti)).numpy())


@pytest.mark.parametrize("w, at, value", [("up_gate_proj", (1, 0, 1), 1e37), ("down_proj", (3, 1, 0), 3e36),
                                          ("down_proj", (0, 0, 0), 3.4e38)])
def test_overflowing_checkpoint_scale_is_named(w, at, value):
    """A finite FP8 checkpoint scale whose q · s overflows float32 is reported as that scale (tensor,
    expert, block, value, product), not as a non-finite weight (issue 15 item 9)."""
    qu, qd, su, sd = _small_checkpoints(0)["fp8"]
    scales = {"up_gate_proj": su.numpy(), "down_proj": sd.numpy()}
    scales[w][at] = value
    q = (qu if w == "up_gate_proj" else qd)[at[0], at[1] * 128: at[1] * 128 + 128, at[2] * 128: at[2] * 128 + 128]
    amax = float(np.abs(q.astype(paddle.float32).numpy()).max())
    assert amax * value > float(np.finfo(np.float32).max)     # the case really overflows
    layer = FusedMoE(4, 2, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=False))
    pattern = (rf"{w}_weight_scale: expert {at[0]}: scale\[{at[1]}, {at[2]}\] = {re.escape(f'{value:g}')} "
               rf"times the FP8 weight \S+ at \(\d+, \d+\) is \S+: q · s overflows float32 and bf16")
    with pytest.raises(ValueError, match=pattern):
        layer.load_weights(qu, qd, paddle.to_tensor(scales["up_gate_proj"]), paddle.to_tensor(scales["down_proj"]))


def test_huge_scale_on_a_zero_block_is_accepted():
    """The overflow check is on q · s, not on the scale: 1e37 times an all-zero block is 0."""
    qu, qd, su, sd = _small_checkpoints(0)["fp8"]
    qd_np = qd.view(paddle.uint8).numpy().copy()
    qd_np[2, :128, :128] = 0
    sd_np = sd.numpy()
    sd_np[2, 0, 0] = 1e37
    layer = FusedMoE(4, 2, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=False))
    layer.load_weights(qu, paddle.to_tensor(qd_np).view(paddle.float8_e4m3fn), su, paddle.to_tensor(sd_np))
    assert not layer.down_proj_weight[2, :128, :128].view(paddle.uint8).numpy().any()


# ---------------------------------------------------------------------- argument checks and sizing

def test_apply_argument_checks(model):
    x, tw, ti = inputs(t=4, seed=108)
    layer = model.layer("bf16")
    with pytest.raises(TypeError, match="x: expected dtype"):
        layer(x.astype(paddle.float32), topk=(tw, ti))
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(x[:, :128], topk=(tw, ti))
    with pytest.raises(ValueError, match=r"topk_ids: expected shape\[1\] == K_top"):
        layer(x, topk=(tw[:, :2], ti[:, :2]))
    with pytest.raises(ValueError, match="topk_weights: expected shape"):
        layer(x, topk=(tw[:, :2], ti))
    with pytest.raises(ValueError, match=r"topk_ids: expected global expert ids in \[-1, num_experts = 8\)"):
        layer(x, topk=(tw, ti + 8))
    with pytest.raises(ValueError, match="gate_out"):
        layer(x, paddle.zeros([3, E]))
    with pytest.raises(TypeError, match="routing"):
        layer.quant_method.apply(layer, x, (tw,))
    ep_layer = model.layer("bf16", ep_size=2, ep_rank=1, max_tokens_per_rank=2)
    with pytest.raises(ValueError, match="runner: ep_size = 2 needs an EP runner"):
        ep_layer(x, topk=(tw, ti))
    with pytest.raises(ValueError, match="runner: ep_rank = 0 does not match the layer's ep_rank = 1"):
        ep_layer(x, topk=(tw, ti), runner=InProcessEPGroup(2, E).runner(0))
    ht = model.layer("bf16", max_tokens_per_rank=2)
    with pytest.raises(ValueError, match="x: 4 tokens on rank 0, more than max_tokens_per_rank = 2"):
        ht(x, topk=(tw, ti), runner=SingleRankEPRunner(E))


def test_upstream_path_names(model):
    x, tw, ti = inputs(t=4, seed=109)
    prefill = model.layer("bf16", max_tokens_per_rank=4)
    decode = model.layer("bf16", moe_phase="decode", num_max_dispatch_tokens_per_rank=4)
    method = prefill.quant_method
    base = f32(method.apply_tp(prefill, x, (tw, ti)))
    np.testing.assert_array_equal(f32(method.apply_ep_prefill(prefill, x, (tw, ti), runner=SingleRankEPRunner(E))),
                                  base)
    np.testing.assert_array_equal(
        f32(decode.quant_method.apply_ep_decode(decode, x, (tw, ti), runner=SingleRankEPRunner(E))), base)
    with pytest.raises(ValueError, match="apply_ep_prefill needs 'prefill'"):
        method.apply_ep_prefill(decode, x, (tw, ti), runner=SingleRankEPRunner(E))
    with pytest.raises(ValueError, match="apply_ep_decode needs 'decode'"):
        method.apply_ep_decode(prefill, x, (tw, ti), runner=SingleRankEPRunner(E))


def test_forward_buffer_bytes_of_the_layer():
    """The method's wrapper of backend.moe.memory.forward_buffer_bytes (tests/test_memory.py) picks M per path."""
    layer = FusedMoE(16, 8, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=True), ep_size=2,
                     max_tokens_per_rank=1024, num_max_dispatch_tokens_per_rank=128)
    method = layer.quant_method
    assert method.forward_buffer_bytes(layer)["ours"]["permute_x [E, M, H] fp8"] == 8 * 2048 * 256
    layer.moe_phase = "decode"
    assert method.forward_buffer_bytes(layer)["ours"]["permute_x [E, M, H] fp8"] == 8 * 256 * 256
    tp = FusedMoE(16, 8, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=True))
    assert tp.quant_method.forward_buffer_bytes(tp, num_tokens=10)["ours"]["act [E, M, I] fp8"] == 16 * 10 * 128


def test_method_module_is_light():
    assert isinstance(bm.BlackwellGemmFusedMoeMethod(BlockWiseFP8Config()).checkpoint_tensor_names, tuple)
    assert BlackwellGemmFusedMoeMethod(BlockWiseFP8Config()).last_provider_name is None


@pytest.mark.parametrize("path", ["tp", "ht", "ll"])
def test_repeated_expert_in_a_token_is_rejected_on_every_path(model, path):
    # issue 15 item 7: the same error on the ht, ll and tp paths, whatever the other tokens hold
    x, tw, ti = inputs(t=8, seed=7)
    ids = ti.numpy().copy()
    ids[5, 3] = ids[5, 1]
    ti = paddle.to_tensor(ids)
    want = rf"topk_ids: token 5 repeats expert {int(ids[5, 1])} at top-k positions \[1, 3\]"
    if path == "tp":
        with pytest.raises(ValueError, match=want):
            model.layer("bf16")(x, topk=(tw, ti))
        return
    # 2 ranks take 4 tokens each: global token 5 is token 1 of rank 1, and the error names the rank
    with pytest.raises(ValueError, match="rank 1: " + want.replace("token 5", "token 1")):
        run_ep(model, "bf16", x, tw, ti, 2, "prefill" if path == "ht" else "decode")


def test_gemm1_overflow_names_the_intermediate_not_x(gemm1_overflow_case):
    """x is finite, its GEMM 1 output is not: the layer raises naming GEMM 1's output (not x, and no silent
    6.6e-37 or -3.2e37 output as before), and moe_ref names gemm1_out."""
    x, w_up, w_down, tw, ti = gemm1_overflow_case
    assert bool(paddle.isfinite(x.astype(paddle.float32)).all())
    layer = FusedMoE(2, 1, 256, 128, BlockWiseFP8Config(is_checkpoint_bf16=True))
    layer.load_weights(w_up.astype(paddle.bfloat16), w_down.astype(paddle.bfloat16))
    with pytest.raises(ValueError, match=r"^GEMM 1 output \(up = x · up_gate_proj_weightᵀ, \[E, M, 2I\]\): "
                                         r"up: non-finite value -?inf at index \(0, \d+, \d+\), a valid row"):
        layer(x, topk=(tw, ti))
    with pytest.raises(ValueError, match=r"^gemm1_out: non-finite value -?inf at index"):
        moe.moe_forward_fp8(x, w_up, w_down, tw, ti, use_ue8m0=True)


def test_weight_scales_prepared_once_at_load_and_passed_to_each_gemm(model, monkeypatch):
    """OpsProvider.prepare_weight_scales (the deep_gemm provider's own weight-scale layout) runs once per weight at load;
    each GEMM gets its weight's object as sfb_prepared, and only from the provider that made it."""
    real = ops.get_provider()
    made, seen = [], []

    class Spy:
        name = real.name

        def prepare_weight_scales(self, b, sfb, *, sfb_per_block=False):
            made.append((list(b.shape), list(sfb.shape), sfb_per_block))
            return ("prepared", len(made) - 1)

        def __getattr__(self, op):
            fn = getattr(real, op)
            if op != "group_gemm_masked":
                return fn

            def call(*args, **options):
                seen.append(options.get("sfb_prepared"))
                return fn(*args, **dict(options, sfb_prepared=None))     # the real provider reads sfb itself
            return call

    spy = Spy()
    monkeypatch.setattr(ops, "get_provider", lambda name=None: spy)
    layer = model.layer("bf16")
    assert made == [([E, 2 * I, H], [E, 2 * I, 16], True), ([E, H, I], [E, H, 16], True)]
    x, tw, ti = inputs(t=8, seed=110)
    layer(x, topk=(tw, ti))
    assert seen == [("prepared", 0), ("prepared", 1)]
    spy.name = "another provider"                 # selected after the load: it converts the bytes itself
    seen.clear()
    layer(x, topk=(tw, ti))
    assert seen == [None, None]


def test_gemms_get_what_the_method_knows_of_bytes_and_rows(model, monkeypatch):
    """Both GEMMs are told the 1x128 activation bytes repeat per 128-K group (sfa_per_group), the weight bytes are
    block-uniform (sfb_per_block) and about ceil(T·K_top / E) rows per expert (expected_m, clipped to [1, M]): tp
    and ht on one rank, T = 8 and 96 tokens, top-4 of 8 experts."""
    seen = gemm_options_spy(monkeypatch)
    for t, want_rows in ((8, 4), (T, T * K_TOP // E)):
        x, tw, ti = inputs(t=t, seed=111)
        model.layer("bf16")(x, topk=(tw, ti))
        model.layer("bf16", max_tokens_per_rank=T)(x, topk=(tw, ti), runner=SingleRankEPRunner(E))
        assert [(o["sfa_per_group"], o["sfb_per_block"], o["expected_m"]) for o in seen] == \
            [(True, True, want_rows)] * 4
        seen.clear()
    assert bm.expected_rows_per_expert(0, E, 16) == 1              # at least one row: DeepGEMM needs > 0
    assert bm.expected_rows_per_expert(10 * 16 * E, E, 16) == 16   # never above M
    assert bm.expected_rows_per_expert(33, E, 16) == 5             # ceil
