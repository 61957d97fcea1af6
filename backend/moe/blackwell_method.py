"""`BlackwellGemmFusedMoeMethod`: FP8 block-quantized fused MoE on the Blackwell op chain
(FastDeploy PR #7053, rebuilt), every op through the ops contract (`backend.ops.get_provider()`).

Three paths, chosen by `apply` (see `backend.moe.layer` for the sizes):

    "ht"  EP prefill  per_token_quant (UE8M0) -> runner.dispatch(W rows) -> prefill_permute_to_masked_gemm
                      -> experts -> depermute_prefill_combine -> runner.combine
    "ll"  EP decode   runner.low_latency_dispatch (masked layout directly) -> experts
                      -> runner.low_latency_combine
    "tp"  ep_size 1   per_token_quant -> prefill_permute_to_masked_gemm -> experts -> depermute_prefill_combine

    experts = unpack_and_convert_scale -> group_gemm_masked (GEMM 1, [E·M, 2I])
              -> fused_mask_swiglu_fp8_quant -> unpack_and_convert_scale -> group_gemm_masked (GEMM 2, [E·M, H])

Upstream's TP and non-`num_worst_tokens` ht paths call DeepGEMM's contiguous GEMM instead;
ours run the same masked chain everywhere, which is why FD_USE_DEEP_GEMM is not needed
(`backend.envs`). All scales on every path are UE8M0 (powers of two), as SM100 wants.

Buffers: the GEMM outputs are allocated with `paddle.empty`, never zero-filled: the provider
writes only the valid rows (SPEC §6) and every later op reads only those. Upstream zero-fills
an E·M·2I bf16 buffer every call (SPEC §13); `forward_buffer_bytes` reports both sizings.
"""
from __future__ import annotations

import numpy as np
import paddle

from moe_ref.checks import check_dim, check_ids_in_range, check_tensor
from moe_ref.fp8 import BYTES_PER_WORD, E4M3_MAX, TMA_ALIGN, UE8M0_MAX_EXP, UE8M0_MIN_EXP, align
from moe_ref.quant import DEEPGEMM_AMAX_FLOOR, GROUP_SIZE

from ..ops.cutlass_sf import SF_TILE_ROWS

FP8 = paddle.float8_e4m3fn
_ID_DTYPES = (paddle.int32, paddle.int64)


# ---------------------------------------------------------------------- weight quantization (load time)

def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def quantize_weight_blocks_ue8m0(w: paddle.Tensor, amax_floor: float = DEEPGEMM_AMAX_FLOOR):
    """128x128 block quantization of one expert's weight with UE8M0 scales (SPEC §3).

    w [N, K] float32 -> (q [N, K] float8_e4m3fn, scale [ceil(N/128), ceil(K/128)] float32 powers of two).
    amax = max(|block|, amax_floor); s = smallest power of two >= amax / 448 (exponent field,
    plus one when the mantissa is non-zero, clamped to UE8M0's 2^-126..2^127); q = e4m3(clamp(w / s)).
    Ragged edges are zero-padded for the amax. Non-finite input is a ValueError.
    """
    n, k = (int(d) for d in w.shape)
    if not bool(paddle.isfinite(w).all()):
        bad = np.argwhere(~np.isfinite(w.numpy()))[0]
        raise ValueError(f"w: non-finite value at index {tuple(int(i) for i in bad)}")
    nb, kb = _ceil_div(n, GROUP_SIZE), _ceil_div(k, GROUP_SIZE)
    wp = w
    if kb * GROUP_SIZE != k:
        wp = paddle.concat([wp, paddle.zeros([n, kb * GROUP_SIZE - k], dtype=wp.dtype)], axis=1)
    if nb * GROUP_SIZE != n:
        wp = paddle.concat([wp, paddle.zeros([nb * GROUP_SIZE - n, kb * GROUP_SIZE], dtype=wp.dtype)], axis=0)
    blocks = wp.reshape([nb, GROUP_SIZE, kb, GROUP_SIZE])
    amax = paddle.clip(blocks.abs().max(axis=[1, 3]), min=float(amax_floor))             # [nb, kb]
    bits = (amax / E4M3_MAX).view(paddle.int32)
    exp = paddle.bitwise_right_shift(bits, paddle.full_like(bits, 23))
    exp = exp + (paddle.bitwise_and(bits, paddle.full_like(bits, (1 << 23) - 1)) != 0).astype(paddle.int32)
    exp = paddle.clip(exp, UE8M0_MIN_EXP, UE8M0_MAX_EXP)
    scale = paddle.bitwise_left_shift(exp, paddle.full_like(exp, 23)).view(paddle.float32)
    q = paddle.clip(blocks / scale.reshape([nb, 1, kb, 1]), -E4M3_MAX, E4M3_MAX)
    q = q.reshape([nb * GROUP_SIZE, kb * GROUP_SIZE])[:n, :k].astype(FP8)
    return q, scale


def dequantize_weight_blocks(q: paddle.Tensor, scale: paddle.Tensor) -> paddle.Tensor:
    """q [N, K] fp8, scale [ceil(N/128), ceil(K/128)] float32 -> [N, K] float32 q · s."""
    n, k = (int(d) for d in q.shape)
    s = paddle.repeat_interleave(paddle.repeat_interleave(scale, GROUP_SIZE, axis=0), GROUP_SIZE, axis=1)
    return q.astype(paddle.float32) * s[:n, :k]


def pack_row_scales_ue8m0(scale: paddle.Tensor, num_rows: int) -> paddle.Tensor:
    """Per-row packed UE8M0 weight scales for SM100 (SPEC §3 end, §2).

    scale [E, ceil(N/128), KB] float32 powers of two -> [E, N, ceil(KB/4)] int32 contiguous:
    sf_row[n, kb] = scale[n // 128, kb], its exponent byte (log2 s + 127) packed 4 to a word,
    little-endian, missing groups byte 0. A scale that is not a power of two is a ValueError
    (taking the exponent of one would round it down: SPEC §2).
    """
    bits = scale.view(paddle.int32).numpy()
    if ((bits & ((1 << 23) - 1)) != 0).any() or ((bits >> 23) < UE8M0_MIN_EXP).any() \
            or ((bits >> 23) > UE8M0_MAX_EXP).any():
        raise ValueError("scale: UE8M0 packing needs positive normal powers of two")
    exp_bytes = (bits >> 23).astype(np.uint8)                                         # [E, nb, KB]
    rows = np.repeat(exp_bytes, GROUP_SIZE, axis=1)[:, :num_rows, :]                  # [E, N, KB]
    e, _, kbn = rows.shape
    words = _ceil_div(kbn, BYTES_PER_WORD)
    padded = np.zeros([e, num_rows, words * BYTES_PER_WORD], dtype=np.uint8)
    padded[..., :kbn] = rows
    return paddle.to_tensor(padded.view("<i4").astype(np.int32))


# ---------------------------------------------------------------------- buffer sizing

def forward_buffer_bytes(num_local_experts: int, max_m_per_expert: int, hidden_size: int,
                         moe_intermediate_size: int, *, num_worst_tokens: int | None = None,
                         top_k: int | None = None, valid_rows: int | None = None) -> dict:
    """Bytes one forward of the masked chain allocates, ours next to upstream's (PR #7053).

    E = num_local_experts, M = max_m_per_expert, H, I; W = num_worst_tokens and K_top = top_k add the
    token-row tensors (x_q, dispatch output, indice map, partial); valid_rows (Σ masked_m) adds the
    bytes the two GEMMs actually write. Returns
    {"ours": {buffer: bytes, ..., "total", "zero_filled"}, "upstream": {..., "total", "zero_filled"},
     "gemm_written_valid_rows": bytes or None}.

    Both allocate the same masked buffers (they are the layout's worst case: every row on one
    expert). The difference is the memset: upstream zero-fills up_gate_proj_out (E·M·2I bf16)
    every call, 17.2 GB at E=32, M=65536, I=2048 (SPEC §13), and allocates a separate E·M·H bf16
    output unless H == 2I; ours zero-fills nothing (paddle.empty; the provider writes valid rows
    only) and reuses the GEMM 1 buffer for GEMM 2 when H == 2I, as upstream does.
    """
    e, m, h, i = (int(v) for v in (num_local_experts, max_m_per_expert, hidden_size, moe_intermediate_size))
    c_h = _ceil_div(_ceil_div(h, GROUP_SIZE), BYTES_PER_WORD)       # packed UE8M0 words per row, K = H
    c_i = _ceil_div(_ceil_div(i, GROUP_SIZE), BYTES_PER_WORD)       # K = I
    m_tma, m_sf = align(m, TMA_ALIGN), align(m, SF_TILE_ROWS)
    masked = {
        "permute_x [E, M, H] fp8": e * m * h,
        "permute_scale [E, C_H, align(M,4)] int32": e * c_h * m_tma * 4,
        "sfa GEMM1 [E, align(M,128), 16 C_H] uint8": e * m_sf * 16 * c_h,
        "up_gate_proj_out [E·M, 2I] bf16": e * m * 2 * i * 2,
        "act [E, M, I] fp8": e * m * i,
        "act_scale [E, C_I, align(M,4)] int32": e * c_i * m_tma * 4,
        "sfa GEMM2 [E, align(M,128), 16 C_I] uint8": e * m_sf * 16 * c_i,
        "ffn_out [E·M, H] bf16": 0 if h == 2 * i else e * m * h * 2,
    }
    rows = {}
    if num_worst_tokens is not None:
        w = int(num_worst_tokens)
        rows["recv_x [W, H] fp8 + recv_x_scale [W, C_H] int32"] = w * h + w * c_h * 4
        rows["partial [W, H] bf16"] = w * h * 2
        if top_k is not None:
            rows["indice_map [W, K_top] int32 + recv ids/weights"] = w * int(top_k) * (4 + 8 + 4)
    ours = {**masked, **rows}
    ours["total"] = sum(ours.values())
    ours["zero_filled"] = 0
    upstream = dict(masked)
    upstream["ffn_out [E·M, H] bf16"] = 0 if h == 2 * i else e * m * h * 2
    upstream.update(rows)
    upstream["total"] = sum(upstream.values())
    upstream["zero_filled"] = e * m * 2 * i * 2
    written = None if valid_rows is None else int(valid_rows) * (2 * i + h) * 2
    return {"ours": ours, "upstream": upstream, "gemm_written_valid_rows": written}


# ---------------------------------------------------------------------- the method

class BlackwellGemmFusedMoeMethod:
    """Fused MoE on FP8 e4m3 weights with 128x128 UE8M0 block scales and 1x128 UE8M0 activations.

    Weight attributes after `process_weights_after_loading` (X = up_gate_proj with N = 2I, K = H,
    or down_proj with N = H, K = I; KB = ceil(K/128), C = ceil(KB/4); no attribute is ever None):

    | attribute | shape, dtype | for | bytes per expert |
    |---|---|---|---|
    | X_weight | [E, N, K] fp8 | both | N·K |
    | X_weight_scale | [E, ceil(N/128), KB] fp32, powers of two | DeepGEMM-style fallbacks, inspection | 4·ceil(N/128)·KB |
    | X_weight_scale_ue8m0 | [E, N, C] int32, per-row packed UE8M0 (contiguous) | DeepGEMM on SM100 | 4·N·C |
    | X_weight_scale_bw | [E, align(N,128), 16·C] uint8, CUTLASS SF bytes | group_gemm_masked | align(N,128)·16·C |

    The FP32 scales pair with the FP8 weights as they are now (after any requantization), so a
    fallback reading them gets the right format: upstream set this attribute to None (or later
    overwrote it with CUTLASS bytes), which crashed or silently misread later paths (SPEC §13).
    Memory, relative to the FP8 weights: CUTLASS bytes 16·ceil(K/512) per row, about 1/32 = 3.1 %;
    packed rows 4·ceil(K/512), about 0.8 %; FP32 blocks about 0.02 % (DeepSeek-V3, H = 7168,
    I = 2048: 3.9 % in all, 1.7 MB per expert next to 44 MB of FP8 weights).

    Checkpoints (`quant_config.is_checkpoint_bf16`):
    - BF16: up_gate_proj_weight [E, 2I, H], down_proj_weight [E, H, I] bf16, quantized at load
      (online), 128x128 blocks, UE8M0 scales.
    - FP8: the same shapes in fp8 plus FP32 128x128 scales up_gate_proj_weight_scale
      [E, ceil(2I/128), ceil(H/128)] and down_proj_weight_scale [E, ceil(H/128), ceil(I/128)].
      Upstream never converts these for Blackwell; we dequantize (q · s in float32) and
      requantize to UE8M0 at load, as engines running such checkpoints on SM100 do. That costs
      up to one bit of mantissa per block where s was not a power of two (s rounds up to 2^ceil).
    """

    def __init__(self, quant_config) -> None:
        self.quant_config = quant_config
        self.last_provider_name: str | None = None
        self.last_path: str | None = None

    @property
    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        """The tensors `FusedMoE.load_weights` fills for this checkpoint kind."""
        names = ("up_gate_proj_weight", "down_proj_weight")
        if self.quant_config.is_checkpoint_bf16:
            return names
        return names + ("up_gate_proj_weight_scale", "down_proj_weight_scale")

    # ------------------------------------------------------------------ weights

    @staticmethod
    def _shapes(layer) -> dict[str, tuple[int, int]]:
        h, i = layer.hidden_size, layer.moe_intermediate_size
        return {"up_gate_proj": (2 * i, h), "down_proj": (h, i)}

    @staticmethod
    def _set_param(layer, name: str, value: paddle.Tensor) -> None:
        param = layer.create_parameter(shape=list(value.shape), dtype=value.dtype,
                                       default_initializer=paddle.nn.initializer.Constant(0))
        param.set_value(value)
        param.stop_gradient = True
        setattr(layer, name, param)

    def create_weights(self, layer) -> None:
        """Allocate the checkpoint parameters (zeros) on `layer` (see the class docstring)."""
        e = layer.num_local_experts
        bf16 = self.quant_config.is_checkpoint_bf16
        for w, (n, k) in self._shapes(layer).items():
            param = layer.create_parameter(shape=[e, n, k], dtype=paddle.bfloat16 if bf16 else FP8,
                                           default_initializer=paddle.nn.initializer.Constant(0))
            param.stop_gradient = True
            setattr(layer, f"{w}_weight", param)
            if not bf16:
                scale = layer.create_parameter(shape=[e, _ceil_div(n, GROUP_SIZE), _ceil_div(k, GROUP_SIZE)],
                                               dtype=paddle.float32,
                                               default_initializer=paddle.nn.initializer.Constant(1.0))
                scale.stop_gradient = True
                setattr(layer, f"{w}_weight_scale", scale)
        self._processed = False

    def process_weights_after_loading(self, layer) -> None:
        """Quantize (BF16 checkpoint) or requantize (FP8 checkpoint) to UE8M0 128x128 blocks and
        build the per-row packed scales and CUTLASS SF bytes. Expert by expert: the extra memory is one
        expert's weight in float32 plus the new FP8 weights (the checkpoint tensors are released when
        the new parameters replace them). Calling it twice is an error (the weights are FP8 then)."""
        from .. import ops

        if getattr(self, "_processed", False):
            raise RuntimeError("process_weights_after_loading: already called for this layer")
        provider = ops.get_provider()
        bf16 = self.quant_config.is_checkpoint_bf16
        for w, (n, k) in self._shapes(layer).items():
            weight = getattr(layer, f"{w}_weight")
            ckpt_scale = None if bf16 else getattr(layer, f"{w}_weight_scale")
            if ckpt_scale is not None:
                s_np = ckpt_scale.numpy()
                if not (np.isfinite(s_np).all() and (s_np > 0).all()):
                    at = tuple(int(j) for j in np.argwhere(~(np.isfinite(s_np) & (s_np > 0)))[0])
                    raise ValueError(f"{w}_weight_scale: expected finite scales > 0, got {float(s_np[at])} "
                                     f"at index {at}")
            q_list, s_list = [], []
            for ex in range(layer.num_local_experts):
                if bf16:
                    wf = weight[ex].astype(paddle.float32)
                else:
                    wf = dequantize_weight_blocks(weight[ex], ckpt_scale[ex])
                try:
                    q, s = quantize_weight_blocks_ue8m0(wf)
                except ValueError as err:
                    raise ValueError(f"{w}_weight: expert {ex}: {err}") from None
                q_list.append(q.view(paddle.uint8))
                s_list.append(s)
            q_all = paddle.stack(q_list).view(FP8)
            s_all = paddle.stack(s_list)
            packed = pack_row_scales_ue8m0(s_all, n)
            self._set_param(layer, f"{w}_weight", q_all)
            self._set_param(layer, f"{w}_weight_scale", s_all)
            self._set_param(layer, f"{w}_weight_scale_ue8m0", packed)
            self._set_param(layer, f"{w}_weight_scale_bw", provider.unpack_and_convert_scale(packed, None))
        # Every weight was quantized in 128x128 blocks above and each block's byte copied to its 128 rows, so
        # the CUTLASS weight bytes hold one byte per block: group_gemm_masked's sfb_per_block, decided once here.
        layer.weight_scale_bw_per_block = True
        self._processed = True

    # ------------------------------------------------------------------ forward

    def _check_routing(self, layer, x, routing):
        t = int(x.shape[0])
        if isinstance(routing, paddle.Tensor):
            check_dim(routing, 0, t, "gate_out", "T (rows of x)")
            return layer.route(routing)
        if not isinstance(routing, (tuple, list)) or len(routing) != 2:
            raise TypeError(f"routing: expected gate_out [T, num_experts] or (topk_weights, topk_ids), "
                            f"got {type(routing).__name__}")
        topk_weights, topk_ids = routing
        check_tensor(topk_weights, "topk_weights", dtypes=(paddle.float32,), ndim=2)
        check_tensor(topk_ids, "topk_ids", dtypes=_ID_DTYPES, ndim=2)
        check_dim(topk_ids, 0, t, "topk_ids", "T (rows of x)")
        check_dim(topk_ids, 1, layer.top_k, "topk_ids", "K_top (layer.top_k)")
        if list(topk_weights.shape) != list(topk_ids.shape):
            raise ValueError(f"topk_weights: expected shape {list(topk_ids.shape)} (as topk_ids), "
                             f"got {list(topk_weights.shape)}")
        ids = check_ids_in_range(topk_ids, "topk_ids", layer.num_experts, "global expert ids",
                                 f"num_experts = {layer.num_experts}")
        return topk_weights, ids

    def _path(self, layer, runner) -> str:
        if runner is None:
            if layer.ep_size != 1:
                raise ValueError(f"runner: ep_size = {layer.ep_size} needs an EP runner "
                                 f"(backend.moe.ep_runner), got None")
            return "tp"
        for attr in ("ep_size", "ep_rank", "num_experts"):
            if getattr(runner, attr, None) != getattr(layer, attr):
                raise ValueError(f"runner: {attr} = {getattr(runner, attr, None)} does not match the layer's "
                                 f"{attr} = {getattr(layer, attr)}")
        return layer.ep_mode

    def apply(self, layer, x: paddle.Tensor, routing, runner=None) -> paddle.Tensor:
        """x [T, H] bf16, routing = gate_out [T, num_experts] float or (topk_weights [T, K_top] float32,
        topk_ids [T, K_top] int64 global ids or -1), runner: EP runner or None (TP)
        -> [T, H] bf16: Σ_k w · Down(SwiGLU(Up(x))) over this token's experts on all ranks (SPEC §11).
        Records `last_provider_name` and `last_path` ("ht", "ll" or "tp")."""
        from .. import ops

        if not getattr(self, "_processed", False):
            raise RuntimeError("apply: call process_weights_after_loading (FusedMoE.load_weights) first")
        check_tensor(x, "x", dtypes=(paddle.bfloat16,), ndim=2)
        check_dim(x, 1, layer.hidden_size, "x", "H (layer.hidden_size)")
        path = self._path(layer, runner)
        topk_weights, topk_ids = self._check_routing(layer, x, routing)
        provider = ops.get_provider()
        self.last_provider_name = provider.name
        self.last_path = path
        if path == "ht":
            return self._apply_ht(provider, layer, x, topk_weights, topk_ids, runner)
        if path == "ll":
            return self._apply_ll(provider, layer, x, topk_weights, topk_ids, runner)
        return self._apply_tp(provider, layer, x, topk_weights, topk_ids)

    @staticmethod
    def _quantize(provider, x):
        t, h = (int(d) for d in x.shape)
        if t == 0:
            return (paddle.zeros([0, h], dtype=FP8),
                    paddle.zeros([0, _ceil_div(_ceil_div(h, GROUP_SIZE), BYTES_PER_WORD)], dtype=paddle.int32))
        return provider.per_token_quant(x, GROUP_SIZE, True)

    def _apply_tp(self, provider, layer, x, topk_weights, topk_ids):
        t = int(x.shape[0])
        if t == 0:
            return paddle.zeros([0, layer.hidden_size], dtype=paddle.bfloat16)
        x_q, x_scale = self._quantize(provider, x)
        m = t               # no dispatch: an expert sees at most every token once
        permute_x, permute_scale, indice_map, counts = provider.prefill_permute_to_masked_gemm(
            x_q, x_scale, topk_ids, layer.num_local_experts, m)
        ffn_out = self._experts(provider, layer, permute_x, permute_scale, counts, m)
        return provider.depermute_prefill_combine(ffn_out, indice_map, topk_weights, t)

    def _apply_ht(self, provider, layer, x, topk_weights, topk_ids, runner):
        t = int(x.shape[0])
        m = layer.ht_rows_per_expert()
        if t > layer.max_tokens_per_rank:
            raise ValueError(f"x: {t} tokens on rank {layer.ep_rank}, more than max_tokens_per_rank = "
                             f"{layer.max_tokens_per_rank}")
        x_q, x_scale = self._quantize(provider, x)
        w = layer.num_worst_tokens
        d = runner.dispatch(x_q, x_scale, topk_ids, topk_weights, w)
        permute_x, permute_scale, indice_map, counts = provider.prefill_permute_to_masked_gemm(
            d.recv_x, d.recv_x_scale, d.recv_topk_ids, layer.num_local_experts, m)
        ffn_out = self._experts(provider, layer, permute_x, permute_scale, counts, m)
        partial = provider.depermute_prefill_combine(ffn_out, indice_map, d.recv_topk_weights, w)
        return runner.combine(partial, d.handle)

    def _apply_ll(self, provider, layer, x, topk_weights, topk_ids, runner):
        m = layer.ll_rows_per_expert()
        recv_x, recv_scale, recv_count, handle = runner.low_latency_dispatch(
            x, topk_ids, layer.num_max_dispatch_tokens_per_rank, True, True)
        ffn_out = self._experts(provider, layer, recv_x, recv_scale, recv_count, m)
        return runner.low_latency_combine(ffn_out, topk_ids, topk_weights, handle)

    def _experts(self, provider, layer, a, a_scale, counts, m):
        """a [E, M, H] fp8, a_scale logical [E, M, C_H] packed UE8M0 int32, counts [E] | [E, 1] int32
        -> ffn_out [E, M, H] bf16, valid rows only (rows >= counts[e] are whatever the buffer held)."""
        e, h, i = layer.num_local_experts, layer.hidden_size, layer.moe_intermediate_size
        sfa = provider.unpack_and_convert_scale(a_scale, counts)
        up = paddle.empty([e * m, 2 * i], dtype=paddle.bfloat16)
        provider.group_gemm_masked(a.reshape([e * m, h]), layer.up_gate_proj_weight, sfa,
                                   layer.up_gate_proj_weight_scale_bw, counts, up, None, m, -1,
                                   sfb_per_block=layer.weight_scale_bw_per_block)
        try:
            act, act_scale = provider.fused_mask_swiglu_fp8_quant(up.reshape([e, m, 2 * i]), counts, GROUP_SIZE, True)
        except ValueError as err:      # name the intermediate: x may be finite while its GEMM 1 overflows
            raise ValueError(f"GEMM 1 output (up = x · up_gate_proj_weightᵀ, [E, M, 2I]): {err}") from None
        sfa = provider.unpack_and_convert_scale(act_scale, counts)
        # GEMM 2 reads act, not up: when H == 2I its output can reuse up's storage (as upstream does)
        down = up if h == 2 * i else paddle.empty([e * m, h], dtype=paddle.bfloat16)
        provider.group_gemm_masked(act.reshape([e * m, i]), layer.down_proj_weight, sfa,
                                   layer.down_proj_weight_scale_bw, counts, down, None, m, -1,
                                   sfb_per_block=layer.weight_scale_bw_per_block)
        return down.reshape([e, m, h])

    def forward_buffer_bytes(self, layer, num_tokens: int | None = None) -> dict:
        """`forward_buffer_bytes` for this layer's path (ht if it has max_tokens_per_rank, else ll;
        tp with num_tokens)."""
        if num_tokens is not None and layer.ep_size == 1:
            m, w = int(num_tokens), int(num_tokens)
        elif layer.max_tokens_per_rank is not None and layer.moe_phase == "prefill":
            m, w = layer.ht_rows_per_expert(), layer.num_worst_tokens
        else:
            m, w = layer.ll_rows_per_expert(), None
        return forward_buffer_bytes(layer.num_local_experts, m, layer.hidden_size, layer.moe_intermediate_size,
                                    num_worst_tokens=w, top_k=layer.top_k)

    # upstream names of the three paths, for readers coming from PR #7053
    def apply_ep_prefill(self, layer, x, routing, runner):
        """Upstream name of the ht path: `apply` with a runner and moe_phase "prefill"."""
        if layer.ep_mode != "ht":
            raise ValueError(f"layer: moe_phase is {layer.moe_phase!r}, apply_ep_prefill needs 'prefill'")
        return self.apply(layer, x, routing, runner)

    def apply_ep_decode(self, layer, x, routing, runner):
        """Upstream name of the ll path: `apply` with a runner and moe_phase "decode"."""
        if layer.ep_mode != "ll":
            raise ValueError(f"layer: moe_phase is {layer.moe_phase!r}, apply_ep_decode needs 'decode'")
        return self.apply(layer, x, routing, runner)

    def apply_tp(self, layer, x, routing):
        """Upstream name of the TP path: `apply` without a runner (ep_size 1)."""
        return self.apply(layer, x, routing, None)
