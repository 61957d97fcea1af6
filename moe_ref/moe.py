"""The whole MoE layer (SPEC §11): float oracle, the FP8 path step by step, and the EP version.

    out[t] = Σ_k w[t, k] · Down_e( SwiGLU( Up_e(x_t) ) ),   e = topk_ids[t, k]

Weights are "NT" (SPEC §0): w_up [E, 2I, H] (rows 0..I-1 the gate half, I..2I-1 the up half),
w_down [E, H, I]; a GEMM computes a @ b.T.

The FP8 path (moe_forward_fp8) uses only reference ops: per_token_group_quant (§3) ->
prefill_permute_to_masked_gemm or permute_to_contiguous (§5) -> GEMM 1 on block-dequantized
operands, float32 accumulation, bf16 out (§6) -> SwiGLU in float32, bf16, requantized per 1x128
with amax floor 1e-10 (§7) -> GEMM 2 (§6) -> weighted depermute/combine (§8). Each GEMM runs on
an expert's valid rows only, so the work scales with T·K_top, not with E·M.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ._paddle import paddle
from .checks import (FLOAT_DTYPES, INT_DTYPES, check_dim, check_distinct_experts, check_finite, check_ids_in_range, check_positive_int,
                     check_same_shape, check_tensor)
from .ep import ep_combine, ep_dispatch
from .constants import RECIPE_GROUP_SIZES, num_scale_groups
from .fp8 import concat_rows, pack_scale_ue8m0, to_mn_major_tma_aligned, unpack_scale_ue8m0  # noqa: F401  (re-exported)
from .layout import (CONTIGUOUS_SEGMENT_ALIGN, ContiguousLayout, MaskedLayout, depermute_contiguous_combine,
                     depermute_prefill_combine, permute_to_contiguous, prefill_permute_to_masked_gemm)
from .quant import (DEEPGEMM_AMAX_FLOOR, FASTDEPLOY_AMAX_FLOOR, GROUP_SIZE, dequant_per_block,
                    dequant_per_token_group, per_block_quant, per_token_group_quant)
from .routing import softmax_topk

SWIGLU_AMAX_FLOOR = FASTDEPLOY_AMAX_FLOOR   # SPEC §7: the fused SwiGLU quant floors amax at 1e-10
LAYOUTS = ("masked", "contiguous")


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MoEWeights:
    """Unquantized expert weights. w_up [E, 2I, H] (gate rows first), w_down [E, H, I]; bf16 or float32."""
    w_up: paddle.Tensor
    w_down: paddle.Tensor

    def __post_init__(self):
        _check_weight_shapes(self.w_up, self.w_down)

    @property
    def num_experts(self) -> int:
        return int(self.w_up.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.w_up.shape[2])

    @property
    def intermediate_size(self) -> int:
        return int(self.w_down.shape[2])


def _check_weight_shapes(w_up, w_down, hidden_size: int | None = None) -> None:
    check_tensor(w_up, "w_up", dtypes=FLOAT_DTYPES + (paddle.float8_e4m3fn,), ndim=3)
    check_tensor(w_down, "w_down", dtypes=FLOAT_DTYPES + (paddle.float8_e4m3fn,), ndim=3)
    e, two_i, h = (int(d) for d in w_up.shape)
    if two_i % 2:
        raise ValueError(f"w_up: expected shape [E, 2I, H] with an even 2I, got {list(w_up.shape)}")
    if hidden_size is not None:
        check_dim(w_up, 2, hidden_size, "w_up", "H (columns of x)")
    if list(w_down.shape) != [e, h, two_i // 2]:
        raise ValueError(f"w_down: expected shape [E, H, I] = {[e, h, two_i // 2]} to match w_up "
                         f"{list(w_up.shape)}, got {list(w_down.shape)}")


def _random_with_outliers(rng: np.random.Generator, shape, std: float, outlier_fraction: float,
                          outlier_scale: float) -> np.ndarray:
    values = rng.normal(0.0, std, size=shape).astype(np.float32)
    if outlier_fraction > 0:
        hit = rng.random(size=shape) < outlier_fraction
        values = np.where(hit, values * np.float32(outlier_scale), values)
    return values


def make_moe_weights(num_experts: int, hidden_size: int, intermediate_size: int, seed: int = 0,
                     std: float = 0.02, outlier_fraction: float = 0.0, outlier_scale: float = 50.0,
                     dtype=paddle.bfloat16) -> MoEWeights:
    """Seeded random weights: w_up [E, 2I, H], w_down [E, H, I] in `dtype`, normal(0, std).

    outlier_fraction > 0 multiplies that fraction of the entries (chosen at random) by
    outlier_scale: a heavy tail like trained checkpoints have. One outlier sets the scale of its
    whole 128x128 block, which then quantizes its small neighbours coarsely; UE8M0 rounds that
    scale up by up to 2x more, so this is where UE8M0 loses accuracy against FP32 scales.
    """
    e = check_positive_int(num_experts, "num_experts")
    h = check_positive_int(hidden_size, "hidden_size")
    i = check_positive_int(intermediate_size, "intermediate_size")
    rng = np.random.default_rng(seed)
    w_up = _random_with_outliers(rng, (e, 2 * i, h), std, outlier_fraction, outlier_scale)
    w_down = _random_with_outliers(rng, (e, h, i), std, outlier_fraction, outlier_scale)
    return MoEWeights(paddle.to_tensor(w_up).astype(dtype), paddle.to_tensor(w_down).astype(dtype))


def make_moe_inputs(num_tokens: int, hidden_size: int, num_experts: int, top_k: int, seed: int = 0,
                    std: float = 1.0, outlier_channel_fraction: float = 0.0, outlier_scale: float = 20.0,
                    dtype=paddle.bfloat16):
    """Seeded activations and softmax top-k routing.

    -> (x [T, H] `dtype`, topk_weights [T, K_top] float32, topk_ids [T, K_top] int64 in [0, num_experts)).
    x ~ normal(0, std); outlier_channel_fraction > 0 scales that fraction of the H columns by
    outlier_scale (LLM activations have a few large channels, so outliers share a column).
    """
    t = check_positive_int(num_tokens, "num_tokens")
    h = check_positive_int(hidden_size, "hidden_size")
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, std, size=(t, h)).astype(np.float32)
    if outlier_channel_fraction > 0:
        cols = rng.random(size=h) < outlier_channel_fraction
        x[:, cols] *= np.float32(outlier_scale)
    logits = paddle.to_tensor(rng.normal(0.0, 1.0, size=(t, num_experts)).astype(np.float32))
    topk_weights, topk_ids = softmax_topk(logits, top_k)
    return paddle.to_tensor(x).astype(dtype), topk_weights, topk_ids


@dataclasses.dataclass
class QuantizedMoEWeights:
    """Block-quantized weights (SPEC §3); scales are float32 (powers of two when use_ue8m0).

    group_size 128: 128x128 blocks, w_up_q [E, 2I, H] fp8, w_up_scale [E, ceil(2I/128), ceil(H/128)] float32,
    w_down_q [E, H, I] fp8, w_down_scale [E, ceil(H/128), ceil(I/128)] float32.
    group_size 32 (#7666's recipe): 1x32 groups along K, w_up_scale [E, 2I, ceil(H/32)], w_down_scale
    [E, H, ceil(I/32)]; the activations are then quantized in 1x32 groups too.
    `dequantized()` returns the float32 weights q·s, computed once and cached: weights are
    constants, and the fp8 -> float32 cast is the slowest step of the CPU reference.
    """
    w_up_q: paddle.Tensor
    w_up_scale: paddle.Tensor
    w_down_q: paddle.Tensor
    w_down_scale: paddle.Tensor
    use_ue8m0: bool
    _dequantized: tuple | None = dataclasses.field(default=None, repr=False, compare=False)
    group_size: int = GROUP_SIZE

    @property
    def weight_block(self) -> tuple[int, int]:
        """(BN, BK) of the weight scales: 128x128 blocks, or 1x32 groups for group_size 32."""
        return weight_block(self.group_size)

    @property
    def num_experts(self) -> int:
        return int(self.w_up_q.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.w_up_q.shape[2])

    @property
    def intermediate_size(self) -> int:
        return int(self.w_down_q.shape[2])

    def dequantized(self):
        """-> (w_up [E, 2I, H] float32, w_down [E, H, I] float32), block-dequantized, cached."""
        if self._dequantized is None:
            self._dequantized = (dequant_per_block(self.w_up_q, self.w_up_scale, self.weight_block),
                                 dequant_per_block(self.w_down_q, self.w_down_scale, self.weight_block))
        return self._dequantized

    def experts(self, start: int, stop: int) -> "QuantizedMoEWeights":
        """Experts start..stop-1 (one EP rank's share); shares the dequantized cache if present."""
        cached = None if self._dequantized is None else tuple(w[start:stop] for w in self._dequantized)
        return QuantizedMoEWeights(self.w_up_q[start:stop], self.w_up_scale[start:stop], self.w_down_q[start:stop],
                                   self.w_down_scale[start:stop], self.use_ue8m0, cached, self.group_size)


def weight_block(group_size: int) -> tuple[int, int]:
    """The weight scale block that goes with activation groups of `group_size` along K:
    128 -> 128x128 blocks (DeepSeek-V3 checkpoints, #7053/develop); 32 -> 1x32 groups (#7666, MXFP8-style)."""
    if group_size not in RECIPE_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {RECIPE_GROUP_SIZES}, got {group_size!r}")
    return (group_size, group_size) if group_size == GROUP_SIZE else (1, group_size)


def quantize_moe_weights(w_up: paddle.Tensor, w_down: paddle.Tensor, use_ue8m0: bool = False,
                         amax_floor: float = DEEPGEMM_AMAX_FLOOR, group_size: int = GROUP_SIZE) -> QuantizedMoEWeights:
    """w_up [E, 2I, H], w_down [E, H, I] float -> QuantizedMoEWeights (per_block_quant in `weight_block(group_size)`
    blocks: 128x128, or 1x32 for group_size 32). NaN/inf in a weight is a ValueError naming it (SPEC §1)."""
    _check_weight_shapes(w_up, w_down)
    check_finite(w_up, "w_up")
    check_finite(w_down, "w_down")
    block = weight_block(group_size)
    up_q, up_s = per_block_quant(w_up, block, use_ue8m0=use_ue8m0, amax_floor=amax_floor)
    down_q, down_s = per_block_quant(w_down, block, use_ue8m0=use_ue8m0, amax_floor=amax_floor)
    return QuantizedMoEWeights(up_q, up_s, down_q, down_s, bool(use_ue8m0), group_size=group_size)


# ---------------------------------------------------------------------------------------------
# Shared argument checks
# ---------------------------------------------------------------------------------------------

def _check_layer_args(x, topk_weights, topk_ids, num_experts: int, hidden_size: int, x_name: str = "x"):
    check_tensor(x, x_name, dtypes=FLOAT_DTYPES, ndim=2)
    check_dim(x, 1, hidden_size, x_name, "H (columns of w_up)")
    check_tensor(topk_ids, "topk_ids", dtypes=INT_DTYPES, ndim=2)
    check_tensor(topk_weights, "topk_weights", dtypes=FLOAT_DTYPES, ndim=2)
    check_dim(topk_ids, 0, int(x.shape[0]), "topk_ids", f"T (rows of {x_name})")
    check_same_shape(topk_weights, "topk_weights", topk_ids, "topk_ids")
    check_ids_in_range(topk_ids, "topk_ids", num_experts, "expert ids", f"E={num_experts}")
    check_distinct_experts(topk_ids, "topk_ids")


# ---------------------------------------------------------------------------------------------
# Oracle
# ---------------------------------------------------------------------------------------------

def swiglu(up: paddle.Tensor) -> paddle.Tensor:
    """up [..., 2I] float -> [..., I] same dtype: lin · gate / (1 + exp(-gate)), gate = up[..., :I]."""
    i = int(up.shape[-1]) // 2
    gate, lin = up[..., :i], up[..., i:]
    return lin * gate / (1.0 + paddle.exp(-gate))


def moe_forward_oracle(x: paddle.Tensor, w_up: paddle.Tensor, w_down: paddle.Tensor, topk_weights: paddle.Tensor,
                       topk_ids: paddle.Tensor, dtype=paddle.float32) -> paddle.Tensor:
    """Plain float MoE on unquantized weights (SPEC §11 oracle).

    x [T, H], w_up [E, 2I, H], w_down [E, H, I], topk_weights [T, K_top], topk_ids [T, K_top] ids in [-1, E)
    -> out [T, H] `dtype` (float32 or float64); every step in `dtype`, no intermediate rounding.
    """
    if dtype not in (paddle.float32, paddle.float64):
        raise TypeError(f"dtype: expected float32 or float64, got {dtype}")
    _check_weight_shapes(w_up, w_down)
    num_experts, _, hidden = (int(d) for d in w_up.shape)
    _check_layer_args(x, topk_weights, topk_ids, num_experts, hidden)
    check_finite(x, "x")
    xf = x.astype(dtype)
    weights = topk_weights.astype(dtype)
    ids = topk_ids.astype(paddle.int64)
    out = paddle.zeros([int(x.shape[0]), hidden], dtype=dtype)
    for e in range(num_experts):
        token_weight = paddle.where(ids == e, weights, paddle.zeros_like(weights)).sum(axis=1)   # [T]
        rows = paddle.nonzero((ids == e).any(axis=1)).flatten()
        if int(rows.shape[0]) == 0:
            continue
        up = paddle.matmul(paddle.gather(xf, rows), w_up[e].astype(dtype), transpose_y=True)
        down = paddle.matmul(swiglu(up), w_down[e].astype(dtype), transpose_y=True)
        out = paddle.index_add(out, rows, 0, down * paddle.gather(token_weight, rows).unsqueeze(1))
    return out


# ---------------------------------------------------------------------------------------------
# FP8 path
# ---------------------------------------------------------------------------------------------

def swiglu_fp8_quant_rows(up: paddle.Tensor, use_ue8m0: bool = False, name: str = "up", group_size: int = GROUP_SIZE):
    """SwiGLU + 1 x group_size requantization of rows (SPEC §7), the math of fused_mask_swiglu_fp8_quant per row.

    up [N, 2I] bf16 -> (act [N, I] fp8, act_scale [N, ceil(I/G)] float32, powers of two when use_ue8m0).
    y = bf16(lin · gate / (1 + exp(-gate))) computed in float32; amax floor 1e-10.
    Non-finite input to the quantization is an error (SPEC §1) naming what holds it: `name` (the caller's
    name for up, e.g. "gemm1_out") for a NaN / inf in up, "SwiGLU(name)" for a finite up whose y overflows.
    """
    check_finite(up, name)
    y = swiglu(up.astype(paddle.float32)).astype(paddle.bfloat16)
    check_finite(y, f"SwiGLU({name})")
    return per_token_group_quant(y, group_size, use_ue8m0=use_ue8m0, amax_floor=SWIGLU_AMAX_FLOOR)


def fused_mask_swiglu_fp8_quant_ref(up: paddle.Tensor, token_nums_per_expert: paddle.Tensor,
                                    use_ue8m0: bool = False):
    """Reference of blackwell_ops' fused_mask_swiglu_fp8_quant (SPEC §7).

    up [E, M, 2I] bf16, token_nums_per_expert [E] | [E, 1] int32
    -> (act [E, M, I] fp8, act_scale MNMajorScale): logical [E, M, ceil(I/128)] float32, or with
    use_ue8m0 packed int32 [E, M, ceil(I/512)]; physical [E, S', align(M, 4)]. Rows at or past
    token_nums_per_expert[e] are zero in act and act_scale (deterministic, SPEC §7: valid rows only).
    """
    check_tensor(up, "up", dtypes=(paddle.bfloat16,), ndim=3)
    check_tensor(token_nums_per_expert, "token_nums_per_expert", dtypes=INT_DTYPES, ndim=(1, 2))
    e, m, two_i = (int(d) for d in up.shape)
    counts = token_nums_per_expert.reshape([-1]).astype(paddle.int64)
    check_dim(counts, 0, e, "token_nums_per_expert", "E")
    if bool(((counts < 0) | (counts > m)).any()):
        raise ValueError(f"token_nums_per_expert: expected values in [0, M={m}], got {counts.tolist()}")
    valid = (paddle.arange(m, dtype=paddle.int64).unsqueeze(0) < counts.unsqueeze(1)).reshape([e * m, 1])
    # Only valid rows are read (SPEC §7): rows past the counts may hold anything, NaN included.
    rows = paddle.where(valid, up.reshape([e * m, two_i]).astype(paddle.float32), paddle.zeros([1, two_i]))
    act, scale = swiglu_fp8_quant_rows(rows, use_ue8m0)
    if use_ue8m0:
        scale = pack_scale_ue8m0(scale)
    act_bits = act.view(paddle.uint8).astype(paddle.int32)
    act_bits = paddle.where(valid, act_bits, paddle.zeros_like(act_bits))
    act = act_bits.astype(paddle.uint8).view(paddle.float8_e4m3fn)
    scale = paddle.where(valid, scale, paddle.zeros_like(scale))
    return act.reshape([e, m, two_i // 2]), to_mn_major_tma_aligned(scale.reshape([e, m, int(scale.shape[-1])]))


@dataclasses.dataclass
class MoEFP8Trace:
    """Intermediates of one moe_forward_fp8 call (for notebooks and tests).

    x_q [T, H] fp8, x_scale [T, S] float32 (powers of two when use_ue8m0), x_scale_op: what the
    permute saw ([T, S] float32 or packed int32 [T, ceil(S/4)]), layout (MaskedLayout or
    ContiguousLayout). Row buffers follow the layout, i.e. [E, M, ·] (masked) or [Mc, ·] (contiguous),
    invalid rows zero: gemm1_out [.., 2I] bf16, act [.., I] fp8, act_scale [.., ceil(I/128)] float32,
    gemm2_out [.., H] bf16. out [T, H] bf16.
    """
    x_q: paddle.Tensor
    x_scale: paddle.Tensor
    x_scale_op: paddle.Tensor
    layout: MaskedLayout | ContiguousLayout
    gemm1_out: paddle.Tensor
    act: paddle.Tensor
    act_scale: paddle.Tensor
    gemm2_out: paddle.Tensor
    out: paddle.Tensor | None = None


def _rows_to_buffer(pieces: list[tuple[int, paddle.Tensor]], starts: list[int], total_rows: int, width: int,
                    dtype) -> paddle.Tensor:
    """Place row blocks at their start rows of a zero [total_rows, width] buffer (concat, no scatter)."""
    parts, cursor = [], 0
    for start, (n, block) in zip(starts, pieces):
        if n == 0:
            continue
        if start > cursor:
            parts.append(paddle.zeros([start - cursor, width], dtype=dtype))
        parts.append(block)
        cursor = start + n
    if total_rows > cursor:
        parts.append(paddle.zeros([total_rows - cursor, width], dtype=dtype))
    if not parts:
        return paddle.zeros([total_rows, width], dtype=dtype)
    return concat_rows(parts)


def expert_ffn_fp8(a_q: paddle.Tensor, a_scale: paddle.Tensor, w_up: paddle.Tensor, w_down: paddle.Tensor,
                    use_ue8m0: bool, group_size: int = GROUP_SIZE):
    """One expert's FFN on its valid rows (SPEC §6, §7, §6 again).

    a_q [n, H] fp8, a_scale [n, S] float32 (S = ceil(H/G), G = group_size), w_up [2I, H], w_down [H, I]
    float32 (block-dequantized) -> (gemm1 [n, 2I] bf16, act [n, I] fp8, act_scale [n, ceil(I/G)] float32,
    gemm2 [n, H] bf16).
    GEMMs multiply dequantized operands in float32 and round the output to bf16, as the kernels do.
    """
    a = dequant_per_token_group(a_q, a_scale, group_size)
    gemm1 = paddle.matmul(a, w_up, transpose_y=True).astype(paddle.bfloat16)
    act, act_scale = swiglu_fp8_quant_rows(gemm1, use_ue8m0, "gemm1_out", group_size)
    gemm2 = paddle.matmul(dequant_per_token_group(act, act_scale, group_size), w_down,
                          transpose_y=True).astype(paddle.bfloat16)
    return gemm1, act, act_scale, gemm2


@dataclasses.dataclass
class _ExpertRows:
    """One permuted layout seen as flat rows: expert e's valid rows are rows[starts[e]: starts[e] + counts[e]]
    of rows_x [total, H] fp8 and rows_scale [total, S'] (row-major)."""
    layout: MaskedLayout | ContiguousLayout
    rows_x: paddle.Tensor
    rows_scale: paddle.Tensor
    counts: list[int]
    starts: list[int]
    total: int


def _permute_rows(x_q, x_scale_op, topk_ids, num_experts: int, layout: str, m: int, group_size: int) -> _ExpertRows:
    """Permute (SPEC §5) in the masked or contiguous layout, and flatten it to expert row ranges."""
    hidden = int(x_q.shape[1])
    if layout == "masked":
        lay = prefill_permute_to_masked_gemm(x_q, x_scale_op, topk_ids, num_experts, m, group_size)
        rows_scale = lay.permute_scale.physical.transpose([0, 2, 1])[:, :m, :].reshape([num_experts * m, -1])
        counts = [int(c) for c in lay.token_nums_per_expert.flatten().tolist()]
        return _ExpertRows(lay, lay.permute_x.reshape([num_experts * m, hidden]), rows_scale, counts,
                           [e * m for e in range(num_experts)], num_experts * m)
    lay = permute_to_contiguous(x_q, x_scale_op, topk_ids, num_experts, group_size)
    counts = [int(c) for c in lay.token_nums_per_expert.flatten().tolist()]
    padded = [-(-c // CONTIGUOUS_SEGMENT_ALIGN) * CONTIGUOUS_SEGMENT_ALIGN for c in counts]
    starts = [int(s) for s in np.concatenate([[0], np.cumsum(padded)[:-1]])]
    return _ExpertRows(lay, lay.permute_x, lay.permute_scale, counts, starts, int(lay.permute_x.shape[0]))


def _run_experts(rows: _ExpertRows, qw: QuantizedMoEWeights) -> list:
    """expert_ffn_fp8 on each expert's valid rows -> per expert (gemm1, act, act_scale, gemm2) or None."""
    up_f32, down_f32 = qw.dequantized()
    groups = num_scale_groups(qw.hidden_size, qw.group_size)
    results = []
    for e in range(qw.num_experts):              # one GEMM pair per expert, on its valid rows only
        n, start = rows.counts[e], rows.starts[e]
        if n == 0:
            results.append(None)
            continue
        a_scale = rows.rows_scale[start: start + n]
        if qw.use_ue8m0:
            a_scale = unpack_scale_ue8m0(a_scale, groups)
        results.append(expert_ffn_fp8(rows.rows_x[start: start + n], a_scale, up_f32[e], down_f32[e], qw.use_ue8m0,
                                      qw.group_size))
    return results


def moe_experts_fp8(x_q: paddle.Tensor, x_scale_op: paddle.Tensor, topk_weights: paddle.Tensor,
                    topk_ids: paddle.Tensor, quantized_weights: QuantizedMoEWeights, layout: str = "masked",
                    max_token_num: int | None = None, return_trace: bool = False):
    """Permute -> GEMM 1 -> SwiGLU + requant -> GEMM 2 -> weighted combine, on quantized activations.

    x_q [W, H] fp8, x_scale_op [W, S] float32 or packed UE8M0 int32 [W, ceil(S/4)] (use_ue8m0),
    topk_weights [W, K_top] float32, topk_ids [W, K_top] int64 local ids or -1
    -> out [W, H] bf16 (this rank's weighted partial, SPEC §8), or (out, MoEFP8Trace) with return_trace.
    M = max_token_num defaults to max(W, 1) (the worst case with distinct ids per token; one unused
    row when W = 0, so that T = 0 gives an empty result rather than an error about an M nobody set).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    qw = quantized_weights
    num_experts, hidden, inter = qw.num_experts, qw.hidden_size, qw.intermediate_size
    check_tensor(x_q, "x_q", dtypes=(paddle.float8_e4m3fn,), ndim=2)
    check_dim(x_q, 1, hidden, "x_q", "H (columns of w_up)")
    w_rows = int(x_q.shape[0])
    m = max(w_rows, 1) if max_token_num is None else max_token_num
    rows = _permute_rows(x_q, x_scale_op, topk_ids, num_experts, layout, m, qw.group_size)
    results = _run_experts(rows, qw)

    def buffer(j: int, width: int, dtype) -> paddle.Tensor:
        pieces = [(0, None) if r is None else (rows.counts[e], r[j]) for e, r in enumerate(results)]
        return _rows_to_buffer(pieces, rows.starts, rows.total, width, dtype)

    gemm2_out = buffer(3, hidden, paddle.bfloat16)
    lay = rows.layout
    if layout == "masked":
        out = depermute_prefill_combine(gemm2_out.reshape([num_experts, m, hidden]), lay.permuted_indice_map,
                                        topk_weights, w_rows)
    else:
        out = depermute_contiguous_combine(gemm2_out, lay.permuted_indice_map, topk_weights, w_rows)
    if not return_trace:
        return out

    shape = (lambda width: [num_experts, m, width]) if layout == "masked" else (lambda width: [rows.total, width])
    act_groups = num_scale_groups(inter, qw.group_size)
    trace = MoEFP8Trace(
        x_q=x_q, x_scale=None, x_scale_op=x_scale_op, layout=lay,
        gemm1_out=buffer(0, 2 * inter, paddle.bfloat16).reshape(shape(2 * inter)),
        act=buffer(1, inter, paddle.float8_e4m3fn).reshape(shape(inter)),
        act_scale=buffer(2, act_groups, paddle.float32).reshape(shape(act_groups)),
        gemm2_out=gemm2_out.reshape(shape(hidden)), out=out)
    return out, trace


def _resolve_quantized_weights(w_up, w_down, quantized_weights, use_ue8m0: bool, amax_floor: float,
                               group_size: int = GROUP_SIZE):
    if quantized_weights is None:
        if w_up is None or w_down is None:
            raise ValueError("w_up, w_down: required when quantized_weights is None")
        return quantize_moe_weights(w_up, w_down, use_ue8m0, amax_floor, group_size)
    qw = quantized_weights
    if not isinstance(qw, QuantizedMoEWeights):
        raise TypeError(f"quantized_weights: expected QuantizedMoEWeights, got {type(qw).__name__}")
    if qw.use_ue8m0 != bool(use_ue8m0) or qw.group_size != group_size:
        raise ValueError(f"quantized_weights: quantized with use_ue8m0={qw.use_ue8m0}, group_size={qw.group_size}, "
                         f"called with use_ue8m0={use_ue8m0}, group_size={group_size}")
    if w_up is not None or w_down is not None:
        _check_weight_shapes(w_up, w_down)
        if list(w_up.shape) != list(qw.w_up_q.shape) or list(w_down.shape) != list(qw.w_down_q.shape):
            raise ValueError(f"quantized_weights: shapes {list(qw.w_up_q.shape)}, {list(qw.w_down_q.shape)} "
                             f"differ from w_up {list(w_up.shape)}, w_down {list(w_down.shape)}")
    return qw


def quantize_activations(x: paddle.Tensor, use_ue8m0: bool = False, amax_floor: float = DEEPGEMM_AMAX_FLOOR,
                         name: str = "x", group_size: int = GROUP_SIZE):
    """x [T, H] float -> (x_q [T, H] fp8, x_scale [T, S] float32 (S = ceil(H/group_size)), x_scale_op): x_scale_op is x_scale
    (FP32 scales) or its packed UE8M0 int32 form [T, ceil(S/4)] (what the ops contract takes).
    NaN/inf in x is a ValueError naming it as `name` (SPEC §1; there is no nan_policy here)."""
    check_finite(x, name)
    x_q, x_scale = per_token_group_quant(x, group_size, use_ue8m0=use_ue8m0, amax_floor=amax_floor)
    return x_q, x_scale, (pack_scale_ue8m0(x_scale) if use_ue8m0 else x_scale)


def moe_forward_fp8(x: paddle.Tensor, w_up: paddle.Tensor | None, w_down: paddle.Tensor | None,
                    topk_weights: paddle.Tensor, topk_ids: paddle.Tensor, use_ue8m0: bool = False, *,
                    layout: str = "masked", max_token_num: int | None = None,
                    amax_floor: float = DEEPGEMM_AMAX_FLOOR, quantized_weights: QuantizedMoEWeights | None = None,
                    return_trace: bool = False, group_size: int = GROUP_SIZE):
    """The FP8 block-quantized MoE layer, step by step with the reference ops (SPEC §11).

    x [T, H] bf16 | float32, w_up [E, 2I, H], w_down [E, H, I] float (may be None when
    quantized_weights is given), topk_weights [T, K_top] float32, topk_ids [T, K_top] int64 in [-1, E)
    -> out [T, H] bf16, or (out, MoEFP8Trace) with return_trace.

    use_ue8m0: UE8M0 (power-of-two) scales for activations and weights, carried packed int32
    through the permute as on Blackwell; else FP32 scales. amax_floor applies to x and to the
    weights when they are quantized here (SPEC §3); the SwiGLU requant uses 1e-10 (SPEC §7). layout: "masked" or "contiguous" (same result).
    quantized_weights: from quantize_moe_weights, to quantize (and dequantize) the weights once.
    group_size: 128 (1x128 activations, 128x128 weights: #7053, develop) or 32 (1x32 activations and
    weights, the recipe of FastDeploy #7666; the same math with one scale per 32 K-elements).
    NaN/inf in x raises ValueError naming x.
    """
    qw = _resolve_quantized_weights(w_up, w_down, quantized_weights, use_ue8m0, amax_floor, group_size)
    _check_layer_args(x, topk_weights, topk_ids, qw.num_experts, qw.hidden_size)
    x_q, x_scale, x_scale_op = quantize_activations(x, use_ue8m0, amax_floor, group_size=group_size)
    result = moe_experts_fp8(x_q, x_scale_op, topk_weights, topk_ids, qw, layout, max_token_num, return_trace)
    if return_trace:
        result[1].x_scale = x_scale
    return result


# ---------------------------------------------------------------------------------------------
# Expert parallel
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class MoEEPTrace:
    """Intermediates of moe_forward_ep: dispatch[r] (DispatchOutput), partial[r] [W, H] bf16 (rank r's
    weighted output, SPEC §8), rank_trace[r] (MoEFP8Trace of rank r's experts), out[s] [T_s, H] bf16."""
    dispatch: list
    partial: list
    rank_trace: list
    out: list


def moe_forward_ep(x: list, w_up: paddle.Tensor | None, w_down: paddle.Tensor | None, topk_weights: list,
                   topk_ids: list, use_ue8m0: bool = False, *, num_worst_tokens: int | None = None,
                   layout: str = "masked", max_token_num: int | None = None,
                   amax_floor: float = DEEPGEMM_AMAX_FLOOR, quantized_weights: QuantizedMoEWeights | None = None,
                   return_trace: bool = False, group_size: int = GROUP_SIZE):
    """The FP8 layer over R = len(x) simulated expert-parallel ranks (SPEC §9, §11).

    x[s] [T_s, H] bf16, w_up [E·R, 2I, H], w_down [E·R, H, I] (all experts; rank r holds experts
    r·E .. r·E+E-1), topk_weights[s] [T_s, K_top] float32, topk_ids[s] [T_s, K_top] int64 global ids
    -> out: list of [T_s, H] bf16 (and MoEEPTrace with return_trace).

    Each rank quantizes its tokens (1 x group_size, as moe_forward_fp8), ep_dispatch sends them, each rank runs moe_experts_fp8
    on its W received rows and local experts (M = max_token_num, default W), ep_combine sums the
    bf16 partials. W = num_worst_tokens defaults to max(1, Σ_s T_s) (nothing can overflow; every rank
    may be empty, T_s = 0, and gets [0, H]).
    For R = 1 the result equals moe_forward_fp8 on the same tokens exactly.
    """
    if not isinstance(x, (list, tuple)) or len(x) == 0:
        raise TypeError("x: expected a non-empty list with one [T, H] tensor per rank")
    num_ranks = len(x)
    qw = _resolve_quantized_weights(w_up, w_down, quantized_weights, use_ue8m0, amax_floor, group_size)
    if qw.num_experts % num_ranks:
        raise ValueError(f"w_up: E·R = {qw.num_experts} experts do not split evenly over R = {num_ranks} ranks")
    e = qw.num_experts // num_ranks
    for s in range(num_ranks):
        _check_layer_args(x[s], topk_weights[s], topk_ids[s], qw.num_experts, qw.hidden_size, f"x[{s}]")
    # at least one row: a dispatch has W >= 1 (DeepEP's num_worst_tokens), also when every rank is empty
    w_rows = max(1, sum(int(t.shape[0]) for t in x)) if num_worst_tokens is None else num_worst_tokens

    quantized = [quantize_activations(t, use_ue8m0, amax_floor, f"x[{s}]", group_size) for s, t in enumerate(x)]
    dispatched = ep_dispatch([q[0] for q in quantized], [q[2] for q in quantized], list(topk_ids),
                             list(topk_weights), e, w_rows)
    qw.dequantized()                               # once, so each rank's slice shares it
    partial, rank_trace = [], []
    for r, d in enumerate(dispatched):
        res = moe_experts_fp8(d.recv_x, d.recv_x_scale, d.recv_topk_weights, d.recv_topk_ids,
                              qw.experts(r * e, (r + 1) * e), layout, max_token_num, return_trace)
        partial.append(res[0] if return_trace else res)
        rank_trace.append(res[1] if return_trace else None)
    out = ep_combine(partial, dispatched[0].handle)
    if return_trace:
        return out, MoEEPTrace(dispatched, partial, rank_trace, out)
    return out
