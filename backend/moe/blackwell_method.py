"""`BlackwellGemmFusedMoeMethod`: FP8 block-quantized fused MoE on the Blackwell op chain, every op through the
ops contract (`backend.ops.get_provider()`), a drop-in for FastDeploy's `FusedMoE` (hooks as upstream develop
calls them, docs/upstream.md §4) and the method of our own `backend.moe.layer.FusedMoE`.

Upstream generations (docs/upstream.md): the hooks, their signatures, the parameter shapes and attribute names
follow develop (#7374, 92ae10c3 = dad5a432); the op chain follows the generation of the installed `blackwell_ops`
(`backend.ops.ops_generation()`: FD_BLACKWELL_OPS_GENERATION, or detected from the package) on the blackwell_ops
provider, develop on the portable ones (their fused ops equal #7053's chain bit for bit):

    develop  ht  per_token_quant -> runner.dispatch (W rows) -> prefill_permute_to_blackwell_masked_gemm
                 -> experts -> depermute_prefill_combine -> runner.combine
             ll  runner.low_latency_dispatch -> unpack_and_convert_scale -> experts -> runner.low_latency_combine
             tp  per_token_quant -> prefill_permute_to_blackwell_masked_gemm -> experts -> depermute_prefill_combine
             experts = group_gemm_masked(.., "w8a8") -> fused_mask_swiglu_fp8_quant_blackwell
                       -> group_gemm_masked(.., "w8a8")
    #7053    the fused permute / SwiGLU replaced by FastDeploy's prefill_permute_to_masked_gemm /
             fused_mask_swiglu_fp8_quant, each followed by unpack_and_convert_scale; nine-argument GEMMs.

Where ours differs from upstream: upstream's TP path (and its ht path without num_worst_tokens) runs DeepGEMM's
contiguous GEMM, its #7053 ll path DeepGEMM's masked GEMM; ours runs the masked chain everywhere (no
FD_USE_DEEP_GEMM needed, `backend.envs`). Upstream quantizes activations with Paddle's `fp8_quant_blockwise`
unless FD_USE_PHI_FP8_QUANT=0, when it calls FastDeploy's per_token_quant as ours always does. All scales are
UE8M0 (powers of two), as SM100 wants.

Buffers: the GEMM outputs are `paddle.empty`, never zero-filled (as develop; #7053 zero-filled them, SPEC §13):
the provider writes only the valid rows (SPEC §6) and every later op reads only those.
`backend.moe.memory.forward_buffer_bytes` reports ours against #7053's sizing.
The weight quantization lives in `backend.moe.quantize`, the memory report in `backend.moe.memory`, what the
method reads from upstream's layer (tracker, routing attributes, sizes) in `backend.moe.upstream`.
"""
from __future__ import annotations

import contextlib

import numpy as np
import paddle

from moe_ref.checks import check_dim, check_distinct_experts, check_ids_in_range, check_same_shape, check_tensor
from moe_ref.constants import GROUP_SIZE, num_scale_groups
from moe_ref.cutlass_sf import SF_VEC_SIZE, unswizzle
from moe_ref.fp8 import ue8m0_decode

from .. import envs, ops
from ..ops import device_errors
from .memory import forward_buffer_bytes
from .quantize import (dequantize_weight_blocks, pack_row_scales_ue8m0, quantize_tokens, quantize_weight_blocks_ue8m0,
                       swap_last_two)
from .upstream import TensorTracker, ht_sizes, ll_dispatch_tokens, moe_phase, route_gate_out

FP8 = paddle.float8_e4m3fn
WEIGHTS = ("up_gate_proj", "down_proj")
RECIPE = "w8a8"                 # group_gemm_masked's tenth argument since #7374 (develop)
_ID_DTYPES = (paddle.int32, paddle.int64)


def _new_param(layer, shape, dtype, fill: float, attrs: dict | None = None):
    param = layer.create_parameter(shape=list(shape), dtype=dtype,
                                   default_initializer=paddle.nn.initializer.Constant(fill))
    param.stop_gradient = True
    for key, value in (attrs or {}).items():      # upstream's set_weight_attrs
        setattr(param, key, value)
    return param


def _add(out: paddle.Tensor, extra: paddle.Tensor) -> paddle.Tensor:
    """out + extra (the shared experts' output, upstream's `tmp_ffn_out += s_x`) in out's dtype: the sum is formed in
    float32 and rounded once, what a bf16 add does on the GPU (Paddle's CPU has no bf16 add kernel)."""
    return (out.astype(paddle.float32) + extra.astype(paddle.float32)).astype(out.dtype)


def expected_rows_per_expert(routed_rows: int, num_local_experts: int, m: int) -> int:
    """The GEMMs' expected_m: ceil(T·K_top / E) clipped to [1, M], routed_rows = T·K_top of this rank's T tokens,
    E local experts. With EP each rank sends T·K_top rows over R·E experts and each expert receives from R ranks,
    so the value holds for balanced routing too. An estimate from host integers (no synchronization, graph-safe):
    the kernels tune their tiles for it; their result does not depend on it."""
    return max(1, min(int(m), -(-int(routed_rows) // max(1, int(num_local_experts)))))


def _is_sf_bytes(t) -> bool:
    return isinstance(t, paddle.Tensor) and t.dtype == paddle.uint8


# ---------------------------------------------------------------------- the method

class BlackwellGemmFusedMoeMethod:
    """Fused MoE on FP8 e4m3 weights with 128x128 UE8M0 block scales and 1x128 UE8M0 activations.

    Checkpoint parameters (`create_weights`, upstream develop BW:294-437; X = up_gate_proj with N = 2I, K = H, or
    down_proj with N = H, K = I):
    - BF16 checkpoint: X_weight [E, K, N] bf16 (up_gate_proj_weight [E, H, 2I], down_proj_weight [E, I, H]) with
      `tensor_track` (`backend.moe.upstream.TensorTracker`) and the `extra_weight_attrs` (weight_loader, ...).
    - FP8 checkpoint: X_weight [E, K, N] fp8 and X_weight_scale_inv [E, ceil(K/128), ceil(N/128)] float32 128x128
      block scales (the checkpoint's `weight_scale_inv`, in the same load orientation). Upstream sizes this
      scale uint8 [E, N, ceil(K/32)] and never converts it, and its FP8 branch raises UnboundLocalError
      (docs/upstream.md §4): the FP32 blocks are what FP8 checkpoints hold.

    After `process_weights_after_loading` (KB = ceil(K/128), C = ceil(KB/4); no attribute is ever None, SPEC §13):

    | attribute | shape, dtype | for | bytes per expert |
    |---|---|---|---|
    | X_weight | [E, N, K] fp8 | group_gemm_masked `b` | N·K |
    | X_weight_scale_inv | [E, align(N,128), 16·C] uint8, CUTLASS SF bytes | group_gemm_masked `sfb` (upstream's name) | align(N,128)·16·C |
    | X_weight_scale_fp32 | [E, ceil(N/128), KB] fp32, powers of two | DeepGEMM-style fallbacks, inspection | 4·ceil(N/128)·KB |
    | X_weight_scale_ue8m0 | [E, N, C] int32, per-row packed UE8M0 (contiguous) | DeepGEMM on SM100 | 4·N·C |

    The FP32 scales pair with the FP8 weights as they are now (after any requantization). Upstream #7053 set its
    int32 scales to None after making the bytes and develop overwrites `X_weight_scale_inv` with the bytes, so a
    fallback path crashed or misread (SPEC §13). Memory next to the FP8 weights: CUTLASS bytes about 3.1 %,
    packed rows 0.8 %, FP32 blocks 0.02 % (DeepSeek-V3, H = 7168, I = 2048: 1.7 MB per expert next to 44 MB).

    FP8 checkpoints are dequantized (q · s in float32) and requantized to UE8M0 at load, as engines running such
    checkpoints on SM100 do: up to one bit of mantissa per block where s was not a power of two.

    1x32 (`quant_config.quant_group_size = 32`, FastDeploy #7666, open; BF16 checkpoints only): weights and
    activations in 1x32 UE8M0 groups through `group_wise_quant`; X_weight_scale_inv is then the swizzled uint8
    [E, N, ceil(K/32)] (upstream's create_weights shape), X_weight_scale_fp32 their values [E, N, ceil(K/32)]
    float32 row-major, and there is no X_weight_scale_ue8m0. The tp and ht paths run it with develop's fused ops
    (ht through `prefill_permute_to_blackwell_masked_gemm`, #7666's unfused branch: its fused one lives in a DeepEP
    fork that is not public); ll raises NotImplementedError for the same reason.

    Check modes (`checks`, README "Failure modes"): "eager" (the default) raises a routing error (an expert id out
    of range, a token repeating an expert, an expert receiving more than M rows) inside `apply`, each check costing
    one host synchronization. "deferred" (or FD_MOE_DEFERRED_CHECKS=1 when `checks` is not given) reads nothing
    back: those errors are recorded in `self.device_errors` (int64 [5], `backend.ops.device_errors`) on the
    device, the offending rows are dropped (bad ids and rows past M neither written nor combined; every valid row
    bit-equal to eager), and `raise_deferred_errors()` (e.g. after the step or after a CUDA-graph replay) raises
    the first one with eager mode's message. The contract's value checks of the chain's own intermediates
    (finite x and GEMM-1 output, counts, scale bytes, combine map) are skipped in deferred mode; a non-finite
    value then shows as NaN / inf in the output instead of a ValueError. Deferred needs the triton or paddle
    provider (the compiled permutes cannot record: NotImplementedError).
    """

    QUANT_GROUP_SIZES = (GROUP_SIZE, SF_VEC_SIZE)     # 1x128 (#7053, develop) and 1x32 (#7666, tp and ht)
    CHECK_MODES = ("eager", "deferred")

    def __init__(self, quant_config, checks: str | None = None) -> None:
        self.quant_config = quant_config
        if checks is None:
            checks = "deferred" if envs.use_deferred_checks() else "eager"
        if checks not in self.CHECK_MODES:
            raise ValueError(f"checks: expected one of {', '.join(self.CHECK_MODES)} (or None: "
                             f"FD_MOE_DEFERRED_CHECKS), got {checks!r}")
        self.checks = checks
        self.device_errors: paddle.Tensor | None = None    # the deferred record, made on the first deferred apply
        self.last_provider_name: str | None = None
        self.last_path: str | None = None
        self.model_format: str | None = None
        self.ep_prefill_runner = None     # upstream's names (init_ep); a `runner=` argument overrides them
        self.ep_decoder_runner = None
        self.added_weight_attrs = [f"{w}_weight" for w in WEIGHTS]                  # upstream BASE:47
        self.added_scale_attrs = [f"{w}_weight_scale_inv" for w in WEIGHTS]         # upstream BW:443
        # weight scales in the loading provider's own layout (OpsProvider.prepare_weight_scales), made once at
        # load: {weight: (provider name, prepared)}; another provider at forward time gets None (it converts itself)
        self._prepared_scales: dict = {}

    @property
    def group_size(self) -> int:
        """128 (1x128 activations, 128x128 weight blocks) or 32 (#7666's 1x32 groups for both): the config's
        quant_group_size (#7666 sets layer.quant_group_size = 32 instead, MOE f0ea6f80:271-274)."""
        return getattr(self.quant_config, "quant_group_size", GROUP_SIZE)

    @property
    def checkpoint_tensor_names(self) -> tuple[str, ...]:
        """The tensors `FusedMoE.load_weights` takes for this checkpoint kind ([E, N, K] orientation)."""
        names = ("up_gate_proj_weight", "down_proj_weight")
        if self.quant_config.is_checkpoint_bf16:
            return names
        return names + ("up_gate_proj_weight_scale", "down_proj_weight_scale")

    def init_ep(self, layer, prefill_runner=None, decode_runner=None) -> None:
        """Upstream's FusedMoE calls `init_ep(layer)` when ep_size > 1 (MOE:289) to build its DeepEP runners;
        here the runners are given (backend.moe.ep_runner / ep_distributed), now or later as attributes."""
        self.ep_prefill_runner = prefill_runner
        self.ep_decoder_runner = decode_runner

    # ------------------------------------------------------------------ weights

    @staticmethod
    def _shapes(layer) -> dict[str, tuple[int, int]]:
        """(N, K) of each weight as the GEMM reads it."""
        h, i = layer.hidden_size, layer.moe_intermediate_size
        return {"up_gate_proj": (2 * i, h), "down_proj": (h, i)}

    @staticmethod
    def _set_param(layer, name: str, value: paddle.Tensor) -> None:
        param = _new_param(layer, value.shape, value.dtype, 0)
        param.set_value(value)
        setattr(layer, name, param)

    def create_weights(self, layer, **extra_weight_attrs) -> None:
        """Allocate the checkpoint parameters on `layer` (class docstring), zeros (scales ones). Upstream's
        FusedMoE passes weight_loader, model_format, num_experts, hidden_size, moe_intermediate_size (MOE:294-301):
        every one is set on the parameters, as upstream's set_weight_attrs does. model_format "torch" (upstream
        transposes such parameters before quantizing, BW:502-506) is a NotImplementedError."""
        self.model_format = extra_weight_attrs.get("model_format")
        if self.model_format not in (None, "paddle"):
            raise NotImplementedError(f"model_format: expected 'paddle' or None, got {self.model_format!r} (the "
                                      f"transpose upstream applies to torch-format checkpoints is not rebuilt here)")
        e, bf16 = layer.num_local_experts, self.quant_config.is_checkpoint_bf16
        for w, (n, k) in self._shapes(layer).items():
            attrs = dict(extra_weight_attrs)
            if bf16:
                attrs["tensor_track"] = TensorTracker([e, k, n], output_dim=w == "up_gate_proj")
            dtype = getattr(layer, "weight_dtype", paddle.bfloat16) if bf16 else FP8
            setattr(layer, f"{w}_weight", _new_param(layer, [e, k, n], dtype, 0, attrs))
            if not bf16:
                setattr(layer, f"{w}_weight_scale_inv", _new_param(
                    layer, [e, num_scale_groups(k), num_scale_groups(n)], paddle.float32, 1.0, extra_weight_attrs))

    def processed_weights(self, layer) -> tuple[str, ...]:
        """The weights ("up_gate_proj", "down_proj") already converted: their X_weight_scale_inv holds SF bytes."""
        return tuple(w for w in WEIGHTS if _is_sf_bytes(getattr(layer, f"{w}_weight_scale_inv", None)))

    def weights_ready(self, layer) -> bool:
        """True once both weights are converted (the forward needs both)."""
        return len(self.processed_weights(layer)) == len(WEIGHTS)

    @staticmethod
    def _fully_loaded(layer, w: str) -> bool:
        """A parameter without a tracker (FP8 checkpoints, loaded whole) counts as loaded; a BF16 one when its
        tracker is complete (upstream's weight_fully_copied)."""
        track = getattr(getattr(layer, f"{w}_weight"), "tensor_track", None)
        return track is None or track.is_fully_copied()

    def process_weights_after_loading(self, layer) -> None:
        """Convert every weight that is fully loaded and not converted yet; nothing else (idempotent).

        Upstream calls this after each BF16 parameter is complete (utils.py:160-196: gate-up first, then down;
        develop tells them apart by `weight_fully_copied(layer.up_gate_proj_weight)`, BW:496-501) and once more at
        the end for FP8 checkpoints (utils.py:247-272); our FusedMoE.load_weights calls it once for both. A weight:
        quantize (BF16) or requantize (FP8) to UE8M0 128x128 blocks, then the per-row packed scales and the CUTLASS
        bytes (`unpack_and_convert_scale(scale, None)`, develop BW:456-468). All or nothing per call: every weight
        of the call is converted before the first attribute is replaced, so an error leaves the layer as it was.
        Then the provider's own weight-scale layout, if it has one (`OpsProvider.prepare_weight_scales`, deep_gemm),
        is made once and handed to each GEMM as sfb_prepared."""
        todo = [w for w in WEIGHTS if w not in self.processed_weights(layer) and self._fully_loaded(layer, w)]
        if not todo:
            return
        provider = ops.get_provider()
        new = {}
        for w in todo:
            new.update(self._convert_1x32(provider, layer, w) if self.group_size == SF_VEC_SIZE
                       else self._convert_128(provider, layer, w))
        for name, value in new.items():
            self._set_param(layer, name, value)
        # 1x128: weights are quantized in 128x128 blocks and each block's byte copied to its 128 rows, so the
        # CUTLASS weight bytes hold one byte per block (group_gemm_masked's sfb_per_block); 1x32 bytes do not.
        layer.weight_scale_bw_per_block = self.group_size == GROUP_SIZE
        for w in todo:
            self._prepared_scales[w] = (provider.name, provider.prepare_weight_scales(
                getattr(layer, f"{w}_weight"), getattr(layer, f"{w}_weight_scale_inv"),
                sfb_per_block=layer.weight_scale_bw_per_block))

    def _convert_128(self, provider, layer, w: str) -> dict:
        """128x128 UE8M0 blocks (#7053, develop): the four attributes of the class docstring."""
        n = self._shapes(layer)[w][0]
        q_all, s_all = self._requantize(layer, w)
        packed = pack_row_scales_ue8m0(s_all, n)
        return {f"{w}_weight": q_all, f"{w}_weight_scale_fp32": s_all, f"{w}_weight_scale_ue8m0": packed,
                f"{w}_weight_scale_inv": provider.unpack_and_convert_scale(packed, None)}

    @staticmethod
    def _convert_1x32(provider, layer, w: str) -> dict:
        """#7666 (BW f0ea6f80:450-461): `group_wise_quant(w, False, True)` of the BF16 weight [E, N, K] -> fp8 and
        the swizzled 1x32 UE8M0 bytes [E, N, ceil(K/32)] (X_weight_scale_inv, what the GEMM reads), plus their
        float32 values row-major (X_weight_scale_fp32, 2^(byte - 127)). No per-row 1x128 words (nothing reads them)."""
        try:
            q, sf = provider.group_wise_quant(swap_last_two(getattr(layer, f"{w}_weight")), False, True)
        except ValueError as err:
            raise ValueError(f"{w}_weight: {err}") from None
        return {f"{w}_weight": q, f"{w}_weight_scale_inv": sf, f"{w}_weight_scale_fp32": ue8m0_decode(unswizzle(sf))}

    def _ckpt_scale_nk(self, layer, w: str):
        """The FP8 checkpoint's block scales as [E, ceil(N/128), ceil(K/128)] float32 (checked finite, > 0), or None
        for a BF16 checkpoint. Errors call them `w`_weight_scale, the [N, K]-oriented name FusedMoE.load_weights
        takes."""
        if self.quant_config.is_checkpoint_bf16:
            return None
        scale = swap_last_two(getattr(layer, f"{w}_weight_scale_inv"))
        s_np = scale.numpy()
        if not (np.isfinite(s_np).all() and (s_np > 0).all()):
            at = tuple(int(j) for j in np.argwhere(~(np.isfinite(s_np) & (s_np > 0)))[0])
            raise ValueError(f"{w}_weight_scale: expected finite scales > 0, got {float(s_np[at])} at index {at}")
        return scale

    def _requantize(self, layer, w: str):
        """The checkpoint's `w`_weight [E, K, N] (and scales) -> (q [E, N, K] fp8, s [E, ceil(N/128), ceil(K/128)]
        float32 UE8M0), expert by expert; writes nothing. Errors name the tensor and the expert."""
        weight = getattr(layer, f"{w}_weight")
        ckpt_scale = self._ckpt_scale_nk(layer, w)
        q_list, s_list = [], []
        for ex in range(layer.num_local_experts):
            w_nk = swap_last_two(weight[ex:ex + 1])[0]
            if ckpt_scale is None:
                wf = w_nk.astype(paddle.float32)
            else:
                try:
                    wf = dequantize_weight_blocks(w_nk, ckpt_scale[ex])
                except ValueError as err:
                    raise ValueError(f"{w}_weight_scale: expert {ex}: {err}") from None
            try:
                q, s = quantize_weight_blocks_ue8m0(wf)
            except ValueError as err:
                raise ValueError(f"{w}_weight: expert {ex}: {err}") from None
            q_list.append(q.view(paddle.uint8))
            s_list.append(s)
        return paddle.stack(q_list).view(FP8), paddle.stack(s_list)

    def process_prequanted_weights(self, layer, state_dict, is_rearrange: bool = False) -> None:
        """FP8 checkpoint, upstream's v0 loader (develop BW:539-611, called from MOE:701): per expert e of this rank
        (layer.expert_id_offset ..), state_dict[key.format(e)] with the keys of `layer.weight_key_map`
        ("up_gate_proj_expert_weight_key", "down_proj_expert_weight_key", and the two "..._weight_scale_key"):
        weights [K, N] fp8 (or int8 bytes), scales [ceil(K/128), ceil(N/128)] float32. Found keys are popped, as
        upstream does. Then the conversion of `process_weights_after_loading`, which upstream never runs here."""
        if self.quant_config.is_checkpoint_bf16:
            raise ValueError("process_prequanted_weights: loads FP8 checkpoints, but quant_config.is_checkpoint_bf16 "
                             "is True")
        if is_rearrange:
            raise NotImplementedError("is_rearrange: redundant-expert rearrangement is not rebuilt here, got True")
        state = state_dict if isinstance(state_dict, dict) else dict(state_dict)
        experts = range(layer.expert_id_offset, layer.expert_id_offset + layer.num_local_experts)
        loaded = {}
        for w in WEIGHTS:
            for suffix, name in (("weight", f"{w}_weight"), ("weight_scale", f"{w}_weight_scale_inv")):
                key = layer.weight_key_map[f"{w}_expert_{suffix}_key"]
                tensors = [state.pop(key.format(e)) for e in experts]
                param = getattr(layer, name)
                stacked = (paddle.stack([t.view(paddle.uint8) for t in tensors]).view(FP8) if param.dtype == FP8
                           else paddle.stack(tensors).astype(param.dtype))
                if list(stacked.shape) != list(param.shape):
                    raise ValueError(f"{key}: expected per-expert shape {list(param.shape)[1:]}, got "
                                     f"{list(stacked.shape)[1:]}")
                loaded[name] = stacked
        for name, value in loaded.items():
            getattr(layer, name).set_value(value)
        self.process_weights_after_loading(layer)

    # ------------------------------------------------------------------ forward: upstream's entry points

    def apply(self, layer, x, gate, topk_ids_hookfunc=None, shared_experts=None, fc1_latent_proj=None,
              fc2_latent_proj=None, *, runner=None):
        """Upstream's `MoEMethodBase.apply` (develop BASE:220-254, arguments as FusedMoE.forward passes them,
        positionally): EP prefill -> `apply_ep_prefill` ("ht"), EP decode -> `apply_ep_decode` ("ll"), else
        `apply_tp`. x [T, H] bf16; gate: upstream's gate layer (gate(x) -> logits [T, num_experts]), or ours:
        gate_out [T, num_experts] float, or (topk_weights [T, K_top] float32, topk_ids [T, K_top] int64 global ids
        or -1). runner (ours, keyword-only): the EP runner, else self.ep_prefill_runner / self.ep_decoder_runner;
        none at all means TP (ep_size 1). -> [T, H] bf16: Σ_k w · Down(SwiGLU(Up(x))) over the token's experts on
        all ranks (SPEC §11), plus shared_experts(x). Upstream's apply drops shared_experts on TP; ours adds it."""
        path, runner = self._path(layer, runner)
        if path == "tp":
            out = self.apply_tp(layer, x, gate, topk_ids_hookfunc, fc1_latent_proj, fc2_latent_proj)
            return out if shared_experts is None else _add(out, shared_experts(x))
        entry = self.apply_ep_prefill if path == "ht" else self.apply_ep_decode
        return entry(layer, x, gate, topk_ids_hookfunc, shared_experts, fc1_latent_proj, fc2_latent_proj,
                     runner=runner)

    def apply_ep_prefill(self, layer, x, gate, topk_ids_hookfunc=None, shared_experts=None, fc1_latent_proj=None,
                         fc2_latent_proj=None, *, runner=None):
        """The ht path (develop BW:613-951; upstream's own signature stops at shared_experts, so develop's
        MoEMethodBase.apply, which passes seven arguments, raises TypeError there: docs/upstream.md §4)."""
        self._need_phase(layer, "prefill", "apply_ep_prefill")
        runner = self._checked_runner(layer, runner or self.ep_prefill_runner, "ep_prefill_runner")
        return self._forward(layer, x, gate, topk_ids_hookfunc, shared_experts, fc1_latent_proj, fc2_latent_proj,
                             "ht", runner)

    def apply_ep_decode(self, layer, x, gate, topk_ids_hookfunc=None, shared_experts=None, fc1_latent_proj=None,
                        fc2_latent_proj=None, *, runner=None):
        """The ll path (develop BW:953-1038)."""
        self._need_phase(layer, "decode", "apply_ep_decode")
        runner = self._checked_runner(layer, runner or self.ep_decoder_runner, "ep_decoder_runner")
        return self._forward(layer, x, gate, topk_ids_hookfunc, shared_experts, fc1_latent_proj, fc2_latent_proj,
                             "ll", runner)

    def apply_tp(self, layer, x, gate, topk_ids_hookfunc=None, fc1_latent_proj=None, fc2_latent_proj=None):
        """The TP path (ep_size 1; develop BW:1040-1170 runs DeepGEMM contiguous there, ours the masked chain)."""
        if layer.ep_size != 1:
            raise ValueError(f"layer: ep_size = {layer.ep_size}, apply_tp needs 1 (use apply with an EP runner)")
        return self._forward(layer, x, gate, topk_ids_hookfunc, None, fc1_latent_proj, fc2_latent_proj, "tp", None)

    # ------------------------------------------------------------------ forward: checks

    @staticmethod
    def _need_phase(layer, phase: str, entry: str) -> None:
        seen = moe_phase(layer)
        if seen != phase:
            raise ValueError(f"layer: moe_phase is {seen!r}, {entry} needs {phase!r}")

    @staticmethod
    def _checked_runner(layer, runner, attr: str):
        if runner is None:
            raise ValueError(f"runner: the EP path needs an EP runner (backend.moe.ep_runner): pass runner= or set "
                             f"method.{attr} (init_ep), got None")
        for name in ("ep_size", "ep_rank", "num_experts"):
            if getattr(runner, name, None) != getattr(layer, name):
                raise ValueError(f"runner: {name} = {getattr(runner, name, None)} does not match the layer's "
                                 f"{name} = {getattr(layer, name)}")
        return runner

    def _path(self, layer, runner):
        """-> (path, runner): "tp" without any runner (ep_size must be 1), else "ht" / "ll" by the phase."""
        if runner is None:
            runner = self.ep_prefill_runner if moe_phase(layer) == "prefill" else self.ep_decoder_runner
        if runner is None:
            if layer.ep_size != 1:
                raise ValueError(f"runner: ep_size = {layer.ep_size} needs an EP runner "
                                 f"(backend.moe.ep_runner), got None")
            return "tp", None
        return ("ht" if moe_phase(layer) == "prefill" else "ll"), runner

    def _check_routing(self, layer, x, gate):
        """-> (topk_weights [T, K_top] float32, topk_ids [T, K_top] int64 global ids, checked)."""
        t = int(x.shape[0])
        if isinstance(gate, paddle.Tensor):
            check_dim(gate, 0, t, "gate_out", "T (rows of x)")
            return route_gate_out(layer, gate, "gate_out")
        if callable(gate):
            return route_gate_out(layer, gate(x).astype(paddle.float32), "gate(x)")
        if not isinstance(gate, (tuple, list)) or len(gate) != 2:
            raise TypeError(f"gate (routing): expected a gate layer, gate_out [T, num_experts] or (topk_weights, "
                            f"topk_ids), got {type(gate).__name__}")
        topk_weights, topk_ids = gate
        check_tensor(topk_weights, "topk_weights", dtypes=(paddle.float32,), ndim=2)
        check_tensor(topk_ids, "topk_ids", dtypes=_ID_DTYPES, ndim=2)
        check_dim(topk_ids, 0, t, "topk_ids", "T (rows of x)")
        check_dim(topk_ids, 1, layer.top_k, "topk_ids", "K_top (layer.top_k)")
        check_same_shape(topk_weights, "topk_weights", topk_ids, "topk_ids")
        if self.checks == "deferred":
            return topk_weights, self._record_routing(layer, topk_ids)
        ids = check_ids_in_range(topk_ids, "topk_ids", layer.num_experts, "global expert ids",
                                 f"num_experts = {layer.num_experts}")
        check_distinct_experts(ids, "topk_ids")
        return topk_weights, ids

    def _record_routing(self, layer, topk_ids):
        """Deferred form of the routing checks above: record the first bad global id, then the first repeat, on
        the device; ids outside [-1, num_experts) become -1 (dropped) -> int64 ids."""
        errors = self._error_record(topk_ids.place)
        device_errors.record_bad_ids(errors, topk_ids, layer.num_experts, device_errors.BAD_GLOBAL_ID)
        device_errors.record_repeats(errors, topk_ids)
        ids = topk_ids.astype(paddle.int64)
        bad = paddle.logical_or(ids < -1, ids >= layer.num_experts)
        return paddle.where(bad, paddle.full_like(ids, -1), ids)

    def _error_record(self, place):
        """The deferred record (made once, on the place of the first deferred forward); None in eager mode."""
        if self.checks != "deferred":
            return None
        if self.device_errors is None:
            self.device_errors = device_errors.new_record(place)
        return self.device_errors

    def raise_deferred_errors(self, layer=None) -> None:
        """Deferred mode: raise the first routing error recorded since the last call (eager mode's ValueError and
        message), clearing the record; one host synchronization. Nothing recorded (or eager mode): returns.
        `layer` is accepted for upstream-style calls (`method.raise_deferred_errors(layer)`), not needed."""
        if self.device_errors is not None:
            device_errors.raise_recorded(self.device_errors)

    def _forward(self, layer, x, gate, topk_ids_hookfunc, shared_experts, fc1_latent_proj, fc2_latent_proj, path,
                 runner):
        """Routing (on x), the hook, fc1 / fc2 latent projections around the experts (as upstream's DeepGEMM method,
        fused_moe_deepgemm_backend.py:358, 658), the path, shared experts added last."""
        if not self.weights_ready(layer):
            raise RuntimeError("apply: call process_weights_after_loading (FusedMoE.load_weights) first; converted "
                               f"so far: {list(self.processed_weights(layer))}")
        check_tensor(x, "x", dtypes=(paddle.bfloat16,), ndim=2)
        topk_weights, topk_ids = self._check_routing(layer, x, gate)
        if topk_ids_hookfunc is not None:
            topk_ids_hookfunc(topk_ids=topk_ids)
        h_in = x if fc1_latent_proj is None else fc1_latent_proj(x)
        check_dim(h_in, 1, layer.hidden_size, "x", "H (layer.hidden_size)")
        provider = ops.get_provider()
        gen = ops.ops_generation()      # "7053" | "develop": which chain (module docstring)
        self._check_recipe(path, gen)
        self.last_provider_name, self.last_path = provider.name, path
        with device_errors.deferred() if self.checks == "deferred" else contextlib.nullcontext():
            if path == "ht":
                out = self._apply_ht(provider, gen, layer, h_in, topk_weights, topk_ids, runner)
            elif path == "ll":
                out = self._apply_ll(provider, gen, layer, h_in, topk_weights, topk_ids, runner)
            else:
                out = self._apply_tp(provider, gen, layer, h_in, topk_weights, topk_ids)
        if fc2_latent_proj is not None:
            out = fc2_latent_proj(out)
        return out if shared_experts is None else _add(out, shared_experts(x))

    def _check_recipe(self, path: str, gen: str) -> None:
        if self.group_size != SF_VEC_SIZE:
            return
        if path == "ll":
            raise NotImplementedError("quant_group_size: 32 on the ll path needs #7666's DeepEP low-latency dispatch "
                                      "with 1x32 groups (not public); tp and ht run 1x32")
        if gen != "develop":
            raise RuntimeError(f"quant_group_size: 32 needs the fused Blackwell permute and SwiGLU (develop or "
                               f"later), but the ops serve generation {gen}")

    # ------------------------------------------------------------------ forward: the three paths

    def _apply_tp(self, provider, gen, layer, x, topk_weights, topk_ids):
        t = int(x.shape[0])
        if t == 0:
            return paddle.zeros([0, layer.hidden_size], dtype=paddle.bfloat16)
        x_q, x_scale = quantize_tokens(provider, x, True, self.group_size)
        m = t               # no dispatch: an expert sees at most every token once
        a, sfa, indice_map, counts = self._permute(provider, gen, x_q, x_scale, topk_ids, layer.num_local_experts, m,
                                                   self._error_record(x.place))
        ffn_out = self._experts(provider, gen, layer, a, sfa, counts, m, t * int(topk_ids.shape[1]))
        return provider.depermute_prefill_combine(ffn_out, indice_map, topk_weights, t)

    def _apply_ht(self, provider, gen, layer, x, topk_weights, topk_ids, runner):
        t = int(x.shape[0])
        max_tokens_per_rank, m, w = ht_sizes(layer, runner)
        if t > max_tokens_per_rank:
            raise ValueError(f"x: {t} tokens on rank {layer.ep_rank}, more than max_tokens_per_rank = "
                             f"{max_tokens_per_rank}")
        x_q, x_scale = quantize_tokens(provider, x, True, self.group_size)
        d = runner.dispatch(x_q, x_scale, topk_ids, topk_weights, w)
        a, sfa, indice_map, counts = self._permute(provider, gen, d.recv_x, d.recv_x_scale, d.recv_topk_ids,
                                                   layer.num_local_experts, m, self._error_record(x.place))
        ffn_out = self._experts(provider, gen, layer, a, sfa, counts, m, t * int(topk_ids.shape[1]))
        # all W rows go to the combine, padding rows included (develop BW:799-804; DeepEP checks the row count)
        partial = provider.depermute_prefill_combine(ffn_out, indice_map, d.recv_topk_weights, w)
        return runner.combine(partial, d.handle)

    def _apply_ll(self, provider, gen, layer, x, topk_weights, topk_ids, runner):
        n = ll_dispatch_tokens(layer)
        e, m = layer.num_local_experts, layer.ep_size * n
        recv_x, recv_scale, recv_count, handle = runner.low_latency_dispatch(x, topk_ids, n, True, True)
        sfa = provider.unpack_and_convert_scale(recv_scale, recv_count)                     # develop BW:998
        ffn_out = self._experts(provider, gen, layer, recv_x.reshape([e * m, layer.hidden_size]), sfa, recv_count, m,
                                int(x.shape[0]) * int(topk_ids.shape[1]))
        return runner.low_latency_combine(ffn_out, topk_ids, topk_weights, handle)

    @staticmethod
    def _permute(provider, gen, x_q, x_scale, topk_ids, e, m, errors):
        """-> (a [E·M, H] fp8, sfa uint8 CUTLASS SF, indice_map [W, K_top] int32, counts [E, 1] int32).
        errors: the deferred record (routing errors recorded there, no host read) or None (eager: the call has
        upstream's arguments only, so a wrapped or upstream-shaped provider sees what it always saw)."""
        deferred = {} if errors is None else {"errors": errors}
        if gen == "develop":
            return provider.prefill_permute_to_blackwell_masked_gemm(x_q, x_scale, topk_ids, e, m,
                                                                     **deferred)  # BW:99
        permute_x, permute_scale, indice_map, counts = provider.prefill_permute_to_masked_gemm(
            x_q, x_scale, topk_ids, e, m, **deferred)                                         # #7053 BW:91
        sfa = provider.unpack_and_convert_scale(permute_scale, counts)                        # #7053 BW:534
        return permute_x.reshape([e * m, int(x_q.shape[1])]), sfa, indice_map, counts

    def _swiglu(self, provider, gen, up, counts, e, m, i):
        """up [E·M, 2I] bf16 -> (act [E·M, I] fp8, sfa uint8 CUTLASS SF)."""
        if gen == "develop":                                                                  # BW:769, 1012
            return provider.fused_mask_swiglu_fp8_quant_blackwell(up, counts, group_size=self.group_size)
        act, act_scale = provider.fused_mask_swiglu_fp8_quant(up.reshape([e, m, 2 * i]), counts, GROUP_SIZE, True)
        return act.reshape([e * m, i]), provider.unpack_and_convert_scale(act_scale, counts)  # #7053 BW:557-578

    def _experts(self, provider, gen, layer, a, sfa, counts, m, routed_rows):
        """a [E·M, H] fp8, sfa its CUTLASS SF bytes, counts [E] | [E, 1] int32, routed_rows = T·K_top of this rank
        (the GEMMs' expected_m comes from it) -> ffn_out [E, M, H] bf16, valid rows only (rows >= counts[e] are
        whatever the buffer held)."""
        e, h, i = layer.num_local_experts, layer.hidden_size, layer.moe_intermediate_size
        recipe = RECIPE if gen == "develop" else None
        prepared = {w: p for w, (name, p) in self._prepared_scales.items() if name == provider.name}
        # what the method knows of the bytes, stated so the GEMM need not look (no pass, no synchronization):
        # 1x128 activations go through unpack_and_convert_scale or the fused ops with 128-wide groups, one byte
        # repeated per 128-K group; 1x32 ones (#7666) differ inside a group. The rows hint is an estimate.
        hints = dict(sfb_per_block=layer.weight_scale_bw_per_block, sfa_per_group=self.group_size == GROUP_SIZE,
                     expected_m=expected_rows_per_expert(routed_rows, e, m))
        up = paddle.empty([e * m, 2 * i], dtype=paddle.bfloat16)
        provider.group_gemm_masked(a, layer.up_gate_proj_weight, sfa, layer.up_gate_proj_weight_scale_inv, counts,
                                   up, None, m, -1, recipe, sfb_prepared=prepared.get("up_gate_proj"), **hints)
        try:
            act, act_sf = self._swiglu(provider, gen, up, counts, e, m, i)
        except ValueError as err:      # name the intermediate: x may be finite while its GEMM 1 overflows
            raise ValueError(f"GEMM 1 output (up = x · up_gate_proj_weightᵀ, [E, M, 2I]): {err}") from None
        # GEMM 2 reads act, not up: when H == 2I its output can reuse up's storage (as upstream does)
        down = up if h == 2 * i else paddle.empty([e * m, h], dtype=paddle.bfloat16)
        provider.group_gemm_masked(act, layer.down_proj_weight, act_sf, layer.down_proj_weight_scale_inv, counts,
                                   down, None, m, -1, recipe, sfb_prepared=prepared.get("down_proj"), **hints)
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
