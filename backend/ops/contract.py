"""The table of the `blackwell_ops` contract ops (SPEC §4-8, §14): one row per op, stated once.

A row gives the op's name, the upstream package that has it (`blackwell_ops`, FastDeploy's own ops
`fastdeploy.model_executor.ops.gpu`, or none: ours), its signature (upstream's positional order, the
defaults; keyword-only parameters are ours and never reach the real package) and its docstring
(shapes and dtypes in SPEC §0 names, the upstream generation the op follows: docs/upstream.md). From it `backend.ops` makes the module-level
function and the `OpsProvider` method, and `backend.ops.blackwell_provider` its forwarders; the
argument check of a row is `backend.ops._checks.CHECKS[name]`. A provider module implements each
op with the same parameters, without defaults: it receives validated, complete arguments.

Layouts used below (SPEC §2): "packed UE8M0" = 4 UE8M0 bytes per int32, little-endian along
the 128-wide group axis (word p holds groups 4p..4p+3, missing groups are byte 0).
"MN-major" = a strided paddle view of logical shape [B, MN, C] with strides
(C · align(MN, 4), 1, align(MN, 4)) over a zero-padded physical [B, C, align(MN, 4)] buffer.
"CUTLASS SF" = uint8 bytes in SM100 SfAtom order (`moe_ref.cutlass_sf`), one byte per
32 K-elements.

Generations (docs/upstream.md): "#7053" = FastDeploy merge 446b26bb; "develop" = #7374 (92ae10c3, equal
to develop of 2026-05-19); "#7666" = the open 1x32 PR (f0ea6f80). Certainty marks as there: "source"
(read in an op definition), "call site" (read in upstream's Python), "derived" (inferred from call
sites; `blackwell_ops` is unpublished).

Imports no Paddle (nor anything that does).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from moe_ref.constants import GROUP_SIZE

__all__ = ["ContractOp", "OPS", "OP_NAMES", "op", "BLACKWELL_OPS", "FD_OPS", "RECIPES"]

BLACKWELL_OPS = "blackwell_ops"                        # FastDeploy's unpublished SM100 package
FD_OPS = "fastdeploy.model_executor.ops.gpu"           # FastDeploy's own compiled ops
RECIPES = ("w8a8",)                                    # group_gemm_masked's tenth argument since #7374


@dataclass(frozen=True)
class ContractOp:
    """One contract op. `package`: the upstream module upstream takes it from (BLACKWELL_OPS or FD_OPS;
    None: ours); `writes`: the argument the op writes in place and returns (None: it returns new tensors)."""
    name: str
    signature: inspect.Signature
    doc: str
    package: str | None = BLACKWELL_OPS
    writes: str | None = None

    @property
    def upstream(self) -> bool:
        """Whether an upstream package has the op."""
        return self.package is not None

    @property
    def positional(self) -> tuple[str, ...]:
        """The upstream positional parameters, in order."""
        return tuple(p.name for p in self.signature.parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD)

    @property
    def options(self) -> tuple[str, ...]:
        """Our keyword-only parameters (not passed to the real package)."""
        return tuple(p.name for p in self.signature.parameters.values() if p.kind is p.KEYWORD_ONLY)


def _row(name: str, required: str, defaults: dict, doc: str, options: dict | None = None, **kw) -> ContractOp:
    par = inspect.Parameter
    params = [par(n, par.POSITIONAL_OR_KEYWORD) for n in required.split()]
    params += [par(n, par.POSITIONAL_OR_KEYWORD, default=v) for n, v in defaults.items()]
    params += [par(n, par.KEYWORD_ONLY, default=v) for n, v in (options or {}).items()]
    return ContractOp(name, inspect.Signature(params), inspect.cleandoc(doc), **kw)


OPS = (
    _row("per_token_quant", "x", dict(block_size=GROUP_SIZE, use_ue8m0=False), """
    1 x block_size activation quantization (SPEC §3).

    x [T, H] bf16 | fp32, finite -> (q [T, H] float8_e4m3fn, scale).
    scale: [T, S] fp32 row-major (S = ceil(H/block_size)), x ~= q · s per group; with
    use_ue8m0=True the scales are powers of two (smallest >= amax/448), returned packed UE8M0
    [T, ceil(S/4)] int32 row-major. amax floor 1e-4 (moe_ref.quant.DEEPGEMM_AMAX_FLOOR), no
    log2 bias (SPEC §3 "ours"; the real package follows FastDeploy's kernel).
    A ragged last group is zero-padded for its amax.
    Upstream: FastDeploy's own op (`fastdeploy.model_executor.ops.gpu`, per_token_quant_fp8.cu; source), every
    generation; it takes bf16 | fp16 x and walks 128-wide groups whatever block_size says.
    """, package=FD_OPS),
    _row("prefill_permute_to_masked_gemm", "x scale topk_ids num_local_experts max_token_num", {}, """
    Scatter tokens to the masked per-expert layout (SPEC §5).

    x [W, H] fp8 | bf16; scale [W, S'] fp32 (S' = S = ceil(H/128)) or packed UE8M0 int32
    (S' = ceil(S/4)), or None for bf16 x; topk_ids [W, K_top] int64 | int32 local expert ids or -1
    (-1 rows may sit anywhere); num_local_experts E; max_token_num M.
    Returns (permute_x [E, M, H] dtype of x, permute_scale, permuted_indice_map [W, K_top] int32,
    token_nums_per_expert [E, 1] int32):
    - slots inside an expert follow token order, then k (deterministic);
    - permuted_indice_map[t, k] = e · M + slot, or -1 where topk_ids is -1;
    - permute_scale: MN-major (M stride 1), logical [E, M, S'] (None when scale is None); strides
      (S'·align(M,4), 1, align(M,4)) on the portable providers, (S'·M, 1, M) from FastDeploy's op (SPEC §5);
    - rows past the count of an expert are zero (x and scale).
    ValueError for an id outside [-1, E) or an expert receiving more than M rows (names both).
    errors (keyword-only, ours; never passed to the real package): None (eager: the routing is checked on the
    host first, one synchronization) or an int64 [5] device record (`backend.ops.device_errors`): deferred, no
    host read: the first bad id / overflow is recorded there, ids outside [0, E) and rows past M are dropped
    (map -1, nothing written), counts clamped to M; `device_errors.raise_recorded` raises the eager message.
    Upstream: FastDeploy's own op (prefill_permute_to_masked_gemm.cu; source): topk_ids int64 (upstream casts
    before the call), K_top 4 or 8 (and 6 for bf16 x with fp32 scales). The ht path of #7053; since #7374
    (develop) replaced by prefill_permute_to_blackwell_masked_gemm.
    """, options=dict(errors=None), package=FD_OPS),
    _row("unpack_and_convert_scale", "scale", dict(masked_m=None), """
    Packed UE8M0 scales -> CUTLASS SM100 scale-factor bytes (SPEC §4).

    scale [E, MN, C] int32 packed UE8M0, any strides (MN-major or contiguous); masked_m None
    (weights) or int32 | int64 [E] or [E, 1] (activations: rows >= masked_m[e] become zero bytes).
    Returns uint8 [E, MN_pad, 16·C], MN_pad = align(MN, 128): each 128-group byte repeated 4 times
    (one byte per 32 K-elements), swizzled per expert with `cutlass_sf.sf_byte_offset`. Rows
    MN..MN_pad-1 are zero bytes (upstream requires MN % 128 == 0 and writes out of range otherwise).
    A byte equal to 255 (UE8M0 NaN) is a ValueError; a non-int32 scale is a TypeError.
    Upstream: `blackwell_ops` (call site), every generation; every caller passes MN-major scales (the
    blackwell_ops provider makes contiguous ones MN-major first). Since #7374 (develop) for weights and the
    decode ("ll") activations only; #7666 does not call it.
    """),
    _row("cutlass_scale_to_fp32", "sf", dict(num_rows=None), """
    Inverse of unpack_and_convert_scale (ours): CUTLASS SF bytes -> FP32 128-group scales.

    sf [E, MN_pad, KB] uint8 (MN_pad % 128 == 0, KB % 4 == 0) -> [E, num_rows, KB/4] fp32,
    value 2^(byte - 127) (byte 0 gives 2^-127). num_rows (default MN_pad) drops padding rows.
    The 4 bytes of a 128-group (one per 32 K-elements) must agree: ValueError otherwise.
    """, package=None),
    _row("group_gemm_masked", "a b sfa sfb masked_m out bias max_m_per_expert", dict(sm_count=-1, recipe=None), """
    Masked grouped FP8 GEMM, NT, block-scaled (SPEC §6); writes `out` in place, returns it.

    a [E·M, K] fp8 (M = max_m_per_expert); b [E, N, K] fp8; sfa [E, align(M,128), KB] and
    sfb [E, align(N,128), KB'] uint8 CUTLASS SF bytes (unpack_and_convert_scale), KB, KB' >= ceil(K/32);
    masked_m [E] (or [E, 1]) int32 in [0, M]; out [E·M, N] bf16; bias [E, N] bf16 | fp32 | None;
    sm_count: SMs the kernel may use (-1 all; ignored by the portable providers).
    recipe: None (#7053's nine-argument call) or "w8a8" (the tenth positional argument upstream passes since
    #7374, develop and #7666; call site): the same computation, FP8 e4m3 operands with UE8M0 bytes. Any other
    value is a ValueError naming `recipe`. The blackwell_ops provider passes what the installed package's
    generation takes (9 arguments for #7053, 10 with "w8a8" for develop), whichever the caller gave.
    For m < masked_m[e]: out[e·M + m, n] = bf16(Σ_k a·2^(sfa-127)·b·2^(sfb-127) (+ bias[e, n])),
    float32 accumulation, one scale byte per 32 K-elements. Rows >= masked_m[e] are not touched.
    Scale bytes (SPEC §2): byte 0 is 2^-127 (not 0); byte 255 (UE8M0 NaN) in sfa or sfb is a ValueError,
    as in unpack_and_convert_scale. An e4m3 NaN byte (0x7F / 0xFF, SPEC §1) in a or b is not checked:
    every output whose sum reads it is NaN, on every provider (as the tensor cores give it).
    sfb_per_block (keyword-only, ours; never passed to the real package): True promises that sfb holds
    one byte per 128 rows x 128 K (weights quantized in 128x128 blocks, each block's byte copied to
    its rows, as `BlackwellGemmFusedMoeMethod.process_weights_after_loading` builds them); the triton
    provider then reads one weight byte per tile and K step. The promise is not verified per call
    (`backend.ops.triton.launch.sf_block_uniform` checks it once, e.g. in a test). False (default):
    per-row weight bytes, the general kernel, correct for any bytes.
    sfb_prepared (keyword-only, ours; never passed to the real package): what
    `OpsProvider.prepare_weight_scales(sfb, sfb_per_block=...)` of the same provider returned for this sfb
    at weight load (the deep_gemm provider's weight scales in DeepGEMM's layout), so that no call converts
    weight scales again; None: a provider that needs another layout converts sfb itself, per call.
    sfa_per_group (keyword-only, ours; never passed to the real package): True promises that sfa repeats one
    byte per 128-wide K group (its 4 bytes equal), as unpack_and_convert_scale and the fused Blackwell ops
    with 128-wide groups write them (1x128 recipes); the triton and deep_gemm providers then take one
    activation byte per 128 K without looking at the bytes: no pass over sfa, no host synchronization
    (with sfb_per_block=True as well, the call never synchronizes). Not verified: a group whose bytes differ
    is read as its first byte (32 K-elements of 128 scaled wrongly). False (default): the providers check
    the bytes per call (one synchronization) and honour one byte per 32 K where they differ.
    expected_m (keyword-only, ours; never passed to the real package): about how many valid rows per expert
    the call has (an estimate known without reading masked_m, e.g. ceil(T·K_top/E)), None: M. A tuning hint,
    never a bound: the triton provider picks its kernel and tile from it, the deep_gemm provider passes it to
    DeepGEMM (its expected_m); the result is the same whatever it says. An int >= 1 or None.
    """, options=dict(sfb_per_block=False, sfb_prepared=None, sfa_per_group=False, expected_m=None),
        writes="out"),
    _row("fused_mask_swiglu_fp8_quant", "up token_nums_per_expert", dict(block_size=GROUP_SIZE, use_ue8m0=True), """
    SwiGLU on the masked layout, then 1 x block_size FP8 quantization (SPEC §7).

    up [E, M, 2I] bf16 | fp32 (gate = up[..., :I], lin = up[..., I:]); token_nums_per_expert
    int32 | int64 [E] or [E, 1] in [0, M]. y = bf16(lin · gate / (1 + exp(-gate))) in float32;
    amax floor 1e-10; s = amax/448 (use_ue8m0: rounded up to a power of two).
    Returns (act [E, M, I] fp8, act_scale): act_scale is MN-major (M padded to 4) with logical
    shape [E, M, ceil(I/block_size/4)] packed UE8M0 int32 (use_ue8m0) or [E, M, ceil(I/block_size)]
    fp32. Rows >= token_nums_per_expert[e] are zero in act and act_scale.
    Non-finite values (SPEC §1: a quantization's input must be finite): a NaN / inf of up in a valid row
    is a ValueError naming "up" and its index; a finite up whose y is not finite (lin · gate overflows)
    one naming "SwiGLU(up)"; on every provider. Rows past the counts are never read, whatever they hold.
    Upstream: FastDeploy's own op (fused_mask_swiglu_fp8_quant_kernel.cu; source): bf16 up only, I a multiple
    of 128, 128-wide groups. The ht and ll paths of #7053; since #7374 (develop) replaced by
    fused_mask_swiglu_fp8_quant_blackwell.
    """, package=FD_OPS),
    _row("depermute_prefill_combine", "ffn_out indice_map topk_weights num_worst_tokens", {}, """
    Gather expert outputs back to tokens and combine with the routing weights (SPEC §8).

    ffn_out [E, M, H] bf16 | fp32; indice_map [W, K_top] int32 | int64 with values e · M + slot or -1;
    topk_weights [W, K_top] fp32; num_worst_tokens W (= rows of indice_map).
    Returns [W, H] bf16: out[t] = bf16(Σ_{k: idx >= 0} topk_weights[t, k] · ffn_out[idx // M, idx % M]),
    float32 accumulation in k order; rows with no valid index are zero.
    Upstream: FastDeploy's own op (depermute_prefill_combine.cu; source), every generation: ffn_out bf16 | fp8,
    indice_map int32 (the blackwell_ops provider casts int64), K_top 4, 6 or 8; FastDeploy leaves rows with no
    valid index unwritten (ours: zero).
    """, package=FD_OPS),
    _row("prefill_permute_to_blackwell_masked_gemm", "x scale topk_ids num_local_experts max_token_num", {}, """
    Scatter tokens to the masked layout with the scales as the GEMM's CUTLASS SF bytes (SPEC §5 + §4), develop.

    x [W, H] fp8; scale [W, ceil(S/4)] int32 packed UE8M0 (1x128 groups, develop) or [W, ceil(H/32)] uint8
    UE8M0 bytes (1x32 groups, #7666's unfused branch); topk_ids [W, K_top] int64 | int32 local expert ids or
    -1 (anywhere); num_local_experts E; max_token_num M.
    Returns (permute_x [E·M, H] fp8, permute_sf [E, align(M, 128), KB] uint8, permuted_indice_map [W, K_top]
    int32, token_nums_per_expert [E, 1] int32), KB = 16·ceil(S/4) (1x128: each group byte repeated 4 times)
    or align(ceil(H/32), 4) (1x32). Slots, map, counts, errors and the `errors` option as
    prefill_permute_to_masked_gemm; rows past an expert's count are zero in permute_x and permute_sf; scale bytes
    of 255 (UE8M0 NaN) are a ValueError (not checked with `errors` given: no host read).
    Equal byte for byte to prefill_permute_to_masked_gemm + unpack_and_convert_scale(permute_scale, counts)
    (reshaped to [E·M, H]) for 1x128 scales. Reference: moe_ref.blackwell_layout.
    Upstream: `blackwell_ops`, develop (#7374) and later (call site BW:99-101); not in #7053's package.
    What upstream returns is derived from its call sites (docs/upstream.md §2): permute_sf is what
    group_gemm_masked reads as sfa with no conversion (sure: #7053 ran unpack_and_convert_scale there);
    permute_x 2-D (fairly sure: every other `a` is reshaped to 2-D first); the container [E, align(M, 128),
    KB] is ours (unknown upstream; only the bytes' order matters to the GEMM); the map and counts as
    FastDeploy's permute (the combine reads the map as int32: source).
    """, options=dict(errors=None)),
    _row("fused_mask_swiglu_fp8_quant_blackwell", "up token_nums_per_expert", {}, """
    SwiGLU on the masked layout, then UE8M0 FP8 quantization with the scales as CUTLASS SF bytes (SPEC §7 + §4).

    up [E·M, 2I] bf16 (gate = up[:, :I], lin = up[:, I:]); token_nums_per_expert int32 | int64 [E] or [E, 1]
    in [0, M], E its length, M = rows(up) / E. y = bf16(lin · gate / (1 + exp(-gate))) in float32; per
    group_size-wide group amax = max(|y|, 1e-10), s = amax/448 rounded up to a power of two, q = e4m3(y / s).
    Returns (act [E·M, I] fp8, act_sf [E, align(M, 128), KB] uint8 CUTLASS SF bytes), KB = 16·ceil(I/512)
    (group_size 128) or align(ceil(I/32), 4) (32). Rows past the counts are never read (upstream allocates up
    with paddle.empty since #7374) and are zero in act and act_sf. Non-finite values as
    fused_mask_swiglu_fp8_quant ("up", "SwiGLU(up)").
    group_size (keyword-only, ours; never passed to the real package): 128 is #7053's
    fused_mask_swiglu_fp8_quant + unpack_and_convert_scale byte for byte; 32 is the MXFP8 (1x32, #7666) reading.
    Reference: moe_ref.blackwell_layout.
    Upstream: `blackwell_ops`, develop and #7666 (call sites BW:769 ht, BW:1012 ll); not in #7053's package. No
    block-size argument upstream: whether develop's op quantizes 128- or 32-wide groups is unknown (#7666 calls it
    unchanged on its 1x32 path); the blackwell_ops provider runs whatever the installed package does. act 2-D
    and act_sf as the GEMM's sfa: derived (fairly sure / sure, docs/upstream.md §2).
    """, options=dict(group_size=GROUP_SIZE)),
    _row("group_wise_quant", "x", dict(flag=False, use_swizzle=False), """
    1x32 UE8M0 FP8 quantization, the recipe of #7666 (weights and activations; SPEC §3 with 32-wide groups).

    x [N, K] or [E, N, K] bf16 | fp32, finite -> (q fp8 of x's shape, sf uint8 [..., N, ceil(K/32)]): per row
    and 32-wide group amax = max(|x|, 1e-10), s = amax/448 rounded up to a power of two, q = e4m3(x / s),
    sf = the UE8M0 byte of s. use_swizzle=False (activations): sf row-major. use_swizzle=True (weights): the same
    bytes in CUTLASS SF order per [N, ceil(K/32)] matrix (N % 128 == 0 and ceil(K/32) % 4 == 0, else a
    ValueError naming x), what group_gemm_masked reads as sfb.
    flag: upstream's second argument, always False (its meaning is unknown); True is a ValueError.
    Reference: moe_ref.blackwell_layout.group_wise_quant.
    Upstream: `blackwell_ops`, #7666 only (call sites BW f0ea6f80:454-458 weights, :632 activations; the amax
    floor is not known upstream, 1e-10 is FastDeploy's).
    """),
)
OP_NAMES = tuple(row.name for row in OPS)
_BY_NAME = {row.name: row for row in OPS}


def op(name: str) -> ContractOp:
    """The row of contract op `name` (KeyError naming the known ops otherwise)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"op: expected one of {', '.join(OP_NAMES)}, got {name!r}") from None
