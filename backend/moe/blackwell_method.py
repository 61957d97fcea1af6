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
writes only the valid rows (SPEC §6) and every later op reads only those. Upstream at #7053 zero-filled
an E·M·2I bf16 buffer every call; from #7374 on it uses `paddle.empty` too (SPEC §13, docs/upstream.md §1);
`backend.moe.memory.forward_buffer_bytes` reports ours against #7053's sizing.

The weight quantization at load lives in `backend.moe.quantize`, the memory report in
`backend.moe.memory`, upstream's names of the three paths in `backend.moe.upstream`.
"""
from __future__ import annotations

import numpy as np
import paddle

from moe_ref.checks import check_dim, check_distinct_experts, check_ids_in_range, check_same_shape, check_tensor
from moe_ref.constants import GROUP_SIZE, num_scale_groups

from .. import ops
from .memory import forward_buffer_bytes
from .quantize import dequantize_weight_blocks, pack_row_scales_ue8m0, quantize_tokens, quantize_weight_blocks_ue8m0
from .upstream import UpstreamPathNames

FP8 = paddle.float8_e4m3fn
_ID_DTYPES = (paddle.int32, paddle.int64)


# ---------------------------------------------------------------------- the method

class BlackwellGemmFusedMoeMethod(UpstreamPathNames):
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
                scale = layer.create_parameter(shape=[e, num_scale_groups(n), num_scale_groups(k)],
                                               dtype=paddle.float32,
                                               default_initializer=paddle.nn.initializer.Constant(1.0))
                scale.stop_gradient = True
                setattr(layer, f"{w}_weight_scale", scale)
        self._processed = False

    @property
    def weights_processed(self) -> bool:
        """True once `process_weights_after_loading` succeeded (the weights are UE8M0 FP8 then)."""
        return getattr(self, "_processed", False)

    def process_weights_after_loading(self, layer) -> None:
        """Quantize (BF16 checkpoint) or requantize (FP8 checkpoint) to UE8M0 128x128 blocks and
        build the per-row packed scales and CUTLASS SF bytes. All or nothing: every check and
        conversion runs before the first attribute is replaced, so an error leaves the layer as it
        was (its checkpoint parameters untouched, still unprocessed). Expert by expert: the extra
        memory is one expert's weight in float32 plus the new FP8 weights and scales of both tensors
        (the checkpoint tensors are released when the new parameters replace them). Calling it
        twice is an error (the weights are FP8 then)."""
        if self.weights_processed:
            raise RuntimeError("process_weights_after_loading: already called for this layer")
        provider = ops.get_provider()
        new = {}
        for w, (n, _) in self._shapes(layer).items():
            q_all, s_all = self._requantize(layer, w)
            packed = pack_row_scales_ue8m0(s_all, n)
            new.update({f"{w}_weight": q_all, f"{w}_weight_scale": s_all, f"{w}_weight_scale_ue8m0": packed,
                        f"{w}_weight_scale_bw": provider.unpack_and_convert_scale(packed, None)})
        for name, value in new.items():
            self._set_param(layer, name, value)
        # Every weight was quantized in 128x128 blocks above and each block's byte copied to its 128 rows, so
        # the CUTLASS weight bytes hold one byte per block: group_gemm_masked's sfb_per_block, decided once here.
        layer.weight_scale_bw_per_block = True
        self._processed = True

    def _requantize(self, layer, w: str):
        """The checkpoint's `w`_weight (and `w`_weight_scale) -> (q [E, N, K] fp8, s [E, ceil(N/128),
        ceil(K/128)] float32 UE8M0), expert by expert; writes nothing. Errors name the tensor and expert."""
        weight = getattr(layer, f"{w}_weight")
        ckpt_scale = None if self.quant_config.is_checkpoint_bf16 else getattr(layer, f"{w}_weight_scale")
        if ckpt_scale is not None:
            s_np = ckpt_scale.numpy()
            if not (np.isfinite(s_np).all() and (s_np > 0).all()):
                at = tuple(int(j) for j in np.argwhere(~(np.isfinite(s_np) & (s_np > 0)))[0])
                raise ValueError(f"{w}_weight_scale: expected finite scales > 0, got {float(s_np[at])} "
                                 f"at index {at}")
        q_list, s_list = [], []
        for ex in range(layer.num_local_experts):
            if ckpt_scale is None:
                wf = weight[ex].astype(paddle.float32)
            else:
                try:
                    wf = dequantize_weight_blocks(weight[ex], ckpt_scale[ex])
                except ValueError as err:
                    raise ValueError(f"{w}_weight_scale: expert {ex}: {err}") from None
            try:
                q, s = quantize_weight_blocks_ue8m0(wf)
            except ValueError as err:
                raise ValueError(f"{w}_weight: expert {ex}: {err}") from None
            q_list.append(q.view(paddle.uint8))
            s_list.append(s)
        return paddle.stack(q_list).view(FP8), paddle.stack(s_list)

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
        check_same_shape(topk_weights, "topk_weights", topk_ids, "topk_ids")
        ids = check_ids_in_range(topk_ids, "topk_ids", layer.num_experts, "global expert ids",
                                 f"num_experts = {layer.num_experts}")
        check_distinct_experts(ids, "topk_ids")
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
        if not self.weights_processed:
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

    def _apply_tp(self, provider, layer, x, topk_weights, topk_ids):
        t = int(x.shape[0])
        if t == 0:
            return paddle.zeros([0, layer.hidden_size], dtype=paddle.bfloat16)
        x_q, x_scale = quantize_tokens(provider, x, True)
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
        x_q, x_scale = quantize_tokens(provider, x, True)
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
